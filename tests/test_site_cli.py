"""The commands a data steward and hospital IT run on a site node, through the real `twinfed` entry point."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from federation.contract import load_study, study_hash
from site_node.config import load_site_config
from site_node.participation import SiteNode
from tests.site_helpers import EXAMPLE_STUDY, fresh_site, initial_state, instruction
from twinfed.cli import app

runner = CliRunner()


def _run(*args: str):
    return runner.invoke(app, list(args))


def _study_file(tmp_path: Path, **training) -> Path:
    raw = yaml.safe_load(EXAMPLE_STUDY.read_text())
    raw["training"].update(training)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_init_writes_a_site_file_and_policy_that_load(tmp_path):
    secret = tmp_path / "site.secret"
    secret.write_text("ab" * 32)
    result = _run("site", "init", str(tmp_path / "node"), "--site-id", "north-clinic",
                  "--omop-url", "sqlite:///omop.sqlite", "--secret-file", str(secret))  # fmt: skip
    assert result.exit_code == 0, result.output
    config = load_site_config(tmp_path / "node" / "site.yaml")
    assert config.site_id == "north-clinic" and config.omop.url == f"sqlite:///{(tmp_path / 'node' / 'omop.sqlite')}"
    assert config.policy == (tmp_path / "node" / "policy.yaml")
    again = _run("site", "init", str(tmp_path / "node"), "--site-id", "north-clinic",
                 "--omop-url", "sqlite:///omop.sqlite", "--secret-file", str(secret))  # fmt: skip
    assert again.exit_code == 2 and "--force" in again.output


def test_approve_status_and_audit_verify(prepared_site, tmp_path):
    site = fresh_site(prepared_site, tmp_path / "site")
    study = _study_file(tmp_path, rounds=2)
    result = _run("site", "approve", str(study), "--site-config", str(site), "--by", "J. Doe", "--note", "DUA 14")
    assert result.exit_code == 0, result.output
    digest = study_hash(load_study(study))
    assert digest in result.output
    node = SiteNode(load_site_config(site))
    outcome = node.train(
        instruction(load_study(study)), initial_state(load_study(study), node.feature_count(load_study(study)))
    )
    assert outcome.answer.status == "trained", outcome.answer.reason
    status = _run("site", "status", "--site-config", str(site))
    assert status.exit_code == 0, status.output
    assert digest[:12] in status.output and "J. Doe" in status.output and "round-trained" in status.output
    verified = _run("site", "audit", "verify", "--site-config", str(site))
    assert verified.exit_code == 0 and "chain intact" in verified.output
    shown = _run("site", "audit", "show", "--site-config", str(site), "--last", "5")
    assert shown.exit_code == 0 and "approved" in shown.output


def test_tampered_audit_log_is_named_and_fails(prepared_site, tmp_path):
    site = fresh_site(prepared_site, tmp_path / "site")
    study = _study_file(tmp_path)
    assert _run("site", "approve", str(study), "--site-config", str(site), "--by", "a").exit_code == 0
    assert (
        _run("site", "revoke", str(study), "--site-config", str(site), "--by", "b", "--reason", "ended").exit_code == 0
    )
    database = load_site_config(site).governance_db.removeprefix("sqlite:///")
    with sqlite3.connect(database) as connection:
        table = next(
            name
            for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")
            if "audit" in name
        )
        connection.execute(f"UPDATE {table} SET payload = replace(payload, '\"a\"', '\"mallory\"') WHERE seq = 1")
    result = _run("site", "audit", "verify", "--site-config", str(site))
    assert result.exit_code == 1 and "1" in result.output and "edited" in result.output.lower()


def test_approval_refused_when_the_policy_would_refuse_the_study(prepared_site, tmp_path):
    site = fresh_site(prepared_site, tmp_path / "site", study_epsilon_ceiling=1.0)
    result = _run("site", "approve", str(EXAMPLE_STUDY), "--site-config", str(site), "--by", "x")
    assert result.exit_code == 1 and "ceiling" in result.output
    node = SiteNode(load_site_config(site))
    assert not node.governance.approvals.is_approved(study_hash(load_study(EXAMPLE_STUDY)))


def test_consent_withdraw_and_list(prepared_site, tmp_path):
    site = fresh_site(prepared_site, tmp_path / "site")
    result = _run("site", "consent", "withdraw", "17", "--site-config", str(site), "--by", "J. Doe", "--reason", "call")
    assert result.exit_code == 0, result.output
    assert "No earlier round included" in result.output
    listed = _run("site", "consent", "list", "--site-config", str(site))
    assert listed.exit_code == 0, listed.output
    assert "17" in listed.output and "withdrawal recorded" in listed.output
    assert "research consent denied" in listed.output, "the synthetic hospital has denying FHIR consents"


def test_train_local_runs_every_round_and_spends_the_study_budget(prepared_site, tmp_path):
    site = fresh_site(prepared_site, tmp_path / "site")
    study = _study_file(tmp_path, rounds=2)
    assert _run("site", "approve", str(study), "--site-config", str(site), "--by", "x").exit_code == 0
    result = _run("site", "train-local", str(study), "--site-config", str(site))
    assert result.exit_code == 0, result.output
    assert "round 2/2" in result.output
    node = SiteNode(load_site_config(site))
    assert 2.4 < node.governance.ledger.spent(study_hash(load_study(study))) <= 3.0 + 1e-6


def test_missing_site_file_is_a_sentence(tmp_path):
    result = _run("site", "status", "--site-config", str(tmp_path / "nope.yaml"))
    assert result.exit_code == 2 and "no such site configuration file" in result.output


def _governance_db(site: Path) -> str:
    return load_site_config(site).governance_db.removeprefix("sqlite:///")


def test_deleted_ledger_rows_fail_verify_status_warns_and_the_node_refuses(prepared_site, tmp_path):
    """Deleting the ledger's rows reset every budget to 0 while `audit verify` said 'chain intact'."""
    site = fresh_site(prepared_site, tmp_path / "site")
    study = _study_file(tmp_path, rounds=2)
    assert _run("site", "approve", str(study), "--site-config", str(site), "--by", "s").exit_code == 0
    spec = load_study(study)
    node = SiteNode(load_site_config(site))
    assert node.train(instruction(spec), initial_state(spec, node.feature_count(spec))).answer.status == "trained"
    assert "chain intact" in _run("site", "audit", "verify", "--site-config", str(site)).output
    with sqlite3.connect(_governance_db(site)) as connection:
        connection.execute("DELETE FROM gov_privacy_ledger")
    result = _run("site", "audit", "verify", "--site-config", str(site))
    assert result.exit_code == 1 and "FAILED" in result.output and "missing from the ledger" in result.output
    status = _run("site", "status", "--site-config", str(site))
    assert status.exit_code == 0 and "does not agree with its audit chain" in status.output
    again = SiteNode(load_site_config(site)).train(
        instruction(spec, server_round=2), initial_state(spec, node.feature_count(spec))
    )
    assert again.answer.status == "refused" and again.answer.code == "governance-inconsistent"


