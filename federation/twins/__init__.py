"""Twin kinds behind one registry: a study names a `model.kind`, and every site and the coordinator get the
same kind from `kind_of`, which builds the same architecture (so weights can be averaged), trains with its
loss, releases and pools its evaluation, and writes its part of the model card (federation.twins.kind).

A new kind is a new module here that subclasses `TwinKind`, registers itself, and is listed in
registry.KIND_MODULES; its spec goes into federation.contract.twin_specs. tests/test_twin_kinds.py runs every
registered kind through a DP round, an evaluation, pooling and a model card.

The names are loaded on first use (PEP 562), and the kinds when the registry is first asked: what needs
only a torch-free part of a kind (trajectory_rows, for the cohort build and a cold patient-twin query)
imports it without paying for torch and Flower.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from federation.twins.kind import ExactEvaluation, TwinKind
    from federation.twins.models import build_model, parameter_count
    from federation.twins.registry import KINDS, kind_of

_WHERE = {
    "KINDS": "registry",
    "kind_of": "registry",
    "ExactEvaluation": "kind",
    "TwinKind": "kind",
    "build_model": "models",
    "parameter_count": "models",
}

__all__ = ["KINDS", "ExactEvaluation", "TwinKind", "build_model", "kind_of", "parameter_count"]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name == "KINDS":
        from federation.twins.registry import load_kinds

        load_kinds()
    return getattr(import_module(f"federation.twins.{_WHERE[name]}"), name)
