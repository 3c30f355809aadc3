"""An OMOP CDM v5.4 database "written by another tool", for onboarding tests.

Most hospitals that join a consortium already run OMOP, loaded by their own ETL (WhiteRabbit/Rabbit-in-a-Hat
designs, SQL scripts, vendors). Such a database differs from what `twinfed etl` writes, and the site node
must take it as it is: this helper builds one with its own plain-SQL DDL (generated from the v5.4 field
list, but with its own type choices: BIGINT ids on PostgreSQL, no primary keys, only two of OHDSI's
indexes, under its own names), its own type concepts (32817 EHR for visits, conditions and deaths, 32856 Lab
for labs), a small vocabulary holding exactly the concepts it uses (rows of the core_concepts.csv bundled
with twinfed, the shared reference file), cdm_source saying 'v5.4', and no twinfed_* table at all.

The patients are adult inpatients (visit 9201; a few emergency visits 9203 that the example study must
leave out) with the chronic conditions and first-day measurements of configs/study-inpatient-mortality.yaml.
A latent severity drives both the measurements and in-hospital death, so a logistic model can learn death
from them. Everything is drawn from one seeded generator: the same seed gives the same database.
"""

from __future__ import annotations

import csv
import datetime as dt
import math
from dataclasses import dataclass
from importlib import resources

import numpy as np
from sqlalchemy import text

from omop_etl.database import open_engine

TYPE_EHR, TYPE_LAB = 32817, 32856
INPATIENT, EMERGENCY = 9201, 9203
SEPSIS = 132797  # an admission diagnosis, only with build_foreign_omop(..., admission_diagnoses=True)
MALE, FEMALE = 8507, 8532

# (concept ids (first is the usual code), prevalence) of the study's chronic conditions.
CONDITIONS = {
    "heart_failure": ((316139, 4229440), 0.18),
    "diabetes": ((201826, 201820), 0.24),
    "ckd": ((46271022, 443597), 0.14),
    "copd": ((255573,), 0.11),
    "dementia": ((4182210,), 0.07),
}
# name -> (concept, unit concept, type, mean, sd per unit of severity, noise sd, lower, upper, per day)
MEASUREMENTS = {
    "heart_rate": (3027018, 8541, TYPE_EHR, 86.0, 11.0, 8.0, 30.0, 200.0, 3),
    "sbp": (3004249, 8876, TYPE_EHR, 126.0, -13.0, 12.0, 60.0, 230.0, 3),
    "resp_rate": (3024171, 8541, TYPE_EHR, 18.0, 3.2, 2.0, 8.0, 45.0, 3),
    "temperature": (3020891, 586323, TYPE_EHR, 37.0, 0.45, 0.35, 34.5, 41.5, 3),
    "spo2": (40762499, 8554, TYPE_EHR, 96.0, -2.3, 1.4, 70.0, 100.0, 3),
    "creatinine": (3016723, 8840, TYPE_LAB, 1.0, 0.25, 0.15, 0.3, 12.0, 1),
    "lactate": (3047181, 8753, TYPE_LAB, 1.3, 0.6, 0.3, 0.3, 15.0, 1),
    "wbc": (3000905, 8848, TYPE_LAB, 8.5, 2.4, 1.8, 1.0, 40.0, 1),
    "sodium": (3019550, 8753, TYPE_LAB, 139.0, -2.2, 2.5, 118.0, 160.0, 1),
    "hemoglobin": (3000963, 8713, TYPE_LAB, 13.0, -0.8, 1.2, 5.0, 19.0, 1),
    "albumin": (3024561, 8713, TYPE_LAB, 3.8, -0.35, 0.35, 1.5, 5.5, 1),
}
VOCABULARIES = {
    "None": "OMOP Standardized Vocabularies",
    "SNOMED": "Systematic Nomenclature of Medicine - Clinical Terms (IHTSDO)",
    "LOINC": "Logical Observation Identifiers Names and Codes (Regenstrief Institute)",
    "UCUM": "Unified Code for Units of Measure (Regenstrief Institute)",
    "Gender": "OMOP Gender",
    "Visit": "OMOP Visit",
    "Type Concept": "OMOP Type Concept",
    "CDM": "OMOP Common DataModel",
}
OWN_INDEXES = (("foreign_person_pk", "person", "person_id"), ("foreign_meas_person", "measurement", "person_id"))


