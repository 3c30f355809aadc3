"""Cohort definitions a consortium asks for, on a small hand-made OMOP database with every answer worked out.

Person-level cohorts (index: the first or each condition, drug, procedure, measurement with a value range,
a panel day, a calendar date), inclusion and exclusion criteria in windows with counts, and the
observation-period requirement; each checked for the exact examples, index times and attrition, on SQLite
and on PostgreSQL. The same database serves tests/test_outcomes.py.

Persons (IP = inpatient visit 9201, OP = outpatient 9202, ER = emergency 9203; "date" = a date-only record,
read as that day's 00:00):
  1  male, born 1950-01-01; observed 2020-01-01 .. 2024-12-31; heart failure 2022-03-01 10:00 and
     2023-06-01 10:00; warfarin 2022-02-10 (date) and 2022-02-25 (date); HbA1c 7.1 2022-02-20 09:00;
     IP 2022-03-01 08:00 -> 03-04 08:00 (V101), IP 2023-06-01 10:00 -> 06-05 10:00 (V102), OP 2023-05-01
     09:00 -> 09:30; ventilation 2022-03-02 08:00; creatinine 1.2 2022-03-03 08:00; died 2024-01-15 12:00.
  2  female, born 1960-05-05; observed 2022-01-01 .. 2023-12-31; a descendant of heart failure (via
     concept_ancestor) 2022-06-15 (date); diabetes 2021-12-01 (date); HbA1c 6.0 2022-06-15 08:00 and 6.8
     2023-01-10 08:00, glucose 140 2023-01-10 07:00; IP 2023-01-10 08:00 -> 01-12 08:00 (V201);
     ventilation 2023-01-18 08:00; creatinine 2.5 2023-01-12 07:00.
  3  male, born 2010-01-01; heart failure 2022-01-01 (date); no observation period (a child).
  4  female, born 1970-07-07; heart failure 2022-09-01 12:00, died 8 h later; no observation period.
  5  male, born 1945-03-03; observed 2019-01-01 .. 2025-06-30; warfarin 2023-03-01 08:00 and 2023-05-01
     (date); HbA1c 9.0 2023-04-01 09:00 and glucose 210 2023-04-01 10:00; diabetes 2023-04-01 (date) and
     2023-06-15 (date); IP 2023-04-10 08:00 -> 04-14 08:00 (V501), IP 2023-06-01 08:00 -> 06-03 08:00
     (V502); ventilation 2023-04-18 08:00:01; creatinine 2.0 2023-04-12 08:00.
  6  female, born 1980-02-02; observed 2023-06-01 .. 2024-06-01; glucose 95 2023-07-01 23:00 and HbA1c 5.5
     2023-07-02 01:00 (two days), HbA1c 6.2 2023-08-01 13:00 and glucose 101 2023-08-01 13:30; diabetes
     2023-08-02 (date) and 2023-11-01 (date, after death); IP 2023-08-01 12:00 -> 08-04 12:00 (V601), ER
     2023-08-20 10:00 -> 14:00; ventilation 2023-08-03 10:00; creatinine 3.0 2023-08-02 11:00; died
     2023-10-01 12:00.
  7  male, born 1990-09-09; observed 2022-06-01 .. 2023-06-01; nothing else.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import create_engine, text

from federation.contract import StudyError, load_study, parse_study, study_hash
from federation.contract.protocol import SiteStatus
from federation.contract.spec import (
    CohortSpec,
    CovariateSpec,
    Criterion,
    IndexEvent,
    IndexSpec,
    LogisticRegressionSpec,
    ObservationRequirement,
    Occurrence,
    OnePerPerson,
    OutcomeKind,
    OutcomeSpec,
    PrivacySpec,
    StudyInfo,
    StudySpec,
    ValueCovariate,
    ValueRange,
    Window,
)
from omop_etl.identity import load_or_create_secret
from site_node.cohort import StudyDataset, build_dataset
from site_node.cohort.omop_source import OmopSource
from site_node.cohort.requirements import count_in_windows
from site_node.cohort.scaling import value_scale
from site_node.cohort.selection import select_cohort
from site_node.config import load_site_config
from site_node.participation import SiteNode
from tests.foreign_omop import build_foreign_omop
from tests.site_helpers import ROOT, fresh_site, initial_state, instruction, write_site
from tests.test_cohort_features import EHR, Rows, database_of, write

HEART_FAILURE, HF_DESCENDANT, DIABETES = 316139, 444031, 201826
WARFARIN, VENTILATION = 1310149, 4230167
HBA1C, GLUCOSE, CREATININE = 3004410, 3004501, 3016723
INPATIENT, OUTPATIENT, EMERGENCY = 9201, 9202, 9203
KEY = b"site-secret-for-cohort-definitions"
AS_OF = datetime(2025, 1, 1)
EPOCH = datetime(1970, 1, 1)


class MoreRows(Rows):
    def drug(self, person_id: int, concept: int, at: date | datetime) -> None:
        self.add(
            "drug_exposure",
            drug_exposure_id=self.next_id(),
            person_id=person_id,
            drug_concept_id=concept,
            drug_exposure_start_date=at.date() if isinstance(at, datetime) else at,
            drug_exposure_start_datetime=at if isinstance(at, datetime) else None,
            drug_exposure_end_date=at.date() if isinstance(at, datetime) else at,
            drug_type_concept_id=EHR,
        )

    def procedure(self, person_id: int, concept: int, at: datetime) -> None:
        self.add(
            "procedure_occurrence",
            procedure_occurrence_id=self.next_id(),
            person_id=person_id,
            procedure_concept_id=concept,
            procedure_date=at.date(),
            procedure_datetime=at,
            procedure_type_concept_id=EHR,
        )


def definition_rows() -> MoreRows:
    r = MoreRows()
    # 1
    r.person(1, 8507, date(1950, 1, 1))
    r.observation_period(1, date(2020, 1, 1), date(2024, 12, 31))
    r.condition(1, HEART_FAILURE, datetime(2022, 3, 1, 10))
    r.condition(1, HEART_FAILURE, datetime(2023, 6, 1, 10))
    r.drug(1, WARFARIN, date(2022, 2, 10))
    r.drug(1, WARFARIN, date(2022, 2, 25))
    r.measurement(1, HBA1C, datetime(2022, 2, 20, 9), 7.1)
    r.visit(101, 1, datetime(2022, 3, 1, 8), datetime(2022, 3, 4, 8))
    r.visit(102, 1, datetime(2023, 6, 1, 10), datetime(2023, 6, 5, 10))
    r.visit(103, 1, datetime(2023, 5, 1, 9), datetime(2023, 5, 1, 9, 30), kind=OUTPATIENT)
    r.procedure(1, VENTILATION, datetime(2022, 3, 2, 8))
    r.measurement(1, CREATININE, datetime(2022, 3, 3, 8), 1.2)
    r.death(1, datetime(2024, 1, 15, 12))
    # 2
    r.person(2, 8532, date(1960, 5, 5))
    r.observation_period(2, date(2022, 1, 1), date(2023, 12, 31))
    r.condition(2, HF_DESCENDANT, date(2022, 6, 15))
    r.condition(2, DIABETES, date(2021, 12, 1))
    r.measurement(2, HBA1C, datetime(2022, 6, 15, 8), 6.0)
    r.measurement(2, HBA1C, datetime(2023, 1, 10, 8), 6.8)
    r.measurement(2, GLUCOSE, datetime(2023, 1, 10, 7), 140)
    r.visit(201, 2, datetime(2023, 1, 10, 8), datetime(2023, 1, 12, 8))
    r.procedure(2, VENTILATION, datetime(2023, 1, 18, 8))
    r.measurement(2, CREATININE, datetime(2023, 1, 12, 7), 2.5)
    # 3: a child
    r.person(3, 8507, date(2010, 1, 1))
    r.condition(3, HEART_FAILURE, date(2022, 1, 1))
    # 4: died 8 h after the index
    r.person(4, 8532, date(1970, 7, 7))
    r.condition(4, HEART_FAILURE, datetime(2022, 9, 1, 12))
    r.death(4, datetime(2022, 9, 1, 20))
    # 5
    r.person(5, 8507, date(1945, 3, 3))
    r.observation_period(5, date(2019, 1, 1), date(2025, 6, 30))
    r.drug(5, WARFARIN, datetime(2023, 3, 1, 8))
    r.drug(5, WARFARIN, date(2023, 5, 1))
    r.measurement(5, HBA1C, datetime(2023, 4, 1, 9), 9.0)
    r.measurement(5, GLUCOSE, datetime(2023, 4, 1, 10), 210)
    r.condition(5, DIABETES, date(2023, 4, 1))
    r.condition(5, DIABETES, date(2023, 6, 15))
    r.visit(501, 5, datetime(2023, 4, 10, 8), datetime(2023, 4, 14, 8))
    r.visit(502, 5, datetime(2023, 6, 1, 8), datetime(2023, 6, 3, 8))
    r.procedure(5, VENTILATION, datetime(2023, 4, 18, 8, 0, 1))
    r.measurement(5, CREATININE, datetime(2023, 4, 12, 8), 2.0)
    # 6
    r.person(6, 8532, date(1980, 2, 2))
    r.observation_period(6, date(2023, 6, 1), date(2024, 6, 1))
    r.measurement(6, GLUCOSE, datetime(2023, 7, 1, 23), 95)
    r.measurement(6, HBA1C, datetime(2023, 7, 2, 1), 5.5)
    r.measurement(6, HBA1C, datetime(2023, 8, 1, 13), 6.2)
    r.measurement(6, GLUCOSE, datetime(2023, 8, 1, 13, 30), 101)
    r.condition(6, DIABETES, date(2023, 8, 2))
    r.condition(6, DIABETES, date(2023, 11, 1))
    r.visit(601, 6, datetime(2023, 8, 1, 12), datetime(2023, 8, 4, 12))
    r.visit(602, 6, datetime(2023, 8, 20, 10), datetime(2023, 8, 20, 14), kind=EMERGENCY)
    r.procedure(6, VENTILATION, datetime(2023, 8, 3, 10))
    r.measurement(6, CREATININE, datetime(2023, 8, 2, 11), 3.0)
    r.death(6, datetime(2023, 10, 1, 12))
    # 7
    r.person(7, 8507, date(1990, 9, 9))
    r.observation_period(7, date(2022, 6, 1), date(2023, 6, 1))
    r.add(
        "concept_ancestor",
        ancestor_concept_id=HEART_FAILURE,
        descendant_concept_id=HF_DESCENDANT,
        min_levels_of_separation=1,
        max_levels_of_separation=1,
    )
    return r


BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


@pytest.fixture(scope="module", params=BACKENDS)
def definitions_db(request, tmp_path_factory) -> Iterator[tuple[str, str | None]]:
    """(url, schema) of the database above on SQLite, then on PostgreSQL in a fresh schema (read only)."""
    yield from definitions_database(request, tmp_path_factory)


def definitions_database(request, tmp_path_factory) -> Iterator[tuple[str, str | None]]:
    """The fixture's body, for other modules' fixtures (tests/test_outcomes.py)."""
    yield from database_of(request, tmp_path_factory, "definitions", definition_rows())


def sqlite_copy(tmp_path, rows: Rows | None = None) -> tuple[str, None]:
    url = f"sqlite:///{tmp_path / 'omop.sqlite'}"
    write(url, None, rows or definition_rows())
    return url, None


# --- the study ------------------------------------------------------------------------------------------


def spec(cohort: CohortSpec, outcome: OutcomeSpec | None = None, covariates: CovariateSpec | None = None) -> StudySpec:
    return StudySpec(
        study=StudyInfo(id="cohort-definitions", title="hand-made cohort definitions"),
        cohort=cohort,
        covariates=covariates or CovariateSpec(demographics=["age", "gender"]),
        outcome=outcome or OutcomeSpec(kind=OutcomeKind.DEATH, window_days=730),
        model=LogisticRegressionSpec(),
        privacy=PrivacySpec(target_epsilon=3.0),
    )


def person_cohort(event: IndexEvent, concept_ids=(), **cohort) -> CohortSpec:
    index = cohort.pop("index", None) or IndexSpec(event=event, concept_ids=list(concept_ids))
    return CohortSpec(index=index, min_age=18, **cohort)


def visit_cohort(**cohort) -> CohortSpec:
    return CohortSpec(visit_concept_ids=[INPATIENT], min_age=18, **cohort)


def build(db: tuple[str, str | None], study: StudySpec) -> StudyDataset:
    url, schema = db
    return build_dataset(url, study, split_key=KEY, schema=schema, as_of=AS_OF)


def chosen(db: tuple[str, str | None], study: StudySpec) -> dict[int, datetime]:
    """Each chosen example's index time, by person (the cohort before consent, as the build selects it)."""
    url, schema = db
    with OmopSource.open(url, schema) as source:
        examples = select_cohort(source, study.cohort, study.outcome, KEY).examples
    return {int(p): _moment(s) for p, s in zip(examples["person_id"], examples["index_s"], strict=True)}


