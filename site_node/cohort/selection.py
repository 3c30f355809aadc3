"""Which examples make up the study's cohort, and which one represents each patient.

A visit-level cohort (index visit_start or visit_end) starts from the visits of the cohort's kinds; a
person-level cohort from its index events (`index_events`: the first or each condition, drug, procedure,
measurement or panel day, or a calendar date). The database selects them with their persons, deaths and
(if the cohort needs one) each person's first qualifying condition; the rules that combine them run here
on one row per candidate:

* visit-level: the visit has ended; age at the index, in completed years, within [min_age, max_age]; the
  visit lasts at least max(min_visit_hours, prediction_hours) when the index is the visit start (the patient
  is still in hospital at the prediction time), min_visit_hours when it is the discharge;
* person-level: age at the index as above;
* the patient has not died at or before the prediction time (the outcome would already be known);
* with condition_concept_ids, one of them (or a descendant) is recorded on or before the index;
* the observation-period requirement, then each inclusion and each exclusion criterion (`requirements`);
  a calendar-date index always requires an observation period covering the date.

A visit without an end is still running: its outcome is unknown, so it is not in the cohort. Then one
example per person (the privacy unit is the patient): the first, the last, or one drawn by a keyed hash of
the person and visit (or event) ids, so the draw is stable across rounds and new visits only change it
when drawn.

The rules are recorded as they are applied, in this order, in the cohort's attrition table (`attrition`):
how many patients and examples each one keeps is what a steward reads when a cohort comes out small.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sqlalchemy import Table, func, select
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.selectable import Select

from federation.contract.spec import (
    VISIT_CONCEPTS,
    CohortSpec,
    Criterion,
    IndexEvent,
    ObservationRequirement,
    Occurrence,
    OnePerPerson,
    OutcomeSpec,
    ValueRange,
    Window,
)
from site_node.cohort import attrition as steps
from site_node.cohort.attrition import Attrition
from site_node.cohort.index_events import index_events
from site_node.cohort.keyed_hash import keyed_uniform
from site_node.cohort.omop_source import OmopSource
from site_node.cohort.requirements import criterion_mask, has_observation_periods, observation_mask
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
    if frame.empty:
        return _empty_visits()
    frame = frame.dropna(subset=["start_s"]).astype(_VISIT_COLUMNS)
    return frame.astype({"start_s": "float64", "end_s": "float64"})


_VISIT_COLUMNS = {"visit_occurrence_id": "int64", "person_id": "int64", "visit_concept_id": "int64"}


def _empty_visits() -> pd.DataFrame:
    columns = {**_VISIT_COLUMNS, "start_s": "float64", "end_s": "float64"}
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in columns.items()})


def persons_of(source: OmopSource, person_ids: Select) -> pd.DataFrame:
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


Rule = tuple[str, "np.ndarray | Callable[[pd.DataFrame], np.ndarray]"]


def select_cohort(source: OmopSource, cohort: CohortSpec, outcome: OutcomeSpec, split_key: bytes) -> Cohort:
    """The qualifying examples, reduced to one example per person (before any consent exclusion).

    Each rule is a boolean mask over the candidates (visits or index events); they are combined in the order
    of the module docstring and the candidates (and patients) still in after each one are counted into the
    attrition table. The rules that read more of the database (observation periods, criteria) are applied
    to the candidates still in only.
    """
    recorded = not _needs_observation(cohort) or has_observation_periods(source)
    labels = criteria(cohort, outcome, observation_recorded=recorded)
    if cohort.visit_level:
        return _visit_cohort(source, cohort, outcome, split_key, labels)
    return _person_cohort(source, cohort, outcome, split_key, labels)


def _empty_cohort(labels: dict[str, str], visits: pd.DataFrame) -> Cohort:
    table = Attrition()
    for name in (n for n in labels if n != steps.CONSENT):
        table = table.then(name, labels[name], [])
    return Cohort(_empty_examples(), visits, table)


def _visit_cohort(
    source: OmopSource, cohort: CohortSpec, outcome: OutcomeSpec, split_key: bytes, labels: dict[str, str]
) -> Cohort:
    visits = cohort_visits(source, cohort)
    visit = source.table("visit_occurrence")
    cohort_persons = select(visit.c.person_id).where(
        visit.c.visit_concept_id.in_(sorted(set(cohort.visit_concept_ids)))
    )
    persons = persons_of(source, cohort_persons)
    if visits.empty or persons.empty:
        return _empty_cohort(labels, visits)
    persons["birth_s"] = birth_seconds(persons)
    deaths = _first_time_per_person(source, "death", None, ("death_datetime", "death_date"), cohort_persons)

    candidates = visits.merge(persons[["person_id", "gender_concept_id", "birth_s"]], on="person_id", how="inner")
    if cohort.index.occurrence == Occurrence.FIRST:  # only each patient's first visit of the kinds
        candidates = candidates.sort_values(["person_id", "start_s", "visit_occurrence_id"])
        candidates = candidates.drop_duplicates("person_id", keep="first").reset_index(drop=True)
    table = Attrition().then(steps.COHORT_VISITS, labels[steps.COHORT_VISITS], candidates["person_id"])
    # A visit without an end is still running (its outcome is unknown): it leaves before anything is computed.
    candidates = candidates.dropna(subset=["end_s"]).reset_index(drop=True)
    table = table.then(steps.VISIT_ENDED, labels[steps.VISIT_ENDED], candidates["person_id"])
    start = candidates["start_s"].to_numpy()
    end = candidates["end_s"].to_numpy()
    index_s = start if cohort.index.event == IndexEvent.VISIT_START else end
    prediction_s = index_s + round(outcome.prediction_hours * 3600)
    candidates["index_s"] = index_s
    candidates["prediction_s"] = prediction_s
    candidates["visit_end_s"] = end
    candidates["event_id"] = candidates["visit_occurrence_id"]
    candidates["death_s"] = candidates["person_id"].map(deaths).astype("float64")
    age = completed_years(candidates["birth_s"].to_numpy(), index_s)
    candidates["age_years"] = (index_s - candidates["birth_s"].to_numpy()) / (YEAR_DAYS * DAY_S)

    rules: list[Rule] = [(steps.AGE, _in_age_band(cohort, age))]
    rules.append((steps.VISIT_LENGTH, end - start >= _required_hours(cohort, outcome) * 3600))
    death = candidates["death_s"].to_numpy()
    rules.append((steps.ALIVE, ~(death <= prediction_s)))  # NaN (no death) compares False and is kept
    rules += _shared_rules(source, cohort, candidates, cohort_persons)
    table, kept = _apply(table, labels, candidates, rules)
    examples = _one_per_person(kept, cohort.one_per_person, split_key)
    table = table.then(steps.ONE_PER_PERSON, labels[steps.ONE_PER_PERSON], examples["person_id"])
    return Cohort(examples, visits, table)


def _person_cohort(
    source: OmopSource, cohort: CohortSpec, outcome: OutcomeSpec, split_key: bytes, labels: dict[str, str]
) -> Cohort:
    no_visits = _empty_visits()  # a person-level cohort has no index visits (and no readmission)
    events, index_persons = index_events(source, cohort.index)
    persons = persons_of(source, index_persons) if not events.empty else pd.DataFrame()
    if events.empty or persons.empty:
        return _empty_cohort(labels, no_visits)
    persons["birth_s"] = birth_seconds(persons)
    deaths = _first_time_per_person(source, "death", None, ("death_datetime", "death_date"), index_persons)

    candidates = events.merge(persons[["person_id", "gender_concept_id", "birth_s"]], on="person_id", how="inner")
    candidates = candidates.sort_values(["person_id", "index_s", "event_id"]).reset_index(drop=True)
    table = Attrition().then(steps.INDEX_EVENTS, labels[steps.INDEX_EVENTS], candidates["person_id"])
    index_s = candidates["index_s"].to_numpy(dtype=np.float64)
    prediction_s = index_s + round(outcome.prediction_hours * 3600)
    # No visit: the visit columns hold the index (so every anchor is defined), the visit ids 0.
    candidates["visit_occurrence_id"] = 0
    candidates["visit_concept_id"] = 0
    candidates["start_s"] = index_s
    candidates["end_s"] = index_s
    candidates["prediction_s"] = prediction_s
    candidates["visit_end_s"] = index_s
    candidates["death_s"] = candidates["person_id"].map(deaths).astype("float64")
    age = completed_years(candidates["birth_s"].to_numpy(), index_s)
    candidates["age_years"] = (index_s - candidates["birth_s"].to_numpy()) / (YEAR_DAYS * DAY_S)

    death = candidates["death_s"].to_numpy()
    rules: list[Rule] = [(steps.AGE, _in_age_band(cohort, age)), (steps.ALIVE, ~(death <= prediction_s))]
    rules += _shared_rules(source, cohort, candidates, index_persons)
    table, kept = _apply(table, labels, candidates, rules)
    examples = _one_per_person(kept, cohort.one_per_person, split_key, person_level=True)
    table = table.then(steps.ONE_PER_PERSON, labels[steps.ONE_PER_PERSON], examples["person_id"])
    return Cohort(examples, no_visits, table)


def _in_age_band(cohort: CohortSpec, age: np.ndarray) -> np.ndarray:
    in_band = age >= cohort.min_age
    if cohort.max_age is not None:
        in_band &= age <= cohort.max_age
    return in_band


def _shared_rules(source: OmopSource, cohort: CohortSpec, candidates: pd.DataFrame, persons: Select) -> list[Rule]:
    """The rules of both levels after age, length and survival: condition, observation, criteria."""
    rules: list[Rule] = []
    if cohort.condition_concept_ids:
        spec = EVENT_TABLES["condition"]
        first_condition = _first_time_per_person(
            source,
            spec.table,
            lambda events: source.concept_filter(events.c[spec.concept], cohort.condition_concept_ids, True),
            (spec.datetime, spec.date),
            persons,
        )
        index_s = candidates["index_s"].to_numpy()
        rules.append(
            (steps.CONDITION, candidates["person_id"].map(first_condition).astype("float64").to_numpy() <= index_s)
        )
    requirement = observation_requirement(cohort)
    if requirement is not None:
        rules.append((steps.OBSERVATION, lambda rows: observation_mask(source, rows, requirement, persons)))
    for number, criterion in enumerate(cohort.inclusion, start=1):
        rules.append(
            (steps.inclusion(number), lambda rows, c=criterion: criterion_mask(source, c, rows, persons, True))
        )
    for number, criterion in enumerate(cohort.exclusion, start=1):
        rules.append(
            (steps.exclusion(number), lambda rows, c=criterion: criterion_mask(source, c, rows, persons, False))
        )
    return rules


def _apply(
    table: Attrition, labels: dict[str, str], candidates: pd.DataFrame, rules: list[Rule]
) -> tuple[Attrition, pd.DataFrame]:
    """Combine the rules in order, counting what each keeps; a callable rule sees the rows still in only."""
    keep = np.ones(len(candidates), dtype=bool)
    person_ids = candidates["person_id"].to_numpy()
    for name, rule in rules:
        if callable(rule):
            rows = np.flatnonzero(keep)
            if rows.size:
                keep[rows[~np.asarray(rule(candidates.iloc[rows]), dtype=bool)]] = False
        else:
            keep &= rule
        table = table.then(name, labels[name], person_ids[keep])
    return table, candidates[keep]


def observation_requirement(cohort: CohortSpec) -> ObservationRequirement | None:
    """The cohort's observation-period requirement; a calendar-date index always needs one covering the date."""
    if cohort.observation_period is not None:
        return cohort.observation_period
    if cohort.index.event == IndexEvent.DATE:
        return ObservationRequirement()
    return None


