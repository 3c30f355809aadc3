"""The index events of a person-level cohort: when each candidate example's time zero lies.

A person-level cohort starts from events instead of visits (the visit-level cohort is in `selection`):

* condition, drug, procedure, measurement: the start of a record of one of the concepts (or a descendant,
  when the vocabulary has concept_ancestor); a measurement index with a value range takes only the
  records whose `value_as_number` is in it (both ends included). `first` is each patient's earliest such
  record in the database, `each` is every one of them (records of one patient at the same second are one
  event);
* panel: a day on which every measurement of the panel (each concept, or a descendant) was taken with a
  number; the index is that day's 00:00, so "that day" is [index, index + 24 h). `first` is the first such
  day, `each` every such day. The choice of the day (not of the first measurement's time) keeps a
  date-only record of that day (read as its 00:00) inside the day;
* date: every patient in the person table, indexed at the date's 00:00 (the cohort then requires an
  observation period covering the date, see `requirements`).

Each function returns the candidates (person_id, event_id, index_s in seconds) and a subquery of their
persons, with which the other tables are read (deaths, persons, criteria), so only those persons' rows
leave the database. `event_id` identifies the event within its person for the keyed random choice: the
record's id, the day number of a panel, 0 for a first occurrence and a date.
"""

from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd
from sqlalchemy import func, select
from sqlalchemy.sql.selectable import Select

from federation.contract.spec import IndexEvent, IndexSpec, Occurrence, ValueRange
from site_node.cohort.omop_source import OmopSource
from site_node.cohort.windows import EVENT_TABLES

DAY_S = 86400
INDEX_DOMAINS = {
    IndexEvent.CONDITION: "condition",
    IndexEvent.DRUG: "drug",
    IndexEvent.PROCEDURE: "procedure",
    IndexEvent.MEASUREMENT: "measurement",
}
CANDIDATE_COLUMNS = {"person_id": "int64", "event_id": "int64", "index_s": "float64"}


def empty_candidates() -> pd.DataFrame:
    return pd.DataFrame({name: pd.Series(dtype=dtype) for name, dtype in CANDIDATE_COLUMNS.items()})


def index_events(source: OmopSource, index: IndexSpec) -> tuple[pd.DataFrame, Select]:
    """(candidates sorted by person and time, subquery of their person ids) for a person-level index."""
    if index.event == IndexEvent.DATE:
        return _date(source, index.date)
    if index.event == IndexEvent.PANEL:
        return _panel(source, index)
    return _occurrences(source, index)


def _date(source: OmopSource, date: dt.date | None) -> tuple[pd.DataFrame, Select]:
    person = source.table("person")
    persons = select(person.c.person_id)
    frame = source.frame(persons)
    if frame.empty or date is None:
        return empty_candidates(), persons
    midnight = (dt.datetime.combine(date, dt.time()) - dt.datetime(1970, 1, 1)).total_seconds()
    ids = np.unique(frame["person_id"].dropna().astype("int64").to_numpy())
    candidates = pd.DataFrame({"person_id": ids, "event_id": np.zeros(len(ids), dtype="int64")})
    candidates["index_s"] = float(midnight)
    return candidates, persons


def value_conditions(column, value: ValueRange | None) -> list:
    """SQL conditions for a value range (a measurement without a number is never in one)."""
    if value is None:
        return []
    conditions = [column.is_not(None)]
    if value.min is not None:
        conditions.append(column >= value.min)
    if value.max is not None:
        conditions.append(column <= value.max)
    return conditions


def in_range(values: np.ndarray, value: ValueRange | None) -> np.ndarray:
    """The same test in numpy, which also drops what SQL lets through: PostgreSQL's NUMERIC 'NaN'."""
    keep = np.isfinite(values)
    if value is not None and value.min is not None:
        keep &= values >= value.min
    if value is not None and value.max is not None:
        keep &= values <= value.max
    return keep


def _occurrences(source: OmopSource, index: IndexSpec) -> tuple[pd.DataFrame, Select]:
    spec = EVENT_TABLES[INDEX_DOMAINS[index.event]]
    events = source.table(spec.table)
    when = source.epoch(events.c[spec.datetime], events.c[spec.date])
    where = [source.concept_filter(events.c[spec.concept], index.concept_ids, True)]
    where += value_conditions(events.c.value_as_number, index.value) if index.value is not None else []
    persons = select(events.c.person_id).where(*where)
    if index.occurrence == Occurrence.FIRST and index.value is None:
        frame = source.frame(
            select(events.c.person_id, func.min(when).label("index_s")).where(*where).group_by(events.c.person_id)
        ).dropna()
        if frame.empty:
            return empty_candidates(), persons
        candidates = pd.DataFrame(
            {
                "person_id": frame["person_id"].astype("int64").to_numpy(),
                "event_id": np.zeros(len(frame), dtype="int64"),
                "index_s": frame["index_s"].astype("float64").to_numpy(),
            }
        )
        return candidates.sort_values("person_id").reset_index(drop=True), persons
    columns = [events.c.person_id, events.c[spec.row_id].label("event_id"), when.label("index_s")]
    if index.value is not None:
        columns.append(events.c.value_as_number.label("value"))
    frame = source.frame(select(*columns).where(*where)).dropna(subset=["person_id", "event_id", "index_s"])
    if frame.empty:
        return empty_candidates(), persons
    if index.value is not None:
        frame = frame[in_range(frame["value"].astype("float64").to_numpy(), index.value)]
    candidates = frame[list(CANDIDATE_COLUMNS)].astype(CANDIDATE_COLUMNS)
    candidates = candidates.sort_values(["person_id", "index_s", "event_id"])
    keys = ["person_id"] if index.occurrence == Occurrence.FIRST else ["person_id", "index_s"]
    return candidates.drop_duplicates(keys, keep="first").reset_index(drop=True), persons


def _panel(source: OmopSource, index: IndexSpec) -> tuple[pd.DataFrame, Select]:
    spec = EVENT_TABLES["measurement"]
    events = source.table(spec.table)
    when = source.epoch(events.c[spec.datetime], events.c[spec.date])
    members = sorted(set(index.concept_ids))
    filters = [source.concept_filter(events.c[spec.concept], [concept], True) for concept in members]
    persons = select(events.c.person_id).where(filters[0], events.c.value_as_number.is_not(None))
    days = []
    for member, concept_filter in enumerate(filters):
        frame = source.frame(
            select(events.c.person_id, when.label("time_s"), events.c.value_as_number.label("value")).where(
                concept_filter, events.c.value_as_number.is_not(None)
            )
        ).dropna()
        if frame.empty:
            return empty_candidates(), persons
        frame = frame[np.isfinite(frame["value"].astype("float64").to_numpy())]
        day = np.floor_divide(frame["time_s"].astype("float64").to_numpy(), DAY_S).astype("int64")
        taken = pd.DataFrame({"person_id": frame["person_id"].astype("int64").to_numpy(), "day": day})
        days.append(taken.drop_duplicates().assign(member=member))
    counted = pd.concat(days).groupby(["person_id", "day"], sort=True)["member"].nunique()
    complete = counted[counted == len(members)].reset_index()[["person_id", "day"]]
    if index.occurrence == Occurrence.FIRST:
        complete = complete.drop_duplicates("person_id", keep="first")  # sorted by day within each person
    candidates = pd.DataFrame(
        {
            "person_id": complete["person_id"].to_numpy(dtype="int64"),
            "event_id": complete["day"].to_numpy(dtype="int64"),
            "index_s": complete["day"].to_numpy(dtype="float64") * DAY_S,
        }
    )
    return candidates.reset_index(drop=True), persons
