"""Helpers for ETL tests: run a load, read tables back in a comparable form."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd
from sqlalchemy import text

from omop_etl.database import open_engine
from omop_etl.load.pipeline import EtlSettings, run_etl

# The column mapping of a laboratory CSV extract keyed by MRN (see docs/etl.md, CSV extracts).
LAB_MAPPING = """\
file: labs.csv
kind: measurement
id: lab_id
patient: mrn
patient_id_is: mrn
code: loinc
code_system: http://loinc.org
value: result
unit: unit
time: taken_at
"""

CLINICAL_TABLES = (
    "person",
    "death",
    "observation_period",
    "visit_occurrence",
    "visit_detail",
    "condition_occurrence",
    "drug_exposure",
    "procedure_occurrence",
    "measurement",
    "observation",
    "care_site",
    "location",
    "provider",
)


def load(inputs: list[Path], db_url: str, secret: Path, schema: str | None = None, **options):
    """Run the ETL with a test secret file; returns the report."""
    settings = EtlSettings(db_url=db_url, schema=schema, secret_file=secret, workers=1, **options)
    return run_etl(inputs, settings)


def frame(db_url: str, table: str, schema: str | None = None) -> pd.DataFrame:
    """A table as a DataFrame with database-independent values (ISO dates, rounded floats), sorted."""
    engine = open_engine(db_url)
    name = f'"{schema}"."{table}"' if schema and db_url.startswith("postgres") else f'"{table}"'
    try:
        with engine.connect() as connection:
            data = pd.read_sql(text(f"SELECT * FROM {name}"), connection)
    finally:
        engine.dispose()
    for column in data.columns:
        series = data[column]
        if series.dtype == object:
            data[column] = series.map(_normalise)
        elif pd.api.types.is_float_dtype(series):
            data[column] = series.round(6)
        elif pd.api.types.is_datetime64_any_dtype(series):
            data[column] = series.dt.strftime("%Y-%m-%d %H:%M:%S")
    return data.sort_values(list(data.columns)).reset_index(drop=True) if len(data) else data


def _normalise(value):
    if value is None:
        return None
    if hasattr(value, "isoformat"):
        text_value = value.isoformat(sep=" ") if hasattr(value, "hour") else value.isoformat()
        return text_value[:19]
    if isinstance(value, str) and len(value) >= 19 and value[10] in " T" and value[4] == "-":
        return value[:10] + " " + value[11:19]
    if isinstance(value, float):
        return round(value, 6)
    return value


def checksum(data: pd.DataFrame) -> str:
    """A content checksum of a normalised table."""
    csv = data.astype(object).where(data.notna(), None).to_csv(index=False, float_format="%.6f")
    return hashlib.sha256(csv.encode()).hexdigest()


def count(db_url: str, table: str, schema: str | None = None, where: str = "") -> int:
    engine = open_engine(db_url)
    name = f'"{schema}"."{table}"' if schema and db_url.startswith("postgres") else f'"{table}"'
    try:
        with engine.connect() as connection:
            return int(connection.execute(text(f"SELECT count(*) FROM {name} {where}")).scalar())
    finally:
        engine.dispose()