def _needs_observation(cohort: CohortSpec) -> bool:
    return observation_requirement(cohort) is not None


def _required_hours(cohort: CohortSpec, outcome: OutcomeSpec) -> float:
    """How long a visit must last: with the admission as index, the patient is still in at the prediction time."""
    if cohort.index.event == IndexEvent.VISIT_START:
        return max(cohort.min_visit_hours, outcome.prediction_hours)
    return cohort.min_visit_hours


# --- the criteria in words ---------------------------------------------------------------------------

_NOUNS = {  # domain: (one record, several records)
    "condition": ("condition", "conditions"),
    "drug": ("drug exposure to", "drug exposures to"),
    "procedure": ("procedure", "procedures"),
    "measurement": ("measurement", "measurements"),
    "observation": ("observation", "observations"),
    "visit": ("visit of kind", "visits of kind"),
}


def _concepts(concept_ids: Sequence[int]) -> str:
    return ", ".join(str(c) for c in sorted(set(concept_ids)))


def value_words(value: ValueRange | None) -> str:
    """' with a value of at least 6.5' (both ends included), '' without a range."""
    if value is None:
        return ""
    if value.min is not None and value.max is not None:
        return f" with a value from {value.min:g} to {value.max:g}"
    if value.min is not None:
        return f" with a value of at least {value.min:g}"
    return f" with a value of at most {value.max:g}"


