"""`twinfed omop init`: an empty OMOP CDM v5.4 schema from the spec, on SQLite and PostgreSQL; running it again
reports a complete schema, completes a partial one without touching its data, and says what it created."""

from __future__ import annotations

import sqlite3
import uuid

import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from omop_etl.database import open_engine
from omop_etl.schema import cdm_metadata
from omop_etl.schema.create import SchemaInitError, init_cdm_schema
from omop_etl.schema.inventory import take_inventory
from twinfed.cli import app

runner = CliRunner()
SPEC = cdm_metadata()
ALL_TABLES = sorted(t.name for t in SPEC.tables.values())
ALL_INDEXES = sorted(str(i.name) for t in SPEC.tables.values() for i in t.indexes)


def said(result) -> str:
    """The command's output with rich's line wrapping undone."""
    return " ".join(result.output.split())


def inventory(url: str, schema: str | None = None):
    engine = open_engine(url)
    try:
        with engine.connect() as connection:
            return take_inventory(connection, schema)
    finally:
        engine.dispose()


def test_init_creates_every_table_column_and_ohdsi_index_on_sqlite(tmp_path):
    url = f"sqlite:///{tmp_path / 'omop.sqlite'}"
    result = runner.invoke(app, ["omop", "init", "--db", url])
    assert result.exit_code == 0, result.output
    assert "39 tables" in said(result) and f"{len(ALL_INDEXES)} OHDSI indexes" in said(result)
    state = inventory(url)
    assert state.complete and state.present_tables == ALL_TABLES and not state.missing_indexes
    assert state.other_tables == [], "nothing but the CDM: no scratch tables of the permission check left behind"
    with sqlite3.connect(tmp_path / "omop.sqlite") as raw:
        columns = {r[1] for r in raw.execute("PRAGMA table_info(note_nlp)")}
    assert "offset" in columns, "the spec's quoted reserved word is the column offset, without its quotes"

    again = runner.invoke(app, ["omop", "init", "--db", url])
    assert again.exit_code == 0, again.output
    assert "already holds a complete OMOP CDM v5.4 schema" in said(again) and "nothing was created" in said(again)


def test_a_partial_schema_gets_what_is_missing_and_keeps_its_data(tmp_path):
    path = tmp_path / "omop.sqlite"
    url = f"sqlite:///{path}"
    init_cdm_schema(url)
    with sqlite3.connect(path) as raw:
        raw.executescript(
            "DROP TABLE measurement; DROP TABLE cohort; DROP INDEX idx_gender; CREATE TABLE local_notes (x TEXT);"
            "INSERT INTO person (person_id, gender_concept_id, year_of_birth, race_concept_id, ethnicity_concept_id)"
            " VALUES (1, 8532, 1950, 0, 0);"
        )
    result = runner.invoke(app, ["omop", "init", "--db", url])
    assert result.exit_code == 0, result.output
    assert "2 tables (cohort, measurement)" in said(result) and "Left as they were: 37 CDM tables" in said(result)
    assert "local_notes" in said(result), "other tables are named and left alone"
    report = init_cdm_schema(url)
    assert not report.created_anything and report.complete
    with sqlite3.connect(path) as raw:
        assert raw.execute("SELECT count(*) FROM person").fetchone() == (1,)
        indexes = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {"idx_gender", "idx_measurement_person_id_1"} <= indexes


def test_a_table_without_v54_columns_is_named_and_not_altered(tmp_path):
    path = tmp_path / "omop.sqlite"
    with sqlite3.connect(path) as raw:  # a CDM 5.3 visit_occurrence: admitting_source_* instead of admitted_from_*
        raw.execute(
            "CREATE TABLE visit_occurrence (visit_occurrence_id INTEGER, person_id INTEGER, visit_concept_id INTEGER, "
            "visit_start_date DATE, visit_end_date DATE, visit_type_concept_id INTEGER, admitting_source_concept_id "
            "INTEGER)"
        )
    result = runner.invoke(app, ["omop", "init", "--db", f"sqlite:///{path}"])
    assert result.exit_code == 1, result.output
    assert "Table visit_occurrence lacks the v5.4 column(s)" in said(result)
    assert "admitted_from_concept_id" in said(result) and "migrate it to 5.4" in said(result)
    with sqlite3.connect(path) as raw:
        columns = {r[1] for r in raw.execute("PRAGMA table_info(visit_occurrence)")}
    assert "admitted_from_concept_id" not in columns and "admitting_source_concept_id" in columns
    assert inventory(f"sqlite:///{path}").missing_tables == [], "every other table was created"


def test_refusals_name_the_database_and_what_to_do(tmp_path):
    with pytest.raises(SchemaInitError, match=r"folder .* does not exist"):
        init_cdm_schema(f"sqlite:///{tmp_path / 'nowhere' / 'omop.sqlite'}")
    with pytest.raises(SchemaInitError, match="SQLite and PostgreSQL"):
        init_cdm_schema("mysql://user@host/omop")
    with pytest.raises(SchemaInitError, match="no schemas; leave --schema out"):
        init_cdm_schema(f"sqlite:///{tmp_path / 'omop.sqlite'}", "cdm")
    result = runner.invoke(app, ["omop", "init", "--db", "postgresql://omop:hunter2@127.0.0.1:9/omop"])
    assert result.exit_code == 2 and "Cannot connect" in said(result) and "hunter2" not in said(result)


@pytest.mark.postgres
def test_init_on_postgresql_creates_the_schema_and_is_idempotent(pg_url):
    schema = f"omop_init_{uuid.uuid4().hex[:8]}"
    try:
        first = init_cdm_schema(pg_url, schema)
        assert first.created_schema and sorted(first.created_tables) == ALL_TABLES
        assert sorted(first.created_indexes) == ALL_INDEXES
        again = init_cdm_schema(pg_url, schema)
        assert not again.created_anything and again.complete and again.existing_tables == ALL_TABLES
        engine = open_engine(pg_url)
        with engine.begin() as connection:
            connection.execute(text(f'DROP TABLE "{schema}".death'))
            connection.execute(text(f'DROP INDEX "{schema}".idx_concept_code'))
        engine.dispose()
        result = runner.invoke(app, ["omop", "init", "--db", pg_url, "--schema", schema])
        assert result.exit_code == 0, result.output
        assert "1 table (death)" in said(result) and "2 OHDSI indexes" in said(result)
        state = inventory(pg_url, schema)
        assert state.complete and not state.missing_indexes
    finally:
        engine = open_engine(pg_url)
        with engine.begin() as connection:
            connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        engine.dispose()


def test_help_explains_when_init_is_not_needed():
    result = runner.invoke(app, ["omop", "init", "--help"])
    assert result.exit_code == 0 and "Safe to run again" in said(result)
    assert "omop" in runner.invoke(app, ["--help"]).output