@dataclass(frozen=True)
class ForeignOmop:
    """What was written (for the tests' expectations)."""

    persons: int
    inpatient_visits: int
    deaths: int
    measurements: int
    conditions: int


def _fields() -> dict[str, list[dict[str, str]]]:
    tables: dict[str, list[dict[str, str]]] = {}
    with resources.files("omop_etl.schema").joinpath("cdm_v5.4_fields.csv").open(encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            tables.setdefault(row["table"], []).append(row)
    return tables


def _type(datatype: str, field: str, primary: bool, dialect: str) -> str:
    if datatype == "integer":
        return "BIGINT" if primary and dialect == "postgresql" else "INTEGER"
    if datatype == "float":
        return "NUMERIC" if dialect == "postgresql" else "REAL"
    if datatype == "date":
        return "DATE"
    if datatype == "datetime":
        return "TIMESTAMP" if dialect == "postgresql" else "DATETIME"
    if datatype == "varchar(max)":
        return "TEXT"
    return datatype.upper()


def ddl(dialect: str, schema: str | None = None) -> list[str]:
    """CREATE TABLE statements for all 39 tables (no primary keys) and the tool's own two indexes."""
    prefix = f'"{schema}".' if schema else ""
    statements = []
    for table, fields in _fields().items():
        columns = ",\n  ".join(
            f'"{f["field"].strip(chr(34))}" {_type(f["datatype"], f["field"], f["primary_key"] == "Yes", dialect)}'
            + (" NOT NULL" if f["required"] == "Yes" else "")
            for f in fields
        )
        statements.append(f'CREATE TABLE {prefix}"{table}" (\n  {columns}\n)')
    statements += [f'CREATE INDEX "{name}" ON {prefix}"{t}" ("{c}")' for name, t, c in OWN_INDEXES]
    return statements


def _concept_rows(concept_ids: set[int]) -> list[dict]:
    rows = [
        {
            "concept_id": 0,
            "concept_name": "No matching concept",
            "domain_id": "Metadata",
            "vocabulary_id": "None",
            "concept_class_id": "Undefined",
            "standard_concept": None,
            "concept_code": "No matching concept",
        }
    ]
    with resources.files("omop_etl.vocabulary").joinpath("core_concepts.csv").open(encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            if int(row["concept_id"]) in concept_ids:
                rows.append({key: row[key] or None for key in rows[0]} | {"concept_id": int(row["concept_id"])})
    missing = concept_ids - {r["concept_id"] for r in rows}
    if missing:
        raise ValueError(f"concepts not in core_concepts.csv: {sorted(missing)}")
    for row in rows:
        row.update(
            valid_start_date="1970-01-01",
            valid_end_date="2099-12-31",
            invalid_reason=None,
            concept_code=row["concept_code"] or "",
        )
    return rows


def _stamp(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def _insert(connection, prefix: str, table: str, rows: list[dict]) -> None:
    if not rows:
        return
    names = list(rows[0])
    columns = ", ".join(f'"{n}"' for n in names)
    marks = ", ".join(f":{n}" for n in names)
    for start in range(0, len(rows), 5000):
        connection.execute(
            text(f'INSERT INTO {prefix}"{table}" ({columns}) VALUES ({marks})'), rows[start : start + 5000]
        )


def build_foreign_omop(
    url: str, schema: str | None = None, persons: int = 600, seed: int = 0, *, admission_diagnoses: bool = False
) -> ForeignOmop:
    """Create the OMOP database at `url` (PostgreSQL: in `schema`, created here) and fill it. See the module.

    `admission_diagnoses` also records sepsis (SEPSIS) at the admission of the sicker patients (more likely
    the higher the latent severity), drawn from a generator of its own: without it the database is the same
    as before, with it the rest of the database is too.
    """
    rng = np.random.default_rng(seed)
    diagnoses = np.random.default_rng([seed, 1])
    engine = open_engine(url)
    dialect = engine.dialect.name
    prefix = f'"{schema}".' if schema and dialect == "postgresql" else ""
    data: dict[str, list[dict]] = {
        name: []
        for name in ("person", "visit_occurrence", "condition_occurrence", "measurement", "death", "observation_period")
    }
    first_day = dt.datetime(2023, 1, 1)
    visit_id, condition_id, measurement_id = 500_000, 800_000, 3_000_000
    inpatient = 0
    for index in range(persons):
        person_id = 10_000 + 7 * index  # the other tool's own ids, with gaps
        age = int(18 + 77 * rng.beta(2.2, 1.6))
        male = bool(rng.random() < 0.52)
        admitted = first_day + dt.timedelta(minutes=int(rng.integers(0, 900 * 24 * 60)))
        birth = dt.date(admitted.year - age, int(rng.integers(1, 13)), int(rng.integers(1, 29)))
        if (birth.month, birth.day) > (admitted.month, admitted.day):
            birth = birth.replace(year=birth.year - 1)  # keep the drawn age at admission
        data["person"].append(
            {
                "person_id": person_id,
                "gender_concept_id": MALE if male else FEMALE,
                "year_of_birth": birth.year,
                "month_of_birth": birth.month,
                "day_of_birth": birth.day,
                "birth_datetime": _stamp(dt.datetime.combine(birth, dt.time())),
                "race_concept_id": 0,
                "ethnicity_concept_id": 0,
                "person_source_value": f"BW{person_id:08d}",
                "gender_source_value": "M" if male else "F",
            }
        )
        severity = float(rng.normal())
        chronic = {}
        observed_from = admitted.date() - dt.timedelta(days=365)
        for name, (concepts, prevalence) in CONDITIONS.items():
            boost = 1.0 + (age - 60) / 60 if name in ("heart_failure", "ckd", "dementia") else 1.0
            if name == "dementia" and age <= 70:
                boost *= 0.15
            chronic[name] = bool(rng.random() < prevalence * max(boost, 0.2))
            if chronic[name]:
                condition_id += 1
                onset = admitted.date() - dt.timedelta(days=int(rng.integers(30, 3000)))
                observed_from = min(observed_from, onset)
                data["condition_occurrence"].append(
                    {
                        "condition_occurrence_id": condition_id,
                        "person_id": person_id,
                        "condition_concept_id": concepts[int(rng.integers(0, len(concepts)))],
                        "condition_start_date": onset.isoformat(),
                        "condition_start_datetime": f"{onset} 00:00:00",
                        "condition_type_concept_id": TYPE_EHR,
                        "condition_status_concept_id": 0,
                        "condition_source_value": f"DX{name[:4].upper()}",
                        "condition_source_concept_id": 0,
                    }
                )
        logit = -3.4 + 1.35 * severity + 0.04 * (age - 65) + 0.55 * chronic["heart_failure"] + 0.45 * chronic["ckd"]
        logit += 0.35 * chronic["copd"] + 0.6 * chronic["dementia"]
        dies = bool(rng.random() < 1 / (1 + math.exp(-logit)))
        stay = dt.timedelta(hours=float(30 + rng.gamma(2.0, 50.0)))
        death_at = None
        if dies:  # after the prediction time (24 h) and within the study's 30 days; in hospital or soon after
            death_at = admitted + dt.timedelta(hours=float(26 + rng.uniform(0, 24 * 20)))
            stay = min(stay, death_at - admitted)
        discharged = admitted + stay
        visit_id += 1
        inpatient += 1
        data["visit_occurrence"].append(
            {
                "visit_occurrence_id": visit_id,
                "person_id": person_id,
                "visit_concept_id": INPATIENT,
                "visit_start_date": admitted.date().isoformat(),
                "visit_start_datetime": _stamp(admitted),
                "visit_end_date": discharged.date().isoformat(),
                "visit_end_datetime": _stamp(discharged),
                "visit_type_concept_id": TYPE_EHR,
                "visit_source_value": "KLINISCH",
                "admitted_from_concept_id": 0,
                "discharged_to_concept_id": 0,
            }
        )
        for name, (concept, unit, kind, mean, slope, noise, low, high, per_day) in MEASUREMENTS.items():
            if kind == TYPE_LAB and rng.random() < 0.08:
                continue  # a lab not drawn on the first day
            for draw in range(per_day):
                hours = float(rng.uniform(0.5, 23.5)) if per_day == 1 else 1 + 7.5 * draw + float(rng.uniform(0, 3))
                effect = slope * severity + (0.5 if name == "creatinine" and chronic["ckd"] else 0.0)
                value = float(np.clip(mean + effect + rng.normal(0, noise), low, high))
                measurement_id += 1
                taken = admitted + dt.timedelta(hours=hours)
                data["measurement"].append(
                    {
                        "measurement_id": measurement_id,
                        "person_id": person_id,
                        "measurement_concept_id": concept,
                        "measurement_date": taken.date().isoformat(),
                        "measurement_datetime": _stamp(taken),
                        "measurement_type_concept_id": kind,
                        "value_as_number": round(value, 2),
                        "unit_concept_id": unit,
                        "visit_occurrence_id": visit_id,
                        "measurement_source_value": name,
                        "measurement_source_concept_id": 0,
                    }
                )
        if admission_diagnoses and diagnoses.random() < 1 / (1 + math.exp(-(-1.2 + 1.4 * severity))):
            condition_id += 1
            data["condition_occurrence"].append(
                {
                    "condition_occurrence_id": condition_id,
                    "person_id": person_id,
                    "condition_concept_id": SEPSIS,
                    "condition_start_date": admitted.date().isoformat(),
                    "condition_start_datetime": _stamp(admitted),
                    "condition_type_concept_id": TYPE_EHR,
                    "condition_status_concept_id": 0,
                    "condition_source_value": "DXSEPS",
                    "condition_source_concept_id": 0,
                }
            )
        if death_at is not None:
            data["death"].append(
                {
                    "person_id": person_id,
                    "death_date": death_at.date().isoformat(),
                    "death_datetime": _stamp(death_at),
                    "death_type_concept_id": TYPE_EHR,
                }
            )
        if index % 15 == 0:  # an emergency visit a year earlier: not an inpatient stay, outside the cohort
            visit_id += 1
            earlier = admitted - dt.timedelta(days=365)
            data["visit_occurrence"].append(
                {
                    "visit_occurrence_id": visit_id,
                    "person_id": person_id,
                    "visit_concept_id": EMERGENCY,
                    "visit_start_date": earlier.date().isoformat(),
                    "visit_start_datetime": _stamp(earlier),
                    "visit_end_date": earlier.date().isoformat(),
                    "visit_end_datetime": _stamp(earlier + dt.timedelta(hours=6)),
                    "visit_type_concept_id": TYPE_EHR,
                    "visit_source_value": "SEH",
                    "admitted_from_concept_id": 0,
                    "discharged_to_concept_id": 0,
                }
            )
        data["observation_period"].append(
            {
                "observation_period_id": person_id,
                "person_id": person_id,
                "observation_period_start_date": observed_from.isoformat(),
                "observation_period_end_date": (death_at or discharged).date().isoformat(),
                "period_type_concept_id": TYPE_EHR,
            }
        )

    used = {MALE, FEMALE, INPATIENT, EMERGENCY, TYPE_EHR, TYPE_LAB, 756265} | (
        {SEPSIS} if admission_diagnoses else set()
    )
    used |= {c for concepts, _ in CONDITIONS.values() for c in concepts}
    used |= {m[0] for m in MEASUREMENTS.values()} | {m[1] for m in MEASUREMENTS.values()}
    try:
        with engine.begin() as connection:
            if dialect == "sqlite":
                connection.exec_driver_sql("BEGIN")
            if schema and dialect == "postgresql":
                connection.execute(text(f'CREATE SCHEMA "{schema}"'))
            for statement in ddl(dialect, schema if dialect == "postgresql" else None):
                connection.execute(text(statement))
            _insert(connection, prefix, "concept", _concept_rows(used))
            _insert(
                connection,
                prefix,
                "vocabulary",
                [
                    {
                        "vocabulary_id": v,
                        "vocabulary_name": name,
                        "vocabulary_reference": "OMOP generated",
                        "vocabulary_version": "v5.0 31-AUG-23" if v == "None" else "2023-08-31",
                        "vocabulary_concept_id": 0,
                    }
                    for v, name in VOCABULARIES.items()
                ],
            )
            for table, rows in data.items():
                _insert(connection, prefix, table, rows)
            _insert(
                connection,
                prefix,
                "cdm_source",
                [
                    {
                        "cdm_source_name": "Birchwood General Hospital",
                        "cdm_source_abbreviation": "BGH",
                        "cdm_holder": "Birchwood General Hospital",
                        "source_description": "EHR, loaded by the hospital's own ETL",
                        "source_release_date": "2025-07-01",
                        "cdm_release_date": "2025-07-02",
                        "cdm_version": "v5.4",
                        "cdm_version_concept_id": 756265,
                        "vocabulary_version": "v5.0 31-AUG-23",
                    }
                ],
            )
    finally:
        engine.dispose()
    return ForeignOmop(
        persons=persons,
        inpatient_visits=inpatient,
        deaths=len(data["death"]),
        measurements=len(data["measurement"]),
        conditions=len(data["condition_occurrence"]),
    )