def _amount(hours: float) -> str:
    hours = abs(hours)
    if hours >= 24 and hours % 24 == 0:
        days = hours / 24
        return f"{days:g} day" if days == 1 else f"{days:g} days"
    return f"{hours:g} h"


def _moment(hours: float) -> str:
    if hours == 0:
        return "the index"
    return f"{_amount(hours)} {'before' if hours < 0 else 'after'} the index"


def window_words(window: Window) -> str:
    """'from 365 days before the index to the index', 'at the index', ..."""
    if window.start_hours == window.end_hours:
        return f"at {_moment(window.start_hours)}"
    return f"from {_moment(window.start_hours)} to {_moment(window.end_hours)}"


def _record(domain: str, concept_ids: Sequence[int], value: ValueRange | None, count: int = 1) -> str:
    one, several = _NOUNS[domain]
    noun = one if count == 1 else several
    below = "" if domain == "visit" else " (or a descendant)"
    return f"{noun} {_concepts(concept_ids)}{below}{value_words(value)}"


def _criterion_words(criterion: Criterion, include: bool, visit_level: bool) -> str:
    n = criterion.min_count
    what = _record(criterion.domain, criterion.concept_ids, criterion.value, n)
    when = window_words(criterion.window)
    own = ", not counting the index visit" if visit_level and criterion.domain == "visit" else ""
    if include:
        amount = "" if n == 1 else f"at least {n} "
        article = "" if n != 1 else ("an " if what[0] in "aeiou" else "a ")
        return f"{article}{amount}{what} {when}{own}"
    return f"no {what} {when}{own}" if n == 1 else f"fewer than {n} {what} {when}{own}"


