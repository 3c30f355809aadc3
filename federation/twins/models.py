"""Building a study's model from its kind, the same everywhere: every site and the coordinator start from the
same weights, so the updates they exchange can be averaged."""

from __future__ import annotations

import torch
from torch import nn

from federation.twins.registry import kind_of


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
