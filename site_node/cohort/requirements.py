"""Inclusion and exclusion criteria and the observation-period requirement, as masks over candidate examples.

Candidates are rows of (person_id, index_s, ...): visits of a visit-level cohort or index events of a
person-level one, several per person before one example per person is chosen. The database returns the
records of a criterion's concepts for the cohort's persons only (a subquery of their ids); the windows are
applied here, for every candidate at once, by binary search over the records sorted by person and time
(no loop over patients):

* a criterion counts the records whose start lies in [index + window start, index + window end] (both
  ends included, as for covariates); inclusion keeps a candidate with at least `min_count` of them,
  exclusion removes it. Descendants of the concepts count when the vocabulary has concept_ancestor,
  except for visits, whose kinds match exactly. A measurement or observation criterion with a value range
  counts only records whose number is in it. A visit criterion of a visit-level cohort does not count the
  example's own visit (a "prior inpatient stay" is another stay);
* the observation-period requirement keeps a candidate whose index lies in one of the person's observation
  periods (from its start date's 00:00 to the end of its end date), with at least `prior_days` of that
  period before the index and `after_days` after it. A database without observation periods (no
  observation_period table, or an empty one) cannot show anyone's observation: the requirement then
  removes every candidate, and its attrition criterion says so. That is the safe rule: a cohort defined by
  its observation time is never built on an unknown one.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sqlalchemy import select
from sqlalchemy.sql.selectable import Select

from federation.contract.spec import Criterion, ObservationRequirement
from site_node.cohort.index_events import in_range, value_conditions
from site_node.cohort.omop_source import OmopSource
from site_node.cohort.windows import EVENT_TABLES

DAY_S = 86400
# Times in the composite (person, time) key are clipped to +/- 2^36 s (about 2,177 years around 1970).
_TIME_LIMIT = 2**36
_SPAN = 2**38


def event_times(source: OmopSource, criterion: Criterion, persons: Select) -> pd.DataFrame:
    """person_id (int64), record_id (int64) and time_s (float64) of the criterion's records of `persons`."""
    spec = EVENT_TABLES[criterion.domain]
    events = source.table(spec.table)
    columns = [
        events.c.person_id,
        events.c[spec.row_id].label("record_id"),
        source.epoch(events.c[spec.datetime], events.c[spec.date]).label("time_s"),
    ]
    if criterion.value is not None:
        columns.append(events.c.value_as_number.label("value"))
    where = [
        events.c.person_id.in_(persons),
        source.concept_filter(events.c[spec.concept], criterion.concept_ids, criterion.domain != "visit"),
    ]
    if criterion.value is not None:
        where += value_conditions(events.c.value_as_number, criterion.value)
    frame = source.frame(select(*columns).where(*where))
    if frame.empty:
        return pd.DataFrame(
            {"person_id": pd.Series(dtype="int64"), "record_id": pd.Series(dtype="int64"), "time_s": []}
        ).astype({"time_s": "float64"})
    frame = frame.dropna(subset=["person_id", "record_id", "time_s"])
    if criterion.value is not None:
        frame = frame[in_range(frame["value"].astype("float64").to_numpy(), criterion.value)]
    return frame[["person_id", "record_id", "time_s"]].astype(
        {"person_id": "int64", "record_id": "int64", "time_s": "float64"}
    )


def count_in_windows(
    event_person: np.ndarray, event_time: np.ndarray, person: np.ndarray, low: np.ndarray, high: np.ndarray
) -> np.ndarray:
    """For each row (person, low, high): how many events of that person have low <= time <= high."""
    event_person = np.asarray(event_person, dtype=np.int64)
    person = np.asarray(person, dtype=np.int64)
    if event_person.size == 0 or person.size == 0:
        return np.zeros(person.size, dtype=np.int64)
    ranks = np.unique(np.concatenate([event_person, person]))

    def key(who: np.ndarray, seconds: np.ndarray) -> np.ndarray:
        clipped = np.clip(np.asarray(seconds, dtype=np.float64), -_TIME_LIMIT, _TIME_LIMIT).astype(np.int64)
        return np.searchsorted(ranks, who).astype(np.int64) * _SPAN + (clipped + _TIME_LIMIT)

    keys = np.sort(key(event_person, event_time))
    upper = np.searchsorted(keys, key(person, np.floor(high)), side="right")
    lower = np.searchsorted(keys, key(person, np.ceil(low)), side="left")
    return (upper - lower).astype(np.int64)


