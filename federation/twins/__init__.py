"""Twin sub-models behind one registry: a study names a model kind, every site and the coordinator build
the same architecture from it, so weights can be averaged. A new kind is a new builder here.

The risk models output one logit per example. They use only layers for which Opacus has per-sample
norm samplers (Linear), so sites can train them with ghost clipping, the cheapest exact DP-SGD.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from federation.contract.spec import LogisticRegressionSpec, MlpSpec

ModelBuilder = Callable[..., nn.Module]


def _logistic_regression(spec: LogisticRegressionSpec, n_features: int) -> nn.Module:
    return nn.Sequential(nn.Linear(n_features, 1))


def _mlp(spec: MlpSpec, n_features: int) -> nn.Module:
    layers: list[nn.Module] = []
    width = n_features
    for hidden in spec.hidden:
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        if spec.dropout:
            layers.append(nn.Dropout(spec.dropout))
        width = hidden
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


REGISTRY: dict[str, ModelBuilder] = {
    "logistic_regression": _logistic_regression,
    "mlp": _mlp,
}


def build_model(spec: LogisticRegressionSpec | MlpSpec, n_features: int, seed: int = 0) -> nn.Module:
    """The study's model for `n_features` inputs, initialised from `seed` (the same weights everywhere)."""
    if n_features < 1:
        raise ValueError("a model needs at least one input feature")
    builder = REGISTRY.get(spec.kind)
    if builder is None:
        raise ValueError(f"unknown twin model kind '{spec.kind}'; known: {', '.join(sorted(REGISTRY))}")
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        return builder(spec, n_features)
    finally:
        torch.random.set_rng_state(generator_state)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