def chosen_visits(db: tuple[str, str | None], study: StudySpec) -> dict[int, int]:
    url, schema = db
    with OmopSource.open(url, schema) as source:
        examples = select_cohort(source, study.cohort, study.outcome, KEY).examples
    return dict(zip(examples["person_id"].tolist(), examples["visit_occurrence_id"].tolist(), strict=True))


def _moment(seconds: float) -> datetime:
    return EPOCH + timedelta(seconds=float(seconds))


def steps(ds: StudyDataset) -> list[tuple[str, int, int]]:
    return [(s.name, s.persons, s.examples) for s in ds.attrition.steps]


# --- condition index ------------------------------------------------------------------------------------


def test_the_first_condition_is_the_index_descendants_included(definitions_db):
    study = spec(person_cohort(IndexEvent.CONDITION, [HEART_FAILURE]))
    ds = build(definitions_db, study)
    # 1 and 2 (a descendant, date only); 3 is a child, 4 died 8 h after the index (before the prediction time)
    assert chosen(definitions_db, study) == {1: datetime(2022, 3, 1, 10), 2: datetime(2022, 6, 15)}
    assert ds.person_ids.tolist() == [1, 2]
    assert steps(ds) == [
        ("index-events", 4, 4),
        ("age", 3, 3),
        ("alive-at-prediction", 2, 2),
        ("one-per-person", 2, 2),
        ("consent", 2, 2),
    ]
    assert ds.attrition.step("index-events").criterion == (
        f"a condition {HEART_FAILURE} (or a descendant); the first is the index"
    )
    assert ds.attrition.step("one-per-person").criterion == "one index event per patient (the first)"
    # the features are computed at the index: age at 2022-03-01 10:00 for person 1
    age = ds.features[0, ds.feature_names.index("age")]
    assert age == pytest.approx((datetime(2022, 3, 1, 10) - datetime(1950, 1, 1)).total_seconds() / 31556952 / 100)
    # death within 730 days of the prediction time: person 1 died 684 days after it
    assert ds.labels.tolist() == [1, 0]


