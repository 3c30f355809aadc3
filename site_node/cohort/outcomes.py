"""Labels: what happened after the prediction time (index + prediction_hours).

Outcome windows are half-open, (prediction time, prediction time + window_days]: something recorded at the
prediction time itself is known when the model is asked, so it is a feature, never the outcome.

* death: the patient died in the window, or with no window_days, during the visit (by its end);
* condition: one of the concepts (or a descendant) starts in the window;
* long_stay: the visit lasted longer than threshold_days;
* readmission: another visit of one of the cohort's kinds starts in (discharge, discharge + window_days];
* time_to_event: death in (prediction time, + window_days] is the event; everyone else is censored at the
  earlier of the window end and the end of their observation (the last day of their latest
  observation_period, which counts in full). A person whose recorded death lies after the window is known
  to be alive at the window end and is censored there. A person without an observation period counts as
  observed until the end of the visit.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sqlalchemy import func, select

from federation.contract.spec import OutcomeKind, OutcomeSpec
from site_node.cohort.features.rows import row_positions
from site_node.cohort.omop_source import OmopSource
from site_node.cohort.windows import SecondsWindow, events_in_window

DAY_S = 86400


def labels(
    source: OmopSource, examples: pd.DataFrame, visits: pd.DataFrame, outcome: OutcomeSpec
) -> tuple[np.ndarray, np.ndarray | None]:
    """(labels float32 (n,), event_days float32 (n,) for time_to_event else None)."""
    if outcome.kind == OutcomeKind.DEATH:
        return _death(examples, outcome).astype(np.float32), None
    if outcome.kind == OutcomeKind.CONDITION:
        return _condition(source, examples, outcome).astype(np.float32), None
    if outcome.kind == OutcomeKind.LONG_STAY:
        stay = examples["end_s"].to_numpy() - examples["start_s"].to_numpy()
        return (stay > outcome.threshold_days * DAY_S).astype(np.float32), None
    if outcome.kind == OutcomeKind.READMISSION:
        return _readmission(examples, visits, outcome).astype(np.float32), None
    event, days = _time_to_event(source, examples, outcome)
    return event.astype(np.float32), days.astype(np.float32)


def _window_end(examples: pd.DataFrame, outcome: OutcomeSpec) -> np.ndarray:
    prediction = examples["prediction_s"].to_numpy()
    if outcome.window_days is None:
        return np.full(prediction.shape, np.inf)
    return prediction + outcome.window_days * DAY_S


def _death(examples: pd.DataFrame, outcome: OutcomeSpec) -> np.ndarray:
    death = examples["death_s"].to_numpy()
    end = examples["end_s"].to_numpy() if outcome.window_days is None else _window_end(examples, outcome)
    return (death > examples["prediction_s"].to_numpy()) & (death <= end)


def _condition(source: OmopSource, examples: pd.DataFrame, outcome: OutcomeSpec) -> np.ndarray:
    window = SecondsWindow("prediction_s", 0, round(outcome.window_days * DAY_S), include_start=False)
    events = events_in_window(source, "condition", outcome.concept_ids, window, descendants=True)
    flag = np.zeros(len(examples), dtype=bool)
    flag[row_positions(examples, events["person_id"].unique())] = True
    return flag


def _readmission(examples: pd.DataFrame, visits: pd.DataFrame, outcome: OutcomeSpec) -> np.ndarray:
    pairs = examples[["person_id", "visit_occurrence_id", "end_s"]].merge(
        visits[["person_id", "visit_occurrence_id", "start_s"]], on="person_id", suffixes=("", "_next")
    )
    after = pairs["start_s"] - pairs["end_s"]
    readmitted = pairs[
        (pairs["visit_occurrence_id_next"] != pairs["visit_occurrence_id"])
        & (after > 0)
        & (after <= outcome.window_days * DAY_S)
    ]
    flag = np.zeros(len(examples), dtype=bool)
    flag[row_positions(examples, readmitted["person_id"].unique())] = True
    return flag


def observation_end_s(source: OmopSource, examples: pd.DataFrame) -> np.ndarray:
    """End (seconds, exclusive: the end date counts in full) of each example's latest observation period."""
    out = np.full(len(examples), np.nan)
    if not source.has("observation_period"):
        return out
    period = source.table("observation_period")
    index = source.index
    frame = source.frame(
        select(period.c.person_id, func.max(source.epoch(period.c.observation_period_end_date)).label("end_s"))
        .where(period.c.person_id.in_(select(index.c.person_id)))
        .group_by(period.c.person_id)
    ).dropna()
    if not frame.empty:
        out[row_positions(examples, frame["person_id"].to_numpy())] = frame["end_s"].to_numpy(dtype=np.float64) + DAY_S
    return out


def _time_to_event(source: OmopSource, examples: pd.DataFrame, outcome: OutcomeSpec) -> tuple[np.ndarray, np.ndarray]:
    prediction = examples["prediction_s"].to_numpy()
    death = examples["death_s"].to_numpy()
    window_end = _window_end(examples, outcome)
    event = (death > prediction) & (death <= window_end)
    observed_until = observation_end_s(source, examples)
    observed_until = np.where(np.isnan(observed_until), examples["end_s"].to_numpy(), observed_until)
    censor = np.minimum(window_end, observed_until)
    dies_after_window = np.isfinite(window_end) & (death > window_end)
    censor = np.where(dies_after_window, window_end, censor)
    at = np.where(event, death, censor)
    return event, np.maximum(at - prediction, 0.0) / DAY_S
