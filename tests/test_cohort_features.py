"""Cohort and features from a tiny hand-made OMOP database, every number worked out by hand.

The same database is built on SQLite and on PostgreSQL (its own schema), and both must give exactly the
values below and the same snapshot hash. Times are whole seconds, as OMOP stores them.

Persons (visits are inpatient, 9201, unless said otherwise; the prediction time is index + 24 h):
  1  male, born 1950-06-15; 2024-03-01 08:00 -> 03-05 12:00; heart rate at +1 h (80), +12 h (100), exactly
     +24 h (120, in the window) and +24 h 1 s (150, out); heart failure 2023-05-01; ventilation at +2 h;
     smoking coded with an unlisted value; died 2024-03-10 10:00 (8 d 2 h after the prediction time).
  2  female, born 1980-01-01; 2024-01-10 10:00 -> 01-12 10:00 (first) and 2024-06-01 -> 06-03 (last);
     heart failure only after the index; smoking 'never' the day before, 'former' at -1 h (latest);
     diabetes exactly at the prediction time (not an outcome); observation ends 2024-01-20.
  3  13 years old at the visit: too young.
  4  visit of 20 h: shorter than the prediction time (qualifies only with the discharge as index).
  5  died 23 h after admission, before the prediction time.
  6  gender 0, born 1970-02-01; 2024-05-01 12:00 -> 05-04 12:00 (72 h exactly); heart rate 1 min before the
     index (out of the window); pain score 7 (an observation without a plausible range); died 1 s after the
     prediction time; diabetes exactly 7 days after the prediction time (in the outcome window).
  7  qualifies, but an active research denial covers the as-of date.
  8  male, born 1990-07-01; 2024-02-20 10:00 -> 02-22 10:00 and again 2024-03-10 (a readmission within
     30 days); a descendant of heart failure (via concept_ancestor) on 2024-01-01; a denial that ended
     2023-12-31; no observation period.
  9  qualifies, excluded by the site's own withdrawal list (extra_excluded_person_ids).
 10  female, born 1985-03-03; 2024-07-01 00:00 -> 07-06 00:00; an inactive denial; an anticoagulant 10 days
     before the index; diabetes 1 s after the prediction time; observation until 2025-12-31.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterator
from datetime import date, datetime

import numpy as np
import pytest
from sqlalchemy import create_engine, text

from federation.contract.spec import (
    CategoricalCovariate,
    CohortSpec,
    CovariateSpec,
    DiscreteTimeSurvivalSpec,
    EvaluationSpec,
    IndexEvent,
    LogisticRegressionSpec,
    OccurrenceCovariate,
    OnePerPerson,
    OutcomeKind,
    OutcomeSpec,
    PrivacySpec,
    RandomSplit,
    StudyInfo,
    StudySpec,
    TemporalSplit,
    TimeSeriesCovariate,
    ValueCovariate,
    Window,
)
from omop_etl.database import open_engine
from omop_etl.load.state import etl_metadata
from omop_etl.schema import create_cdm
from site_node.cohort import CohortError, StudyDataset, build_dataset, feature_names, series_names
from site_node.cohort.keyed_hash import keyed_split

HEART_RATE, HEART_FAILURE, HF_DESCENDANT, DIABETES = 3027018, 316139, 444031, 201826
SMOKING, NEVER, FORMER, UNLISTED = 43054909, 45879404, 45883458, 45884037
PAIN, VENTILATION, WARFARIN = 4999001, 4230167, 1310149
EHR = 32817
AS_OF = datetime(2025, 1, 1)
KEY = b"site-secret-for-tests"
HR_CENTER, HR_HALF = 155.0, 145.0  # heart rate plausible range 10..300 /min


def hr(value: float) -> float:
    return (value - HR_CENTER) / HR_HALF


def age(index: datetime, born: datetime) -> float:
    return (index - born).total_seconds() / (365.2425 * 86400) / 100


# --- the study --------------------------------------------------------------------------------------


def study(outcome: OutcomeSpec | None = None, **cohort) -> StudySpec:
    survival = outcome is not None and outcome.kind == OutcomeKind.TIME_TO_EVENT
    return StudySpec(
        model=DiscreteTimeSurvivalSpec(interval_days=[7, 30]) if survival else LogisticRegressionSpec(),
        study=StudyInfo(id="cohort-test", title="hand-made cohort"),
        cohort=CohortSpec(visit_concept_ids=[9201], min_age=18, max_age=90, **cohort),
        covariates=CovariateSpec(
            demographics=["age", "gender"],
            occurrences=[
                OccurrenceCovariate(name="heart_failure", domain="condition", concept_ids=[HEART_FAILURE]),
                OccurrenceCovariate(
                    name="anticoagulant",
                    domain="drug",
                    concept_ids=[WARFARIN],
                    window=Window(start_hours=-720, end_hours=0),
                ),
                OccurrenceCovariate(
                    name="ventilation",
                    domain="procedure",
                    concept_ids=[VENTILATION],
                    window=Window(start_hours=0, end_hours=24),
                ),
            ],
            values=[
                ValueCovariate(
                    name="heart_rate", concept_ids=[HEART_RATE], statistics=["latest", "mean", "min", "max", "count"]
                ),
                ValueCovariate(name="pain", concept_ids=[PAIN], domain="observation", statistics=["max"]),
            ],
            categorical=[
                CategoricalCovariate(
                    name="smoking",
                    concept_ids=[SMOKING],
                    value_concept_ids=[NEVER, FORMER],
                    window=Window(start_hours=-72, end_hours=24),
                )
            ],
            time_series=[
                TimeSeriesCovariate(name="hr", concept_ids=[HEART_RATE], bin_hours=6),
                TimeSeriesCovariate(
                    name="hr_recent", concept_ids=[HEART_RATE], window=Window(start_hours=12, end_hours=24), bin_hours=6
                ),
            ],
        ),
        outcome=outcome or OutcomeSpec(kind=OutcomeKind.DEATH, prediction_hours=24, window_days=30),
        privacy=PrivacySpec(target_epsilon=3.0),
    )


FEATURES = [
    "age",
    "gender_male",
    "gender_female",
    "gender_other",
    "heart_failure",
    "anticoagulant",
    "ventilation",
    "heart_rate_latest",
    "heart_rate_mean",
    "heart_rate_min",
    "heart_rate_max",
    "heart_rate_count",
    "heart_rate_missing",
    "pain_max",
    "pain_missing",
    f"smoking_{NEVER}",
    f"smoking_{FORMER}",
    "smoking_other",
    "smoking_missing",
]


# --- the database -----------------------------------------------------------------------------------


class Rows:
    """Collects rows per OMOP table, filling the required columns a test does not care about."""

    def __init__(self) -> None:
        self.tables: dict[str, list[dict]] = {}
        self.ids = 0

    def add(self, table: str, **values) -> None:
        self.tables.setdefault(table, []).append(values)

    def next_id(self) -> int:
        self.ids += 1
        return self.ids

    def person(self, person_id: int, gender: int, born: date) -> None:
        self.add(
            "person",
            person_id=person_id,
            gender_concept_id=gender,
            year_of_birth=born.year,
            month_of_birth=born.month,
            day_of_birth=born.day,
            race_concept_id=0,
            ethnicity_concept_id=0,
        )

    def visit(self, visit_id: int, person_id: int, start: datetime, end: datetime, kind: int = 9201) -> None:
        self.add(
            "visit_occurrence",
            visit_occurrence_id=visit_id,
            person_id=person_id,
            visit_concept_id=kind,
            visit_start_date=start.date(),
            visit_start_datetime=start,
            visit_end_date=end.date(),
            visit_end_datetime=end,
            visit_type_concept_id=EHR,
        )

    def measurement(self, person_id: int, concept: int, at: datetime, value: float) -> None:
        self.add(
            "measurement",
            measurement_id=self.next_id(),
            person_id=person_id,
            measurement_concept_id=concept,
            measurement_date=at.date(),
            measurement_datetime=at,
            measurement_type_concept_id=EHR,
            value_as_number=value,
        )

    def observation(self, person_id: int, concept: int, at: datetime, number=None, coded=None) -> None:
        self.add(
            "observation",
            observation_id=self.next_id(),
            person_id=person_id,
            observation_concept_id=concept,
            observation_date=at.date(),
            observation_datetime=at,
            observation_type_concept_id=EHR,
            value_as_number=number,
            value_as_concept_id=coded,
        )

    def condition(self, person_id: int, concept: int, at: date | datetime) -> None:
        self.add(
            "condition_occurrence",
            condition_occurrence_id=self.next_id(),
            person_id=person_id,
            condition_concept_id=concept,
            condition_start_date=at.date() if isinstance(at, datetime) else at,
            condition_start_datetime=at if isinstance(at, datetime) else None,
            condition_type_concept_id=EHR,
        )

    def death(self, person_id: int, at: datetime) -> None:
        self.add("death", person_id=person_id, death_date=at.date(), death_datetime=at)

    def observation_period(self, person_id: int, start: date, end: date) -> None:
        self.add(
            "observation_period",
            observation_period_id=self.next_id(),
            person_id=person_id,
            observation_period_start_date=start,
            observation_period_end_date=end,
            period_type_concept_id=EHR,
        )

    def consent(self, person_id: int, status: str, provision: str, start: str | None, end: str | None) -> None:
        key = uuid.uuid4().bytes
        self.add(
            "twinfed_consent",
            consent_key=key,
            patient_key=key,
            person_id=person_id,
            status=status,
            provision=provision,
            scope="research",
            period_start=start,
            period_end=end,
            file_id=1,
            position=self.next_id(),
        )


def hand_made_rows() -> Rows:
    r = Rows()
    # 1
    r.person(1, 8507, date(1950, 6, 15))
    r.visit(10, 1, datetime(2024, 3, 1, 8), datetime(2024, 3, 5, 12))
    r.measurement(1, HEART_RATE, datetime(2024, 3, 1, 9), 80)
    r.measurement(1, HEART_RATE, datetime(2024, 3, 1, 20), 100)
    r.measurement(1, HEART_RATE, datetime(2024, 3, 2, 8), 120)
    r.measurement(1, HEART_RATE, datetime(2024, 3, 2, 8, 0, 1), 150)
    r.condition(1, HEART_FAILURE, date(2023, 5, 1))
    r.condition(1, DIABETES, datetime(2024, 3, 9, 8, 0, 1))  # 7 days + 1 s after the prediction time
    r.add(
        "procedure_occurrence",
        procedure_occurrence_id=r.next_id(),
        person_id=1,
        procedure_concept_id=VENTILATION,
        procedure_date=date(2024, 3, 1),
        procedure_datetime=datetime(2024, 3, 1, 10),
        procedure_type_concept_id=EHR,
    )
    r.observation(1, SMOKING, datetime(2024, 3, 1, 8), coded=UNLISTED)
    r.death(1, datetime(2024, 3, 10, 10))
    r.observation_period(1, date(2020, 1, 1), date(2024, 3, 10))
    # 2
    r.person(2, 8532, date(1980, 1, 1))
    r.visit(20, 2, datetime(2024, 1, 10, 10), datetime(2024, 1, 12, 10))
    r.visit(21, 2, datetime(2024, 6, 1, 10), datetime(2024, 6, 3, 10))
    r.visit(22, 2, datetime(2024, 1, 20, 9), datetime(2024, 1, 20, 10), kind=9202)  # outpatient: no readmission
    r.condition(2, HEART_FAILURE, date(2024, 1, 11))
    r.condition(2, DIABETES, datetime(2024, 1, 11, 10))  # exactly at the prediction time
    r.observation(2, SMOKING, datetime(2024, 1, 9, 10), coded=NEVER)
    r.observation(2, SMOKING, datetime(2024, 1, 10, 9), coded=FORMER)
    r.observation_period(2, date(2023, 1, 1), date(2024, 1, 20))
    # 3: too young
    r.person(3, 8532, date(2010, 5, 5))
    r.visit(30, 3, datetime(2024, 3, 1), datetime(2024, 3, 4))
    # 4: 20 h stay
    r.person(4, 8507, date(1960, 1, 1))
    r.visit(40, 4, datetime(2024, 2, 1), datetime(2024, 2, 1, 20))
    # 5: died before the prediction time
    r.person(5, 8507, date(1940, 1, 1))
    r.visit(50, 5, datetime(2024, 4, 1), datetime(2024, 4, 10))
    r.death(5, datetime(2024, 4, 1, 23))
    # 6
    r.person(6, 0, date(1970, 2, 1))
    r.visit(60, 6, datetime(2024, 5, 1, 12), datetime(2024, 5, 4, 12))
    r.measurement(6, HEART_RATE, datetime(2024, 5, 1, 11, 59), 90)
    r.observation(6, PAIN, datetime(2024, 5, 1, 13), number=7)
    r.death(6, datetime(2024, 5, 2, 12, 0, 1))
    r.condition(6, DIABETES, datetime(2024, 5, 9, 12))  # exactly 7 days after the prediction time
    # 7: denies research use
    r.person(7, 8532, date(1975, 1, 1))
    r.visit(70, 7, datetime(2024, 2, 10), datetime(2024, 2, 15))
    r.consent(7, "active", "deny", "2023-01-01 00:00:00", None)
    # 8
    r.person(8, 8507, date(1990, 7, 1))
    r.visit(80, 8, datetime(2024, 2, 20, 10), datetime(2024, 2, 22, 10))
    r.visit(81, 8, datetime(2024, 3, 10, 10), datetime(2024, 3, 14, 10))
    r.condition(8, HF_DESCENDANT, date(2024, 1, 1))
    r.consent(8, "active", "deny", "2023-01-01", "2023-12-31")
    r.consent(8, "active", "permit", "2024-01-01", None)
    # 9: withdrawn at the site
    r.person(9, 8507, date(1965, 1, 1))
    r.visit(90, 9, datetime(2024, 8, 1), datetime(2024, 8, 5))
    # 10
    r.person(10, 8532, date(1985, 3, 3))
    r.visit(100, 10, datetime(2024, 7, 1), datetime(2024, 7, 6))
    r.add(
        "drug_exposure",
        drug_exposure_id=r.next_id(),
        person_id=10,
        drug_concept_id=WARFARIN,
        drug_exposure_start_date=date(2024, 6, 21),
        drug_exposure_end_date=date(2024, 6, 30),
        drug_type_concept_id=EHR,
    )
    r.condition(10, DIABETES, datetime(2024, 7, 2, 0, 0, 1))
    r.consent(10, "inactive", "deny", "2023-01-01", None)
    r.observation_period(10, date(2022, 1, 1), date(2025, 12, 31))
    # the vocabulary knows one descendant of heart failure
    r.add(
        "concept_ancestor",
        ancestor_concept_id=HEART_FAILURE,
        descendant_concept_id=HF_DESCENDANT,
        min_levels_of_separation=1,
        max_levels_of_separation=1,
    )
    return r


def write(url: str, schema: str | None, rows: Rows) -> None:
    engine = open_engine(url)
    try:
        cdm = create_cdm(engine, schema)
        etl = etl_metadata(schema)
        etl.create_all(engine)
        tables = {t.name: t for m in (cdm, etl) for t in m.tables.values()}
        with engine.begin() as connection:
            for name, table_rows in rows.tables.items():
                columns = sorted({key for row in table_rows for key in row})
                connection.execute(tables[name].insert(), [{c: row.get(c) for c in columns} for row in table_rows])
    finally:
        engine.dispose()


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def hand_made(request, tmp_path_factory) -> Iterator[tuple[str, str | None]]:
    """(url, schema) of the hand-made database on SQLite, then on PostgreSQL in a fresh schema (read only)."""
    yield from database_of(request, tmp_path_factory, "cohort", hand_made_rows())


def database_of(request, tmp_path_factory, name: str, rows: Rows) -> Iterator[tuple[str, str | None]]:
    """A module fixture's (url, schema) of `rows` written on the fixture's backend: a SQLite file, or a fresh
    PostgreSQL schema dropped afterwards (for other modules' fixtures too)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp(name) / 'omop.sqlite'}"
        write(url, None, rows)
        yield url, None
        return
    url = request.getfixturevalue("pg_url")
    schema = f"{name}_{uuid.uuid4().hex[:10]}"
    write(url, schema, rows)
    yield url, schema
    _drop_schema(url, schema)


def _drop_schema(url: str, schema: str) -> None:
    engine = open_engine(url)
    with engine.begin() as connection:
        connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    engine.dispose()


def build(db: tuple[str, str | None], spec: StudySpec | None = None, **options) -> StudyDataset:
    url, schema = db
    options.setdefault("extra_excluded_person_ids", [9])
    options.setdefault("as_of", AS_OF)
    return build_dataset(url, spec or study(), split_key=KEY, schema=schema, **options)


def by_person(ds: StudyDataset) -> dict[int, dict[str, float]]:
    return {
        int(p): dict(zip(ds.feature_names, row.tolist(), strict=True))
        for p, row in zip(ds.person_ids, ds.features, strict=True)
    }


# --- tests ------------------------------------------------------------------------------------------


def test_cohort_consent_and_one_example_per_person(hand_made):
    ds = build(hand_made)
    assert ds.person_ids.tolist() == [1, 2, 6, 8, 10]
    assert ds.person_ids.dtype == np.int64 and len(set(ds.person_ids.tolist())) == len(ds)
    assert ds.cohort_size == 7  # 1, 2, 6, 7, 8, 9, 10 qualify
    assert ds.excluded_by_consent == 2  # 7 (active denial) and 9 (withdrawn at the site)
    assert ds.features.dtype == np.float32 and ds.labels.dtype == np.float32
    assert ds.split.dtype == np.dtype("<U10") and set(ds.split) <= {"train", "validation", "test"}
    assert ds.event_days is None


def test_every_static_feature_matches_the_hand_computation(hand_made):
    ds = build(hand_made)
    assert ds.feature_names == FEATURES == feature_names(study())
    f = by_person(ds)
    expected = {
        1: {
            "age": age(datetime(2024, 3, 1, 8), datetime(1950, 6, 15)),
            "gender_male": 1,
            "heart_failure": 1,
            "ventilation": 1,
            "heart_rate_latest": hr(120),  # the value exactly at +24 h is in, the one 1 s later is not
            "heart_rate_mean": hr(100),
            "heart_rate_min": hr(80),
            "heart_rate_max": hr(120),
            "heart_rate_count": math.log1p(3) / math.log1p(100),
            "pain_missing": 1,
            "smoking_other": 1,
        },
        2: {
            "age": age(datetime(2024, 1, 10, 10), datetime(1980, 1, 1)),
            "gender_female": 1,
            "heart_rate_missing": 1,
            "pain_missing": 1,
            f"smoking_{FORMER}": 1,  # the latest of 'never' (day before) and 'former' (1 h before)
        },
        6: {
            "age": age(datetime(2024, 5, 1, 12), datetime(1970, 2, 1)),
            "gender_other": 1,
            "heart_rate_missing": 1,  # measured 1 minute before the window
            "pain_max": math.log1p(7) / math.log1p(1e4),  # no plausible range: signed log scale
            "smoking_missing": 1,
        },
        8: {
            "age": age(datetime(2024, 2, 20, 10), datetime(1990, 7, 1)),
            "gender_male": 1,
            "heart_failure": 1,  # a descendant concept, through concept_ancestor
            "heart_rate_missing": 1,
            "pain_missing": 1,
            "smoking_missing": 1,
        },
        10: {
            "age": age(datetime(2024, 7, 1), datetime(1985, 3, 3)),
            "gender_female": 1,
            "anticoagulant": 1,
            "heart_rate_missing": 1,
            "pain_missing": 1,
            "smoking_missing": 1,
        },
    }
    for person, values in expected.items():
        full = dict.fromkeys(FEATURES, 0.0) | values
        assert f[person] == pytest.approx(full, abs=1e-6), person


def test_time_series_bins_mask_and_hours_since_last(hand_made):
    ds = build(hand_made)
    assert ds.series_names == ["hr", "hr_recent"] == series_names(study())
    assert ds.series is not None and ds.series.shape == (5, 4, 2, 3) and ds.series.dtype == np.float32
    person1 = ds.series[0]
    # 'hr' over [0, 24] h in 6 h bins: 80 at +1 h, nothing, 100 at +12 h, 120 at +24 h
    np.testing.assert_allclose(person1[:, 0, 0], [hr(80), 0, hr(100), hr(120)], atol=1e-6)
    np.testing.assert_allclose(person1[:, 0, 1], [1, 0, 1, 1])
    np.testing.assert_allclose(person1[:, 0, 2], [5 / 24, 11 / 24, 6 / 24, 0], atol=1e-6)
    # 'hr_recent' over [12, 24] h: two bins, aligned on the last position, padded before
    np.testing.assert_allclose(person1[:, 1, 0], [0, 0, hr(100), hr(120)], atol=1e-6)
    np.testing.assert_allclose(person1[:, 1, 1], [0, 0, 1, 1])
    np.testing.assert_allclose(person1[:, 1, 2], [1, 1, 6 / 12, 0], atol=1e-6)
    # nobody else has a heart rate in the window: all empty, hours-since at its cap
    assert not ds.series[1:, :, :, :2].any() and (ds.series[1:, :, :, 2] == 1).all()


def test_death_label_window_boundaries(hand_made):
    ds = build(hand_made)
    # 1 dies 8 days after the prediction time, 6 one second after it; 5 died before it (not in the cohort)
    assert dict(zip(ds.person_ids.tolist(), ds.labels.tolist(), strict=True)) == {1: 1, 2: 0, 6: 1, 8: 0, 10: 0}
    in_visit = build(hand_made, study(OutcomeSpec(kind=OutcomeKind.DEATH, prediction_hours=24)))
    # during the visit only: 1 dies after discharge (03-05 12:00), 6 during the stay
    assert in_visit.labels.tolist() == [0, 0, 1, 0, 0]


def test_condition_outcome_counts_after_the_prediction_time_up_to_the_window_end(hand_made):
    spec = study(OutcomeSpec(kind=OutcomeKind.CONDITION, prediction_hours=24, window_days=7, concept_ids=[DIABETES]))
    ds = build(hand_made, spec)
    # 2: exactly at the prediction time (no); 10: 1 s after (yes); 6: exactly 7 days after (yes); 1: 7 d 1 s (no)
    assert dict(zip(ds.person_ids.tolist(), ds.labels.tolist(), strict=True)) == {1: 0, 2: 0, 6: 1, 8: 0, 10: 1}


def test_long_stay_and_readmission(hand_made):
    long_stay = build(hand_made, study(OutcomeSpec(kind=OutcomeKind.LONG_STAY, threshold_days=3)))
    # stays: 1 = 4 d 4 h, 2 = 2 d, 6 = exactly 3 d (not longer), 8 = 2 d, 10 = 5 d
    assert long_stay.labels.tolist() == [1, 0, 0, 0, 1]
    readmission = build(
        hand_made,
        study(
            OutcomeSpec(kind=OutcomeKind.READMISSION, prediction_hours=24, window_days=30), index=IndexEvent.VISIT_END
        ),
    )
    # with the discharge as index the 20 h stay of person 4 qualifies; 5 and 6 died before discharge
    assert readmission.person_ids.tolist() == [1, 2, 4, 8, 10]
    # 8 comes back 17 days after discharge; 2's next inpatient stay is months later (the clinic visit does not count)
    assert readmission.labels.tolist() == [0, 0, 0, 1, 0]


def test_time_to_event_days_and_censoring(hand_made):
    ds = build(hand_made, study(OutcomeSpec(kind=OutcomeKind.TIME_TO_EVENT, prediction_hours=24, window_days=30)))
    assert ds.event_days is not None and ds.event_days.dtype == np.float32
    assert ds.labels.tolist() == [1, 0, 1, 0, 0]
    expected_days = [
        8 + 2 / 24,  # 1: death 2024-03-10 10:00, 8 d 2 h after 03-02 08:00
        9 + 14 / 24,  # 2: censored at the end of observation (2024-01-20, the whole day) from 01-11 10:00
        1 / 86400,  # 6: death one second after the prediction time
        1.0,  # 8: no observation period: observed until discharge, one day after the prediction time
        30.0,  # 10: observed beyond the 30-day window
    ]
    np.testing.assert_allclose(ds.event_days, expected_days, rtol=1e-6, atol=1e-6)


def test_one_per_person_first_last_and_random(hand_made):
    last = build(hand_made, study(one_per_person=OnePerPerson.LAST))
    f = by_person(last)
    # last stays: 2 in June (no smoking record around it), 8 in March (age changes slightly)
    assert f[2]["smoking_missing"] == 1 and f[2][f"smoking_{FORMER}"] == 0
    assert f[8]["age"] == pytest.approx(age(datetime(2024, 3, 10, 10), datetime(1990, 7, 1)), abs=1e-6)
    spec = study(one_per_person=OnePerPerson.RANDOM)
    first_draw, second_draw = build(hand_made, spec), build(hand_made, spec)
    assert first_draw.snapshot_hash == second_draw.snapshot_hash
    np.testing.assert_array_equal(first_draw.features, second_draw.features)
    assert first_draw.person_ids.tolist() == [1, 2, 6, 8, 10]


def test_split_is_deterministic_and_subsets_carry_their_own_hash(hand_made):
    ds, again = build(hand_made), build(hand_made)
    np.testing.assert_array_equal(ds.split, again.split)
    assert ds.snapshot_hash == again.snapshot_hash and len(ds.snapshot_hash) == 64
    # the example study's default split: 80/20 by the keyed hash, no validation part cut
    np.testing.assert_array_equal(ds.split, keyed_split(ds.person_ids, KEY, (0.8, 0.0, 0.2)))
    assert "validation" not in set(ds.split)
    for part in ("train", "validation", "test"):
        sub = ds.subset(part)
        assert (sub.split == part).all() and len(sub) == int((ds.split == part).sum())
        assert sub.feature_names == ds.feature_names and sub.cohort_size == ds.cohort_size
        assert sub.attrition == ds.attrition  # the whole cohort's table, in every part
        if len(sub) < len(ds):
            assert sub.snapshot_hash != ds.snapshot_hash
    uncut = ds.subset("validation")
    assert len(uncut) == 0 and uncut.features.shape == (0, len(FEATURES)) and uncut.series.shape[0] == 0
    with pytest.raises(ValueError, match="not a split part"):
        ds.subset("holdout")


def test_a_temporal_split_cuts_at_the_index_dates(hand_made):
    """Index dates: 2 on 2024-01-10, 8 on 02-20, 1 on 03-01 08:00, 6 on 05-01 12:00, 10 on 07-01 00:00."""
    spec = study().model_copy(
        update={
            "evaluation": EvaluationSpec(
                split=TemporalSplit(validation_from=date(2024, 3, 1), test_from=date(2024, 5, 1))
            )
        }
    )
    ds = build(hand_made, spec)
    parts = dict(zip(ds.person_ids.tolist(), ds.split.tolist(), strict=True))
    # a visit starting on the cut-off day belongs to the later part, whatever its time of day
    assert parts == {2: "train", 8: "train", 1: "validation", 6: "test", 10: "test"}
    assert [(p.part, p.persons) for p in ds.attrition.parts] == [("train", 2), ("validation", 1), ("test", 2)]
    # without validation_from, everything before test_from trains
    up_to_july = EvaluationSpec(split=TemporalSplit(test_from=date(2024, 7, 1)))
    two_parts = build(hand_made, spec.model_copy(update={"evaluation": up_to_july}))
    assert dict(zip(two_parts.person_ids.tolist(), two_parts.split.tolist(), strict=True)) == {
        2: "train", 8: "train", 1: "train", 6: "train", 10: "test",
    }  # fmt: skip
    assert [p.part for p in two_parts.attrition.parts] == ["train", "test"]


def test_a_temporal_split_after_the_sites_data_leaves_an_empty_test_part(hand_made):
    later = EvaluationSpec(split=TemporalSplit(test_from=date(2030, 1, 1)))
    ds = build(hand_made, study().model_copy(update={"evaluation": later}))
    assert set(ds.split) == {"train"} and len(ds) == 5
    test = ds.subset("test")
    assert len(test) == 0 and test.labels.shape == (0,) and test.attrition == ds.attrition
    assert [(p.part, p.persons) for p in ds.attrition.parts] == [("train", 5), ("test", 0)]


def test_the_attrition_counts_each_criterion_in_order(hand_made):
    ds = build(hand_made)
    rows = [(s.name, s.persons, s.examples, s.removed_persons, s.removed_examples) for s in ds.attrition.steps]
    assert rows == [
        ("cohort-visits", 10, 12, None, None),  # persons 1-10; 2 and 8 have two inpatient stays each
        ("visit-ended", 10, 12, 0, 0),
        ("age", 9, 11, 1, 1),  # 3 is 13
        ("visit-length", 8, 10, 1, 1),  # 4 stayed 20 h
        ("alive-at-prediction", 7, 9, 1, 1),  # 5 died 23 h after admission
        ("one-per-person", 7, 7, 0, 2),
        ("consent", 5, 5, 2, 2),  # 7 denied, 9 withdrew at the site
    ]
    assert ds.attrition.persons == len(ds) and sum(p.persons for p in ds.attrition.parts) == len(ds)
    assert [p.part for p in ds.attrition.parts] == ["train", "test"]  # the default split cuts no validation
    assert ds.attrition.step("age").criterion == "aged 18 to 90 at the index"
    assert ds.attrition.step("visit-length").criterion == "the visit lasts at least 24 h"
    # a condition requirement is its own step, after the others; it can remove visits but keep the patient
    with_condition = build(hand_made, study(condition_concept_ids=[HEART_FAILURE]))
    condition = with_condition.attrition.step("condition")
    # 1 and 8 (a descendant) had it before the index; 2 only before the second stay; 6, 7, 9, 10 never
    counts = (condition.persons, condition.examples, condition.removed_persons, condition.removed_examples)
    assert counts == (3, 4, 4, 5)
    assert [s.name for s in with_condition.attrition.steps][-3:] == ["condition", "one-per-person", "consent"]
    assert with_condition.person_ids.tolist() == [1, 2, 8]


@pytest.mark.postgres
def test_sqlite_and_postgresql_give_the_same_dataset(pg_url, tmp_path):
    sqlite = (f"sqlite:///{tmp_path / 'omop.sqlite'}", None)
    postgres = (pg_url, f"cohort_{uuid.uuid4().hex[:10]}")
    try:
        for db in (sqlite, postgres):
            write(*db, hand_made_rows())
        spec = study(OutcomeSpec(kind=OutcomeKind.TIME_TO_EVENT, prediction_hours=24, window_days=30))
        a, b = build(sqlite, spec), build(postgres, spec)
    finally:
        _drop_schema(*postgres)
    np.testing.assert_array_equal(a.features, b.features)
    np.testing.assert_array_equal(a.series, b.series)
    assert a.snapshot_hash == b.snapshot_hash


def test_consent_depends_on_the_as_of_date_and_a_missing_registry_means_no_denials(tmp_path):
    db = (f"sqlite:///{tmp_path / 'omop.sqlite'}", None)
    write(*db, hand_made_rows())
    # in 2022 nobody's denial had started yet
    early = build(db, as_of=datetime(2022, 6, 1), extra_excluded_person_ids=[])
    assert early.excluded_by_consent == 0 and 7 in early.person_ids.tolist()
    # person 8's denial covered the whole of 2023-12-31
    late_in_2023 = build(db, as_of=datetime(2023, 12, 31, 23, 59), extra_excluded_person_ids=[])
    assert 8 not in late_in_2023.person_ids.tolist() and late_in_2023.excluded_by_consent == 2
    engine = create_engine(db[0])
    with engine.begin() as connection:
        connection.execute(text("DROP TABLE twinfed_consent"))
    engine.dispose()
    no_registry = build(db)
    assert no_registry.excluded_by_consent == 1  # only the site's own withdrawal list (person 9)
    assert 7 in no_registry.person_ids.tolist()


def test_sqlite_times_stored_as_seconds_since_1970_read_the_same(tmp_path):
    """OHDSI's DatabaseConnector (e.g. the Eunomia databases) writes SQLite dates as numbers of seconds."""
    text_times = (f"sqlite:///{tmp_path / 'text.sqlite'}", None)
    numeric_times = (f"sqlite:///{tmp_path / 'numeric.sqlite'}", None)
    for db in (text_times, numeric_times):
        write(*db, hand_made_rows())
    engine = create_engine(numeric_times[0])
    with engine.begin() as connection:
        for table in ("person", "visit_occurrence", "measurement", "observation", "condition_occurrence", "death"):
            columns = [row[1] for row in connection.execute(text(f"PRAGMA table_info({table})"))]
            for column in (c for c in columns if c.endswith(("_date", "_datetime"))):
                connection.execute(text(f"UPDATE {table} SET {column} = CAST(strftime('%s', {column}) AS REAL)"))
        assert connection.execute(text("SELECT typeof(visit_start_datetime) FROM visit_occurrence")).first()[0] in (
            "integer",
            "real",
        )
    engine.dispose()
    assert build(numeric_times).snapshot_hash == build(text_times).snapshot_hash


def test_without_concept_ancestors_only_the_listed_concepts_count(tmp_path):
    db = (f"sqlite:///{tmp_path / 'omop.sqlite'}", None)
    rows = hand_made_rows()
    del rows.tables["concept_ancestor"]
    write(*db, rows)
    assert by_person(build(db))[8]["heart_failure"] == 0


def test_feature_names_do_not_depend_on_the_data(tmp_path):
    with_data = (f"sqlite:///{tmp_path / 'a.sqlite'}", None)
    write(*with_data, hand_made_rows())
    other = Rows()  # a site with a single patient and none of the study's measurements
    other.person(1, 8532, date(1960, 1, 1))
    other.visit(1, 1, datetime(2024, 1, 1), datetime(2024, 1, 9))
    empty = (f"sqlite:///{tmp_path / 'b.sqlite'}", None)
    write(*empty, other)
    a, b = build(with_data), build(empty)
    assert a.feature_names == b.feature_names == FEATURES
    assert a.series_names == b.series_names
    assert b.features.shape == (1, len(FEATURES)) and b.series.shape == (1, 4, 2, 3)
    no_cohort = (f"sqlite:///{tmp_path / 'c.sqlite'}", None)
    write(*no_cohort, Rows())
    c = build(no_cohort)
    assert c.features.shape == (0, len(FEATURES)) and c.cohort_size == 0 and c.feature_names == FEATURES


def test_a_database_without_omop_tables_is_refused_clearly(tmp_path):
    url = f"sqlite:///{tmp_path / 'other.sqlite'}"
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE patients (id integer)"))
    engine.dispose()
    with pytest.raises(CohortError, match="has no OMOP CDM tables"):
        build_dataset(url, study(), split_key=KEY)
    partial = f"sqlite:///{tmp_path / 'partial.sqlite'}"
    engine = create_engine(partial)
    create_cdm(engine)
    with engine.begin() as connection:
        connection.execute(text("DROP TABLE person"))
    engine.dispose()
    with pytest.raises(CohortError, match="no person table"):
        build_dataset(partial, study(), split_key=KEY)
    with pytest.raises(ValueError, match="split_key"):
        build_dataset(url, study(), split_key=b"")


@pytest.mark.postgres
def test_a_postgresql_schema_without_omop_tables_is_named_in_the_error(pg_url):
    with pytest.raises(CohortError, match=r"in schema 'no_such_cdm_schema'.*no OMOP CDM tables"):
        build_dataset(pg_url, study(), split_key=KEY, schema="no_such_cdm_schema")


@pytest.mark.parametrize("fractions", [(0.8, 0.0, 0.2), (0.7, 0.15, 0.15), (0.5, 0.3, 0.2)])
def test_the_random_split_honours_the_fractions_and_is_keyed(fractions):
    ids = np.arange(1, 20_001, dtype=np.int64)
    split = keyed_split(ids, KEY, fractions)
    shares = tuple(float((split == part).mean()) for part in ("train", "validation", "test"))
    assert shares == pytest.approx(fractions, abs=0.015)
    if fractions[1] == 0:
        assert "validation" not in set(split)  # a share of 0 cuts no part, not a sliver of one
    # another key gives another split
    assert (keyed_split(ids, b"another site", fractions) != split).mean() > 0.3


def test_a_persons_part_stays_when_other_persons_are_added():
    first_load = np.arange(1, 5_001, dtype=np.int64)
    later = np.concatenate([np.arange(5_001, 12_001, dtype=np.int64), first_load[::-1]])  # new patients, reordered
    before = dict(zip(first_load.tolist(), keyed_split(first_load, KEY, (0.6, 0.2, 0.2)).tolist(), strict=True))
    after = dict(zip(later.tolist(), keyed_split(later, KEY, (0.6, 0.2, 0.2)).tolist(), strict=True))
    assert all(after[p] == part for p, part in before.items())


def test_split_fractions_that_do_not_add_up_are_refused():
    with pytest.raises(ValueError, match="adding up to 1"):
        keyed_split(np.arange(3), KEY, (0.7, 0.1, 0.1))


def test_a_random_split_from_the_study_is_what_the_dataset_carries(hand_made):
    spec = study().model_copy(
        update={"evaluation": EvaluationSpec(split=RandomSplit(train=0.5, validation=0.25, test=0.25))}
    )
    ds = build(hand_made, spec)
    np.testing.assert_array_equal(ds.split, keyed_split(ds.person_ids, KEY, (0.5, 0.25, 0.25)))
    assert [p.part for p in ds.attrition.parts] == ["train", "validation", "test"]
