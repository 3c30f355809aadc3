"""Which visits make up the study's cohort, and which one represents each patient.

The database selects the visits of the cohort's kinds with their persons, deaths and (if the cohort needs
one) each person's first qualifying condition; the rules that combine them run here on one row per visit:

* age at the index, in completed years, within [min_age, max_age];
* the visit lasts at least max(min_visit_hours, prediction_hours) when the index is the visit start (the
  patient is still in hospital at the prediction time); when the index is the discharge, min_visit_hours;
* the patient has not died at or before the prediction time (the outcome would already be known);
* with condition_concept_ids, one of them (or a descendant) is recorded on or before the index.

A visit without an end is still running: its outcome is unknown, so it is not in the cohort. Then one
visit per person (the privacy unit is the patient): the first, the last, or one drawn by a keyed hash of
the person and visit ids, so the draw is stable across rounds and new visits only change it when drawn.

The rules are recorded as they are applied, in this order, in the cohort's attrition table (`attrition`):
how many patients and visits each one keeps is what a steward reads when a cohort comes out small.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sqlalchemy import Table, func, select
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.selectable import Select

from federation.contract.spec import VISIT_CONCEPTS, CohortSpec, IndexEvent, OnePerPerson, OutcomeSpec
from site_node.cohort import attrition as steps
from site_node.cohort.attrition import Attrition
from site_node.cohort.keyed_hash import keyed_uniform
from site_node.cohort.omop_source import OmopSource
from site_node.cohort.windows import EVENT_TABLES

DAY_S = 86400
YEAR_DAYS = 365.2425


@dataclass
class Cohort:
    """The chosen examples (one row per person, sorted by person id) and every visit of the cohort's kinds."""

    examples: pd.DataFrame
    visits: pd.DataFrame  # all visits of the cohort's kinds (readmission looks for the next one)
    attrition: Attrition  # the criteria up to one visit per person (consent and the split come later)


def cohort_visits(source: OmopSource, cohort: CohortSpec) -> pd.DataFrame:
    """Every visit of the cohort's kinds: visit id, person id, kind, start_s and end_s (seconds)."""
    visit = source.table("visit_occurrence")
    frame = source.frame(
        select(
            visit.c.visit_occurrence_id,
            visit.c.person_id,
            visit.c.visit_concept_id,
            source.epoch(visit.c.visit_start_datetime, visit.c.visit_start_date).label("start_s"),
            source.epoch(visit.c.visit_end_datetime, visit.c.visit_end_date).label("end_s"),
        ).where(visit.c.visit_concept_id.in_(sorted(set(cohort.visit_concept_ids))))
    )
    columns = {"visit_occurrence_id": "int64", "person_id": "int64", "visit_concept_id": "int64"}
    if frame.empty:
        return pd.DataFrame(
            {c: pd.Series(dtype=t) for c, t in {**columns, "start_s": "float64", "end_s": "float64"}.items()}
        )
    frame = frame.dropna(subset=["start_s"]).astype(columns)
    return frame.astype({"start_s": "float64", "end_s": "float64"})


def _persons(source: OmopSource, person_ids: Select) -> pd.DataFrame:
    person = source.table("person")
    frame = source.frame(
        select(
            person.c.person_id,
            person.c.gender_concept_id,
            person.c.year_of_birth,
            person.c.month_of_birth,
            person.c.day_of_birth,
            source.epoch(person.c.birth_datetime).label("birth_s"),
        ).where(person.c.person_id.in_(person_ids))
    )
    return frame.astype({"person_id": "int64"}) if not frame.empty else frame


def _first_time_per_person(
    source: OmopSource,
    table: str,
    concept_filter: Callable[[Table], ColumnElement] | None,
    time_columns: Sequence[str],
    person_ids: Select,
) -> pd.Series:
    """Earliest time (seconds) per person among the rows passing `concept_filter` (None: all rows)."""
    events = source.table(table)
    when = source.epoch(*(events.c[c] for c in time_columns))
    statement = select(events.c.person_id, func.min(when).label("time_s")).where(events.c.person_id.in_(person_ids))
    if concept_filter is not None:
        statement = statement.where(concept_filter(events))
    frame = source.frame(statement.group_by(events.c.person_id))
    if frame.empty:
        return pd.Series(dtype="float64")
    frame = frame.dropna()
    return pd.Series(frame["time_s"].astype("float64").to_numpy(), index=frame["person_id"].astype("int64").to_numpy())


