"""Shared fixtures: small and medium synthetic consortia (generated once per session) and PostgreSQL."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
from sqlalchemy import text

from omop_etl.database import DatabaseUnavailable, check_database, open_engine, redact
from synthetic import SynthConfig, generate_consortium

PG_URL = os.environ.get("TWINFED_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="session")
def small_consortium(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 hospitals x 120 patients: small enough to validate every resource with the R4B models."""
    out = tmp_path_factory.mktemp("small-consortium")
    generate_consortium(SynthConfig(sites=3, patients_per_site=120, seed=11), out, workers=2)
    return out


@pytest.fixture(scope="session")
def medium_consortium(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 hospitals x 700 patients: enough stays for rates, heterogeneity and learnability checks."""
    out = tmp_path_factory.mktemp("medium-consortium")
    generate_consortium(SynthConfig(sites=3, patients_per_site=700, seed=5), out, workers=2)
    return out


@pytest.fixture(scope="session")
def pg_url() -> str:
    """A reachable PostgreSQL URL. Under CI=true an unreachable server fails the test; elsewhere it skips."""
    try:
        check_database(PG_URL)
    except DatabaseUnavailable as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true requires the PostgreSQL tests to run, but {redact(PG_URL)} is unusable: {exc}")
        pytest.skip(f"PostgreSQL at {redact(PG_URL)} is not reachable ({exc}); set TWINFED_TEST_PG_URL to run them")
    return PG_URL


@pytest.fixture(scope="session")
def prepared_site(medium_consortium: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One synthetic hospital (700 patients) loaded into OMOP by the ETL, with a site file and policy.

    Tests copy it with `tests.site_helpers.fresh_site` so each gets its own governance database.
    """
    from tests.site_helpers import load_site_omop, write_site

    folder = tmp_path_factory.mktemp("site")
    url, secret = load_site_omop(medium_consortium, "aster-university", folder / "data")
    write_site(folder / "site", "aster-university", url, secret)
    return folder / "site"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def backend(request, tmp_path):
    """(url, schema) of an empty governance database, on SQLite and on PostgreSQL (a throw-away schema)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'governance.sqlite'}", None
        return
    url = request.getfixturevalue("pg_url")
    schema = f"gov_test_{uuid.uuid4().hex[:10]}"
    yield url, schema
    engine = open_engine(url)
    with engine.begin() as connection:
        connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    engine.dispose()