def test_each_occurrence_lets_one_per_person_choose(definitions_db):
    index = IndexSpec(event=IndexEvent.CONDITION, concept_ids=[HEART_FAILURE], occurrence=Occurrence.EACH)
    study = spec(person_cohort(IndexEvent.CONDITION, index=index, one_per_person=OnePerPerson.LAST))
    assert chosen(definitions_db, study) == {1: datetime(2023, 6, 1, 10), 2: datetime(2022, 6, 15)}
    ds = build(definitions_db, study)
    assert steps(ds)[0] == ("index-events", 4, 5)  # person 1 has two heart-failure records
    assert ds.attrition.step("index-events").criterion.endswith("each one is a candidate index")
    first = spec(person_cohort(IndexEvent.CONDITION, index=index, one_per_person=OnePerPerson.FIRST))
    assert chosen(definitions_db, first)[1] == datetime(2022, 3, 1, 10)
    drawn = spec(person_cohort(IndexEvent.CONDITION, index=index, one_per_person=OnePerPerson.RANDOM))
    assert chosen(definitions_db, drawn) == chosen(definitions_db, drawn)  # the keyed draw is stable
    assert chosen(definitions_db, drawn)[1] in (datetime(2022, 3, 1, 10), datetime(2023, 6, 1, 10))


