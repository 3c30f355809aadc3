"""Server-side aggregation for the coordinator: one front door, `make_aggregator(spec.federation)`.

Every strategy screens the sites' updates first (keys, shapes, finite values, example counts) and names
each one it leaves out, so the coordinator never drops a site silently; every strategy's state
(`state_dict` / `load_state_dict`) is enough for a coordinator killed mid-study to resume from the last
completed round with the same results as an uninterrupted run.
"""

from federation.coordinator.strategies.adaptive import FedAdam, FedYogi
from federation.coordinator.strategies.averaging import FedAvg, FedProx
from federation.coordinator.strategies.base import (
    AggregateReport,
    AggregationError,
    Aggregator,
    BaseAggregator,
    SiteUpdate,
    UpdateRejected,
    Weights,
)
from federation.coordinator.strategies.registry import STRATEGIES, make_aggregator
from federation.coordinator.strategies.robust import Median, TrimmedMean

__all__ = [
    "STRATEGIES",
    "AggregateReport",
    "AggregationError",
    "Aggregator",
    "BaseAggregator",
    "FedAdam",
    "FedAvg",
    "FedProx",
    "FedYogi",
    "Median",
    "SiteUpdate",
    "TrimmedMean",
    "UpdateRejected",
    "Weights",
    "make_aggregator",
]
