"""Any OMOP CDM v5.4 database can become a site: the doctor checks it (and names what is missing), `site init`
creates and announces the site secret, and a database another tool wrote trains a study through the CLI."""

from __future__ import annotations

import sqlite3
import stat
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml
from sqlalchemy import text
from sqlalchemy.engine import make_url
from typer.testing import CliRunner

from federation.contract import load_study, study_hash
from omop_etl.database import normalise_url, open_engine
from omop_etl.identity import SecretError
from omop_etl.schema.create import init_cdm_schema
from site_node.config import load_site_config
from site_node.participation import SiteNode
from tests import fhir_samples as S
from tests.etl_helpers import load
from tests.foreign_omop import build_foreign_omop
from tests.site_helpers import EXAMPLE_STUDY, TEST_POLICY
from twinfed.cli import app

runner = CliRunner()


def said(result) -> str:
    """The command's output with rich's table and line wrapping undone (cells become one line of words)."""
    return " ".join(result.output.replace("│", " ").split())


def row(result, check: str) -> str:
    """The status word of one doctor check ('ok', 'warn', 'FAIL')."""
    for line in result.output.splitlines():
        cells = [c.strip() for c in line.split("│")]
        if len(cells) > 2 and cells[1] == check:
            return cells[2]
    raise AssertionError(f"no '{check}' row in:\n{result.output}")


@pytest.fixture(scope="module")
def foreign(tmp_path_factory) -> tuple[str, object]:
    """An OMOP database another tool wrote (SQLite), built once for the module; tests must not change it."""
    path = tmp_path_factory.mktemp("foreign") / "birchwood.sqlite"
    summary = build_foreign_omop(f"sqlite:///{path}", persons=600, seed=3)
    return f"sqlite:///{path}", summary


def site_init(folder: Path, url: str, site_id: str, *options: str, env: dict[str, str] | None = None):
    """`twinfed site init FOLDER --site-id ID --omop-url URL OPTIONS...`"""
    return runner.invoke(app, ["site", "init", str(folder), "--site-id", site_id, "--omop-url", url, *options], env=env)


