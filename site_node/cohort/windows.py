"""Events of one OMOP domain inside a time window around each chosen example, selected by the database.

A window is given in seconds relative to an anchor of the example (index, prediction time or visit end).
Both ends are inclusive by default: a measurement taken exactly at the end of a feature window that ends
at the prediction time is something the model may see. Prognostic outcome windows start just after the
prediction time (`include_start=False`), so nothing is both a feature and an outcome; a diagnostic
outcome's window (relative to the index) leaves out its end (`include_end=False`), so a day window is that
day without the next midnight.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sqlalchemy import select

from site_node.cohort.omop_source import ANCHORS, OmopSource


@dataclass(frozen=True)
class EventTable:
    """Where a domain's events live in CDM v5.4: table, concept column, time columns and row id."""

    table: str
    concept: str
    datetime: str
    date: str
    row_id: str


EVENT_TABLES: dict[str, EventTable] = {
    "condition": EventTable(
        "condition_occurrence",
        "condition_concept_id",
        "condition_start_datetime",
        "condition_start_date",
        "condition_occurrence_id",
    ),
    "drug": EventTable(
        "drug_exposure",
        "drug_concept_id",
        "drug_exposure_start_datetime",
        "drug_exposure_start_date",
        "drug_exposure_id",
    ),
    "procedure": EventTable(
        "procedure_occurrence",
        "procedure_concept_id",
        "procedure_datetime",
        "procedure_date",
        "procedure_occurrence_id",
    ),
    "measurement": EventTable(
        "measurement", "measurement_concept_id", "measurement_datetime", "measurement_date", "measurement_id"
    ),
    "observation": EventTable(
        "observation", "observation_concept_id", "observation_datetime", "observation_date", "observation_id"
    ),
    # a visit as an event (criteria and outcomes): its start; visit kinds match exactly, without descendants
    "visit": EventTable(
        "visit_occurrence", "visit_concept_id", "visit_start_datetime", "visit_start_date", "visit_occurrence_id"
    ),
}


@dataclass(frozen=True)
class SecondsWindow:
    """[start, end] in seconds after an anchor of the example; `include_start=False` makes it (start, end],
    `include_end=False` [start, end) (a diagnostic outcome's window)."""

    anchor: str
    start: int
    end: int
    include_start: bool = True
    include_end: bool = True

    def __post_init__(self) -> None:
        if self.anchor not in ANCHORS:
            raise ValueError(f"unknown anchor {self.anchor!r}")


def hours_window(anchor: str, start_hours: float, end_hours: float, include_start: bool = True) -> SecondsWindow:
    """A window given in hours (the study spec's unit), rounded to whole seconds like the stored times."""
    return SecondsWindow(anchor, round(start_hours * 3600), round(end_hours * 3600), include_start)


def events_in_window(
    source: OmopSource,
    domain: str,
    concept_ids: Sequence[int],
    window: SecondsWindow,
    *,
    descendants: bool = False,
    value_column: str | None = None,
    require_value: bool = True,
) -> pd.DataFrame:
    """Columns person_id, row_id, offset_s (seconds after the anchor) and, if asked, `value`.

    Rows without a value in `value_column` are left out: a measurement without a number says nothing
    about the level (`require_value=False` keeps them, with a missing value: a drug given without a
    recorded quantity was still given). Only the chosen examples' persons are read (a join with the
    temporary index table).
    """
    spec = EVENT_TABLES[domain]
    events = source.table(spec.table)
    index = source.index
    offset = (source.epoch(events.c[spec.datetime], events.c[spec.date]) - index.c[window.anchor]).label("offset_s")
    columns = [events.c.person_id, events.c[spec.row_id].label("row_id"), offset]
    if value_column is not None:
        columns.append(events.c[value_column].label("value"))
    statement = (
        select(*columns)
        .select_from(events.join(index, events.c.person_id == index.c.person_id))
        .where(source.concept_filter(events.c[spec.concept], concept_ids, descendants))
        .where(offset <= window.end if window.include_end else offset < window.end)
        .where(offset >= window.start if window.include_start else offset > window.start)
    )
    if value_column is not None and require_value:
        statement = statement.where(events.c[value_column].is_not(None))
    frame = source.frame(statement)
    if frame.empty:
        return pd.DataFrame(
            {
                "person_id": pd.Series(dtype="int64"),
                "row_id": pd.Series(dtype="int64"),
                "offset_s": pd.Series(dtype="int64"),
                **({"value": pd.Series(dtype="float64")} if value_column is not None else {}),
            }
        )
    frame = frame.dropna(subset=["offset_s"]).astype({"person_id": "int64", "row_id": "int64", "offset_s": "int64"})
    if value_column in ("value_as_number", "quantity"):  # numbers; the others are concept ids
        frame["value"] = frame["value"].astype("float64")
        if require_value:
            frame = frame[np.isfinite(frame["value"].to_numpy())]  # PostgreSQL NUMERIC can hold 'NaN'
    elif value_column is not None:
        frame["value"] = frame["value"].astype("int64")
    return frame