def test_without_concept_ancestors_the_descendant_does_not_index(tmp_path):
    rows = definition_rows()
    del rows.tables["concept_ancestor"]
    db = sqlite_copy(tmp_path, rows)
    assert chosen(db, spec(person_cohort(IndexEvent.CONDITION, [HEART_FAILURE]))) == {1: datetime(2022, 3, 1, 10)}


# --- drug and measurement indexes -------------------------------------------------------------------------


def test_a_drug_index_with_an_inclusion_window_and_a_value_range(definitions_db):
    hba1c_around = Criterion(
        domain="measurement",
        concept_ids=[HBA1C],
        value=ValueRange(min=6.5),
        window=Window(start_days=-30, end_days=30),
    )
    study = spec(person_cohort(IndexEvent.DRUG, [WARFARIN], inclusion=[hba1c_around]))
    # first warfarin: 1 on 2022-02-10 (HbA1c 7.1 ten days later), 5 on 2023-03-01 08:00 (HbA1c 31 days later)
    assert chosen(definitions_db, study) == {1: datetime(2022, 2, 10)}
    ds = build(definitions_db, study)
    assert steps(ds) == [
        ("index-events", 2, 2),
        ("age", 2, 2),
        ("alive-at-prediction", 2, 2),
        ("inclusion-1", 1, 1),
        ("one-per-person", 1, 1),
        ("consent", 1, 1),
    ]
    assert ds.attrition.step("inclusion-1").criterion == (
        f"inclusion 1: a measurement {HBA1C} (or a descendant) with a value of at least 6.5 from 30 days before "
        "the index to 30 days after the index"
    )


def test_each_drug_exposure_with_a_minimum_count(definitions_db):
    index = IndexSpec(event=IndexEvent.DRUG, concept_ids=[WARFARIN], occurrence=Occurrence.EACH)
    two_in_a_month = Criterion(
        domain="drug", concept_ids=[WARFARIN], window=Window(start_days=-30, end_days=0), min_count=2
    )
    study = spec(person_cohort(IndexEvent.DRUG, index=index, inclusion=[two_in_a_month]))
    # 1: the second exposure (02-25) has the first (02-10) 15 days before it; 5's are two months apart
    assert chosen(definitions_db, study) == {1: datetime(2022, 2, 25)}
    ds = build(definitions_db, study)
    assert steps(ds)[:4] == [
        ("index-events", 2, 4),
        ("age", 2, 4),
        ("alive-at-prediction", 2, 4),
        ("inclusion-1", 1, 1),
    ]
    assert ds.attrition.step("inclusion-1").criterion == (
        f"inclusion 1: at least 2 drug exposures to {WARFARIN} (or a descendant) from 30 days before the index to "
        "the index"
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (ValueRange(min=6.5), {1: datetime(2022, 2, 20, 9), 2: datetime(2023, 1, 10, 8), 5: datetime(2023, 4, 1, 9)}),
        (ValueRange(min=6.5, max=8.0), {1: datetime(2022, 2, 20, 9), 2: datetime(2023, 1, 10, 8)}),
        (ValueRange(max=6.0), {2: datetime(2022, 6, 15, 8), 6: datetime(2023, 7, 2, 1)}),  # 6.0 itself is in
    ],
)
def test_a_measurement_index_takes_the_first_value_in_range(definitions_db, value, expected):
    index = IndexSpec(event=IndexEvent.MEASUREMENT, concept_ids=[HBA1C], value=value)
    assert chosen(definitions_db, spec(person_cohort(IndexEvent.MEASUREMENT, index=index))) == expected


# --- a calendar date and observation periods ----------------------------------------------------------------