def birth_seconds(persons: pd.DataFrame) -> np.ndarray:
    """Birth time in seconds: birth_datetime if recorded, else the middle of what year/month/day tell."""
    year = persons["year_of_birth"].astype("float64")
    has_month = persons["month_of_birth"].notna()
    month = persons["month_of_birth"].where(has_month, 7).astype("float64")
    day = persons["day_of_birth"].where(persons["day_of_birth"].notna(), np.where(has_month, 15, 1)).astype("float64")
    dates = pd.to_datetime(pd.DataFrame({"year": year, "month": month, "day": day}).astype("Int64"), errors="coerce")
    mid_year = pd.to_datetime(pd.DataFrame({"year": year, "month": 7, "day": 1}).astype("Int64"), errors="coerce")
    dates = dates.fillna(mid_year)
    seconds = (dates - pd.Timestamp(0)).dt.total_seconds().to_numpy(dtype="float64")
    recorded = persons["birth_s"].astype("float64").to_numpy()
    return np.where(np.isfinite(recorded), recorded, seconds)


def completed_years(birth_s: np.ndarray, at_s: np.ndarray) -> np.ndarray:
    """Age in completed years by the calendar (a birthday counts from its first second)."""
    birth = pd.to_datetime(pd.Series(birth_s), unit="s")
    at = pd.to_datetime(pd.Series(at_s), unit="s")
    years = at.dt.year - birth.dt.year
    before_birthday = (at.dt.month * 100 + at.dt.day) < (birth.dt.month * 100 + birth.dt.day)
    return (years - before_birthday.astype(int)).to_numpy()


def select_cohort(source: OmopSource, cohort: CohortSpec, outcome: OutcomeSpec, split_key: bytes) -> Cohort:
    """The qualifying visits, reduced to one example per person (before any consent exclusion).

    Each rule is a boolean mask over the visits; they are combined in the order of the module docstring
    and the visits (and patients) still in after each one are counted into the attrition table.
    """
    visits = cohort_visits(source, cohort)
    visit = source.table("visit_occurrence")
    cohort_persons = select(visit.c.person_id).where(
        visit.c.visit_concept_id.in_(sorted(set(cohort.visit_concept_ids)))
    )
    persons = _persons(source, cohort_persons)
    labels = criteria(cohort, outcome)
    if visits.empty or persons.empty:
        table = Attrition()
        for name in (n for n in steps.STEP_ORDER if n in labels and n != steps.CONSENT):
            table = table.then(name, labels[name], [])
        return Cohort(_empty_examples(), visits, table)
    persons["birth_s"] = birth_seconds(persons)
    deaths = _first_time_per_person(source, "death", None, ("death_datetime", "death_date"), cohort_persons)

    candidates = visits.merge(persons[["person_id", "gender_concept_id", "birth_s"]], on="person_id", how="inner")
    table = Attrition().then(steps.COHORT_VISITS, labels[steps.COHORT_VISITS], candidates["person_id"])
    # A visit without an end is still running (its outcome is unknown): it leaves before anything is computed.
    candidates = candidates.dropna(subset=["end_s"]).reset_index(drop=True)
    table = table.then(steps.VISIT_ENDED, labels[steps.VISIT_ENDED], candidates["person_id"])
    start = candidates["start_s"].to_numpy()
    end = candidates["end_s"].to_numpy()
    index_s = start if cohort.index == IndexEvent.VISIT_START else end
    prediction_s = index_s + round(outcome.prediction_hours * 3600)
    candidates["index_s"] = index_s
    candidates["prediction_s"] = prediction_s
    candidates["visit_end_s"] = end
    candidates["death_s"] = candidates["person_id"].map(deaths).astype("float64")
    age = completed_years(candidates["birth_s"].to_numpy(), index_s)
    candidates["age_years"] = (index_s - candidates["birth_s"].to_numpy()) / (YEAR_DAYS * DAY_S)

    rules: list[tuple[str, np.ndarray]] = []
    in_band = age >= cohort.min_age
    if cohort.max_age is not None:
        in_band &= age <= cohort.max_age
    rules.append((steps.AGE, in_band))
    rules.append((steps.VISIT_LENGTH, end - start >= _required_hours(cohort, outcome) * 3600))
    death = candidates["death_s"].to_numpy()
    rules.append((steps.ALIVE, ~(death <= prediction_s)))  # NaN (no death) compares False and is kept
    if cohort.condition_concept_ids:
        spec = EVENT_TABLES["condition"]
        first_condition = _first_time_per_person(
            source,
            spec.table,
            lambda events: source.concept_filter(events.c[spec.concept], cohort.condition_concept_ids, True),
            (spec.datetime, spec.date),
            cohort_persons,
        )
        rules.append(
            (steps.CONDITION, candidates["person_id"].map(first_condition).astype("float64").to_numpy() <= index_s)
        )
    keep = np.ones(len(candidates), dtype=bool)
    person_ids = candidates["person_id"].to_numpy()
    for name, mask in rules:
        keep &= mask
        table = table.then(name, labels[name], person_ids[keep])
    examples = _one_per_person(candidates[keep], cohort.one_per_person, split_key)
    table = table.then(steps.ONE_PER_PERSON, labels[steps.ONE_PER_PERSON], examples["person_id"])
    return Cohort(examples, visits, table)


