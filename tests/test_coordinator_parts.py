"""Coordinator parts that do not need processes: pooling of site evaluations, receipts, checkpoints and
the model card. The whole coordinator runs against real SuperLink/SuperNode processes in
test_federation_e2e.py."""

from __future__ import annotations

import datetime as dt
import json
import math
import re

import numpy as np
import pytest

from federation.contract import study_hash
from federation.contract.protocol import EvaluationRelease, ReleaseMode
from federation.contract.receipts import Participation, RoundReceipt, SiteReceipt, append_receipt, read_receipts
from federation.coordinator.checkpoint import Checkpoint, CheckpointMismatch, load_checkpoint, save_checkpoint
from federation.coordinator.model_card import write_model_card
from federation.coordinator.runner import RunResult, initial_weights
from federation.deploy.link_instance import INSTANCE_ENV, GuardedGrid, LinkInstance, RunSuperseded, start_instance
from federation.twins.risk_pooling import hanley_mcneil_se, pool_evaluations
from tests.site_helpers import study


def test_hanley_mcneil_matches_the_published_example():
    # Hanley & McNeil (1982), table: AUROC 0.8 with 50 positives and 50 negatives has SE ~0.0442.
    assert hanley_mcneil_se(0.8, 50, 50) == pytest.approx(0.0442, abs=5e-4)


def test_pooled_auroc_combines_exact_sites_by_inverse_variance_and_skips_withheld_ones():
    spec = study()

    def exact(auroc, n, positives, **extra):
        return EvaluationRelease(
            part="test", mode=ReleaseMode.EXACT, auroc=auroc, examples=n, with_outcome=positives, cell_floor=10,
            loss=0.3, brier=0.1, **extra,
        )  # fmt: skip

    releases = [
        ("a", exact(0.80, 200, 40)),
        ("b", exact(0.70, 100, 20)),
        ("c", EvaluationRelease(part="test", mode=ReleaseMode.WITHHELD, withheld="auroc", withheld_reason="small")),
    ]
    pooled = pool_evaluations(releases, spec.evaluation)
    wa = 1 / hanley_mcneil_se(0.80, 40, 160) ** 2
    wb = 1 / hanley_mcneil_se(0.70, 20, 80) ** 2
    assert pooled.auroc.value == pytest.approx((0.8 * wa + 0.7 * wb) / (wa + wb))
    half = (pooled.auroc.high - pooled.auroc.low) / 2
    assert half == pytest.approx(1.959964 / math.sqrt(wa + wb), rel=0.2)  # replicate spread ~ the analytic one
    assert pooled.loss.value == pytest.approx(0.3) and pooled.sensitivity.value is None
    assert pool_evaluations([releases[2]], spec.evaluation).auroc.text() == "withheld (cell floor)"


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


def _pooled_test(spec) -> dict:
    rng = np.random.default_rng(3)
    bins = len(spec.evaluation.score_edges) + 1
    positives = np.linspace(2, 40, bins) + rng.normal(0, 2, bins)
    negatives = np.linspace(300, 5, bins) + rng.normal(0, 2, bins)
    release = EvaluationRelease(
        part="test", mode=ReleaseMode.DP, positives=list(positives), negatives=list(negatives), noise_sd=2.0,
        score_edges=list(spec.evaluation.score_edges),
    )  # fmt: skip
    return pool_evaluations([("a", release)], spec.evaluation).model_dump(mode="json")


