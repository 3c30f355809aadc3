"""The synthetic hospital consortium: the stand-in for real EHRs in tests, benchmarks and the demo.

Front door: `generate_consortium(config, out_dir)` writes, per hospital, a FHIR R4 Bulk Data export
(`<out>/<site>/fhir/*.ndjson` + `manifest.json`) and, apart from it, a ground-truth file
(`<out>/ground-truth/<site>.json`) that no real hospital could have. See docs/synthetic-data.md.
"""

from synthetic.config import SiteProfile, SynthConfig, load_profiles
from synthetic.consortium import ConsortiumResult, generate_consortium

__all__ = ["ConsortiumResult", "SiteProfile", "SynthConfig", "generate_consortium", "load_profiles"]
