"""A patient's series on the trajectory twin's grid (issue 12): the signals before and after each decision
time, and the treatments given on every step, read from the site's OMOP database.

The grid starts `history_steps` steps before the study's prediction time (the index plus
`outcome.prediction_hours`) and runs on for `windows_per_patient` forecasts of `horizon_steps` steps each.
Decision time k is the prediction time plus k forecasts: its history is the `history_steps` steps before
it, its future the `horizon_steps` steps after, so the forecasts of one patient do not overlap. Every
decision time of a patient belongs to that one patient: the windows are returned per patient, (n, W, ...),
never flattened, so that sampling, clipping and accounting stay at the patient (the privacy unit).

A decision time is used (`valid`) when it lies before the end of the index visit (visit-level cohorts;
the first always is: it is the cohort's example) and, from the second on, some signal was measured in its
history: a patient no longer measured has nothing to forecast from.

Per signal and step: the mean of the step's values (after the signal's transform), an observed mask, and
the hours since the signal was last measured (from the grid's start; capped at the history length and
divided by it, 1 meaning not measured yet). Per treatment and step: the summed dose (`quantity` of
drug_exposure, when the treatment asks for the dose and the row has one, else 1 per record), so a
scenario can set the same inputs for the steps ahead. Values are in the signal's own units (log units for
a log signal); scaling is the kind's, with fixed ranges that are the same at every site.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from federation.contract.twin_specs import Signal, TrajectorySpec, Treatment
from site_node.cohort.errors import CohortError
from site_node.cohort.features.rows import row_positions
from site_node.cohort.omop_source import OmopSource
from site_node.cohort.windows import events_in_window, hours_window


@dataclass
class Trajectories:
    """Every example's windows: W decision times of one patient each, with H history and F future steps."""

    person_ids: np.ndarray  # int64 (n,), the examples' order
    decision_hours: np.ndarray  # float64 (W,): hours after the index of each decision time
    valid: np.ndarray  # bool (n, W): the decision time is used (see the module's docstring)
    history: np.ndarray  # float32 (n, W, H, S, 3): value, observed mask, hours since last measured (scaled)
    future: np.ndarray  # float32 (n, W, F, S): the signals' values after the decision time (0 where unobserved)
    future_mask: np.ndarray  # float32 (n, W, F, S): 1 where the future value was observed
    controls: np.ndarray  # float32 (n, W, H + F, R): treatment exposure per step, history then horizon
    signal_names: list[str]
    treatment_names: list[str]
    dropped_values: dict[str, int]  # per signal: values a log transform could not take (zero or negative)

    @property
    def windows(self) -> np.ndarray:
        """int (n,): how many decision times each patient gives."""
        return self.valid.sum(axis=1)


def build_trajectories(
    source: OmopSource,
    examples: pd.DataFrame,
    spec: TrajectorySpec,
    prediction_hours: float,
    *,
    visit_level: bool,
    first_always_used: bool = True,
) -> Trajectories:
    """The examples' windows; `examples` (sorted by person id, with index_s and visit_end_s) are the study's
    chosen examples after consent, whose person ids are in the source's index table. `prediction_hours` is
    the first decision time; with `first_always_used` off (a twin query at a time of its own), the first
    window of a visit-level cohort is used only when it begins before the end of the visit, like the others."""
    n, windows = len(examples), spec.windows_per_patient
    history, horizon, step_hours = spec.history_steps, spec.horizon_steps, spec.step_hours
    steps = history + windows * horizon
    start_hours = prediction_hours - history * step_hours
    decision_hours = prediction_hours + np.arange(windows) * horizon * step_hours

    grids = []
    dropped: dict[str, int] = {}
    for signal in spec.signals:
        grid, dropped[signal.name] = _signal_grid(source, examples, signal, start_hours, steps, step_hours)
        grids.append(grid)
    signals = np.stack(grids, axis=2) if grids else np.zeros((n, steps, 0, 3))  # (n, G, S, 3)
    controls = np.zeros((n, steps, len(spec.treatments)))
    for column, treatment in enumerate(spec.treatments):
        controls[:, :, column] = _treatment_grid(source, examples, treatment, start_hours, steps, step_hours)

    valid = np.ones((n, windows), dtype=bool)
    if visit_level:
        stay_hours = (examples["visit_end_s"].to_numpy(float) - examples["index_s"].to_numpy(float)) / 3600.0
        valid[:] = decision_hours[None, :] < stay_hours[:, None]
    if first_always_used:
        valid[:, 0] = True
    history_out = np.zeros((n, windows, history, len(spec.signals), 3), dtype=np.float32)
    future = np.zeros((n, windows, horizon, len(spec.signals)), dtype=np.float32)
    future_mask = np.zeros_like(future)
    control_out = np.zeros((n, windows, history + horizon, len(spec.treatments)), dtype=np.float32)
    for k in range(windows):
        begin = k * horizon
        past = signals[:, begin : begin + history]
        history_out[:, k] = past
        ahead = signals[:, begin + history : begin + history + horizon]
        future[:, k] = ahead[..., 0]
        future_mask[:, k] = ahead[..., 1]
        control_out[:, k] = controls[:, begin : begin + history + horizon]
        if k:
            valid[:, k] &= past[..., 1].any(axis=(1, 2))
    history_out[..., 2] = np.minimum(history_out[..., 2], 1.0)
    return Trajectories(
        person_ids=examples["person_id"].to_numpy(dtype=np.int64),
        decision_hours=decision_hours,
        valid=valid,
        history=history_out,
        future=future,
        future_mask=future_mask,
        controls=control_out,
        signal_names=[s.name for s in spec.signals],
        treatment_names=[t.name for t in spec.treatments],
        dropped_values=dropped,
    )