def test_a_calendar_date_indexes_everyone_in_observation_on_it(definitions_db):
    index = IndexSpec(event=IndexEvent.DATE, date=date(2023, 1, 1))
    study = spec(person_cohort(IndexEvent.DATE, index=index))
    ds = build(definitions_db, study)
    # 3 is a child, 4 died in 2022, 6 is observed only from June 2023
    assert chosen(definitions_db, study) == dict.fromkeys([1, 2, 5, 7], datetime(2023, 1, 1))
    assert steps(ds) == [
        ("index-events", 7, 7),
        ("age", 6, 6),
        ("alive-at-prediction", 5, 5),
        ("observation-period", 4, 4),
        ("one-per-person", 4, 4),
        ("consent", 4, 4),
    ]
    assert ds.attrition.step("index-events").criterion == "a record in the person table; the index is 2023-01-01 00:00"
    assert ds.attrition.step("observation-period").criterion == (
        "in observation on 2023-01-01 (an observation period covers the index)"
    )


@pytest.mark.parametrize(
    ("prior", "after", "expected"),
    [
        (365, 0, [1, 2, 5]),  # 2's period starts exactly 365 days before; 7's 214 days before
        (366, 0, [1, 5]),
        (0, 365, [1, 2, 5]),  # 2's ends on 2023-12-31, counted in full: exactly 365 days after
        (0, 366, [1, 5]),
    ],
)
def test_observation_before_and_after_the_index(definitions_db, prior, after, expected):
    index = IndexSpec(event=IndexEvent.DATE, date=date(2023, 1, 1))
    observation = ObservationRequirement(prior_days=prior, after_days=after)
    study = spec(person_cohort(IndexEvent.DATE, index=index, observation_period=observation))
    assert sorted(chosen(definitions_db, study)) == expected
    step = build(definitions_db, study).attrition.step("observation-period")
    assert step.persons == len(expected)
    assert f"with at least {max(prior, after)} days" in step.criterion


def test_an_observation_requirement_on_a_condition_index(definitions_db):
    study = spec(
        person_cohort(IndexEvent.CONDITION, [HEART_FAILURE], observation_period=ObservationRequirement(prior_days=365))
    )
    # 2's heart failure (2022-06-15) comes 165 days into her observation
    assert chosen(definitions_db, study) == {1: datetime(2022, 3, 1, 10)}
    ds = build(definitions_db, study)
    assert steps(ds)[2:4] == [("alive-at-prediction", 2, 2), ("observation-period", 1, 1)]
    assert ds.attrition.step("observation-period").criterion == (
        "the index lies in an observation period, with at least 365 days of it before the index"
    )


@pytest.mark.parametrize("how", ["no table", "no rows"])
def test_without_observation_periods_the_requirement_removes_everyone_and_says_why(tmp_path, how):
    db = sqlite_copy(tmp_path)
    engine = create_engine(db[0])
    with engine.begin() as connection:
        connection.execute(
            text("DROP TABLE observation_period" if how == "no table" else "DELETE FROM observation_period")
        )
    engine.dispose()
    required = spec(
        person_cohort(IndexEvent.CONDITION, [HEART_FAILURE], observation_period=ObservationRequirement(prior_days=30))
    )
    ds = build(db, required)
    assert len(ds) == 0
    step = ds.attrition.step("observation-period")
    assert (step.persons, step.removed_persons) == (0, 2)
    assert "this database records no observation period" in step.criterion
    assert "the criterion removes everyone" in step.criterion
    on_a_date = spec(person_cohort(IndexEvent.DATE, index=IndexSpec(event=IndexEvent.DATE, date=date(2023, 1, 1))))
    assert len(build(db, on_a_date)) == 0
    # a study without the requirement does not read observation periods for its cohort
    assert build(db, spec(person_cohort(IndexEvent.CONDITION, [HEART_FAILURE]))).person_ids.tolist() == [1, 2]


# --- visit-level cohorts with criteria --------------------------------------------------------------------


def test_visit_level_inclusion_of_another_visit_does_not_count_the_index_visit(definitions_db):
    prior_stay = Criterion(domain="visit", concept_ids=[INPATIENT], window=Window(start_days=-365, end_days=0))
    study = spec(visit_cohort(inclusion=[prior_stay]))
    # only V502 has another inpatient stay (V501, 52 days before) in the year before it
    assert chosen_visits(definitions_db, study) == {5: 502}
    ds = build(definitions_db, study)
    assert steps(ds) == [
        ("cohort-visits", 4, 6),
        ("visit-ended", 4, 6),
        ("age", 4, 6),
        ("visit-length", 4, 6),
        ("alive-at-prediction", 4, 6),
        ("inclusion-1", 1, 1),
        ("one-per-person", 1, 1),
        ("consent", 1, 1),
    ]
    assert ds.attrition.step("inclusion-1").criterion == (
        f"inclusion 1: a visit of kind {INPATIENT} from 365 days before the index to the index, not counting the "
        "index visit"
    )


