"""The same load on PostgreSQL (production store, configurable schema) gives the same OMOP content as on
SQLite: same row counts and content checksums per table."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import text

from omop_etl.database import open_engine
from tests import fhir_samples as S
from tests.etl_helpers import CLINICAL_TABLES, checksum, count, frame, load
from tests.fhir_export import sites

pytestmark = pytest.mark.postgres


@pytest.fixture
def pg_schema(pg_url):
    schema = f"cdm_{uuid.uuid4().hex[:8]}"
    yield schema
    engine = open_engine(pg_url)
    with engine.begin() as connection:
        connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    engine.dispose()


def test_postgresql_and_sqlite_give_the_same_omop_content(small_consortium, pg_url, pg_schema, tmp_path):
    _, export_dir, truth = sites(small_consortium)[1]
    secret = tmp_path / "secret"
    sqlite_url = f"sqlite:///{tmp_path / 'omop.sqlite'}"
    sqlite_report = load([export_dir], sqlite_url, secret)
    pg_report = load([export_dir], pg_url, secret, schema=pg_schema)
    assert pg_report.reconciles and pg_report.model_dump(include={"loaded", "quarantined", "skipped", "excluded"}) == (
        sqlite_report.model_dump(include={"loaded", "quarantined", "skipped", "excluded"})
    )
    assert pg_report.quarantined.total == truth["defects"]["total"]
    for table in (*CLINICAL_TABLES, "concept", "concept_relationship", "vocabulary"):
        sqlite_rows, pg_rows = frame(sqlite_url, table), frame(pg_url, table, pg_schema)
        assert len(pg_rows) == len(sqlite_rows), table
        assert checksum(pg_rows) == checksum(sqlite_rows), table


def test_postgresql_load_is_incremental_and_updates_in_place(pg_url, pg_schema, tmp_path):
    export = S.write_ndjson(tmp_path / "export", S.ALL)
    first = load([export], pg_url, tmp_path / "secret", schema=pg_schema)
    assert first.reconciles and first.quarantined.total == 0
    measurements = count(pg_url, "measurement", pg_schema)
    again = load([export], pg_url, tmp_path / "secret", schema=pg_schema)
    assert again.input.total == 0 and count(pg_url, "measurement", pg_schema) == measurements
    assert count(pg_url, "person", pg_schema) == 1 and count(pg_url, "twinfed_consent", pg_schema) == 1