def _required_hours(cohort: CohortSpec, outcome: OutcomeSpec) -> float:
    """How long a visit must last: with the admission as index, the patient is still in at the prediction time."""
    if cohort.index == IndexEvent.VISIT_START:
        return max(cohort.min_visit_hours, outcome.prediction_hours)
    return cohort.min_visit_hours


def criteria(cohort: CohortSpec, outcome: OutcomeSpec) -> dict[str, str]:
    """Each attrition step's criterion in words, with the study's values, keyed by step name (in order)."""
    kinds = {concept: name.replace("_", " ") for name, concept in VISIT_CONCEPTS.items()}
    visit_kinds = ", ".join(
        f"{concept} ({kinds[concept]})" if concept in kinds else str(concept)
        for concept in sorted(set(cohort.visit_concept_ids))
    )
    plural = "kinds" if len(set(cohort.visit_concept_ids)) > 1 else "kind"
    age = (
        f"aged {cohort.min_age} or over at the index"
        if cohort.max_age is None
        else f"aged {cohort.min_age} to {cohort.max_age} at the index"
    )
    hours = _required_hours(cohort, outcome)
    labels = {
        steps.COHORT_VISITS: f"visits of {plural} {visit_kinds}",
        steps.VISIT_ENDED: "the visit has ended (an end is recorded)",
        steps.AGE: age,
        steps.VISIT_LENGTH: f"the visit lasts at least {hours:g} h",
        steps.ALIVE: f"alive at the prediction time (index + {outcome.prediction_hours:g} h)",
    }
    if cohort.condition_concept_ids:
        concepts = ", ".join(str(c) for c in sorted(set(cohort.condition_concept_ids)))
        labels[steps.CONDITION] = f"a condition {concepts} (or a descendant) on or before the index"
    choice = {
        OnePerPerson.FIRST: "the first",
        OnePerPerson.LAST: "the last",
        OnePerPerson.RANDOM: "one drawn by the site's keyed hash",
    }[cohort.one_per_person]
    labels[steps.ONE_PER_PERSON] = f"one visit per patient ({choice})"
    labels[steps.CONSENT] = "not withheld by consent (research denials and withdrawals)"
    return labels


def _one_per_person(visits: pd.DataFrame, rule: OnePerPerson, split_key: bytes) -> pd.DataFrame:
    if visits.empty:
        return _empty_examples()
    if rule == OnePerPerson.RANDOM:
        draw = keyed_uniform(
            split_key, "visit", visits["person_id"].to_numpy(), visits["visit_occurrence_id"].to_numpy()
        )
        ordered = visits.assign(_draw=draw).sort_values(["person_id", "_draw", "visit_occurrence_id"])
        chosen = ordered.drop_duplicates("person_id", keep="first").drop(columns="_draw")
    else:
        ordered = visits.sort_values(["person_id", "start_s", "visit_occurrence_id"])
        chosen = ordered.drop_duplicates("person_id", keep="first" if rule == OnePerPerson.FIRST else "last")
    return chosen.sort_values("person_id").reset_index(drop=True)


def _empty_examples() -> pd.DataFrame:
    columns = {
        "visit_occurrence_id": "int64",
        "person_id": "int64",
        "visit_concept_id": "int64",
        "start_s": "float64",
        "end_s": "float64",
        "gender_concept_id": "float64",
        "birth_s": "float64",
        "index_s": "float64",
        "prediction_s": "float64",
        "visit_end_s": "float64",
        "death_s": "float64",
        "age_years": "float64",
    }
    return pd.DataFrame({name: pd.Series(dtype=dtype) for name, dtype in columns.items()})
