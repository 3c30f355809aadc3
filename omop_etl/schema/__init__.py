"""The OMOP CDM v5.4 schema, built with SQLAlchemy from the official field-level specification.

Every table, column, type, nullability, primary key and OHDSI index comes from the bundled spec files
(see README.md here), so the database we write is the one OHDSI tools expect. SQLite (a file) is the
embedded default; PostgreSQL takes an optional schema name such as `cdm`.

Foreign keys are not enforced as database constraints, as in OHDSI's own default DDL run order: concept
foreign keys would need the full vocabulary to be present. `twinfed dq` checks them instead.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

from sqlalchemy import Column, Date, DateTime, Index, Integer, MetaData, Numeric, String, Table, Text, text
from sqlalchemy.engine import Engine
from sqlalchemy.types import TypeEngine

CDM_VERSION = "5.4"
CDM_VERSION_CONCEPT_ID = 756265  # "OMOP CDM Version 5.4.0"

# The tables a digital twin needs; twinfed writes these (the other CDM tables are created empty).
TWIN_TABLES = (
    "person",
    "observation_period",
    "visit_occurrence",
    "visit_detail",
    "condition_occurrence",
    "drug_exposure",
    "procedure_occurrence",
    "measurement",
    "observation",
    "death",
    "location",
    "care_site",
    "provider",
    "cdm_source",
    "concept",
    "concept_relationship",
    "vocabulary",
    "source_to_concept_map",
)


@dataclass(frozen=True)
class FieldSpec:
    """One field of the CDM specification."""

    table: str
    field: str
    required: bool
    datatype: str
    primary_key: bool
    foreign_key_table: str
    foreign_key_field: str
    foreign_key_domain: str


def _read(name: str) -> list[dict[str, str]]:
    with resources.files("omop_etl.schema").joinpath(name).open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


@lru_cache(maxsize=1)
def field_specs() -> tuple[FieldSpec, ...]:
    """All fields of CDM v5.4 in specification order."""
    return tuple(
        FieldSpec(
            table=row["table"],
            # The spec quotes the reserved word "offset" (note_nlp) for its SQL templates; the column is offset.
            field=row["field"].strip('"'),
            required=row["required"] == "Yes",
            datatype=row["datatype"],
            primary_key=row["primary_key"] == "Yes",
            foreign_key_table=row["foreign_key_table"],
            foreign_key_field=row["foreign_key_field"],
            foreign_key_domain="" if row["foreign_key_domain"] in ("", "NA") else row["foreign_key_domain"],
        )
        for row in _read("cdm_v5.4_fields.csv")
    )


def table_fields(table: str) -> tuple[FieldSpec, ...]:
    """The fields of one table, in column order."""
    fields = tuple(f for f in field_specs() if f.table == table)
    if not fields:
        raise KeyError(f"'{table}' is not an OMOP CDM v5.4 table")
    return fields


def sqlalchemy_type(datatype: str) -> TypeEngine:
    """The SQLAlchemy type for a spec datatype, following OHDSI's generated DDL per dialect."""
    if datatype == "integer":
        return Integer()
    if datatype == "float":
        return Numeric(asdecimal=False)  # NUMERIC on PostgreSQL (as the OHDSI DDL), returned as float
    if datatype == "date":
        return Date()
    if datatype == "datetime":
        return DateTime()
    if datatype == "varchar(max)":
        return Text()
    if datatype.startswith("varchar("):
        return String(int(datatype[len("varchar(") : -1]))
    raise ValueError(f"unknown CDM datatype {datatype!r}")


def cdm_metadata(schema: str | None = None) -> MetaData:
    """SQLAlchemy metadata with every CDM v5.4 table and the OHDSI indexes."""
    metadata = MetaData(schema=schema)
    tables: dict[str, Table] = {}
    for spec in field_specs():
        if spec.table not in tables:
            tables[spec.table] = Table(spec.table, metadata)
        tables[spec.table].append_column(
            Column(
                spec.field,
                sqlalchemy_type(spec.datatype),
                primary_key=spec.primary_key,
                nullable=not spec.required,
                autoincrement=False,
            )
        )
    for row in _read("cdm_v5.4_indices.csv"):
        table = tables.get(row["table"])
        if table is not None:
            Index(row["index"], table.c[row["field"]])
    return metadata


def create_cdm(engine: Engine, schema: str | None = None) -> MetaData:
    """Create the CDM tables and indexes that do not exist yet (PostgreSQL: and the schema)."""
    metadata = cdm_metadata(schema)
    with engine.begin() as connection:
        if schema and engine.dialect.name == "postgresql":
            connection.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
        metadata.create_all(connection, checkfirst=True)
    return metadata
