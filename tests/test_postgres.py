"""PostgreSQL, the production store, is reachable and usable (these tests must run under CI=true)."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from omop_etl.database import DatabaseUnavailable, check_database, normalise_url, open_engine
from twinfed.cli import app

pytestmark = pytest.mark.postgres


def test_check_database_connects_and_may_create_tables(pg_url):
    result = check_database(pg_url)
    assert result.dialect == "postgresql"
    assert int(result.server_version.split(".")[0]) >= 12
    assert result.can_create_tables


def test_a_schema_can_be_created_written_and_dropped(pg_url):
    engine = open_engine(pg_url)
    try:
        with engine.begin() as connection:
            connection.execute(text("DROP SCHEMA IF EXISTS twinfed_smoke CASCADE"))
            connection.execute(text("CREATE SCHEMA twinfed_smoke"))
            connection.execute(text("CREATE TABLE twinfed_smoke.person (person_id integer PRIMARY KEY)"))
            connection.execute(text("INSERT INTO twinfed_smoke.person VALUES (1), (2)"))
            assert connection.execute(text("SELECT count(*) FROM twinfed_smoke.person")).scalar_one() == 2
            connection.execute(text("DROP SCHEMA twinfed_smoke CASCADE"))
    finally:
        engine.dispose()


def test_site_doctor_against_postgresql(pg_url):
    from tests.foreign_omop import build_foreign_omop

    wide = {"COLUMNS": "300"}
    bare = CliRunner().invoke(app, ["site", "doctor", "--db", pg_url, "--schema", "no_such_cdm_schema"], env=wide)
    assert bare.exit_code == 1 and "there is no schema no_such_cdm_schema" in bare.output
    schema = f"doctor_{uuid.uuid4().hex[:8]}"
    build_foreign_omop(pg_url, schema, persons=50)
    try:
        result = CliRunner().invoke(app, ["site", "doctor", "--db", pg_url, "--schema", schema])
        assert result.exit_code == 0, result.output
    finally:
        engine = open_engine(pg_url)
        with engine.begin() as connection:
            connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        engine.dispose()


def test_plain_postgresql_urls_use_psycopg3():
    assert normalise_url("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalise_url("postgres://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalise_url("sqlite:///x.sqlite") == "sqlite:///x.sqlite"


def test_wrong_database_name_is_reported_without_password(pg_url):
    base = pg_url.rsplit("/", 1)[0]
    with pytest.raises(DatabaseUnavailable, match="Cannot connect") as info:
        check_database(base.replace("://", "://postgres:hunter2@", 1).replace("postgres@", "", 1) + "/no_such_db")
    assert "hunter2" not in str(info.value)
