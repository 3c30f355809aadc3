"""One patient's row of the trajectory kind, in numpy only: the layout of a row (every decision-time window of
the patient, so that a row is the privacy unit for the trainer), the scaling of signals to normal-range units
and back, and the packing of a cohort's windows into rows.

Kept apart from the network (trajectory_model) and the kind (trajectory) because the site's cohort build
and a patient-twin query need exactly this and nothing of torch: a cold `twinfed twin patient` must not pay
torch's two seconds of import to cut one patient's row (site_node.patient_twin).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar

import numpy as np

from federation.contract.twin_specs import TrajectorySpec

if TYPE_CHECKING:
    import torch

A = TypeVar("A", np.ndarray, "torch.Tensor")


class SeriesWindows(Protocol):
    """What `pack` reads of a cohort's windows (site_node.cohort.trajectories.Trajectories)."""

    valid: np.ndarray
    history: np.ndarray
    future: np.ndarray
    future_mask: np.ndarray
    controls: np.ndarray


@dataclass(frozen=True)
class TrajectoryLayout:
    """How one patient's windows lie in one flat row, so that a row is a patient (the privacy unit) for the
    trainer. Inputs: the static covariates, then per window the history (H, S, 3) and the treatments of
    history and horizon (H + F, R); last, per window, the values observed over the horizon and their mask
    (F, S, 2), which only the treatment policy reads (the per-step weights: what the ward saw before it
    treated) and which are zero when the twin is asked. Targets: per window the future values and their
    observed mask (F, S each); per window the event, whether the window is used, and its weight; per window
    whether each treatment was given in the first step ahead (R); last, per window, whether each was given
    in each step ahead (F, R). Outputs: per window the quantiles (F, S, Q); per window the event's logit;
    per window the treatments' propensity logits at the first step from the history (R); the treatments'
    base-rate logits (R); last, per window, the policy's logits of each treatment at each step ahead given
    what was observed up to it, and given the history only (F, R, 2).
    The unpacking works alike on numpy arrays and torch tensors (slices and reshapes only)."""

    statics: int
    windows: int
    history: int
    horizon: int
    signals: int
    treatments: int
    quantiles: int

    @classmethod
    def of(cls, spec: TrajectorySpec, statics: int) -> TrajectoryLayout:
        return cls(statics, spec.windows_per_patient, spec.history_steps, spec.horizon_steps, len(spec.signals),
                   len(spec.treatments), len(spec.quantiles))  # fmt: skip

    @property
    def _window_inputs(self) -> tuple[int, int]:
        return self.history * self.signals * 3, (self.history + self.horizon) * self.treatments

    @property
    def _observed_width(self) -> int:
        return self.windows * self.horizon * self.signals * 2

    @property
    def input_width(self) -> int:
        return self.statics + self.windows * sum(self._window_inputs) + self._observed_width

    @property
    def target_width(self) -> int:
        return self.windows * (2 * self.horizon * self.signals + 3 + self.treatments + self.horizon * self.treatments)

    @property
    def output_width(self) -> int:
        forecast, policy = self.horizon * self.signals * self.quantiles, 2 * self.horizon * self.treatments
        per_window = forecast + 1 + self.treatments + policy
        return self.windows * per_window + self.treatments

    def pack_inputs(self, statics: np.ndarray, history: np.ndarray, controls: np.ndarray,
                    observed: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
        """(n, statics), (n, W, H, S, 3), (n, W, H + F, R) and the horizon's observed values with their mask
        (n, W, F, S, 2; zero when not given, as when the twin is asked) -> (n, input_width) float32."""
        n = len(statics)  # the widths are spelled out: with no patient (n = 0) numpy cannot infer them
        history_width, control_width = self._window_inputs
        per_window = np.concatenate([history.reshape(n, self.windows, history_width),
                                     controls.reshape(n, self.windows, control_width)], axis=2)  # fmt: skip
        width = self._observed_width
        observed = np.zeros((n, width)) if observed is None else observed.reshape(n, width)
        return np.concatenate([statics.reshape(n, self.statics),
                               per_window.reshape(n, self.windows * (history_width + control_width)), observed],
                              axis=1).astype(np.float32)  # fmt: skip

    def unpack_observed(self, x: A) -> A:
        """(P, input_width) -> the horizon's observed values and mask (P, W, F, S, 2), for the policy only."""
        return x[:, x.shape[1] - self._observed_width :].reshape(x.shape[0], self.windows, self.horizon,
                                                                   self.signals, 2)  # fmt: skip

    def unpack_inputs(self, x: A) -> tuple[A, A, A]:
        """(P, input_width) -> statics (P, d), history (P, W, H, S, 3), controls (P, W, H + F, R)."""
        p = x.shape[0]
        history_width, control_width = self._window_inputs
        statics = x[:, : self.statics]
        end = self.statics + self.windows * (history_width + control_width)
        windows = x[:, self.statics : end].reshape(p, self.windows, history_width + control_width)
        history = windows[..., :history_width].reshape(p, self.windows, self.history, self.signals, 3)
        controls = windows[..., history_width:].reshape(p, self.windows, self.history + self.horizon, self.treatments)
        return statics, history, controls

    def pack_targets(
        self,
        future: np.ndarray,
        mask: np.ndarray,
        event: np.ndarray,
        valid: np.ndarray,
        weights: np.ndarray,
        treated_ahead: np.ndarray | None = None,
    ) -> np.ndarray:
        """(n, W, F, S) x 2, (n, W) x 3 and whether each treatment was given in each step ahead (n, W, F, R)
        -> (n, target_width) float32."""
        n = len(future)
        if treated_ahead is None:
            treated_ahead = np.zeros((n, self.windows, self.horizon, self.treatments))
        w, values = self.windows, self.horizon * self.signals  # spelled out: with n = 0 numpy cannot infer them
        both = np.concatenate([future.reshape(n, w, values), mask.reshape(n, w, values)], axis=2)
        flags = np.stack([event, valid, weights], axis=2)
        ahead = np.asarray(treated_ahead).reshape(n, w, self.horizon, self.treatments)
        r = self.treatments
        parts = [both.reshape(n, w * 2 * values), flags.reshape(n, w * 3), ahead[:, :, 0].reshape(n, w * r),
                 ahead.reshape(n, w * self.horizon * r)]  # fmt: skip
        return np.concatenate(parts, axis=1).astype(np.float32)

    def unpack_targets(self, y: A) -> tuple[A, ...]:
        """(P, target_width) -> future, mask (P, W, F, S); event, valid, weights (P, W); treated (P, W, R)."""
        p, values = y.shape[0], self.horizon * self.signals
        first, second = self.windows * 2 * values, self.windows * (2 * values + 3)
        head = y[:, :first].reshape(p, self.windows, 2, self.horizon, self.signals)
        flags = y[:, first:second].reshape(p, self.windows, 3)
        treated = y[:, second : second + self.windows * self.treatments].reshape(p, self.windows, self.treatments)
        return head[:, :, 0], head[:, :, 1], flags[..., 0], flags[..., 1], flags[..., 2], treated

    def unpack_treated_ahead(self, y: A) -> A:
        """(P, target_width) -> whether each treatment was given in each step ahead (P, W, F, R)."""
        width = self.windows * self.horizon * self.treatments
        return y[:, y.shape[1] - width :].reshape(y.shape[0], self.windows, self.horizon, self.treatments)

    def unpack_outputs(self, out: A) -> tuple[A, A, A, A]:
        """(P, output_width) -> quantiles (P, W, F, S, Q), logit (P, W), propensity (P, W, R), base rate (P, R)."""
        p, w, r = out.shape[0], self.windows, self.treatments
        forecast = w * self.horizon * self.signals * self.quantiles
        quantiles = out[:, :forecast].reshape(p, w, self.horizon, self.signals, self.quantiles)
        logit = out[:, forecast : forecast + w]
        propensity = out[:, forecast + w : forecast + w + w * r].reshape(p, w, r)
        return quantiles, logit, propensity, out[:, forecast + w + w * r : forecast + w + w * r + r]

    def unpack_policy(self, out: A) -> A:
        """(P, output_width) -> the policy's logits of each treatment at each step ahead, given what was
        observed up to it and given the history only (P, W, F, R, 2)."""
        width = self.windows * self.horizon * self.treatments * 2
        return out[:, out.shape[1] - width :].reshape(out.shape[0], self.windows, self.horizon, self.treatments, 2)


def scale_signals(spec: TrajectorySpec, values: np.ndarray, observed: np.ndarray) -> np.ndarray:
    """(..., S) values in each signal's transformed unit -> normal-range units (0 where not observed)."""
    centre, half = (np.array(v) for v in zip(*(s.centre_and_half_width() for s in spec.signals), strict=True))
    return np.where(observed > 0, (values - centre) / half, 0.0)


def unscale_signals(spec: TrajectorySpec, scaled: np.ndarray, axis: int = -1) -> np.ndarray:
    """Normal-range units back to each signal's own unit (undoing the log for a log signal); the signals lie
    along `axis`."""
    shape = [1] * scaled.ndim
    shape[axis] = len(spec.signals)
    centre, half = (np.array(v).reshape(shape) for v in zip(*(s.centre_and_half_width() for s in spec.signals),
                                                            strict=True))  # fmt: skip
    value = scaled * half + centre
    logs = np.array([s.transform == "log" for s in spec.signals]).reshape(shape)
    return np.where(logs, np.exp(value), value)


def pack(spec: TrajectorySpec, statics: np.ndarray, windows: SeriesWindows, labels: np.ndarray
         ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """One row of inputs and one of targets per patient: every window, values in normal-range units, doses
    in typical doses; the study's outcome is each window's event."""
    layout = TrajectoryLayout.of(spec, statics.shape[1])
    history = np.array(windows.history, dtype=np.float64)
    history[..., 0] = scale_signals(spec, history[..., 0], history[..., 1])
    future = scale_signals(spec, windows.future, windows.future_mask)
    doses = np.array([t.typical_dose if t.dose else 1.0 for t in spec.treatments])
    controls = np.asarray(windows.controls, dtype=np.float64) / (doses if len(doses) else 1.0)
    valid = np.asarray(windows.valid, dtype=np.float64)
    n, w = valid.shape
    event = np.repeat(np.asarray(labels, dtype=np.float64)[:, None], w, axis=1)
    treated_ahead = (controls[:, :, spec.history_steps :, :] > 0).astype(np.float64)
    observed = np.stack([future, np.asarray(windows.future_mask, dtype=np.float64)], axis=-1)
    inputs = layout.pack_inputs(statics, history, controls, observed)
    targets = layout.pack_targets(future, windows.future_mask, event, valid, np.ones((n, w)), treated_ahead)
    return inputs, targets