def test_visit_level_exclusion_with_a_count_and_a_window(definitions_db):
    two_warfarin = Criterion(
        domain="drug", concept_ids=[WARFARIN], window=Window(start_days=-30, end_days=0), min_count=2
    )
    study = spec(visit_cohort(exclusion=[two_warfarin]))
    # V101 has both of person 1's warfarin exposures in the 30 days before; person 1 keeps V102
    assert chosen_visits(definitions_db, study) == {1: 102, 2: 201, 5: 501, 6: 601}
    ds = build(definitions_db, study)
    exclusion = ds.attrition.step("exclusion-1")
    assert (exclusion.persons, exclusion.examples, exclusion.removed_persons, exclusion.removed_examples) == (
        4,
        5,
        0,
        1,
    )
    assert exclusion.criterion == (
        f"exclusion 1: fewer than 2 drug exposures to {WARFARIN} (or a descendant) from 30 days before the index to "
        "the index"
    )
    any_warfarin = two_warfarin.model_copy(update={"min_count": 1, "window": Window(start_days=-45, end_days=0)})
    # 45 days back also reach 5's exposures before V501 (40 days) and V502 (31 days 8 h)
    assert chosen_visits(definitions_db, spec(visit_cohort(exclusion=[any_warfarin]))) == {1: 102, 2: 201, 6: 601}


def test_inclusion_and_exclusion_combine_in_order(definitions_db):
    twice = Criterion(
        domain="condition", concept_ids=[HEART_FAILURE], window=Window(start_days=-730, end_hours=24), min_count=2
    )
    once = twice.model_copy(update={"min_count": 1})
    # V102: heart failure at its index and 457 days before; V101 and V201 have one record each in the window
    assert chosen_visits(definitions_db, spec(visit_cohort(inclusion=[twice]))) == {1: 102}
    assert chosen_visits(definitions_db, spec(visit_cohort(inclusion=[once]))) == {1: 101, 2: 201}
    no_ventilation = Criterion(
        domain="procedure", concept_ids=[VENTILATION], window=Window(start_hours=0, end_hours=24)
    )
    both = spec(visit_cohort(inclusion=[once], exclusion=[no_ventilation]))
    # V101 had ventilation 24 h after its index (the window's end is in): person 1 keeps V102
    assert chosen_visits(definitions_db, both) == {1: 102, 2: 201}
    names = [s.name for s in build(definitions_db, both).attrition.steps]
    assert names[-4:] == ["inclusion-1", "exclusion-1", "one-per-person", "consent"]


def test_a_visit_index_may_take_each_patients_first_visit_only(definitions_db):
    first_only = IndexSpec(event=IndexEvent.VISIT_START, occurrence=Occurrence.FIRST)
    prior_stay = Criterion(domain="visit", concept_ids=[INPATIENT], window=Window(start_days=-365, end_days=0))
    study = spec(visit_cohort(index=first_only, inclusion=[prior_stay]))
    # the first stays have no stay before them: nobody is left (each visit: V502 qualified)
    assert chosen_visits(definitions_db, study) == {}
    ds = build(definitions_db, study)
    assert steps(ds)[0] == ("cohort-visits", 4, 4)
    assert ds.attrition.step("cohort-visits").criterion.endswith("only each patient's first is a candidate")


# --- a measurement panel (cross-sectional) ----------------------------------------------------------------


def test_a_panel_index_is_the_first_day_with_every_measurement_of_the_panel(definitions_db):
    panel = IndexSpec(event=IndexEvent.PANEL, concept_ids=[GLUCOSE, HBA1C])
    values = [
        ValueCovariate(name="glucose", concept_ids=[GLUCOSE], window=Window(start_hours=0, end_hours=24)),
        ValueCovariate(name="hba1c", concept_ids=[HBA1C], window=Window(start_hours=0, end_hours=24)),
    ]
    diagnosis = OutcomeSpec(
        kind=OutcomeKind.CONDITION, concept_ids=[DIABETES], timing="diagnostic", window=Window(start_days=0, end_days=1)
    )
    study = spec(person_cohort(IndexEvent.PANEL, index=panel), diagnosis, CovariateSpec(demographics=[], values=values))
    # 6's glucose of 07-01 23:00 and HbA1c of 07-02 01:00 fall on two days; both were taken on 08-01
    assert chosen(definitions_db, study) == {2: datetime(2023, 1, 10), 5: datetime(2023, 4, 1), 6: datetime(2023, 8, 1)}
    ds = build(definitions_db, study)
    assert steps(ds) == [
        ("index-events", 3, 3),
        ("age", 3, 3),
        ("alive-at-prediction", 3, 3),
        ("one-per-person", 3, 3),
        ("consent", 3, 3),
    ]
    glucose, hba1c = value_scale([GLUCOSE]), value_scale([HBA1C])
    f = {
        int(p): dict(zip(ds.feature_names, row.tolist(), strict=True))
        for p, row in zip(ds.person_ids, ds.features, strict=True)
    }
    for person, (g, a) in {2: (140, 6.8), 5: (210, 9.0), 6: (101, 6.2)}.items():
        assert f[person]["glucose_latest"] == pytest.approx(float(glucose.apply(np.array([g]))[0]), abs=1e-6)
        assert f[person]["hba1c_latest"] == pytest.approx(float(hba1c.apply(np.array([a]))[0]), abs=1e-6)
    # diabetes recorded that day: 5's on 2023-04-01 (date only) is in; 6's on 08-02 (its 00:00 ends the window) is not
    assert ds.labels.tolist() == [0, 1, 0]


