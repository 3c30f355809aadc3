"""`twinfed dq`: the data-quality checks on real SQLite and PostgreSQL databases.

A tiny OMOP CDM is built twice with create_cdm + insert_rows: a clean one that passes every applicable
check, and a dirty one in which each check type finds the problems planted for it (exact row counts).
Then the command line (exit codes, the 80-column summary, JSON and HTML files) and the bundled thresholds.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import re
import uuid
from pathlib import Path

import pytest
import typer
from sqlalchemy import Column, MetaData, Table, text
from typer.testing import CliRunner

from omop_etl.bulk import insert_rows
from omop_etl.database import open_engine
from omop_etl.dq_cli import dq
from omop_etl.quality import DqReport, Status, render_html, run_checks, write_html
from omop_etl.quality import thresholds as th
from omop_etl.schema import cdm_metadata, create_cdm
from tests.shared_data import require, shared_path

D = dt.date
TODAY = dt.date.today()
EHR = 32817  # Type Concept "EHR"
HEART_RATE, SYSTOLIC, PER_MINUTE, MM_HG = 3027018, 3004249, 8541, 8876
DIABETES, INPATIENT, MALE, FEMALE, CHEST_XRAY = 201826, 9201, 8507, 8532, 4163872
LISINOPRIL = 1308216  # RxNorm ingredient (bundled vocabulary)
TESTICULAR_HYPOFUNCTION = 26662  # DQD plausibleGender: Male
SERUM_CREATININE_LEVEL, MICROMOLE_PER_LITER = 37392176, 8749  # DQD OBSERVATION value range 10..200 umol/L
T2DM_ICD10CM = 1567956  # non-standard source concept (ICD10CM E11)

# Concept rows the tests need (concept_code is not read by any check; codes we could not verify hold the id).
CONCEPTS = [
    (MALE, "MALE", "Gender", "Gender", "Gender", "S", "M"),
    (FEMALE, "FEMALE", "Gender", "Gender", "Gender", "S", "F"),
    (INPATIENT, "Inpatient Visit", "Visit", "Visit", "Visit", "S", "IP"),
    (EHR, "EHR", "Type Concept", "Type Concept", "Type Concept", "S", "32817"),
    (HEART_RATE, "Heart rate", "Measurement", "LOINC", "Clinical Observation", "S", "8867-4"),
    (SYSTOLIC, "Systolic blood pressure", "Measurement", "LOINC", "Clinical Observation", "S", "8480-6"),
    (MM_HG, "millimeter mercury column", "Unit", "UCUM", "Unit", "S", "mm[Hg]"),
    (PER_MINUTE, "per minute", "Unit", "UCUM", "Unit", "S", "/min"),
    (MICROMOLE_PER_LITER, "micromole per liter", "Unit", "UCUM", "Unit", "S", "umol/L"),
    (DIABETES, "Type 2 diabetes mellitus", "Condition", "SNOMED", "Clinical Finding", "S", "44054006"),
    (TESTICULAR_HYPOFUNCTION, "Testicular hypofunction", "Condition", "SNOMED", "Clinical Finding", "S", "26662"),
    (T2DM_ICD10CM, "Type 2 diabetes mellitus", "Condition", "ICD10CM", "3-char nonbill code", None, "E11"),
    (CHEST_XRAY, "Plain chest X-ray", "Procedure", "SNOMED", "Procedure", "S", "399208008"),
    (LISINOPRIL, "lisinopril", "Drug", "RxNorm", "Ingredient", "S", "29046"),
    (SERUM_CREATININE_LEVEL, "Serum creatinine level", "Observation", "SNOMED", "Observable Entity", "S", "37392176"),
]


def clean_data() -> dict[str, list[dict]]:
    """Three persons with visits, conditions, a drug, a procedure, vitals, an observation and one death."""
    concept = [
        dict(
            zip(
                (
                    "concept_id",
                    "concept_name",
                    "domain_id",
                    "vocabulary_id",
                    "concept_class_id",
                    "standard_concept",
                    "concept_code",
                ),
                row,
                strict=True,
            ),
            valid_start_date=D(1970, 1, 1),
            valid_end_date=D(2099, 12, 31),
        )
        for row in CONCEPTS
    ]

    def person(pid, gender, year, month=None, day=None, **extra):
        birth = dt.datetime(year, month, day) if month and day else None
        return dict(
            person_id=pid,
            gender_concept_id=gender,
            year_of_birth=year,
            month_of_birth=month,
            day_of_birth=day,
            birth_datetime=birth,
            race_concept_id=0,
            ethnicity_concept_id=0,
            **extra,
        )

    def period(oid, pid, start, end):
        return dict(
            observation_period_id=oid,
            person_id=pid,
            observation_period_start_date=start,
            observation_period_end_date=end,
            period_type_concept_id=EHR,
        )

    def visit(vid, pid, start, end, **extra):
        return dict(
            visit_occurrence_id=vid,
            person_id=pid,
            visit_concept_id=INPATIENT,
            visit_start_date=start,
            visit_end_date=end,
            visit_type_concept_id=EHR,
            **{"care_site_id": 1, "provider_id": 1, **extra},
        )

    def condition(cid, pid, concept_id, start, visit_id, end=None):
        return dict(
            condition_occurrence_id=cid,
            person_id=pid,
            condition_concept_id=concept_id,
            condition_start_date=start,
            condition_end_date=end,
            condition_type_concept_id=EHR,
            visit_occurrence_id=visit_id,
        )

    return {
        "concept": concept,
        "location": [dict(location_id=1, city="Springfield")],
        "care_site": [dict(care_site_id=1, care_site_name="Ward A", location_id=1)],
        "provider": [dict(provider_id=1, care_site_id=1, gender_concept_id=FEMALE)],
        "person": [
            person(1, MALE, 1960, 5, 10, location_id=1, provider_id=1, care_site_id=1),
            person(2, FEMALE, 1975),
            person(3, MALE, 1950, 1, 1),
        ],
        "observation_period": [
            period(1, 1, D(2023, 1, 1), D(2023, 12, 31)),
            period(2, 2, D(2023, 1, 1), D(2023, 12, 31)),
            period(3, 3, D(2023, 1, 1), D(2023, 6, 20)),
        ],
        "visit_occurrence": [
            visit(10, 1, D(2023, 3, 1), D(2023, 3, 5)),
            visit(11, 2, D(2023, 4, 10), D(2023, 4, 12)),
            visit(12, 3, D(2023, 6, 1), D(2023, 6, 10)),
        ],
        "condition_occurrence": [
            condition(100, 1, DIABETES, D(2023, 3, 1), 10),
            condition(101, 2, DIABETES, D(2023, 4, 10), 11, end=D(2023, 4, 12)),
            condition(102, 3, TESTICULAR_HYPOFUNCTION, D(2023, 6, 2), 12),
        ],
        "drug_exposure": [
            dict(
                drug_exposure_id=200,
                person_id=1,
                drug_concept_id=LISINOPRIL,
                drug_exposure_start_date=D(2023, 3, 2),
                drug_exposure_end_date=D(2023, 3, 5),
                drug_type_concept_id=EHR,
                days_supply=4,
                quantity=4.0,
                visit_occurrence_id=10,
            ),
        ],
        "procedure_occurrence": [
            dict(
                procedure_occurrence_id=300,
                person_id=2,
                procedure_concept_id=CHEST_XRAY,
                procedure_date=D(2023, 4, 11),
                procedure_type_concept_id=EHR,
                visit_occurrence_id=11,
            ),
        ],
        "measurement": [
            measurement(400, 1, HEART_RATE, D(2023, 3, 1), 72, PER_MINUTE, 10),
            measurement(401, 1, SYSTOLIC, D(2023, 3, 2), 120, MM_HG, 10),
            measurement(402, 2, HEART_RATE, D(2023, 4, 10), 80, PER_MINUTE, 11),
            measurement(403, 2, SYSTOLIC, D(2023, 4, 11), 118, MM_HG, 11),
            measurement(404, 3, HEART_RATE, D(2023, 6, 5), 90, PER_MINUTE, 12),
            measurement(405, 3, SYSTOLIC, D(2023, 6, 5), 130, MM_HG, 12),
            measurement(406, 3, HEART_RATE, D(2023, 6, 11), 85, PER_MINUTE, 12),  # visit end + 1 day: tolerated
        ],
        "observation": [observation(500, 1, D(2023, 3, 3), 80.0)],
        "death": [dict(person_id=3, death_date=D(2023, 6, 20), death_type_concept_id=EHR)],
    }


def measurement(mid, pid, concept_id, when, value, unit, visit_id):
    return dict(
        measurement_id=mid,
        person_id=pid,
        measurement_concept_id=concept_id,
        measurement_date=when,
        measurement_type_concept_id=EHR,
        value_as_number=value,
        unit_concept_id=unit,
        unit_source_value=None if unit is None else str(unit),
        visit_occurrence_id=visit_id,
    )


def observation(oid, pid, when, value, type_concept=EHR):
    return dict(
        observation_id=oid,
        person_id=pid,
        observation_concept_id=SERUM_CREATININE_LEVEL,
        observation_date=when,
        observation_type_concept_id=type_concept,
        value_as_number=value,
        unit_concept_id=MICROMOLE_PER_LITER if value is not None else None,
        visit_occurrence_id=10,
    )


def dirty_data() -> dict[str, list[dict]]:
    """The clean set plus one planted problem (or a few) per check type; see EXPECTED_FAILURES."""
    data = clean_data()
    data["person"] += [
        dict(
            person_id=4,
            gender_concept_id=FEMALE,
            year_of_birth=1980,
            race_concept_id=0,
            ethnicity_concept_id=0,
            location_id=42,
        ),  # location 42 does not exist; person 4 has no observation period
        dict(person_id=5, gender_concept_id=MALE, year_of_birth=1800, race_concept_id=0, ethnicity_concept_id=0),
        dict(person_id=6, gender_concept_id=MALE, year_of_birth=1970, race_concept_id=0, ethnicity_concept_id=0),
        dict(person_id=7, gender_concept_id=FEMALE, year_of_birth=1970, race_concept_id=0, ethnicity_concept_id=0),
    ]
    periods = [
        (4, 5, D(2023, 1, 1), D(2023, 12, 31)),
        (5, 6, D(2022, 1, 1), D(2022, 6, 30)),
        (6, 6, D(2022, 6, 1), D(2022, 12, 31)),  # overlaps period 5
        (7, 7, D(2022, 1, 1), D(2022, 6, 30)),
        (8, 7, D(2022, 7, 1), D(2022, 12, 31)),  # back to back with period 7
        (9, 1, D(2024, 3, 1), D(2024, 6, 30)),  # a second period of person 1, well apart: fine
    ]
    data["observation_period"] += [
        dict(
            observation_period_id=o,
            person_id=p,
            observation_period_start_date=s,
            observation_period_end_date=e,
            period_type_concept_id=EHR,
        )
        for o, p, s, e in periods
    ]
    data["visit_occurrence"] += [
        dict(
            visit_occurrence_id=13,
            person_id=2,
            visit_concept_id=INPATIENT,
            visit_start_date=D(2023, 5, 1),
            visit_end_date=D(2023, 5, 2),
            visit_type_concept_id=EHR,
            care_site_id=77,
        ),  # care site 77 unknown
        dict(
            visit_occurrence_id=14,
            person_id=5,
            visit_concept_id=INPATIENT,
            visit_start_date=D(2023, 7, 1),
            visit_end_date=TODAY + dt.timedelta(days=30),
            visit_type_concept_id=EHR,
        ),  # ends in the future
    ]

    def condition(cid, pid, concept_id, start, visit_id, end=None):
        return dict(
            condition_occurrence_id=cid,
            person_id=pid,
            condition_concept_id=concept_id,
            condition_start_date=start,
            condition_end_date=end,
            condition_type_concept_id=EHR,
            visit_occurrence_id=visit_id,
        )

    data["condition_occurrence"] += [
        condition(103, 1, DIABETES, D(2023, 3, 1), 555),  # visit 555 does not exist
        condition(104, 1, HEART_RATE, D(2023, 3, 2), 10),  # a Measurement concept as a condition
        condition(105, 1, T2DM_ICD10CM, D(2023, 3, 3), 10),  # non-standard concept
        condition(106, 2, 0, D(2023, 4, 11), 11),  # unmapped
        condition(107, 2, DIABETES, D(2023, 4, 12), 11, end=D(2023, 4, 10)),  # ends before it starts
        condition(108, 2, TESTICULAR_HYPOFUNCTION, D(2023, 4, 11), 11),  # male-only concept on a woman
    ]
    data["procedure_occurrence"] += [
        dict(
            procedure_occurrence_id=301,
            person_id=1,
            procedure_concept_id=CHEST_XRAY,
            procedure_date=D(1960, 3, 1),
            procedure_type_concept_id=EHR,
        ),  # before birth on 1960-05-10
        dict(
            procedure_occurrence_id=302,
            person_id=2,
            procedure_concept_id=CHEST_XRAY,
            procedure_date=D(2023, 4, 11),
            procedure_type_concept_id=0,
            visit_occurrence_id=11,
        ),  # type concept 0 (threshold 0%)
    ]
    data["measurement"] += [
        measurement(410, 999, HEART_RATE, D(2023, 3, 2), 75, PER_MINUTE, 10),  # person 999 does not exist
        measurement(411, 1, 123456789, D(2023, 3, 2), None, None, 10),  # concept not in the vocabulary
        measurement(412, 3, HEART_RATE, D(2023, 9, 1), 88, PER_MINUTE, None),  # 73 days after death
        measurement(413, 3, HEART_RATE, D(2023, 8, 19), 86, PER_MINUTE, None),  # 60 days after death: tolerated
        measurement(414, 2, HEART_RATE, D(2023, 4, 15), 82, PER_MINUTE, 11),  # 3 days after its visit ended
        measurement(415, 1, HEART_RATE, D(2023, 3, 3), 70, MM_HG, 10),  # heart rate in mm[Hg]
        measurement(416, 1, HEART_RATE, D(2023, 3, 4), 500, PER_MINUTE, 10),  # 500/min
        measurement(417, 2, SYSTOLIC, D(2023, 4, 11), 5, MM_HG, 11),  # 5 mm[Hg]
    ]
    data["observation"] += [
        observation(501, 1, D(2023, 3, 3), None, type_concept=None),  # required type concept missing
        observation(500, 1, D(2023, 3, 4), 500.0),  # duplicate id 500, and 500 umol/L is above DQD's 200
    ]
    return data


# check_id -> (violated rows, denominator) of every check the dirty database must fail
EXPECTED_FAILURES = {
    "cdmTable.visit_detail": (1, 1),
    "cdmField.provider": (1, 13),
    "isRequired.observation.observation_type_concept_id": (1, 3),
    "isPrimaryKey.observation.observation_id": (2, 3),
    "plausibleValueHigh.observation.observation_concept_id.37392176.8749": (1, 2),
    "isForeignKey.person.location_id": (1, 7),
    "isForeignKey.measurement.person_id": (1, 15),
    "isForeignKey.measurement.measurement_concept_id": (1, 15),
    "isForeignKey.condition_occurrence.visit_occurrence_id": (1, 9),
    "isForeignKey.visit_occurrence.care_site_id": (1, 5),
    "fkDomain.condition_occurrence.condition_concept_id": (1, 9),
    "isStandardValidConcept.condition_occurrence.condition_concept_id": (1, 9),
    "standardConceptRecordCompleteness.condition_occurrence.condition_concept_id": (1, 9),
    "standardConceptRecordCompleteness.procedure_occurrence.procedure_type_concept_id": (1, 3),
    "plausibleValueLow.person.year_of_birth": (1, 7),
    "plausibleValueHigh.visit_occurrence.visit_end_date": (1, 5),
    "plausibleStartBeforeEnd.condition_occurrence.condition_start_date": (1, 2),
    "plausibleAfterBirth.procedure_occurrence.procedure_date": (1, 3),
    "plausibleBeforeDeath.measurement.measurement_date": (1, 5),
    "withinVisitDates.measurement.measurement_date": (1, 13),
    "measurePersonCompleteness.observation_period": (1, 7),
    "measureObservationPeriodOverlap.observation_period": (2, 6),
    "plausibleGender.condition_occurrence.condition_concept_id.26662": (1, 2),
    "plausibleUnitConceptIds.measurement.measurement_concept_id.3027018": (1, 10),
    "plausibleValueHigh.measurement.measurement_concept_id.3027018.8541": (1, 9),
    "plausibleValueLow.measurement.measurement_concept_id.3004249.8876": (1, 4),
}


def _loose_table(source: Table, metadata: MetaData, *, drop: tuple[str, ...] = (), keep_keys: bool = False) -> Table:
    """A copy of a CDM table without NOT NULL (and primary key) constraints, as some site databases have."""
    columns = [
        Column(
            c.name,
            c.type,
            primary_key=keep_keys and c.primary_key,
            nullable=not (keep_keys and c.primary_key),
            autoincrement=False,
        )
        for c in source.columns
        if c.name not in drop
    ]
    return Table(source.name, metadata, *columns)


def build_database(engine, schema: str | None, data: dict[str, list[dict]], *, dirty: bool = False) -> None:
    """Create the CDM with create_cdm and load `data` with insert_rows (dirty: also bend the structure)."""
    cdm = cdm_metadata(schema)
    if dirty:
        # Tables as a site database without constraints may have them: observation without NOT NULL and
        # primary key, provider without its `dea` column. create_cdm leaves existing tables alone.
        loose = MetaData(schema=schema)
        _loose_table(cdm.tables[_key("observation", schema)], loose)
        _loose_table(cdm.tables[_key("provider", schema)], loose, drop=("dea",), keep_keys=True)
        with engine.begin() as connection:
            if schema:
                connection.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
            loose.create_all(connection)
    create_cdm(engine, schema)
    with engine.begin() as connection:
        if dirty:
            connection.execute(text(f"DROP TABLE {_qualified('visit_detail', schema)}"))
        for table_name, rows in data.items():
            columns = sorted({key for row in rows for key in row})
            insert_rows(
                connection,
                cdm.tables[_key(table_name, schema)],
                [tuple(r.get(c) for c in columns) for r in rows],
                columns,
            )


def _key(table: str, schema: str | None) -> str:
    return f"{schema}.{table}" if schema else table


def _qualified(table: str, schema: str | None) -> str:
    return f'"{schema}".{table}' if schema else table


# ---------------------------------------------------------------------------------------------------------
# Shared assertions (SQLite and PostgreSQL)


def assert_clean(report: DqReport) -> None:
    ids = [r.check_id for r in report.results]
    assert len(ids) == len(set(ids))
    problems = [f"{r.check_id}: {r.explanation}" for r in report.results if r.status in (Status.FAILED, Status.ERROR)]
    assert not problems, problems
    assert report.ok
    passed = {r.check_type for r in report.results if r.status is Status.PASSED}
    # every check type ran and passed on the clean data
    assert passed == set(th.check_types()) & {r.check_type for r in report.results}
    assert len(passed) == 18, sorted(passed)
    # empty tables are not applicable, never passed or failed
    visit_detail = [
        r for r in report.results if r.table == "visit_detail" and r.check_type not in ("cdmTable", "cdmField")
    ]
    assert visit_detail and all(r.status is Status.NOT_APPLICABLE for r in visit_detail)
    assert report.result("isRequired.visit_detail.visit_detail_id").explanation == (
        "Not applicable: visit_detail has no rows."
    )
    # a tolerated event one day after its visit, and an unpopulated optional field
    assert report.result("withinVisitDates.measurement.measurement_date").violated_rows == 0
    assert report.result("isForeignKey.person.provider_id").status is Status.PASSED
    assert report.result("isForeignKey.visit_occurrence.provider_id").violated_rows == 0
    assert report.result("isForeignKey.condition_occurrence.provider_id").status is Status.NOT_APPLICABLE
    # DQD's and twinfed's concept-level ranges both ran
    assert report.result("plausibleValueHigh.measurement.measurement_concept_id.3027018.8541").threshold_source == (
        "twinfed"
    )
    assert (
        report.result("plausibleValueHigh.observation.observation_concept_id.37392176.8749").threshold_source == "DQD"
    )
    coverage = {c.table: c for c in report.coverage}
    assert coverage["measurement"].pct_standard == 100.0 and coverage["measurement"].rows == 7


def assert_dirty(report: DqReport) -> None:
    failed = {r.check_id: (r.violated_rows, r.denominator_rows) for r in report.results if r.status is Status.FAILED}
    assert failed == EXPECTED_FAILURES
    assert not [r for r in report.results if r.status is Status.ERROR]
    assert not report.ok
    # tolerances: 60 days after death and 1 day around the visit are not counted
    assert report.result("plausibleBeforeDeath.measurement.measurement_date").violated_rows == 1
    # a missing table makes the checks on it and the references to it not applicable
    assert report.result("isRequired.visit_detail.visit_detail_id").status is Status.NOT_APPLICABLE
    assert report.result("isForeignKey.measurement.visit_detail_id").explanation == (
        "Not applicable: table visit_detail is missing."
    )
    assert "dea" in report.result("cdmField.provider").explanation
    explanation = report.result("fkDomain.condition_occurrence.condition_concept_id").explanation
    assert explanation == (
        "1 of 9 rows in condition_occurrence have a condition_concept_id that is neither 0 nor in the Condition "
        "domain: 11.11%, above the 0% threshold."
    )
    assert report.result(
        "standardConceptRecordCompleteness.condition_occurrence.condition_concept_id"
    ).pct_violated == (pytest.approx(100 / 9, abs=1e-3))
    summary = {row.category: row for row in report.summary}
    assert summary["Plausibility"].failed == 12 and summary["Conformance"].failed == 11
    assert summary["Completeness"].failed == 3
    coverage = {c.table: c for c in report.coverage}
    condition = coverage["condition_occurrence"]
    assert (condition.rows, condition.concept_zero, condition.non_standard, condition.not_in_vocabulary) == (9, 1, 1, 0)
    assert condition.pct_standard == pytest.approx(100 * 7 / 9, abs=0.01)


# ---------------------------------------------------------------------------------------------------------
# SQLite


@pytest.fixture
def clean_sqlite(tmp_path) -> str:
    url = f"sqlite:///{tmp_path / 'clean.sqlite'}"
    engine = open_engine(url)
    build_database(engine, None, clean_data())
    engine.dispose()
    return url


@pytest.fixture
def dirty_sqlite(tmp_path) -> str:
    url = f"sqlite:///{tmp_path / 'dirty.sqlite'}"
    engine = open_engine(url)
    build_database(engine, None, dirty_data(), dirty=True)
    engine.dispose()
    return url


def _run(url: str, schema: str | None = None) -> DqReport:
    engine = open_engine(url)
    try:
        return run_checks(engine, schema)
    finally:
        engine.dispose()


def test_clean_sqlite_database_passes_every_applicable_check(clean_sqlite):
    assert_clean(_run(clean_sqlite))


def test_dirty_sqlite_database_fails_exactly_the_planted_problems(dirty_sqlite):
    assert_dirty(_run(dirty_sqlite))


def test_empty_database_reports_missing_tables_and_runs_nothing_else(tmp_path):
    url = f"sqlite:///{tmp_path / 'empty.sqlite'}"
    engine = open_engine(url)
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE unrelated (x integer)"))
    report = run_checks(engine)
    engine.dispose()
    assert {r.check_id for r in report.results if r.status is Status.FAILED} == {
        f"cdmTable.{table}" for table in (*th.CHECKED_TABLES, "concept")
    }
    assert all(r.status is Status.NOT_APPLICABLE for r in report.results if r.check_type != "cdmTable")
    assert "No OMOP CDM table was found" in report.warnings[0]


def test_empty_cdm_flags_the_required_observation_periods_only(tmp_path):
    engine = open_engine(f"sqlite:///{tmp_path / 'cdm.sqlite'}")
    create_cdm(engine)
    cdm = cdm_metadata()
    with engine.begin() as connection:
        insert_rows(
            connection,
            cdm.tables["person"],
            [(1, MALE, 1970, 0, 0)],
            ["person_id", "gender_concept_id", "year_of_birth", "race_concept_id", "ethnicity_concept_id"],
        )
    report = run_checks(engine)
    engine.dispose()
    failed = {r.check_id for r in report.results if r.status is Status.FAILED}
    # no observation period at all is a failure; no visits is "nothing loaded", not a failure
    assert failed == {"measurePersonCompleteness.observation_period"}
    assert report.result("measurePersonCompleteness.visit_occurrence").status is Status.NOT_APPLICABLE
    assert report.result("fkDomain.person.gender_concept_id").explanation.startswith(
        "Not applicable: the CONCEPT table"
    )
    assert any("CONCEPT table is missing or empty" in w for w in report.warnings)


def test_a_check_that_cannot_run_is_an_error_and_the_others_still_report(tmp_path):
    engine = open_engine(f"sqlite:///{tmp_path / 'old.sqlite'}")
    data = clean_data()
    for row in data["person"]:
        del row["birth_datetime"]
    with engine.begin() as connection:  # a person table without birth_datetime, as in some old CDMs
        connection.execute(
            text(
                "CREATE TABLE person (person_id integer PRIMARY KEY, gender_concept_id integer, year_of_birth integer,"
                " month_of_birth integer, day_of_birth integer, race_concept_id integer, ethnicity_concept_id integer,"
                " location_id integer, provider_id integer, care_site_id integer)"
            )
        )
    build_database(engine, None, data)
    report = run_checks(engine)
    engine.dispose()
    errors = [r for r in report.results if r.status is Status.ERROR]
    assert errors and {r.check_type for r in errors} == {"plausibleAfterBirth"}
    assert "birth_datetime" in errors[0].explanation and errors[0].explanation.startswith("The check could not run")
    failed = {r.check_id for r in report.results if r.status is Status.FAILED}
    assert failed == {"cdmField.person"}
    # the other checks of the same tables still ran
    assert report.result("isRequired.measurement.measurement_concept_id").status is Status.PASSED
    assert report.result("withinVisitDates.measurement.measurement_date").status is Status.PASSED
    assert not report.ok


def test_numeric_dates_in_sqlite_are_flagged(tmp_path):
    engine = open_engine(f"sqlite:///{tmp_path / 'eunomia-like.sqlite'}")
    create_cdm(engine)
    with engine.begin() as connection:  # some tools store SQLite dates as seconds since 1970
        connection.execute(text("INSERT INTO observation_period VALUES (1, 1, 1672531200.0, 1703980800.0, 32817)"))
    report = run_checks(engine)
    engine.dispose()
    assert any("stored as integer values, not ISO-8601 text" in w for w in report.warnings)


def test_report_round_trips_through_json(dirty_sqlite):
    report = _run(dirty_sqlite)
    payload = json.loads(report.model_dump_json())
    assert payload["counts"]["failed"] == len(EXPECTED_FAILURES)
    assert [row["category"] for row in payload["summary"]] == ["Conformance", "Completeness", "Plausibility"]
    first = payload["results"][0]
    for key in (
        "check_id",
        "check_type",
        "kahn_category",
        "table",
        "violated_rows",
        "denominator_rows",
        "pct_violated",
        "threshold",
        "status",
        "explanation",
    ):
        assert key in first
    again = DqReport.model_validate_json(report.model_dump_json())
    assert again.results == report.results


def test_html_report_is_self_contained_and_lists_failures_first(dirty_sqlite, tmp_path):
    report = _run(dirty_sqlite)
    path = write_html(report, tmp_path / "out" / "dq.html")
    page = path.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "<style>" in page
    for external in ("<script", "src=", "href=", "@import", "url("):
        assert external not in page
    assert "Summary by Kahn category" in page and "Plausibility" in page
    statuses = re.findall(r'<tr class="(\w+)">', page)
    order = {"failed": 0, "error": 1, "passed": 2, "not_applicable": 3}
    assert statuses == sorted(statuses, key=order.__getitem__)
    assert statuses.count("failed") == len(EXPECTED_FAILURES)
    assert "unit_concept_id outside {-1, 8483, 8541}" not in page  # "-1" is shown as "none"
    assert "outside {none, 8483, 8541}" in page
    assert render_html(report) == page


# ---------------------------------------------------------------------------------------------------------
# Command line


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("dq")(dq)

    @app.callback()
    def _root() -> None:
        """Test front door."""

    return app


runner = CliRunner()


def test_cli_exits_0_and_writes_reports_for_a_clean_database(clean_sqlite, tmp_path):
    report_path, html_path = tmp_path / "dq.json", tmp_path / "dq.html"
    result = runner.invoke(_app(), ["dq", "--db", clean_sqlite, "--report", str(report_path), "--html", str(html_path)])
    assert result.exit_code == 0, result.output
    assert "All applicable checks passed" in result.output
    assert DqReport.model_validate_json(report_path.read_text()).ok
    assert "All applicable checks passed." in html_path.read_text()


def test_cli_exits_1_and_lists_failures_within_80_columns(dirty_sqlite):
    result = runner.invoke(_app(), ["dq", "--db", dirty_sqlite], env={"COLUMNS": "80"})
    assert result.exit_code == 1, result.output
    assert "26 check(s) failed or could not run" in result.output and "Conformance" in result.output
    assert "1 of 9 rows in condition_occurrence have a condition_concept_id that is neither 0 nor in the" in (
        " ".join(result.output.split())
    )
    assert "and 11 more" in result.output
    too_wide = [line for line in result.output.splitlines() if len(line) > 80]
    assert not too_wide, too_wide


def test_cli_exits_2_with_a_sentence_when_the_database_is_unreachable(tmp_path):
    result = runner.invoke(_app(), ["dq", "--db", "postgresql://nobody:secret@127.0.0.1:9/none"])
    assert result.exit_code == 2
    assert "Cannot connect" in result.output and "secret" not in result.output
    missing = runner.invoke(_app(), ["dq", "--db", f"sqlite:///{tmp_path / 'typo.sqlite'}"])
    assert missing.exit_code == 2
    assert "There is no SQLite database at" in missing.output
    assert not (tmp_path / "typo.sqlite").exists()
    garbage = runner.invoke(_app(), ["dq", "--db", "not a url"])
    assert garbage.exit_code == 2 and "is not a database URL" in garbage.output


def test_cli_exits_2_when_a_report_cannot_be_written(clean_sqlite, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = runner.invoke(_app(), ["dq", "--db", clean_sqlite, "--report", str(blocker / "dq.json")])
    assert result.exit_code == 2
    assert "cannot write the report" in result.output


def test_cli_help_documents_the_options():
    result = runner.invoke(_app(), ["dq", "--help"], env={"COLUMNS": "100"})
    assert result.exit_code == 0
    for option in ("--db", "--schema", "--report", "--html", "Exit status"):
        assert option in result.output


# ---------------------------------------------------------------------------------------------------------
# Bundled thresholds


def test_bundled_thresholds_hold_dqd_numbers():
    kinds = th.check_types()
    assert kinds["isRequired"].category == "Conformance" and kinds["isRequired"].severity == "fatal"
    assert kinds["measureObservationPeriodOverlap"].subcategory == "Temporal"
    assert th.field_threshold("condition_occurrence", "condition_concept_id", "standardConceptRecordCompleteness") == (
        5.0,
        "DQD",
    )
    assert th.field_threshold("visit_occurrence", "visit_concept_id", "standardConceptRecordCompleteness")[0] == 0.0
    assert th.field_threshold("person", "race_concept_id", "standardConceptRecordCompleteness")[0] == 100.0
    tables = {(r.table, r.check): r.threshold for r in th.table_rules()}
    assert tables[("observation_period", "measurePersonCompleteness")] == 0.0
    assert tables[("visit_occurrence", "measurePersonCompleteness")] == 95.0
    units = {
        r.concept_id: th.parse_unit_ids(r.parameter) for r in th.concept_rules() if r.check == "plausibleUnitConceptIds"
    }
    assert units[HEART_RATE] == (-1, 8483, 8541) and units[SYSTOLIC] == (8876,)
    assert th.resolve_bound("today+1d", D(2025, 12, 31)) == D(2026, 1, 1)
    assert th.resolve_bound("year+1", D(2025, 6, 1)) == 2026.0


def test_twinfed_measurement_ranges_match_the_etl_quarantine_limits():
    from omop_etl.units import plausible_range

    rules = [r for r in th.concept_rules() if r.source == "twinfed"]
    assert rules
    for rule in rules:
        low, high = plausible_range(rule.concept_id)
        expected = low if rule.check == "plausibleValueLow" else high
        assert float(rule.parameter) == expected, rule


def test_bundled_files_are_the_extraction_of_the_dqd_csvs(tmp_path):
    dqd = shared_path("omop", "dqd")
    require(dqd / "OMOP_CDMv5.4_Field_Level.csv")
    th.build_from_dqd(dqd, tmp_path)
    bundled = Path(th.__file__).parent
    for name in (th.CHECK_TYPES_FILE, th.TABLE_THRESHOLDS_FILE, th.FIELD_THRESHOLDS_FILE, th.CONCEPT_THRESHOLDS_FILE):
        assert (tmp_path / name).read_text() == (bundled / name).read_text(), name
    with (bundled / th.CONCEPT_THRESHOLDS_FILE).open(newline="") as handle:
        assert "Notes" not in next(csv.reader(handle))


# ---------------------------------------------------------------------------------------------------------
# PostgreSQL (the production store): same databases in a schema of their own


@pytest.fixture
def pg_schema(pg_url):
    schema = f"dq_{uuid.uuid4().hex[:10]}"
    engine = open_engine(pg_url)
    try:
        yield engine, schema
    finally:
        with engine.begin() as connection:
            connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        engine.dispose()


@pytest.mark.postgres
def test_clean_postgresql_database_passes_every_applicable_check(pg_schema):
    engine, schema = pg_schema
    build_database(engine, schema, clean_data())
    report = run_checks(engine, schema)
    assert_clean(report)
    assert report.dialect == "postgresql" and report.cdm_schema == schema


@pytest.mark.postgres
def test_dirty_postgresql_database_fails_exactly_the_planted_problems(pg_schema, pg_url, tmp_path):
    engine, schema = pg_schema
    build_database(engine, schema, dirty_data(), dirty=True)
    assert_dirty(run_checks(engine, schema))
    result = runner.invoke(_app(), ["dq", "--db", pg_url, "--schema", schema, "--html", str(tmp_path / "dq.html")])
    assert result.exit_code == 1, result.output
    assert f"(schema {schema})" in " ".join(result.output.split())
    assert (tmp_path / "dq.html").is_file()


@pytest.mark.postgres
def test_wrong_postgresql_schema_is_reported_not_crashed(pg_schema):
    engine, schema = pg_schema
    report = run_checks(engine, schema)  # the schema was never created
    assert not report.ok
    assert f"schema '{schema}'" in report.warnings[0]