def test_an_edited_audit_time_and_a_garbled_head_never_show_a_traceback(prepared_site, tmp_path):
    site = fresh_site(prepared_site, tmp_path / "site")
    assert _run("site", "approve", str(_study_file(tmp_path)), "--site-config", str(site), "--by", "s").exit_code == 0
    with sqlite3.connect(_governance_db(site)) as connection:
        connection.execute("UPDATE gov_audit_log SET at = 'last tuesday'")
    status = _run("site", "status", "--site-config", str(site))
    assert status.exit_code == 0 and "Traceback" not in status.output, status.output
    shown = _run("site", "audit", "show", "--site-config", str(site))
    assert shown.exit_code == 0 and "(time edited)" in shown.output
    load_site_config(site).audit_head.write_text("{garbled")
    verified = _run("site", "audit", "verify", "--site-config", str(site))
    assert verified.exit_code == 1 and "audit head file is unreadable" in verified.output
    assert "Traceback" not in verified.output


def test_a_new_version_of_an_approved_study_is_told_what_it_inherits(prepared_site, tmp_path):
    site = fresh_site(prepared_site, tmp_path / "site")
    first = _study_file(tmp_path, rounds=2)
    assert _run("site", "approve", str(first), "--site-config", str(site), "--by", "s").exit_code == 0
    spec = load_study(first)
    node = SiteNode(load_site_config(site))
    assert node.train(instruction(spec), initial_state(spec, node.feature_count(spec))).answer.status == "trained"
    spent = node.governance.ledger.spent(spec.study.id)
    raw = yaml.safe_load(first.read_text())
    raw["study"]["title"] = raw["study"].get("title", "") + " (retitled)"
    second = tmp_path / "second.yaml"
    second.write_text(yaml.safe_dump(raw))
    result = _run("site", "approve", str(second), "--site-config", str(site), "--by", "s")
    assert result.exit_code == 0, result.output
    assert "Inherits" in result.output and f"{spent:.3f}" in result.output
    [entry] = [e for e in node.governance.audit.entries(kind="approved") if "inherits" in e.payload]
    assert entry.payload["inherits"]["spent_epsilon"] == pytest.approx(spent)
