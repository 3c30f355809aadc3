"""Twin kinds behind one registry: a study names a `model.kind`, and every site and the coordinator get the
same kind from `kind_of`, which builds the same architecture (so weights can be averaged), trains with its
loss, releases and pools its evaluation, and writes its part of the model card (federation.twins.kind).

A new kind is a new module here that subclasses `TwinKind`, registers itself, and is imported below; its
spec goes into federation.contract.twin_specs. tests/test_twin_kinds.py runs every registered kind through a
DP round, an evaluation, pooling and a model card.
"""

from __future__ import annotations

import torch
from torch import nn

from federation.twins import risk, survival, trajectory  # noqa: F401 (each registers its kinds)
from federation.twins.kind import ExactEvaluation, TwinKind
from federation.twins.registry import KINDS, kind_of

__all__ = ["KINDS", "ExactEvaluation", "TwinKind", "build_model", "kind_of", "parameter_count"]


def build_model(spec, n_features: int, seed: int = 0) -> nn.Module:
    """The study's model for `n_features` inputs, initialised from `seed` (the same weights everywhere)."""
    if n_features < 1:
        raise ValueError("a model needs at least one input feature")
    kind = kind_of(spec)
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        return kind.build(spec, n_features)
    finally:
        torch.random.set_rng_state(generator_state)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
