"""Labels: what happened after the prediction time (index + prediction_hours), or, for a diagnostic outcome,
what was recorded in its window around the index.

Prognostic outcome windows are half-open, (prediction time, prediction time + window_days]: something
recorded at the prediction time itself is known when the model is asked, so it is a feature, never the
outcome. A diagnostic outcome's window is [index + start, index + end) (`outcome.window`): it may overlap
the covariates, and leaves out its end so that a day window is that day alone.

* death: the patient died in the window, or with no window_days, during the visit (by its end);
* condition, procedure, drug: one of the concepts (or a descendant) starts in the window;
* visit: a visit of one of the kinds (exactly those concept ids) starts in the window; in a visit-level
  cohort the example's own visit never counts;
* measurement: one of the concepts (or a descendant) is recorded in the window with its value in the range
  (both ends included: `{min: 4}` is "4 or more");
* long_stay: the visit lasted longer than threshold_days (visit-level cohorts);
* readmission: another visit of one of the cohort's kinds starts in (discharge, discharge + window_days];
* time_to_event: the event is death, or the first record of the outcome's event (a condition, procedure,
  drug, visit or measurement as above) in (prediction time, + window_days]. Everyone else is censored at
  the earlier of the window end and the end of their observation (the last day of their latest
  observation_period, which counts in full), and, for an event other than death, at their death: death is
  a competing end of follow-up and is treated as censoring (the model estimates the event's hazard among
  the living; it is not a cumulative incidence with death as a competing risk). A record of the event after
  the censoring time is not counted. A person whose recorded death lies after the window is known to be
  alive at the window end and is censored there. A person without an observation period counts as observed
  until the end of the visit (visit-level) or until the prediction time (person-level: no follow-up can be
  shown, so such a person is censored at 0 days unless they die).
* time_to_event with event discharge (the length of stay, visit-level cohorts indexed at the visit's start):
  the event is the end of the index visit, however it ends (home, transfer, death: the bed is free). It is
  censored at the window end, and at the data's end for a visit still running then: one the database leaves
  without an end time whose end date is the latest end date it holds (the ETL writes an open encounter so).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sqlalchemy import func, select

from federation.contract.spec import EVENT_OUTCOMES, CohortSpec, OutcomeKind, OutcomeSpec
from site_node.cohort.features.rows import row_positions
from site_node.cohort.index_events import in_range
from site_node.cohort.omop_source import OmopSource
from site_node.cohort.windows import SecondsWindow, events_in_window

DAY_S = 86400
# "No window_days" for a time-to-event search: far beyond any record (about 31,700 years, in seconds).
_UNBOUNDED_S = 10**12
DOMAINS = {
    OutcomeKind.CONDITION: "condition",
    OutcomeKind.PROCEDURE: "procedure",
    OutcomeKind.DRUG: "drug",
    OutcomeKind.VISIT: "visit",
    OutcomeKind.MEASUREMENT: "measurement",
}


def labels(
    source: OmopSource,
    examples: pd.DataFrame,
    visits: pd.DataFrame,
    outcome: OutcomeSpec,
    cohort: CohortSpec | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """(labels float32 (n,), event_days float32 (n,) for time_to_event else None).

    `cohort` says whether the examples are visits (the default when it is not given) or persons at an event.
    """
    visit_level = cohort is None or cohort.visit_level
    if outcome.kind == OutcomeKind.DEATH:
        return _death(examples, outcome).astype(np.float32), None
    if outcome.kind in EVENT_OUTCOMES:
        first = first_event_s(source, examples, outcome, visit_level)
        return np.isfinite(first).astype(np.float32), None
    if outcome.kind == OutcomeKind.LONG_STAY:
        stay = examples["end_s"].to_numpy() - examples["start_s"].to_numpy()
        return (stay > outcome.threshold_days * DAY_S).astype(np.float32), None
    if outcome.kind == OutcomeKind.READMISSION:
        return _readmission(examples, visits, outcome).astype(np.float32), None
    event, days = _time_to_event(source, examples, outcome, visit_level)
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


def _outcome_window(outcome: OutcomeSpec) -> SecondsWindow:
    if outcome.diagnostic and outcome.window is not None:
        start, end = round(outcome.window.start_hours * 3600), round(outcome.window.end_hours * 3600)
        return SecondsWindow("index_s", start, end, include_start=True, include_end=False)
    end = _UNBOUNDED_S if outcome.window_days is None else round(outcome.window_days * DAY_S)
    return SecondsWindow("prediction_s", 0, end, include_start=False)


def first_event_s(source: OmopSource, examples: pd.DataFrame, outcome: OutcomeSpec, visit_level: bool) -> np.ndarray:
    """Per example, the time (seconds) of the first record of the outcome's event in its window; inf if none."""
    kind = outcome.event_kind
    domain = DOMAINS[kind]
    window = _outcome_window(outcome)
    measured = kind == OutcomeKind.MEASUREMENT
    events = events_in_window(
        source,
        domain,
        outcome.concept_ids,
        window,
        descendants=domain != "visit",
        value_column="value_as_number" if measured else None,
    )
    if measured:
        events = events[in_range(events["value"].to_numpy(dtype=np.float64), outcome.value)]
    rows = row_positions(examples, events["person_id"].to_numpy())
    if domain == "visit" and visit_level and len(events):
        own = examples["visit_occurrence_id"].to_numpy(dtype=np.int64)[rows]
        keep = events["row_id"].to_numpy(dtype=np.int64) != own
        events, rows = events[keep], rows[keep]
    first = np.full(len(examples), np.inf)
    if len(events):
        anchor = examples[window.anchor].to_numpy(dtype=np.float64)[rows]
        np.minimum.at(first, rows, anchor + events["offset_s"].to_numpy(dtype=np.float64))
    return first


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