def study_file(folder: Path, rounds: int) -> Path:
    raw = yaml.safe_load(EXAMPLE_STUDY.read_text())
    raw["training"]["rounds"] = rounds
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def twinfed_tables(path: str) -> list[str]:
    with sqlite3.connect(path.removeprefix("sqlite:///")) as raw:
        return [r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE name LIKE 'twinfed%'")]


def test_the_doctor_passes_a_database_another_tool_wrote(foreign):
    url, summary = foreign
    result = runner.invoke(app, ["site", "doctor", "--db", url])
    assert result.exit_code == 0, result.output
    text_ = said(result)
    assert row(result, "OMOP tables") == "warn", "its own indexes only: the OHDSI ones are named as missing"
    assert "all 39 CDM v5.4 tables with every column" in text_ and "idx_concept_code" in text_
    assert row(result, "cdm_source") == "ok" and "'Birchwood General Hospital', CDM v5.4" in text_
    assert row(result, "vocabulary") == "ok" and "standard concepts the study uses are present" in text_
    assert row(result, "clinical rows") == "ok"
    assert f"person {summary.persons}" in text_ and f"death {summary.deaths}" in text_ and "drug_exposure 0" in text_
    assert row(result, "site secret") == "ok" and "not loaded by twinfed etl" in text_
    assert twinfed_tables(url) == [], "the doctor writes nothing into the hospital's OMOP database"


def test_the_doctor_names_what_a_database_lacks(tmp_path):
    not_omop = tmp_path / "billing.sqlite"
    with sqlite3.connect(not_omop) as raw:
        raw.execute("CREATE TABLE invoices (id INTEGER)")
    result = runner.invoke(app, ["site", "doctor", "--db", f"sqlite:///{not_omop}"])
    assert result.exit_code == 1
    assert row(result, "OMOP tables") == "FAIL" and "has no OMOP CDM tables (it has 1 other table(s))" in said(result)
    assert "twinfed omop init" in said(result)

    empty = f"sqlite:///{tmp_path / 'empty.sqlite'}"
    init_cdm_schema(empty)
    engine = open_engine(empty)
    with engine.begin() as connection:
        connection.execute(text("DROP TABLE drug_exposure"))
        connection.execute(
            text(
                "INSERT INTO cdm_source (cdm_source_name, cdm_source_abbreviation, cdm_holder, "
                "source_release_date, cdm_release_date, cdm_version, cdm_version_concept_id, "
                "vocabulary_version) VALUES ('Old', 'O', 'O', '2020-01-01', '2020-01-01', '5.3.1', "
                "0, 'v5')"
            )
        )
        connection.execute(
            text(
                "INSERT INTO concept VALUES (3027018, 'Heart rate', 'Measurement', 'LOINC', "
                "'Clinical Observation', 'S', '8867-4', '1970-01-01', '2099-12-31', NULL)"
            )
        )
    engine.dispose()
    result = runner.invoke(app, ["site", "doctor", "--db", empty])
    assert result.exit_code == 1
    text_ = said(result)
    assert "lacks 1 of the 39 CDM v5.4 tables: drug_exposure" in text_
    assert row(result, "cdm_source") == "FAIL" and "cdm_source says CDM version 5.3.1" in text_
    assert row(result, "vocabulary") == "FAIL"
    assert "3047181 (lactate)" in text_ and "4182210 (dementia)" in text_ and "twinfed vocab load" in text_
    assert "3027018" not in text_.split("concepts the study uses:")[1].split(".")[0], "the one present is not named"
    assert row(result, "clinical rows") == "FAIL" and "there are no persons" in text_

    missing = runner.invoke(app, ["site", "doctor", "--db", f"sqlite:///{tmp_path / 'typo.sqlite'}"])
    assert missing.exit_code == 1 and "There is no database file" in said(missing)
    assert not (tmp_path / "typo.sqlite").exists(), "a mistyped path is reported, not created"


def test_the_doctor_compares_the_secret_with_the_one_the_etl_loaded_with(tmp_path):
    url = f"sqlite:///{tmp_path / 'omop.sqlite'}"
    secret = tmp_path / "site.secret"
    load([S.write_ndjson(tmp_path / "export", [S.ORG, S.PATIENT, S.ENCOUNTER, S.CONDITION])], url, secret)
    unchecked = runner.invoke(app, ["site", "doctor", "--db", url])
    assert row(unchecked, "site secret") == "warn" and "pass --secret-file" in said(unchecked)
    right = runner.invoke(app, ["site", "doctor", "--db", url, "--secret-file", str(secret)])
    assert row(right, "site secret") == "ok" and "is the secret twinfed etl loaded this database with" in said(right)
    other = tmp_path / "other.secret"
    other.write_text("cd" * 32)
    wrong = runner.invoke(app, ["site", "doctor", "--db", url, "--secret-file", str(other)])
    assert wrong.exit_code == 1 and row(wrong, "site secret") == "FAIL"
    assert "is not the secret twinfed etl loaded this database with" in said(wrong)


def test_site_init_creates_the_secret_says_where_and_to_back_it_up(foreign, tmp_path):
    url, _ = foreign
    default = tmp_path / "config" / "site-secret"
    result = site_init(tmp_path / "site", url, "birchwood", env={"TWINFED_SITE_SECRET_FILE": str(default)})
    assert result.exit_code == 0, result.output
    assert default.exists() and stat.S_IMODE(default.stat().st_mode) == 0o600
    assert f"Created the site secret {default}" in said(result)
    assert "Back it up together with the OMOP database" in said(result)
    config = load_site_config(tmp_path / "site" / "site.yaml")
    assert config.secret_file == default and len(config.split_key()) == 32

    again = site_init(tmp_path / "site2", url, "birchwood", "--secret-file", str(default))
    assert again.exit_code == 0 and f"Using the site secret {default}" in said(again)
    assert load_site_config(tmp_path / "site2" / "site.yaml").split_key() == config.split_key()

    fresh = tmp_path / "keys" / "new.secret"  # given but not there yet: created at that path
    created = site_init(tmp_path / "site3", url, "birchwood", "--secret-file", str(fresh))
    assert created.exit_code == 0 and fresh.exists() and f"Created the site secret {fresh}" in said(created)


def test_site_init_refuses_a_secret_that_is_not_the_one_the_etl_used(tmp_path):
    url = f"sqlite:///{tmp_path / 'omop.sqlite'}"
    load([S.write_ndjson(tmp_path / "export", [S.ORG, S.PATIENT])], url, tmp_path / "etl.secret")
    lost = site_init(tmp_path / "site", url, "aster", "--secret-file", str(tmp_path / "lost.secret"))
    assert lost.exit_code == 2 and not (tmp_path / "lost.secret").exists()
    assert "twinfed etl loaded the OMOP database" in said(lost) and "a new secret would not match" in said(lost)
    assert not (tmp_path / "site" / "site.yaml").exists()
    other = tmp_path / "other.secret"
    other.write_text("ef" * 32)
    wrong = site_init(tmp_path / "site", url, "aster", "--secret-file", str(other))
    assert wrong.exit_code == 2 and "is not the one twinfed etl loaded" in said(wrong)
    relative = site_init(tmp_path, "sqlite:///omop.sqlite", "aster", "--secret-file", str(other))
    assert relative.exit_code == 2, "a relative SQLite path is the site folder's, as the site file reads it"
    right = site_init(tmp_path / "site", url, "aster", "--secret-file", str(tmp_path / "etl.secret"))
    assert right.exit_code == 0 and "it is the one twinfed etl loaded the OMOP database with" in said(right)


def test_a_lost_secret_names_the_site_file_setting(foreign, tmp_path):
    url, _ = foreign
    secret = tmp_path / "site.secret"
    assert site_init(tmp_path / "site", url, "birchwood", "--secret-file", str(secret)).exit_code == 0
    secret.unlink()
    with pytest.raises(SecretError) as lost:
        load_site_config(tmp_path / "site" / "site.yaml").split_key()
    assert "Set secret_file in the site file (site.yaml)" in str(lost.value)
    assert "Pass --secret-file" not in str(lost.value), "the site node has no --secret-file option"


def test_a_database_another_tool_wrote_becomes_a_site_and_trains(foreign, tmp_path):
    url, _ = foreign
    site = tmp_path / "site"
    secret = tmp_path / "birchwood.secret"
    assert site_init(site, url, "birchwood", "--secret-file", str(secret)).exit_code == 0
    (site / "policy.yaml").write_text(yaml.safe_dump(TEST_POLICY), encoding="utf-8")
    study = study_file(tmp_path, rounds=2)
    approved = runner.invoke(
        app, ["site", "approve", str(study), "--site-config", str(site / "site.yaml"), "--by", "IT"]
    )
    assert approved.exit_code == 0, approved.output
    result = runner.invoke(app, ["site", "train-local", str(study), "--site-config", str(site / "site.yaml")])
    assert result.exit_code == 0, result.output
    node = SiteNode(load_site_config(site / "site.yaml"))
    spec = load_study(study)
    spent = node.governance.ledger.spent(study_hash(spec))
    assert 0 < spent <= spec.privacy.target_epsilon + 1e-6, "the study's privacy budget was spent, within its target"
    assert sum(1 for e in node.governance.audit.entries() if e.kind == "round-trained") == 2
    assert twinfed_tables(url) == [], "training reads the hospital's OMOP database; it writes nothing into it"


def test_the_foreign_database_holds_a_learnable_signal(foreign):
    """A plain (non-private) logistic regression learns in-hospital death from the study's features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import cross_val_predict

    from site_node.cohort import build_dataset

    url, summary = foreign
    dataset = build_dataset(url, load_study(EXAMPLE_STUDY), split_key=b"k" * 32)
    assert len(dataset) == summary.persons and 0.05 < dataset.labels.mean() < 0.2
    assert np.mean(dataset.features[:, dataset.feature_names.index("lactate_max")] != 0) > 0.8
    scores = cross_val_predict(
        LogisticRegression(max_iter=2000), dataset.features, dataset.labels, cv=5, method="predict_proba"
    )[:, 1]
    assert roc_auc_score(dataset.labels, scores) > 0.75


@pytest.mark.postgres
def test_a_postgresql_database_another_tool_wrote_trains_through_a_read_only_account(pg_url, tmp_path):
    """Hospitals give the site node a read-only account on their OMOP schema: the doctor says that is enough."""
    schema, role = f"foreign_{uuid.uuid4().hex[:8]}", f"twinfed_ro_{uuid.uuid4().hex[:8]}"
    admin = open_engine(pg_url)
    try:
        build_foreign_omop(pg_url, schema, persons=300, seed=5)
        with admin.begin() as connection:
            connection.execute(text(f"CREATE ROLE {role} LOGIN PASSWORD 'read-only'"))
            connection.execute(text(f'GRANT USAGE ON SCHEMA "{schema}" TO {role}'))
            connection.execute(text(f'GRANT SELECT ON ALL TABLES IN SCHEMA "{schema}" TO {role}'))
        reader = make_url(normalise_url(pg_url)).set(username=role, password="read-only").render_as_string(False)
        doctor = runner.invoke(app, ["site", "doctor", "--db", reader, "--schema", schema])
        assert doctor.exit_code == 0, doctor.output
        assert row(doctor, "database") == "warn" and "enough for a site node reading an existing OMOP" in said(doctor)
        assert row(doctor, "vocabulary") == "ok" and "person 300" in said(doctor)
        assert "read-only" not in doctor.output, "the password is never printed"
        site = tmp_path / "site"
        init = site_init(
            site, reader, "birchwood", "--omop-schema", schema, "--secret-file", str(tmp_path / "s.secret")
        )
        assert init.exit_code == 0, init.output
        (site / "policy.yaml").write_text(yaml.safe_dump(TEST_POLICY), encoding="utf-8")
        study = study_file(tmp_path, rounds=1)
        assert runner.invoke(app, ["site", "approve", str(study), "-s", str(site / "site.yaml")]).exit_code == 0
        result = runner.invoke(app, ["site", "train-local", str(study), "-s", str(site / "site.yaml")])
        assert result.exit_code == 0, result.output
        spent = SiteNode(load_site_config(site / "site.yaml")).governance.ledger.spent(study_hash(load_study(study)))
        assert spent > 0
    finally:
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
            connection.execute(text(f"DROP ROLE IF EXISTS {role}"))
        admin.dispose()