# --- the study file ---------------------------------------------------------------------------------------


def _raw(cohort: dict, outcome: dict | None = None) -> dict:
    return {
        "study": {"id": "x-study", "title": "x"},
        "cohort": cohort,
        "covariates": {"demographics": ["age"]},
        "outcome": outcome or {"kind": "death", "window_days": 30},
        "privacy": {"target_epsilon": 3.0},
    }


def test_a_plain_visit_index_is_the_same_study_as_before():
    old = parse_study(_raw({"index": "visit_end"}))
    new = parse_study(_raw({"index": {"event": "visit_end", "occurrence": "each"}}))
    assert old == new and old.cohort.visit_level and old.cohort.level == "visit"
    assert old.cohort.index.occurrence == Occurrence.EACH  # a visit index keeps every visit, as before
    assert parse_study(_raw({"index": {"event": "condition", "concept_ids": [1]}})).cohort.index.occurrence == "first"
    days = parse_study(
        _raw({"inclusion": [{"domain": "drug", "concept_ids": [1], "window": {"start_days": -30, "end_days": 0}}]})
    )
    hours = parse_study(
        _raw({"inclusion": [{"domain": "drug", "concept_ids": [1], "window": {"start_hours": -720, "end_hours": 0}}]})
    )
    assert days == hours


@pytest.mark.parametrize(
    ("cohort", "message"),
    [
        ({"index": {"event": "condition"}}, "a 'condition' index needs concept_ids"),
        ({"index": {"event": "panel", "concept_ids": [3004410]}}, "at least two measurement concept_ids"),
        ({"index": {"event": "date"}}, "a 'date' index needs date"),
        ({"index": {"event": "date", "date": "2024-01-01", "occurrence": "each"}}, "occurrence 'each' does not apply"),
        ({"index": {"event": "drug", "concept_ids": [1], "value": {"min": 1}}}, "applies to a 'measurement' index"),
        ({"index": {"event": "visit_start", "concept_ids": [1]}}, "visit_concept_ids: remove index.concept_ids"),
        ({"index": {"event": "measurement", "concept_ids": [1], "value": {}}}, "needs min, max or both"),
        ({"index": {"event": "measurement", "concept_ids": [1], "value": {"min": 5, "max": 4}}}, "is below its min"),
        (
            {"index": {"event": "condition", "concept_ids": [1]}, "visit_concept_ids": [9202]},
            "visit_concept_ids choose the visits of a visit-level cohort",
        ),
        ({"index": {"event": "condition", "concept_ids": [1]}, "min_visit_hours": 24}, "min_visit_hours applies"),
        (
            {"inclusion": [{"domain": "condition", "concept_ids": [1], "value": {"min": 1}}]},
            "measurement or observation",
        ),
        ({"exclusion": [{"domain": "drug", "concept_ids": [1], "min_count": 0}]}, "min_count"),
        ({"inclusion": [{"domain": "lab", "concept_ids": [1]}]}, "domain"),
        (
            {
                "inclusion": [
                    {
                        "domain": "drug",
                        "concept_ids": [1],
                        "window": {"start_days": -3, "start_hours": 1, "end_hours": 0},
                    }
                ]
            },
            "not both",
        ),
        (
            {"inclusion": [{"domain": "drug", "concept_ids": [1], "window": {"start_days": "-3", "end_hours": 0}}]},
            "number of days",
        ),
        ({"observation_period": {"prior_days": -1}}, "observation_period.prior_days"),
    ],
)
def test_cohort_errors_name_the_field_and_the_rule(cohort, message):
    with pytest.raises(StudyError, match=message):
        parse_study(_raw(cohort))


def test_visit_outcomes_are_refused_for_a_person_level_cohort():
    cohort = {"index": {"event": "condition", "concept_ids": [316139]}}
    with pytest.raises(
        StudyError, match=r"outcome 'long_stay' is about the index visit, and the cohort is person-level"
    ):
        parse_study(_raw(cohort, {"kind": "long_stay", "threshold_days": 7}))
    with pytest.raises(StudyError, match=r"outcome 'readmission' is about the index visit"):
        parse_study(_raw(cohort, {"kind": "readmission", "window_days": 30}))
    with pytest.raises(StudyError, match=r"give outcome.window_days"):
        parse_study(_raw(cohort, {"kind": "death"}))
    parse_study(_raw({}, {"kind": "long_stay", "threshold_days": 7}))  # a visit-level cohort has a stay


# --- the window counting, at scale ------------------------------------------------------------------------


def test_counting_in_windows_matches_a_plain_loop():
    rng = np.random.default_rng(3)
    event_person = rng.integers(1, 300, 5000)
    event_time = rng.integers(-(10**9), 2 * 10**9, 5000).astype(np.float64)
    person = rng.integers(1, 320, 2000)
    low = rng.integers(-(10**9), 2 * 10**9, 2000).astype(np.float64)
    high = low + rng.integers(0, 10**9, 2000)
    counts = count_in_windows(event_person, event_time, person, low, high)
    expected = [
        int(((event_person == p) & (event_time >= lo) & (event_time <= hi)).sum())
        for p, lo, hi in zip(person, low, high, strict=True)
    ]
    assert counts.tolist() == expected


