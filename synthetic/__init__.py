"""The synthetic hospital consortium: the stand-in for real EHRs in tests, benchmarks and the demo.

Front door: `generate_consortium(config, out_dir)` writes, per hospital, a FHIR R4 Bulk Data export
(`<out>/<site>/fhir/*.ndjson` + `manifest.json`) and, apart from it, a ground-truth file
(`<out>/ground-truth/<site>.json`) that no real hospital could have. See docs/synthetic-data.md.

The names are loaded on first use (PEP 562): every `twinfed` command imports the `synth` command's module,
and a cold patient-twin query must not pay for the generator.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from synthetic.config import SiteProfile, SynthConfig, load_profiles
    from synthetic.consortium import ConsortiumResult, generate_consortium

_WHERE = {
    "SiteProfile": "config",
    "SynthConfig": "config",
    "load_profiles": "config",
    "ConsortiumResult": "consortium",
    "generate_consortium": "consortium",
}

__all__ = ["ConsortiumResult", "SiteProfile", "SynthConfig", "generate_consortium", "load_profiles"]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"synthetic.{_WHERE[name]}"), name)
