"""Coordinator parts that do not need processes: pooling of site evaluations, receipts, checkpoints and
the model card. The whole coordinator runs against real SuperLink/SuperNode processes in
test_federation_e2e.py."""

from __future__ import annotations

import datetime as dt
import json
import math

import numpy as np
import pytest

from federation.checkpoint import Checkpoint, CheckpointMismatch, load_checkpoint, save_checkpoint
from federation.evaluation import SiteEvaluation, hanley_mcneil_se, pooled_auroc, pooled_mean
from federation.model_card import write_model_card
from federation.receipts import Participation, RoundReceipt, SiteReceipt, append_receipt, read_receipts
from federation.runner import RunResult, initial_weights
from federation.study import study_hash
from tests.site_helpers import study


def test_hanley_mcneil_matches_the_published_example():
    # Hanley & McNeil (1982), table: AUROC 0.8 with 50 positives and 50 negatives has SE ~0.0442.
    assert hanley_mcneil_se(0.8, 50, 50) == pytest.approx(0.0442, abs=5e-4)


def test_pooled_auroc_is_inverse_variance_weighted_and_skips_withheld_counts():
    sites = [
        SiteEvaluation("a", 0.80, 0.3, 0.1, 200, 40),
        SiteEvaluation("b", 0.70, 0.4, 0.2, 100, 20),
        SiteEvaluation("c", 0.99, 0.1, 0.0, None, None),  # counts withheld: cannot be weighted
    ]
    pooled = pooled_auroc(sites)
    wa = 1 / hanley_mcneil_se(0.80, 40, 160) ** 2
    wb = 1 / hanley_mcneil_se(0.70, 20, 80) ** 2
    assert pooled.value == pytest.approx((0.8 * wa + 0.7 * wb) / (wa + wb))
    assert pooled.high - pooled.value == pytest.approx(1.959964 / math.sqrt(wa + wb), rel=1e-5)
    assert pooled.sites == 2 and 0.7 < pooled.value < 0.8
    assert pooled_mean(sites, "loss") == pytest.approx((0.3 * 200 + 0.4 * 100) / 300)
    assert pooled_auroc([sites[2]]) is None


def test_receipts_append_and_read_back(tmp_path):
    now = dt.datetime.now(dt.UTC)
    receipt = RoundReceipt(
        run_name="r",
        server_round=1,
        phase="train",
        started_at=now,
        finished_at=now,
        required_sites=2,
        sites=[
            SiteReceipt(node_id=1, site_id="a", status=Participation.TRAINED, epsilon_spent=0.5),
            SiteReceipt(node_id=2, site_id="b", status=Participation.REFUSED, code="budget", reason="spent"),
            SiteReceipt(node_id=3, status=Participation.TIMED_OUT, reason="no answer within 30 s"),
        ],
    )
    path = tmp_path / "receipts.jsonl"
    append_receipt(path, receipt)
    append_receipt(path, receipt)
    back = read_receipts(path)
    assert len(back) == 2 and back[0] == receipt
    assert back[0].summary() == "round 1 train: 1 trained, 1 refused, 1 timed-out"
    assert back[0].sites[2].label == "node 3"


def test_checkpoint_round_trip_and_refuses_another_study(tmp_path):
    spec = study()
    weights = initial_weights(spec)
    save_checkpoint(tmp_path, Checkpoint(study_hash(spec), "run", 3, weights, {"strategy": "fedavg"}, [{"round": 3}]))
    loaded = load_checkpoint(tmp_path, study_hash(spec))
    assert loaded.completed_round == 3 and loaded.history == [{"round": 3}]
    assert all(np.array_equal(loaded.weights[k], weights[k]) for k in weights)
    assert not list(tmp_path.glob(".*.tmp")), "no temporary file is left behind"
    with pytest.raises(CheckpointMismatch, match="study file changed"):
        load_checkpoint(tmp_path, "0" * 64)
    assert load_checkpoint(tmp_path / "empty", study_hash(spec)) is None


def test_model_card_names_sites_epsilon_and_refusals(tmp_path):
    spec = study()
    now = dt.datetime.now(dt.UTC)
    trained = SiteReceipt(
        node_id=1, site_id="a", status=Participation.TRAINED, epsilon_spent=1.25, epsilon_ceiling=3.0,
        cohort_snapshot="c" * 64, consent_snapshot="d" * 64,
    )  # fmt: skip
    refused = SiteReceipt(node_id=2, site_id="b", status=Participation.REFUSED, code="budget", reason="spent")
    append_receipt(
        tmp_path / "receipts.jsonl",
        RoundReceipt(
            run_name="r",
            server_round=1,
            phase="train",
            started_at=now,
            finished_at=now,
            required_sites=1,
            sites=[trained, refused],
        ),
    )
    history = [{"round": 1, "auroc": 0.71, "auroc_low": 0.6, "auroc_high": 0.8, "auroc_sites": 1, "loss": 0.3,
                "brier": 0.1, "site_auroc": {"a": 0.71}, "epsilon": {"a": 1.25},
                "participation": {"a": "trained", "b": "refused"}, "secure_aggregation": False},
               {"round": 2, "auroc": 0.72, "auroc_low": 0.6, "auroc_high": 0.8, "auroc_sites": 1,
                "participation": {"a": "trained", "b": "trained"}, "secure_aggregation": True}]  # fmt: skip
    html_path = write_model_card(tmp_path, spec, RunResult("completed", "done", 2, initial_weights(spec), history))
    card = json.loads((tmp_path / "model-card.json").read_text())
    assert card["study"]["hash"] == study_hash(spec)
    assert card["sites"]["a"]["epsilon_spent"] == 1.25 and card["sites"]["a"]["cohort_snapshot"] == "c" * 64
    assert card["sites"]["b"]["refusals"][0]["code"] == "budget"
    assert card["metrics"]["held_out_auroc_95ci"] == [0.6, 0.8] and card["metrics"]["held_out_auroc"] == 0.72
    page = html_path.read_text()
    assert "data:image/png;base64," in page and "budget" in page and study_hash(spec) in page
    # which rounds the coordinator saw only the weighted mean of (a site's policy turned SecAgg+ on)
    assert card["aggregation"]["secure_rounds"] == [2] and "SecAgg+) in rounds 2 of 2" in page
    assert (tmp_path / "final-model.pt").exists()
