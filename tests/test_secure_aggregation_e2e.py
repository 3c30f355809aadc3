"""Secure aggregation with real processes: a coordinator and three site nodes over TLS on loopback.

The study itself does not ask for secure aggregation, but one hospital's policy requires it. What must
hold, as a consortium would check it afterwards:

* round 1 runs plain; the hospital that requires SecAgg+ refuses it (code needs-secure-aggregation),
  spends nothing, and the coordinator says the next rounds use SecAgg+;
* rounds 2 and 3 run SecAgg+ with all three hospitals: each is receipted as trained with its epsilon;
* the model the coordinator ends with equals the plain example-weighted mean of the updates the three
  hospitals released in the last round (each keeps what it released), within the quantisation step;
* the requiring hospital's ledger holds exactly the two secure rounds; every audit log verifies.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from federation.protocol import RefusalCode
from federation.provision import ConsortiumLayout, init_consortium
from federation.receipts import Participation, read_receipts
from federation.study import load_study, study_hash
from site_node.config import load_site_config
from site_node.participation import SiteNode
from tests.process_helpers import TWINFED, Running, free_port
from tests.site_helpers import EXAMPLE_STUDY
from tests.test_federation_e2e import _site, _start_site

SITES = ("aster", "birch", "cedar")
ROUNDS = 3


@pytest.mark.timeout(480)
def test_a_site_that_requires_secure_aggregation_turns_it_on_and_the_mean_is_exact(prepared_site, tmp_path):
    root = tmp_path / "consortium"
    init_consortium(root, ["localhost", "127.0.0.1"], list(SITES))
    keys = ConsortiumLayout(root)
    raw = yaml.safe_load(EXAMPLE_STUDY.read_text())
    raw["training"].update({"rounds": ROUNDS, "local_epochs": 1})
    raw["federation"].update({"min_sites": 2, "secure_aggregation": False, "round_timeout_seconds": 120})
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump(raw), encoding="utf-8")
    spec = load_study(study)
    digest = study_hash(spec)
    site_files = {
        "aster": _site(prepared_site, tmp_path / "aster", "aster"),
        "birch": _site(prepared_site, tmp_path / "birch", "birch"),
        "cedar": _site(prepared_site, tmp_path / "cedar", "cedar", require_secure_aggregation=True),
    }
    for site_file in site_files.values():
        node = SiteNode(load_site_config(site_file))
        node.governance.approvals.approve(digest, spec.study.id, "steward")
        node.governance.close()

    port = free_port()
    coordinator = Running([TWINFED, "coordinator", "start", "--dir", str(root), "--port", str(port)])
    sites: dict[str, Running] = {}
    try:
        coordinator.wait_for("Coordinator running", timeout=60)
        for site_id, site_file in site_files.items():
            sites[site_id] = _start_site(site_id, site_file, keys, port)
        for running in sites.values():
            running.wait_for("Connected to the SuperLink as node", timeout=90)
        run = Running([TWINFED, "study", "run", str(study), "--coordinator-dir", str(root), "--wait-for-sites", "90"])
        assert run.wait(timeout=400) == 0, run.output
        assert "require secure aggregation: the next rounds use SecAgg+" in run.output
    finally:
        for running in sites.values():
            running.kill_group()
        coordinator.kill_group()

    folder = root / "studies" / spec.study.id / spec.study.id
    train = {r.server_round: r for r in read_receipts(folder / "receipts.jsonl") if r.phase == "train"}
    first = {s.label: s for s in train[1].sites}
    assert not train[1].secure_aggregation
    assert first["cedar"].status == Participation.REFUSED
    assert first["cedar"].code == RefusalCode.NEEDS_SECURE_AGGREGATION.value
    assert {first["aster"].status, first["birch"].status} == {Participation.TRAINED}
    for server_round in range(2, ROUNDS + 1):
        receipt = train[server_round]
        assert receipt.secure_aggregation and "SecAgg+" in receipt.note, receipt.note
        assert {s.label: s.status for s in receipt.sites} == dict.fromkeys(SITES, Participation.TRAINED)
        assert all(s.epsilon_spent and s.epsilon_spent > 0 for s in receipt.sites)

    card = json.loads((folder / "model-card.json").read_text())
    assert card["run"]["status"] == "completed"
    assert [row["secure_aggregation"] for row in card["history"]] == [False] + [True] * (ROUNDS - 1)

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

    cedar = SiteNode(load_site_config(site_files["cedar"]))
    committed = [r for r in cedar.governance.ledger.reservations(digest) if r.status == "committed"]
    assert sorted(r.round_key.rsplit(":", 1)[1] for r in committed) == [str(n) for n in range(2, ROUNDS + 1)]
    for site_file in site_files.values():
        assert SiteNode(load_site_config(site_file)).governance.audit.verify().ok
