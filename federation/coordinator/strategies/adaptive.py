"""FedAdam and FedYogi: a server optimiser stepping along the pseudo-gradient (Reddi et al., "Adaptive
Federated Optimization", ICLR 2021, Algorithm 2).

With delta_t = (weighted mean of the updates) - x_t:
    m_t = beta1 m_{t-1} + (1 - beta1) delta_t
    v_t = beta2 v_{t-1} + (1 - beta2) delta_t^2                            (Adam)
    v_t = v_{t-1} - (1 - beta2) delta_t^2 sign(v_{t-1} - delta_t^2)       (Yogi)
    x_{t+1} = x_t + eta m_t / (sqrt(v_t) + tau)
with m_0 = v_0 = 0, as in Flower's FedAdam/FedYogi. The paper's update has no bias correction, and neither
has this one; Flower's FedAdam multiplies eta by sqrt(1 - beta2^(t+1)) / (1 - beta1^(t+1)), which is the
only difference from it (tests/test_strategies.py checks both against Flower's arithmetic). The moments are
state: they go into `state_dict` so a resumed study takes exactly the steps the uninterrupted one would.
"""

from __future__ import annotations

from abc import abstractmethod

import numpy as np

from federation.coordinator.strategies.averaging import weighted_mean
from federation.coordinator.strategies.base import Accepted, BaseAggregator

_M, _V = "m/", "v/"  # key prefixes of the moments in the flat state dict


class _ServerOptimiser(BaseAggregator):
    """The FedOpt skeleton; subclasses give the second-moment rule."""

    def __init__(self, learning_rate: float, beta1: float, beta2: float, tau: float) -> None:
        super().__init__()
        if not (learning_rate > 0 and 0 <= beta1 < 1 and 0 <= beta2 < 1 and tau > 0):
            raise ValueError(
                f"{self.name} needs learning_rate > 0, 0 <= beta1 < 1, 0 <= beta2 < 1 and tau > 0; got "
                f"{learning_rate}, {beta1}, {beta2}, {tau}"
            )
        self.learning_rate = float(learning_rate)
        self.beta1 = float(beta1)
        self.beta2 = float(beta2)
        self.tau = float(tau)
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}

    @abstractmethod
    def _second_moment(self, v: np.ndarray, delta_squared: np.ndarray) -> np.ndarray:
        """v_t from v_{t-1} and the squared pseudo-gradient."""

    def _combine(self, global_weights: dict[str, np.ndarray], accepted: list[Accepted]) -> dict[str, np.ndarray]:
        mean = weighted_mean(accepted)
        if self.m and set(self.m) != set(global_weights):
            raise ValueError(
                f"{self.name}: the global model's parameters changed since the last round "
                f"({sorted(set(self.m) ^ set(global_weights))}); the server moments no longer fit it"
            )
        m, v, new = {}, {}, {}
        for key, x in global_weights.items():
            delta = mean[key] - x
            m[key] = self.beta1 * self.m.get(key, np.zeros_like(x)) + (1 - self.beta1) * delta
            v[key] = self._second_moment(self.v.get(key, np.zeros_like(x)), delta * delta)
            new[key] = x + self.learning_rate * m[key] / (np.sqrt(v[key]) + self.tau)
        self.m, self.v = m, v  # committed only once every parameter is computed
        return new

    def hyperparameters(self) -> dict[str, float]:
        return {
            "server_learning_rate": self.learning_rate,
            "server_beta1": self.beta1,
            "server_beta2": self.beta2,
            "server_tau": self.tau,
        }

    def _arrays_state(self) -> dict[str, np.ndarray]:
        return {**{_M + k: a.copy() for k, a in self.m.items()}, **{_V + k: a.copy() for k, a in self.v.items()}}

    def _load_arrays_state(self, rounds: int, arrays: dict[str, object]) -> None:
        unknown = sorted(key for key in arrays if not key.startswith((_M, _V)))
        if unknown:
            raise ValueError(f"{self.name} state has unknown entries: {', '.join(unknown)}")
        m = {key[len(_M) :]: np.array(value, dtype=np.float64) for key, value in arrays.items() if key.startswith(_M)}
        v = {key[len(_V) :]: np.array(value, dtype=np.float64) for key, value in arrays.items() if key.startswith(_V)}
        if set(m) != set(v) or any(m[key].shape != v[key].shape for key in m):
            raise ValueError(f"{self.name} state: first and second moments do not cover the same parameters")
        if bool(m) != (rounds > 0):
            raise ValueError(f"{self.name} state: {rounds} round(s) aggregated but {len(m)} moment arrays")
        if any(not np.isfinite(a).all() for a in (*m.values(), *v.values())) or any((a < 0).any() for a in v.values()):
            raise ValueError(f"{self.name} state: moments must be finite and the second moment non-negative")
        self.m, self.v = m, v


class FedAdam(_ServerOptimiser):
    """Adam on the server: v is an exponential moving average of the squared pseudo-gradient."""

    name = "fedadam"

    def _second_moment(self, v: np.ndarray, delta_squared: np.ndarray) -> np.ndarray:
        return self.beta2 * v + (1 - self.beta2) * delta_squared


class FedYogi(_ServerOptimiser):
    """Yogi on the server: v moves towards delta^2 by an additive step, so it grows no faster than Adam's
    and does not forget a large past gradient as quickly (more stable with heterogeneous sites)."""

    name = "fedyogi"

    def _second_moment(self, v: np.ndarray, delta_squared: np.ndarray) -> np.ndarray:
        return v - (1 - self.beta2) * delta_squared * np.sign(v - delta_squared)
