"""Secure aggregation with real processes: a coordinator and three site nodes over TLS on loopback.

The study itself does not ask for secure aggregation, but one hospital's policy requires it, and the
study needs all three hospitals in every round. What must hold, as a consortium would check it:

* round 1 runs plain; the hospital that requires SecAgg+ refuses it (code needs-secure-aggregation) and
  spends nothing; two hospitals trained, too few, so the coordinator runs round 1 again with SecAgg+
  (the two re-send the update they kept, spending nothing twice) and every later round too;
* every secure round has all three hospitals receipted as trained with their epsilon;
* the model the coordinator ends with equals the plain example-weighted mean of the updates the three
  hospitals released in the last round (each keeps what it released), within the quantisation step;
* every hospital's ledger holds one committed round per round; every audit log verifies.

Then, on the same running consortium, a second run of the study after one hospital withdrew its
approval: the study needs all three, so round 1 stops it with a report (k-of-n), not a hang.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from federation.contract import load_study, study_hash
from federation.contract.protocol import RefusalCode
from federation.contract.receipts import Participation, read_receipts
from federation.deploy.provision import init_consortium
from site_node.config import load_site_config
from site_node.participation import SiteNode
from tests.consortium_helpers import live_consortium, site_folder
from tests.process_helpers import TWINFED, Running
from tests.site_helpers import EXAMPLE_STUDY

SITES = ("aster", "birch", "cedar")
ROUNDS = 3


@pytest.mark.timeout(480)
def test_a_site_that_requires_secure_aggregation_turns_it_on_and_the_mean_is_exact(prepared_site, tmp_path):
    root = tmp_path / "consortium"
    init_consortium(root, ["localhost", "127.0.0.1"], list(SITES))
    raw = yaml.safe_load(EXAMPLE_STUDY.read_text())
    raw["training"].update({"rounds": ROUNDS, "local_epochs": 1})
    raw["federation"].update({"min_sites": 3, "secure_aggregation": False, "round_timeout_seconds": 120})
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump(raw), encoding="utf-8")
    spec = load_study(study)
    digest = study_hash(spec)
    site_files = {
        "aster": site_folder(prepared_site, tmp_path / "aster", "aster"),
        "birch": site_folder(prepared_site, tmp_path / "birch", "birch"),
        "cedar": site_folder(prepared_site, tmp_path / "cedar", "cedar", require_secure_aggregation=True),
    }
    for site_file in site_files.values():
        node = SiteNode(load_site_config(site_file))
        node.governance.approvals.approve(digest, spec.study.id, "steward")
        node.governance.close()

    command = [TWINFED, "study", "run", str(study), "--coordinator-dir", str(root), "--wait-for-sites", "90"]
    with live_consortium(root, site_files):
        run = Running(command)
        assert run.wait(timeout=400) == 0, run.output
        assert "require secure aggregation: the next rounds use SecAgg+" in run.output
        assert "Round 1: run again with SecAgg+." in run.output

        cedar = SiteNode(load_site_config(site_files["cedar"]))
        cedar.governance.approvals.revoke(digest, "cedar steward", "agreement ended")
        cedar.governance.close()
        second = Running([*command, "--name", "after-revocation"])
        assert second.wait(timeout=300) == 1, second.output
        # aster and birch spent the study's budget in the first run: they refuse too, for budget
        assert "Study stopped" in second.output and "site(s) trained, the study needs 3" in second.output

    folder = root / "studies" / spec.study.id / spec.study.id
    receipts = [r for r in read_receipts(folder / "receipts.jsonl") if r.phase == "train"]
    assert [(r.server_round, r.secure_aggregation) for r in receipts] == [(1, False)] + [
        (n, True) for n in range(1, ROUNDS + 1)
    ]
    first = {s.label: s for s in receipts[0].sites}
    assert first["cedar"].status == Participation.REFUSED
    assert first["cedar"].code == RefusalCode.NEEDS_SECURE_AGGREGATION.value
    assert {first["aster"].status, first["birch"].status} == {Participation.TRAINED}
    assert not receipts[0].aggregated and "run again with SecAgg+" in receipts[0].note
    for receipt in receipts[1:]:
        assert receipt.secure_aggregation and "SecAgg+" in receipt.note, receipt.note
        assert {s.label: s.status for s in receipt.sites} == dict.fromkeys(SITES, Participation.TRAINED)
        assert all(s.epsilon_spent and s.epsilon_spent > 0 for s in receipt.sites)

    card = json.loads((folder / "model-card.json").read_text())
    assert card["run"]["status"] == "completed"
    assert [row["secure_aggregation"] for row in card["history"]] == [True] * ROUNDS

    released = [
        torch.load(Path(f).parent / "released" / digest[:16] / f"{spec.study.id}_{ROUNDS}.pt", weights_only=True)
        for f in site_files.values()
    ]
    total = sum(r["num_examples"] for r in released)
    final = torch.load(folder / "checkpoint.pt", weights_only=False)["weights"]
    for name in released[0]["state_dict"]:
        plain = sum(r["state_dict"][name].double() * r["num_examples"] for r in released) / total
        difference = (torch.as_tensor(final[name]).double() - plain).abs().max().item()
        assert difference < 1e-5, f"{name}: the SecAgg+ mean differs from the plain mean by {difference}"

    for site_file in site_files.values():
        node = SiteNode(load_site_config(site_file))
        # one committed reservation per round at every site: the repeated round 1 spent nothing twice
        committed = [
            r
            for r in node.governance.ledger.reservations(digest)
            if r.status == "committed" and r.purpose == "train" and r.round_key.startswith(f"{spec.study.id}:")
        ]
        assert sorted(r.round_key.rsplit(":", 1)[1] for r in committed) == [str(n) for n in range(1, ROUNDS + 1)]
        assert node.governance.audit.verify().ok
    aster = SiteNode(load_site_config(site_files["aster"]))
    assert sum(e.kind == "round-resent" for e in aster.governance.audit.entries()) == 1

    stopped = read_receipts(root / "studies" / spec.study.id / "after-revocation" / "receipts.jsonl")
    assert [(r.server_round, r.phase) for r in stopped] == [(1, "train")]
    assert stopped[0].note.startswith("stopped: round 1: only ") and not stopped[0].aggregated
    codes = {s.label: s.code for s in stopped[0].sites}
    assert codes["cedar"] == RefusalCode.UNAPPROVED_STUDY.value
    assert codes["aster"] in (None, RefusalCode.BUDGET.value) and codes["birch"] in (None, RefusalCode.BUDGET.value)
    card = json.loads((root / "studies" / spec.study.id / "after-revocation" / "model-card.json").read_text())
    assert card["run"]["status"] == "stopped" and card["run"]["completed_rounds"] == 0