def _index_words(cohort: CohortSpec) -> str:
    index = cohort.index
    each = index.occurrence == Occurrence.EACH
    if index.event == IndexEvent.DATE:
        return f"a record in the person table; the index is {index.date} 00:00"
    if index.event == IndexEvent.PANEL:
        which = "each such day (00:00) is a candidate index" if each else "the first such day (00:00) is the index"
        return (
            f"a day with every measurement of the panel {_concepts(index.concept_ids)} (each, or a descendant, "
            f"with a value); {which}"
        )
    domain = {
        IndexEvent.CONDITION: "condition",
        IndexEvent.DRUG: "drug",
        IndexEvent.PROCEDURE: "procedure",
        IndexEvent.MEASUREMENT: "measurement",
    }[index.event]
    what = _record(domain, index.concept_ids, index.value)
    article = "an" if what[0] in "aeiou" else "a"
    return f"{article} {what}; {'each one is a candidate index' if each else 'the first is the index'}"


def _observation_words(cohort: CohortSpec, recorded: bool) -> str:
    requirement = observation_requirement(cohort)
    assert requirement is not None
    if cohort.index.event == IndexEvent.DATE:
        words = f"in observation on {cohort.index.date} (an observation period covers the index)"
    else:
        words = "the index lies in an observation period"
    ends = []
    if requirement.prior_days:
        ends.append(f"{_amount(requirement.prior_days * 24)} of it before the index")
    if requirement.after_days:
        ends.append(f"{_amount(requirement.after_days * 24)} after it")
    if ends:
        words += ", with at least " + " and ".join(ends)
    if not recorded:
        words += (
            " - this database records no observation period (observation_period is missing or empty), so nobody's "
            "observation can be shown and the criterion removes everyone"
        )
    return words


