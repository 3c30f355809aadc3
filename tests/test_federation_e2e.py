"""A whole study as a consortium runs it: `twinfed coordinator start` (Flower SuperLink, TLS, SuperNode
authentication), three `twinfed site start` processes (SuperNodes), each site's data steward approving
the study, and `twinfed study run` following the rounds to a model card.

One run covers what must hold across processes: sites train over TLS and the coordinator aggregates; a
site out of budget refuses and its receipt says so; a site killed mid-study leaves a time-out receipt and
the study goes on while `min_sites` are left; every site's audit log verifies afterwards.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
from pathlib import Path

import pytest
import yaml

from federation.contract import load_study, study_hash
from federation.contract.receipts import Participation, read_receipts
from federation.deploy.provision import init_consortium
from site_node.config import load_site_config
from site_node.participation import SiteNode
from tests.consortium_helpers import coordinator_command, live_consortium
from tests.consortium_helpers import site_folder as _site
from tests.process_helpers import FLOWER_ENV, TWINFED, Running
from tests.site_helpers import EXAMPLE_STUDY

SITES = ("aster", "birch", "cedar")


def _study_file(folder: Path) -> Path:
    raw = yaml.safe_load(EXAMPLE_STUDY.read_text())
    raw["training"].update({"rounds": 2, "local_epochs": 1})
    raw["federation"].update({"min_sites": 1, "secure_aggregation": False, "round_timeout_seconds": 25})
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


@pytest.mark.timeout(420)
def test_study_over_tls_with_a_refusal_and_a_site_killed_mid_study(prepared_site, tmp_path):
    root = tmp_path / "consortium"
    init_consortium(root, ["localhost", "127.0.0.1"], list(SITES))
    study = _study_file(tmp_path)
    spec = load_study(study)
    site_files = {
        "aster": _site(prepared_site, tmp_path / "aster", "aster"),
        "birch": _site(prepared_site, tmp_path / "birch", "birch"),
        "cedar": _site(prepared_site, tmp_path / "cedar", "cedar", site_epsilon_ceiling=0.2),  # out of budget
    }
    for site_id, site_file in site_files.items():
        approved = subprocess.run(
            [TWINFED, "site", "approve", str(study), "--site-config", str(site_file), "--by", f"{site_id} steward"],
            env=FLOWER_ENV, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert approved.returncode == 0, approved.stdout + approved.stderr

    with live_consortium(root, site_files) as live:
        run = Running([TWINFED, "study", "run", str(study), "--coordinator-dir", str(root), "--wait-for-sites", "60"])
        run.wait_for("Round 1/2", timeout=180)
        live.sites["birch"].kill_group()  # a hospital goes away after round 1
        code = run.wait(timeout=200)
        assert code == 0, run.output
        assert "Study completed" in run.output

    folder = root / "studies" / spec.study.id / spec.study.id
    receipts = read_receipts(folder / "receipts.jsonl")
    train = {r.server_round: {s.label: s for s in r.sites} for r in receipts if r.phase == "train"}
    assert train[1]["aster"].status == Participation.TRAINED and train[1]["birch"].status == Participation.TRAINED
    assert train[1]["cedar"].status == Participation.REFUSED and train[1]["cedar"].code == "budget"
    assert "0.2" in train[1]["cedar"].reason
    assert train[2]["aster"].status == Participation.TRAINED
    # the stopped hospital is accounted for: disconnected (it left the consortium cleanly) or timed out
    assert train[2]["birch"].status in (Participation.DISCONNECTED, Participation.TIMED_OUT), train[2]
    assert train[2]["cedar"].status == Participation.REFUSED

    card = json.loads((folder / "model-card.json").read_text())
    assert card["run"]["status"] == "completed" and card["study"]["hash"] == study_hash(spec)
    aster_card = card["sites"]["aster"]
    assert 0 < aster_card["epsilon_training"] <= spec.privacy.target_epsilon + 1e-6
    assert 0 < aster_card["epsilon_evaluation"] <= spec.evaluation.epsilon + 1e-6
    assert aster_card["epsilon_training"] < aster_card["epsilon_spent"] <= spec.epsilon_budget() + 1e-6
    assert aster_card["evaluation_release"] == "dp", "the default evaluation release is differentially private"
    assert card["sites"]["aster"]["rounds_trained"] == 2 and card["sites"]["birch"]["rounds_trained"] == 1
    assert card["metrics"]["held_out_auroc_text"] and (folder / "model-card.html").exists()
    evaluations = [r for r in receipts if r.phase == "evaluate"]
    assert [(r.server_round, r.part) for r in evaluations] == [(2, "test")], "one test release, of the final model"

    for site_id, site_file in site_files.items():
        node = SiteNode(load_site_config(site_file))
        assert node.governance.integrity().ok, site_id
        # the consortium's receipts witness each site's chain: every head a site named is still in it
        assert train[1][site_id].audit_hash, site_id
        witnessed = subprocess.run(
            [TWINFED, "site", "audit", "verify", "--site-config", str(site_file),
             "--receipts", str(folder / "receipts.jsonl")],
            env=FLOWER_ENV, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert witnessed.returncode == 0 and "audit heads the consortium saw" in witnessed.stdout, witnessed.stderr
    aster = SiteNode(load_site_config(site_files["aster"]))
    assert aster.governance.ledger.spent(study_hash(spec)) == pytest.approx(card["sites"]["aster"]["epsilon_spent"])
    # someone with the site's key and database rewrites aster's history (a chain of its first entry, the ledger
    # emptied, the head re-signed): it verifies on its own, and not against what the consortium saw
    aster_file = site_files["aster"]
    aster_db = load_site_config(aster_file).governance_db.removeprefix("sqlite:///")
    with sqlite3.connect(aster_db) as connection:
        connection.execute("DELETE FROM gov_audit_log WHERE seq > 1")
        connection.execute("DELETE FROM gov_privacy_ledger")
    aster_node = SiteNode(load_site_config(aster_file))
    first = aster_node.governance.audit.entries()[0]
    aster_node.governance.audit.head_file.unlink()
    aster_node.governance.audit._write_head(first, 1)  # the key holder re-signs a head for the shorter chain
    assert aster_node.governance.integrity().ok, "the rewrite is consistent on its own"
    rewritten = subprocess.run(
        [TWINFED, "site", "audit", "verify", "--site-config", str(aster_file),
         "--receipts", str(folder / "receipts.jsonl")],
        env=FLOWER_ENV, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert rewritten.returncode == 1 and "the consortium saw this site's audit head" in rewritten.stderr



@pytest.mark.timeout(600)
def test_a_coordinator_killed_mid_study_resumes_from_its_last_round(prepared_site, tmp_path):
    root = tmp_path / "consortium"
    init_consortium(root, ["localhost", "127.0.0.1"], ["aster", "birch"])
    raw = yaml.safe_load(EXAMPLE_STUDY.read_text())
    raw["training"].update({"rounds": 3, "local_epochs": 1})
    # A validation part chooses the study's model: a DP validation release every round, one test release.
    raw["evaluation"] = {"split": {"kind": "random", "train": 0.6, "validation": 0.2, "test": 0.2}}
    # A site that was waiting for the dead coordinator reconnects within its reconnect wait (5 s) of the
    # restart; the round timeout leaves room for that on a loaded CI host.
    raw["federation"].update({"min_sites": 2, "secure_aggregation": False, "round_timeout_seconds": 150})
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump(raw), encoding="utf-8")
    spec = load_study(study)
    site_files = {site: _site(prepared_site, tmp_path / site, site) for site in ("aster", "birch")}
    for site_file in site_files.values():
        node = SiteNode(load_site_config(site_file))
        node.governance.approvals.approve(study_hash(spec), spec.study.id, "steward")
        node.governance.close()

    with live_consortium(root, site_files) as live:
        command = [TWINFED, "study", "run", str(study), "--coordinator-dir", str(root), "--wait-for-sites", "90"]
        first = Running(command)
        first.wait_for("Round 1/3", timeout=180)
        live.coordinator.process.kill()  # kill -9: no clean shutdown; its SuperLink goes down with it
        live.coordinator.kill_group()
        assert first.wait(timeout=120) != 0

        live.coordinator = Running(coordinator_command(root, live.port))
        live.coordinator.wait_for("Coordinator running", timeout=60)
        resumed = Running([*command, "--resume"])
        code = resumed.wait(timeout=300)
        # On failure, say what each site saw: its SuperNode log holds the messages it pulled and sent.
        logs = {site: (path.parent / "supernode.log") for site, path in site_files.items()}
        seen = "\n".join(f"--- {s}: ...{p.read_text(errors='replace')[-6000:]}" for s, p in logs.items() if p.exists())
        superlink = root / "superlink" / "superlink.log"
        coordinator = "\n".join(live.coordinator.lines[-40:])
        if superlink.exists():  # the SuperLink says which replies it stored, refused or expired
            lines = superlink.read_text(errors="replace").splitlines()
            kept = [ln for ln in lines if ln.strip() and "heartbeat" not in ln]
            coordinator += "\n--- superlink.log: ...\n" + "\n".join(kept[-150:])
        assert code == 0, f"{resumed.output}\n{seen}\n--- coordinator: ...\n{coordinator}"
        assert "Resuming run" in resumed.output and "Round 1/3" not in resumed.output
        assert "Round 3/3" in resumed.output

    folder = root / "studies" / spec.study.id / spec.study.id
    train_rounds = [r.server_round for r in read_receipts(folder / "receipts.jsonl") if r.phase == "train"]
    assert train_rounds[0] == 1 and train_rounds[-2:] == [2, 3] and set(train_rounds) == {1, 2, 3}
    card = json.loads((folder / "model-card.json").read_text())
    assert card["run"]["status"] == "completed" and card["run"]["completed_rounds"] == 3
    evaluations = [(r.server_round, r.part) for r in read_receipts(folder / "receipts.jsonl") if r.phase == "evaluate"]
    validations = sorted({n for n, part in evaluations if part == "validation"})
    assert validations == [1, 2, 3], "every round's model was scored on the validation part, across the restart"
    # The study's model is the round with the best pooled validation AUROC, and only it was tested.
    scores = {row["round"]: (row["validation"]["auroc"]["value"] or -1) for row in card["history"]}
    chosen = card["model"]["selected_round"]
    assert scores[chosen] == max(scores.values()) and "validation AUROC" in card["model"]["selection"]
    assert [n for n, part in evaluations if part == "test"] == [chosen]
    for site_file in site_files.values():
        node = SiteNode(load_site_config(site_file))
        # every round trained once at each site: three committed rounds, nothing spent twice
        spent = node.governance.ledger.spent_by_purpose(study_hash(spec))
        assert spent["train"] <= spec.privacy.target_epsilon + 1e-6
        assert spent["total"] <= spec.epsilon_budget() + 1e-6
        rows = [r for r in node.governance.ledger.reservations(study_hash(spec)) if r.status == "committed"]
        assert sorted(r.round_key for r in rows if r.purpose == "train")[-1].endswith(":3")
        outcomes = [r.round_key for r in rows if r.purpose == "evaluate" and not r.round_key.endswith(":scores")]
        released = sorted(tuple(key.rsplit(":", 2)[-2:]) for key in outcomes)
        assert len(outcomes) * 2 == sum(r.purpose == "evaluate" for r in rows), "each release has its score stage"
        expected = [("1", "validation"), ("2", "validation"), ("3", "validation"), (str(chosen), "test")]
        assert released == sorted(expected)