def test_model_card_names_sites_epsilon_and_refusals(tmp_path):
    spec = study()
    now = dt.datetime.now(dt.UTC)
    trained = SiteReceipt(
        node_id=1, site_id="a", status=Participation.TRAINED, epsilon_spent=1.25, epsilon_ceiling=4.0,
        epsilon_training=1.25, epsilon_evaluation=0.0, cohort_snapshot="c" * 64, consent_snapshot="d" * 64,
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
    history = [{"round": 1, "epsilon": {"a": 1.25}, "participation": {"a": "trained", "b": "refused"},
                "secure_aggregation": False},
               {"round": 2, "participation": {"a": "trained", "b": "trained"}, "secure_aggregation": True}]  # fmt: skip
    pooled = _pooled_test(spec)
    result = RunResult("completed", "done", 2, initial_weights(spec), history, pooled, 2, "the last round's model.")
    html_path = write_model_card(tmp_path, spec, result)
    text = (tmp_path / "model-card.json").read_text()
    card = json.loads(text)
    assert "NaN" not in text
    assert card["study"]["hash"] == study_hash(spec)
    assert card["sites"]["a"]["epsilon_spent"] == 1.25 and card["sites"]["a"]["cohort_snapshot"] == "c" * 64
    assert card["sites"]["b"]["refusals"][0]["code"] == "budget"
    assert card["metrics"]["held_out_auroc"] == pooled["auroc"]["value"]
    assert card["metrics"]["held_out_auroc_95ci"] == [pooled["auroc"]["low"], pooled["auroc"]["high"]]
    assert card["privacy"]["differentially_private"] and card["model"]["selected_round"] == 2
    page = html_path.read_text()
    assert "data:image/png;base64," in page and "budget" in page and study_hash(spec) in page
    assert "sensitivity" in page and "Calibration by risk stratum" in page
    # which rounds the coordinator saw only the weighted mean of (a site's policy turned SecAgg+ on)
    assert card["aggregation"]["secure_rounds"] == [2] and "SecAgg+) in rounds 2 of 2" in page
    assert (tmp_path / "final-model.pt").exists()


def test_model_card_of_a_withheld_evaluation_says_so_and_never_nan(tmp_path):
    spec = study()
    withheld = EvaluationRelease(
        part="test", mode=ReleaseMode.WITHHELD, withheld="auroc, loss, brier, confusion counts, examples",
        withheld_reason="fewer than 10 patients (the site's cell-count floor)", cell_floor=10,
    )  # fmt: skip
    pooled = pool_evaluations([("tiny", withheld)], spec.evaluation).model_dump(mode="json")
    result = RunResult("completed", "done", 1, initial_weights(spec), [{"round": 1}], pooled, 1, "last round.")
    html_path = write_model_card(tmp_path, spec, result)
    text = (tmp_path / "model-card.json").read_text()
    assert "NaN" not in text and json.loads(text)["metrics"]["held_out_auroc_text"] == "withheld (cell floor)"
    page = html_path.read_text()
    visible = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)
    assert "withheld (cell floor)" in visible and not re.search(r"\bnan\b", visible, re.IGNORECASE)


def test_model_card_of_a_non_private_study_says_so_first(tmp_path):
    spec = study(privacy={"mode": "none", "target_epsilon": None})
    result = RunResult("completed", "done", 1, initial_weights(spec), [{"round": 1}], None, 1, "not evaluated.")
    page = write_model_card(tmp_path, spec, result).read_text()
    assert page.index("NOT DIFFERENTIALLY PRIVATE") < page.index("<h1>")
    assert not json.loads((tmp_path / "model-card.json").read_text())["privacy"]["differentially_private"]


def test_selection_keeps_the_best_validation_round_and_counts_rounds_without_improvement():
    from federation.coordinator.runner import Selection

    selection, weights = Selection(), {"w": np.zeros(1)}
    for server_round, score in enumerate([0.70, 0.74, None, 0.73, 0.74], start=1):
        selection.offer(server_round, {"w": np.full(1, server_round)}, score)
    # round 2 stays the best: a tie later is no improvement, and a round without an estimate is none either
    assert selection.round == 2 and selection.score == 0.74 and selection.weights["w"][0] == 2
    assert selection.stale_rounds == 3, "early stopping with patience 3 ends training after round 5"
    selection.offer(6, weights, 0.80)
    assert selection.round == 6 and selection.stale_rounds == 0


class _CountingGrid:
    """The Flower Grid's boundary: what the runner asked of it (a real one needs a running SuperLink)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def push_messages(self, messages):
        self.calls.append("push")
        return ["m1"]

    def pull_messages(self, message_ids):
        self.calls.append("pull")
        return []

    def get_node_ids(self):
        self.calls.append("nodes")
        return [1, 2]


def test_a_serverapp_left_over_from_a_killed_coordinator_stops_before_it_sends_anything(tmp_path, monkeypatch):
    superlink_dir = tmp_path / "superlink"
    monkeypatch.setenv(INSTANCE_ENV, start_instance(superlink_dir))
    instance = LinkInstance.from_environment(superlink_dir)
    assert instance is not None
    grid = _CountingGrid()
    guarded = GuardedGrid(grid, instance)
    assert guarded.get_node_ids() == [1, 2] and guarded.push_messages([]) == ["m1"]
    start_instance(superlink_dir)  # the coordinator is restarted over the same folder
    with pytest.raises(RunSuperseded, match=r"restarted under this run.*--resume"):
        guarded.push_messages([])
    with pytest.raises(RunSuperseded):
        guarded.pull_messages(["m1"])
    assert grid.calls == ["nodes", "push"], "nothing reached the restarted SuperLink"
    monkeypatch.delenv(INSTANCE_ENV)
    assert LinkInstance.from_environment(superlink_dir) is None, "no guard where no coordinator started the run"
