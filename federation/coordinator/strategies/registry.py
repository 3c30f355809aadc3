"""Strategy name -> aggregator, from the study's federation settings.

A new strategy is a new module and one line here; `tests/test_strategies.py` checks that every value the
study contract allows for `FederationSpec.strategy` has an entry, so neither can drift from the other.
"""

from __future__ import annotations

from collections.abc import Callable

from federation.contract.spec import FederationSpec
from federation.coordinator.strategies.adaptive import FedAdam, FedYogi
from federation.coordinator.strategies.averaging import FedAvg, FedProx
from federation.coordinator.strategies.base import BaseAggregator
from federation.coordinator.strategies.robust import Median, TrimmedMean


def _optimiser(cls: type[FedAdam] | type[FedYogi]) -> Callable[[FederationSpec], BaseAggregator]:
    def build(spec: FederationSpec) -> BaseAggregator:
        return cls(spec.server_learning_rate, spec.server_beta1, spec.server_beta2, spec.server_tau)

    return build


STRATEGIES: dict[str, Callable[[FederationSpec], BaseAggregator]] = {
    "fedavg": lambda spec: FedAvg(),
    "fedprox": lambda spec: FedProx(),
    "fedadam": _optimiser(FedAdam),
    "fedyogi": _optimiser(FedYogi),
    "trimmed_mean": lambda spec: TrimmedMean(spec.trim_fraction),
    "median": lambda spec: Median(),
}


def make_aggregator(spec: FederationSpec) -> BaseAggregator:
    """A fresh aggregator (round 0, no state) for the study's strategy and its settings."""
    try:
        build = STRATEGIES[spec.strategy]
    except KeyError:
        raise ValueError(f"no aggregator for strategy '{spec.strategy}'; known: {', '.join(STRATEGIES)}") from None
    return build(spec)
