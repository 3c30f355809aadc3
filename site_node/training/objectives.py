"""The trainer's loss for a study's twin kind: the kind's per-patient loss and output gradient, bound to its spec."""

from __future__ import annotations

from functools import partial

from federation.twins import kind_of
from federation.twins.risk import RiskKind
from site_node.training.ghost import BINARY, Objective


def objective_of(model_spec) -> Objective:
    """The objective of the study's `model` section (the risk kinds share the binary one)."""
    kind = kind_of(model_spec)
    if isinstance(kind, RiskKind):
        return BINARY
    return Objective(partial(kind.loss, model_spec), partial(kind.output_gradient, model_spec))