def running_at_data_end(source: OmopSource, examples: pd.DataFrame) -> np.ndarray:
    """Per example, whether its visit was still running when the data end: no end time, and an end date on
    the latest end date of any visit (an open encounter, which the ETL ends on the export's date)."""
    visit = source.table("visit_occurrence")
    latest = select(func.max(visit.c.visit_end_date)).scalar_subquery()
    frame = source.frame(
        select(visit.c.visit_occurrence_id).where(
            visit.c.person_id.in_(select(source.index.c.person_id)),
            visit.c.visit_end_datetime.is_(None),
            visit.c.visit_end_date >= latest,
        )
    )
    own = examples["visit_occurrence_id"].to_numpy(dtype=np.int64)
    return np.isin(own, frame["visit_occurrence_id"].to_numpy(dtype=np.int64))


def _time_to_event(
    source: OmopSource, examples: pd.DataFrame, outcome: OutcomeSpec, visit_level: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    prediction = examples["prediction_s"].to_numpy()
    death = examples["death_s"].to_numpy()
    window_end = _window_end(examples, outcome)
    if outcome.event_kind == OutcomeKind.DISCHARGE:  # the visit's own end: no observation period is read
        end = examples["visit_end_s"].to_numpy(dtype=np.float64)
        event = ~running_at_data_end(source, examples) & (end <= window_end)
        at = np.where(event, end, np.minimum(end, window_end))
        return event, np.maximum(at - prediction, 0.0) / DAY_S
    observed_until = observation_end_s(source, examples)
    unobserved = examples["end_s"].to_numpy() if visit_level else prediction
    observed_until = np.where(np.isnan(observed_until), unobserved, observed_until)
    censor = np.minimum(window_end, observed_until)
    if outcome.event_kind == OutcomeKind.DEATH:
        event = (death > prediction) & (death <= window_end)
        dies_after_window = np.isfinite(window_end) & (death > window_end)
        censor = np.where(dies_after_window, window_end, censor)
        at = np.where(event, death, censor)
        return event, np.maximum(at - prediction, 0.0) / DAY_S
    # Another event: death before it ends the follow-up (censored there), as does the end of observation.
    censor = np.where(death > prediction, np.fmin(censor, death), censor)  # NaN (no death) leaves it
    first = first_event_s(source, examples, outcome, visit_level)
    event = first <= censor
    at = np.where(event, first, censor)
    return event, np.maximum(at - prediction, 0.0) / DAY_S