# --- end to end: the example studies on a synthetic hospital and on a database another tool wrote ---------

PERSON_LEVEL = ROOT / "configs" / "study-person-level-example.yaml"
CROSS_SECTIONAL = ROOT / "configs" / "study-cross-sectional-example.yaml"
LACTATE = 3047181


@pytest.fixture(scope="module")
def foreign_site(tmp_path_factory) -> Path:
    """A site over an OMOP database another tool wrote (tests/foreign_omop.py), with sepsis recorded at the
    admission of the sicker patients; tests copy it with `fresh_site`."""
    folder = tmp_path_factory.mktemp("foreign-site")
    url = f"sqlite:///{folder / 'birchwood.sqlite'}"
    build_foreign_omop(url, persons=900, seed=7, admission_diagnoses=True)
    secret = folder / "birchwood.secret"
    load_or_create_secret(secret, create=True)
    write_site(folder / "site", "birchwood", url, secret)
    return folder / "site"


def _site_dataset(template: Path, spec: StudySpec) -> StudyDataset:
    config = load_site_config(template / "site.yaml")
    return build_dataset(config.omop.url, spec, split_key=config.split_key())


@pytest.mark.parametrize("site", ["prepared_site", "foreign_site"])
def test_the_person_level_example_builds_and_trains_a_dp_round(site, request, tmp_path):
    template = request.getfixturevalue(site)
    spec = load_study(PERSON_LEVEL)
    assert not spec.cohort.visit_level
    ds = _site_dataset(template, spec)
    assert len(ds) >= 100, len(ds)
    assert [s.name for s in ds.attrition.steps] == [
        "index-events", "age", "alive-at-prediction", "observation-period", "exclusion-1", "one-per-person",
        "consent",
    ]  # fmt: skip
    assert 0.03 < float(ds.labels.mean()) < 0.6
    # the index is a lactate of 2 or more, which the covariate window [-24 h, 0] holds
    lactate = value_scale([LACTATE]).apply(np.array([2.0]))[0]
    assert (ds.features[:, ds.feature_names.index("lactate_missing")] == 0).all()
    assert (ds.features[:, ds.feature_names.index("lactate_max")] >= lactate - 1e-6).all()
    _train_one_round(template, tmp_path, spec)


@pytest.mark.parametrize("site", ["prepared_site", "foreign_site"])
def test_the_cross_sectional_example_builds_and_trains_a_dp_round(site, request, tmp_path):
    template = request.getfixturevalue(site)
    spec = load_study(CROSS_SECTIONAL)
    assert spec.outcome.diagnostic and spec.outcome.prediction_hours == 0
    ds = _site_dataset(template, spec)
    assert len(ds) >= 100, len(ds)
    assert [s.name for s in ds.attrition.steps] == [
        "index-events",
        "age",
        "alive-at-prediction",
        "one-per-person",
        "consent",
    ]
    assert 0.03 < float(ds.labels.mean()) < 0.6
    # every example has each measurement of the panel on its index day, so no value is missing
    for name in ("wbc", "creatinine", "sodium"):
        assert (ds.features[:, ds.feature_names.index(f"{name}_missing")] == 0).all()
    # sepsis is more often diagnosed the day the white cell count is high
    wbc = ds.features[:, ds.feature_names.index("wbc_max")]
    assert wbc[ds.labels == 1].mean() > wbc[ds.labels == 0].mean()
    _train_one_round(template, tmp_path, spec)


def _train_one_round(template: Path, tmp_path: Path, spec: StudySpec) -> None:
    """One DP round at the site, as the coordinator asks for it: approved by hash, budget spent, audited."""
    node = SiteNode(load_site_config(fresh_site(template, tmp_path / "site")))
    digest = study_hash(spec)
    node.governance.approvals.approve(digest, spec.study.id, "test steward")
    outcome = node.train(instruction(spec), initial_state(spec, node.feature_count(spec)))
    assert outcome.answer.status == SiteStatus.TRAINED, outcome.answer.reason
    assert 0 < outcome.answer.epsilon_spent <= spec.privacy.target_epsilon
    assert outcome.answer.epsilon_spent == pytest.approx(node.governance.ledger.spent(digest))
    assert outcome.metrics["num-examples"] >= 50
    assert set(outcome.state_dict) == set(initial_state(spec, node.feature_count(spec)))
    assert node.governance.audit.verify().ok


def test_the_example_studies_summarise_their_cohort_and_outcome():
    person = load_study(PERSON_LEVEL)
    assert person.cohort.summary().startswith(f"person-level: index first measurement {LACTATE}, age 18-any")
    assert person.outcome.summary() == "death after 0 h, within 30 days"
    cross = load_study(CROSS_SECTIONAL)
    assert cross.outcome.summary() == "condition (diagnostic) from 0 h to 24 h of the index"
    mortality = load_study(ROOT / "configs" / "study-inpatient-mortality.yaml")
    assert (
        mortality.cohort.summary()
        == "visit-level: visits 9201 (index visit_start), age 18-any; first visit per patient"
    )
