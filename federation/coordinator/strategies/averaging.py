"""FedAvg and FedProx: the new global model is the example-weighted mean of the sites' weights.

FedProx differs only in local training (the proximal term, `training.proximal_mu`, applied by the sites);
on the server it is the same weighted mean (Li et al., "Federated Optimization in Heterogeneous
Networks", 2020), so it is its own name here only so that receipts and model cards say what ran.
"""

from __future__ import annotations

import numpy as np

from federation.coordinator.strategies.base import Accepted, BaseAggregator


def weighted_mean(accepted: list[Accepted]) -> dict[str, np.ndarray]:
    """Coordinate-wise sum of w_i x_i / sum of w_i over the accepted updates, in float64."""
    total = sum(update.weight for update in accepted)
    keys = accepted[0].arrays.keys()
    return {key: sum(update.arrays[key] * (update.weight / total) for update in accepted) for key in keys}


class FedAvg(BaseAggregator):
    """McMahan et al. 2017: weighted mean of the updates (withheld counts weigh the mean of the others)."""

    name = "fedavg"

    def _combine(self, global_weights: dict[str, np.ndarray], accepted: list[Accepted]) -> dict[str, np.ndarray]:
        return weighted_mean(accepted)


class FedProx(FedAvg):
    """FedProx on the server: the FedAvg mean; the proximal term was applied during the sites' training."""

    name = "fedprox"
