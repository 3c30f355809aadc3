"""The trainer's loss for a study's twin kind: the kind's per-patient loss and output gradient, bound to its spec."""

from __future__ import annotations

from functools import partial

from federation.contract.twin_specs import BINARY as BINARY_TARGET
from federation.twins import kind_of
from federation.twins.risk import RiskKind
from site_node.training.ghost import BINARY, Objective


def objective_of(model_spec) -> Objective:
    """The objective of the study's `model` section (the risk kinds share the binary one)."""
    kind = kind_of(model_spec)
    if isinstance(kind, RiskKind) and kind.targets == BINARY_TARGET:  # not the trajectory kind's event part
        return BINARY
    gradient = partial(kind.output_gradient, model_spec) if kind.closed_form_gradient else None
    return Objective(partial(kind.loss, model_spec), gradient)
