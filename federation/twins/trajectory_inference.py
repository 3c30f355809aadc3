"""The trajectory network's forward pass in numpy, for answering at the site without torch.

A patient twin's query runs the study's network over a handful of rows (one patient, a few scenarios).
torch costs two seconds of import before the first multiplication, more than the whole answer may take
(the cold-query target of issue 12 is three seconds), while the forward pass itself is a few small
matrix products per step. `TrajectoryForward` computes exactly trajectory_model.TrajectoryExamples'
outputs (the GRU equations of trajectory_model.GRU, the monotone quantiles, the event and propensity
heads, the per-step policy) with, when given, one site's conformal offsets applied as
trajectory.ConformalTrajectory applies them. tests/test_trajectory_inference.py holds it to the torch model on
random weights and inputs.

Training, and computing a site's conformal calibration, stay in torch; this only reads weights (a mapping
from the torch state dict's names to arrays), so it cannot drift from what was trained without the test
failing.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from federation.contract.twin_specs import INTERVALS, TrajectorySpec
from federation.twins.trajectory_rows import TrajectoryLayout


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # the logistic function without overflow for large |x|


def _softplus(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, x)


class TrajectoryForward:
    """TrajectoryExamples (with ConformalTrajectory's offsets when given) over numpy rows: (P, input_width)
    -> (P, output_width), the same layout (TrajectoryLayout), in float64."""

    def __init__(self, spec: TrajectorySpec, static_features: int, weights: Mapping[str, np.ndarray],
                 offsets: np.ndarray | None = None) -> None:  # fmt: skip
        self.layout = TrajectoryLayout.of(spec, static_features)
        self.weights = {name: np.asarray(value, dtype=np.float64) for name, value in weights.items()}
        self.hidden = spec.hidden
        self.lagged = spec.lagged
        levels = list(spec.quantiles)
        self.median = levels.index(0.5)
        self.offsets = None if offsets is None else np.asarray(offsets, dtype=np.float64)
        self.ends = [(levels.index(low), levels.index(high)) for low, high in INTERVALS.values()]
        missing = [n for n in self._needed() if n not in self.weights]
        if missing:
            raise ValueError(f"the weights lack {', '.join(missing)}: they are not this study's trajectory model")

    def _needed(self) -> list[str]:
        names = [f"net.{part}.{map_}.{kind}" for part in ("encoder", "decoder") for map_ in ("input_map", "hidden_map")
                 for kind in ("weight", "bias")]  # fmt: skip
        names += ["net.quantile_head.weight", "net.quantile_head.bias", "net.event_head.weight", "net.event_head.bias",
                  "net.base_rate", "net.policy.0.weight", "net.policy.0.bias", "net.policy.2.weight",
                  "net.policy.2.bias", "net.policy_at_decision.weight", "net.policy_at_decision.bias"]  # fmt: skip
        if self.layout.statics:
            names += ["net.static.weight", "net.static.bias"]
        if self.layout.treatments:
            names += ["net.propensity_head.weight", "net.propensity_head.bias"]
        return names

    def _doses(self, controls: np.ndarray) -> np.ndarray:
        """trajectory_model.decoder_doses, in numpy (each treatment at its step, or the step before's)."""
        layout = self.layout
        same = controls[:, layout.history : layout.history + layout.horizon]
        before = controls[:, layout.history - 1 : layout.history - 1 + layout.horizon]
        return np.where(np.asarray(self.lagged, dtype=bool), before, same) if self.lagged else same

    def _linear(self, name: str, x: np.ndarray) -> np.ndarray:
        return x @ self.weights[f"net.{name}.weight"].T + self.weights[f"net.{name}.bias"]

    def _gru(self, name: str, x: np.ndarray, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """trajectory_model.GRU: x (B, T, input), h (B, hidden) -> states (B, T, hidden), the last."""
        projected = self._linear(f"{name}.input_map", x)
        outputs = []
        for t in range(x.shape[1]):
            ir, iz, inew = np.split(projected[:, t], 3, axis=-1)
            hr, hz, hnew = np.split(self._linear(f"{name}.hidden_map", h), 3, axis=-1)
            reset, update = sigmoid(ir + hr), sigmoid(iz + hz)
            candidate = np.tanh(inew + reset * hnew)
            h = (1 - update) * candidate + update * h
            outputs.append(h)
        return np.stack(outputs, axis=1), h

    def _net(self, history: np.ndarray, controls: np.ndarray, statics: np.ndarray, observed: np.ndarray):
        """TrajectoryNet.forward: quantiles (B, F, S, Q), the event's logit (B,), propensity logits (B, R), the
        policy's logits at every step ahead (B, F, R, 2)."""
        layout, batch = self.layout, history.shape[0]
        context = np.tanh(self._linear("static", statics)) if layout.statics else np.zeros((batch, self.hidden))
        past = np.concatenate([history.reshape(batch, layout.history, -1), controls[:, : layout.history],
                               np.broadcast_to(context[:, None, :], (batch, layout.history, self.hidden))],
                              axis=-1)  # fmt: skip
        _, state = self._gru("encoder", past, np.zeros((batch, self.hidden)))
        planned = np.concatenate([self._doses(controls),
                                  np.broadcast_to(context[:, None, :], (batch, layout.horizon, self.hidden))],
                                 axis=-1)  # fmt: skip
        ahead, last = self._gru("decoder", planned, state)
        raw = self._linear("quantile_head", ahead).reshape(batch, layout.horizon, layout.signals, layout.quantiles)
        recorded = np.zeros((batch, layout.signals))
        for t in range(layout.history):  # each signal's last recorded value (0 where never recorded)
            recorded = np.where(history[:, t, :, 1] > 0, history[:, t, :, 0], recorded)
        m = self.median
        centre = raw[..., m : m + 1]
        up = np.cumsum(_softplus(raw[..., m + 1 :]), axis=-1)
        down = np.cumsum(_softplus(raw[..., :m][..., ::-1]), axis=-1)[..., ::-1]
        quantiles = np.concatenate([centre - down, centre, centre + up], axis=-1) + recorded[:, None, :, None]
        logit = self._linear("event_head", np.concatenate([state, last], axis=-1))[:, 0]
        propensity = self._linear("propensity_head", state) if layout.treatments else state[:, :0]
        now = observed.reshape(batch, layout.horizon, 2 * layout.signals)
        before = np.concatenate([history[:, -1, :, :2].reshape(batch, 1, -1), now[:, :-1]], axis=1)
        given = controls[:, layout.history - 1 : layout.history - 1 + layout.horizon]
        inputs = np.concatenate([np.broadcast_to(state[:, None, :], (batch, layout.horizon, self.hidden)), now, before,
                                 given], axis=-1)  # fmt: skip
        seen = self._linear("policy.2", np.tanh(self._linear("policy.0", inputs)))
        at_decision = self._linear("policy_at_decision", state).reshape(batch, layout.horizon, layout.treatments)
        return quantiles, logit, propensity, np.stack([seen, at_decision], axis=-1)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        layout, p = self.layout, x.shape[0]
        x = np.asarray(x, dtype=np.float64)
        statics, history, controls = layout.unpack_inputs(x)
        w = layout.windows
        quantiles, logit, propensity, policy = self._net(
            history.reshape(p * w, layout.history, layout.signals, 3),
            controls.reshape(p * w, layout.history + layout.horizon, layout.treatments),
            np.repeat(statics, w, axis=0),
            layout.unpack_observed(x).reshape(p * w, layout.horizon, layout.signals, 2),
        )
        quantiles = quantiles.reshape(p, w, layout.horizon, layout.signals, layout.quantiles)
        if self.offsets is not None:  # ConformalTrajectory: each interval widened by its offset, then sorted
            quantiles = quantiles.copy()
            for index, (low, high) in enumerate(self.ends):
                quantiles[..., low] -= self.offsets[index]
                quantiles[..., high] += self.offsets[index]
            quantiles = np.sort(quantiles, axis=-1)
        base = np.broadcast_to(self.weights["net.base_rate"][None, :], (p, layout.treatments))
        return np.concatenate([quantiles.reshape(p, -1), logit.reshape(p, w), propensity.reshape(p, -1), base,
                               policy.reshape(p, -1)], axis=1)  # fmt: skip