def criteria(cohort: CohortSpec, outcome: OutcomeSpec, *, observation_recorded: bool = True) -> dict[str, str]:
    """Each attrition step's criterion in words, with the study's values, keyed by step name (in order).

    `observation_recorded` False (a database without observation periods) adds why the observation-period
    requirement removes everyone.
    """
    age = (
        f"aged {cohort.min_age} or over at the index"
        if cohort.max_age is None
        else f"aged {cohort.min_age} to {cohort.max_age} at the index"
    )
    labels: dict[str, str] = {}
    if cohort.visit_level:
        kinds = {concept: name.replace("_", " ") for name, concept in VISIT_CONCEPTS.items()}
        visit_kinds = ", ".join(
            f"{concept} ({kinds[concept]})" if concept in kinds else str(concept)
            for concept in sorted(set(cohort.visit_concept_ids))
        )
        plural = "kinds" if len(set(cohort.visit_concept_ids)) > 1 else "kind"
        first = "; only each patient's first is a candidate" if cohort.index.occurrence == Occurrence.FIRST else ""
        hours = _required_hours(cohort, outcome)
        labels[steps.COHORT_VISITS] = f"visits of {plural} {visit_kinds}{first}"
        labels[steps.VISIT_ENDED] = "the visit has ended (an end is recorded)"
        labels[steps.AGE] = age
        labels[steps.VISIT_LENGTH] = f"the visit lasts at least {hours:g} h"
    else:
        labels[steps.INDEX_EVENTS] = _index_words(cohort)
        labels[steps.AGE] = age
    labels[steps.ALIVE] = f"alive at the prediction time (index + {outcome.prediction_hours:g} h)"
    if cohort.condition_concept_ids:
        concepts = _concepts(cohort.condition_concept_ids)
        labels[steps.CONDITION] = f"a condition {concepts} (or a descendant) on or before the index"
    if _needs_observation(cohort):
        labels[steps.OBSERVATION] = _observation_words(cohort, observation_recorded)
    for number, criterion in enumerate(cohort.inclusion, start=1):
        words = _criterion_words(criterion, True, cohort.visit_level)
        labels[steps.inclusion(number)] = f"inclusion {number}: {words}"
    for number, criterion in enumerate(cohort.exclusion, start=1):
        words = _criterion_words(criterion, False, cohort.visit_level)
        labels[steps.exclusion(number)] = f"exclusion {number}: {words}"
    choice = {
        OnePerPerson.FIRST: "the first",
        OnePerPerson.LAST: "the last",
        OnePerPerson.RANDOM: "one drawn by the site's keyed hash",
    }[cohort.one_per_person]
    unit = "visit" if cohort.visit_level else "index event"
    labels[steps.ONE_PER_PERSON] = f"one {unit} per patient ({choice})"
    labels[steps.CONSENT] = "not withheld by consent (research denials and withdrawals)"
    return labels


def _one_per_person(
    candidates: pd.DataFrame, rule: OnePerPerson, split_key: bytes, person_level: bool = False
) -> pd.DataFrame:
    if candidates.empty:
        return _empty_examples()
    ids = "event_id" if person_level else "visit_occurrence_id"
    if rule == OnePerPerson.RANDOM:
        purpose = "index-event" if person_level else "visit"
        draw = keyed_uniform(split_key, purpose, candidates["person_id"].to_numpy(), candidates[ids].to_numpy())
        ordered = candidates.assign(_draw=draw).sort_values(["person_id", "_draw", ids])
        chosen = ordered.drop_duplicates("person_id", keep="first").drop(columns="_draw")
    else:
        ordered = candidates.sort_values(["person_id", "start_s" if not person_level else "index_s", ids])
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
        "event_id": "int64",
        "death_s": "float64",
        "age_years": "float64",
    }
    return pd.DataFrame({name: pd.Series(dtype=dtype) for name, dtype in columns.items()})