def _step_of(events: pd.DataFrame, start_hours: float, step_hours: float, steps: int) -> np.ndarray:
    """The grid step of each event (its offset from the index, in seconds); the grid's last step also holds
    an event exactly at its end."""
    since = events["offset_s"].to_numpy(dtype=np.float64) - start_hours * 3600.0
    return np.minimum((since // (step_hours * 3600.0)).astype(np.int64), steps - 1)


def _signal_grid(
    source: OmopSource, examples: pd.DataFrame, signal: Signal, start_hours: float, steps: int, step_hours: float
) -> tuple[np.ndarray, int]:
    """(n, G, 3) for one signal, and how many values its transform could not take."""
    n = len(examples)
    out = np.zeros((n, steps, 3))
    window = hours_window("index_s", start_hours, start_hours + steps * step_hours)
    events = events_in_window(source, "measurement", signal.concept_ids, window, value_column="value_as_number")
    values = events["value"].to_numpy(dtype=np.float64)
    dropped = 0
    if signal.transform == "log":
        usable = values > 0
        dropped = int((~usable).sum())
        events, values = events[usable], np.log(values[usable])
    if not len(events):
        out[:, :, 2] = np.inf
        return _hours_scaled(out, steps, step_hours), dropped
    rows = row_positions(examples, events["person_id"].to_numpy())
    which = _step_of(events, start_hours, step_hours, steps)
    since = events["offset_s"].to_numpy(dtype=np.float64) - start_hours * 3600.0
    per_step = (
        pd.DataFrame({"row": rows, "step": which, "value": values, "at": since})
        .groupby(["row", "step"], sort=False)
        .agg(value=("value", "mean"), at=("at", "max"))
    )
    row_index = per_step.index.get_level_values("row").to_numpy()
    step_index = per_step.index.get_level_values("step").to_numpy()
    out[row_index, step_index, 0] = per_step["value"].to_numpy()
    out[row_index, step_index, 1] = 1.0
    last_seen = np.full((n, steps), -np.inf)
    last_seen[row_index, step_index] = per_step["at"].to_numpy()
    last_seen = np.maximum.accumulate(last_seen, axis=1)
    step_end = (np.arange(steps) + 1) * step_hours * 3600.0
    out[:, :, 2] = np.where(np.isfinite(last_seen), (step_end[None, :] - last_seen) / 3600.0, np.inf)
    return _hours_scaled(out, steps, step_hours), dropped


def _hours_scaled(out: np.ndarray, steps: int, step_hours: float) -> np.ndarray:
    """Hours since last measured, divided by the grid's length and capped at 1 (never measured: 1)."""
    out[:, :, 2] = np.minimum(out[:, :, 2] / (steps * step_hours), 1.0)
    return out


def _treatment_grid(
    source: OmopSource, examples: pd.DataFrame, treatment: Treatment, start_hours: float, steps: int, step_hours: float
) -> np.ndarray:
    """(n, G): the treatment's exposure per step (dose summed, or records counted)."""
    n = len(examples)
    out = np.zeros((n, steps))
    window = hours_window("index_s", start_hours, start_hours + steps * step_hours)
    dose = treatment.dose and treatment.domain == "drug"
    events = events_in_window(source, treatment.domain, treatment.concept_ids, window,
                              value_column="quantity" if dose else None, require_value=False)  # fmt: skip
    if not len(events):
        return out
    # the recorded quantity where there is one, else 1 per record
    amount = events["value"].astype("float64").fillna(1.0).to_numpy() if dose else np.ones(len(events))
    if not np.isfinite(amount).all() or (amount < 0).any():
        raise CohortError(f"treatment '{treatment.name}': a drug_exposure quantity is negative or not a number")
    rows = row_positions(examples, events["person_id"].to_numpy())
    np.add.at(out, (rows, _step_of(events, start_hours, step_hours, steps)), amount)
    return out