def criterion_counts(source: OmopSource, criterion: Criterion, candidates: pd.DataFrame, persons: Select) -> np.ndarray:
    """How many of the criterion's records lie in its window around each candidate's index."""
    events = event_times(source, criterion, persons)
    index = candidates["index_s"].to_numpy(dtype=np.float64)
    low = index + round(criterion.window.start_hours * 3600)
    high = index + round(criterion.window.end_hours * 3600)
    person = candidates["person_id"].to_numpy(dtype=np.int64)
    counts = count_in_windows(events["person_id"].to_numpy(), events["time_s"].to_numpy(), person, low, high)
    if criterion.domain == "visit" and "visit_occurrence_id" in candidates and len(events):
        # the example's own visit is not "another visit": take it out where it was counted
        own = candidates["visit_occurrence_id"].to_numpy(dtype=np.int64)
        counted = pd.MultiIndex.from_arrays([events["person_id"].to_numpy(), events["record_id"].to_numpy()])
        mine = pd.MultiIndex.from_arrays([person, own]).isin(counted)
        start = candidates["start_s"].to_numpy(dtype=np.float64)
        counts = counts - (mine & (start >= np.ceil(low)) & (start <= np.floor(high))).astype(np.int64)
    return counts


def criterion_mask(
    source: OmopSource, criterion: Criterion, candidates: pd.DataFrame, persons: Select, include: bool
) -> np.ndarray:
    """Which candidates an inclusion (`include`) or exclusion criterion keeps."""
    enough = criterion_counts(source, criterion, candidates, persons) >= criterion.min_count
    return enough if include else ~enough


def has_observation_periods(source: OmopSource) -> bool:
    """Whether the database records any observation period at all."""
    if not source.has("observation_period"):
        return False
    period = source.table("observation_period")
    return source.connection.execute(select(period.c.person_id).limit(1)).first() is not None


def observation_mask(
    source: OmopSource, candidates: pd.DataFrame, requirement: ObservationRequirement, persons: Select
) -> np.ndarray:
    """Which candidates' index lies in an observation period with the required days before and after it."""
    keep = np.zeros(len(candidates), dtype=bool)
    if candidates.empty or not has_observation_periods(source):
        return keep
    period = source.table("observation_period")
    frame = source.frame(
        select(
            period.c.person_id,
            source.epoch(period.c.observation_period_start_date).label("start_s"),
            source.epoch(period.c.observation_period_end_date).label("end_s"),
        ).where(period.c.person_id.in_(persons))
    ).dropna()
    if frame.empty:
        return keep
    periods = frame.astype({"person_id": "int64", "start_s": "float64", "end_s": "float64"})
    periods["end_s"] += DAY_S  # the end date counts in full
    rows = pd.DataFrame(
        {
            "row": np.arange(len(candidates)),
            "person_id": candidates["person_id"].to_numpy(dtype=np.int64),
            "index_s": candidates["index_s"].to_numpy(dtype=np.float64),
        }
    ).merge(periods, on="person_id", how="inner")
    index = rows["index_s"].to_numpy()
    start, end = rows["start_s"].to_numpy(), rows["end_s"].to_numpy()
    fits = (
        (start <= index)
        & (index < end)
        & (index - start >= requirement.prior_days * DAY_S)
        & (end - index >= requirement.after_days * DAY_S)
    )
    keep[np.unique(rows["row"].to_numpy()[fits])] = True
    return keep
