"""Leave one site out (federation/local/leave_one_site_out.py and the runner's held-out site).

The variants: derived ids (within the study id pattern, shortened deterministically with a short hash),
distinct hashes, descriptions naming the site left out, refusal when the sites left could not train.
The report: read from a variant's receipts and model card, with the held-out site's metric or the reason
there is none. The coordinator's side runs in-process over real site nodes (one prepared hospital under
three site ids, answering through the ClientApp's own handlers): the held-out site is identified by the
admission query, trains in no round, is asked for no validation, and alone is asked for the test
evaluation; a held-out site that is not connected, or has not approved the variant, is reported, not
skipped. The end-to-end run in Flower's simulation engine is in tests/test_simulation.py.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import uuid
from pathlib import Path

import pytest
from flwr.app import Context, Message, RecordDict

from federation.contract import canonical_json, load_study, parse_study, study_hash
from federation.contract.receipts import Participation, RoundReceipt, SiteReceipt, append_receipt, read_receipts
from federation.coordinator.model_card import write_model_card
from federation.coordinator.runner import RunResult, StudyRunner, initial_weights
from federation.local import leave_one_site_out as loso
from federation.twins.pooling import Estimate
from site_node.config import load_site_config
from site_node.participation import SiteNode
from site_node.simulated_sites import approve
from tests.consortium_helpers import site_folder
from tests.site_helpers import study

SITES = ["aster", "birch", "cedar"]
ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_.-]{1,63}$")


def _study(**federation):
    """The example study, small: 2 rounds of 1 epoch, 2 sites needed, no SecAgg+, a validation part."""
    data = study().model_dump(mode="json")
    data["training"].update(rounds=2, local_epochs=1)
    data["federation"].update({"min_sites": 2, "secure_aggregation": False, "round_timeout_seconds": 60, **federation})
    data["evaluation"]["split"] = {"kind": "random", "train": 0.6, "validation": 0.2, "test": 0.2}
    return parse_study(data)


# --- the variants ---------------------------------------------------------------------------------


def test_each_site_gets_a_variant_with_its_own_id_hash_and_a_description_naming_it():
    spec = _study()
    found = loso.variants(spec, SITES)
    assert [v.held_out_site for v in found] == SITES
    assert [v.id for v in found] == [f"inpatient-mortality-24h.without-{site}" for site in SITES]
    assert len({v.hash for v in found} | {study_hash(spec)}) == len(SITES) + 1
    for variant in found:
        site = variant.held_out_site
        assert f"without site '{site}'" in variant.spec.study.description
        assert f"without {site}" in variant.spec.study.title
        # everything but the study's identity is the study itself
        assert variant.spec.model_dump(exclude={"study"}) == spec.model_dump(exclude={"study"})
    assert loso.variants(spec, SITES) == found, "derivation is deterministic"


def test_long_ids_are_shortened_deterministically_within_the_pattern():
    long_study, long_site = "a" * 64, "hospital-" + "b" * 55
    derived = loso.variant_id(long_study, long_site)
    assert ID_PATTERN.match(derived) and len(derived) == 64
    assert derived == loso.variant_id(long_study, long_site)
    assert ".without-" in derived and derived.startswith("aaaa")
    # two sites that differ only past the cut still get different ids
    assert loso.variant_id(long_study, long_site + "1") != loso.variant_id(long_study, long_site + "2")
    short = loso.variant_id("mortality", "b" * 64)
    assert ID_PATTERN.match(short) and short.startswith("mortality.without-bbb")
    assert loso.variant_id("mortality", "cedar") == "mortality.without-cedar"


def test_too_few_sites_to_train_without_one_is_refused_with_the_reason():
    with pytest.raises(loso.LeaveOneSiteOutError, match="at least 4 sites"):
        loso.variants(study(), SITES)  # min_sites 3 and secure aggregation: 3 must train
    with pytest.raises(loso.LeaveOneSiteOutError, match="at least 2 sites"):
        loso.variants(_study(min_sites=1), ["aster", "aster"])
    assert len(loso.variants(study(), [*SITES, "dogwood"])) == 4


def test_the_budget_statement_says_what_the_variants_cost_each_site():
    text = loso.budget_statement(_study(), 3)
    assert "trains in 2 of them" in text and "2 x 5 + 2 = 12" in text and "against 5" in text


def test_variant_files_read_back_with_their_hash_and_approval_commands_name_them(tmp_path):
    found = loso.variants(_study(), SITES)
    files = loso.write_variants(found, tmp_path)
    for variant in found:
        assert study_hash(load_study(files[variant.held_out_site])) == variant.hash
    commands = loso.approval_commands(list(files.values()), "site.yaml")
    assert commands[0] == f"twinfed site approve {files['aster']} --site-config site.yaml"


# --- the report from a run folder -------------------------------------------------------------------


def _receipt(server_round: int, phase: str, sites: list[SiteReceipt], part: str | None = None, note: str = ""):
    now = dt.datetime.now(dt.UTC)
    return RoundReceipt(run_name="r", server_round=server_round, phase=phase, started_at=now, finished_at=now,
                        required_sites=2, sites=sites, part=part, note=note)  # fmt: skip


def _card(folder: Path, spec, evaluation: dict | None, status: str = "completed", reason: str = "all 2 rounds"):
    result = RunResult(status, reason, 2, initial_weights(spec), [{"round": 2}], evaluation, 2, "chosen", "cedar")
    write_model_card(folder, spec, result)


def _pooled(spec, value: float | None) -> dict:
    from federation.twins import kind_of

    pooled = kind_of(spec.model).pool(spec, [], seed=0).model_dump(mode="json")
    pooled["auroc"] = Estimate(value=value, low=0.6, high=0.8).model_dump() if value else pooled["auroc"]
    pooled["patients"] = Estimate(value=101.4, low=95, high=108).model_dump()
    return pooled


def test_the_report_takes_the_metric_at_the_held_out_site_or_says_why_not(tmp_path):
    spec = _study()
    variant = loso.variants(spec, SITES)[2]
    trained = [SiteReceipt(node_id=n, site_id=s, status=Participation.TRAINED) for n, s in ((1, "aster"), (2, "birch"))]
    ready = SiteReceipt(node_id=3, site_id="cedar", status=Participation.READY, reason="held out")
    evaluated = SiteReceipt(node_id=3, site_id="cedar", status=Participation.EVALUATED)

    ok = tmp_path / "ok"
    append_receipt(ok / "receipts.jsonl", _receipt(1, "train", [*trained, ready]))
    append_receipt(ok / "receipts.jsonl", _receipt(2, "evaluate", [evaluated], "test"))
    _card(ok, variant.spec, _pooled(spec, 0.71))
    result = loso.held_out_result(spec, variant, ok, database="sqlite:///cedar.sqlite")
    assert result.evaluated and result.metric.value == 0.71 and result.patients.value == pytest.approx(101.4)
    assert result.training_sites == ["aster", "birch"] and result.held_out_trained_rounds == 0
    assert result.headline.startswith("AUROC 0.710") and result.database == "sqlite:///cedar.sqlite"

    refused = tmp_path / "refused"
    no = SiteReceipt(node_id=3, site_id="cedar", status=Participation.REFUSED, code="unapproved-study", reason="no")
    append_receipt(refused / "receipts.jsonl", _receipt(1, "train", trained))
    append_receipt(refused / "receipts.jsonl", _receipt(2, "evaluate", [no], "test"))
    _card(refused, variant.spec, _pooled(spec, None))
    result = loso.held_out_result(spec, variant, refused)
    assert not result.evaluated and result.metric is None
    assert "refused (unapproved-study): no" in result.reason and result.unapproved_at == ["cedar"]

    absent = tmp_path / "absent"
    append_receipt(absent / "receipts.jsonl", _receipt(1, "train", trained))
    append_receipt(absent / "receipts.jsonl", _receipt(2, "evaluate", [], "test", "No external validation: gone"))
    _card(absent, variant.spec, None)
    assert loso.held_out_result(spec, variant, absent).reason == "No external validation: gone"

    stopped = tmp_path / "stopped"
    append_receipt(stopped / "receipts.jsonl", _receipt(1, "train", trained[:1]))
    _card(stopped, variant.spec, None, "stopped", "round 1: only 1 site(s) trained")
    assert loso.held_out_result(spec, variant, stopped).reason == "the variant stopped: round 1: only 1 site(s) trained"

    never = loso.held_out_result(spec, variant, tmp_path / "never", failure="flwr exit 1")
    assert never.run_status is None and never.reason == "flwr exit 1"

    report = loso.build_report(spec, [result, never], note="n")
    assert report.metric == "AUROC" and report.validation_cut and not report.complete
    path = loso.write_report(report, tmp_path / "report")
    assert json.loads(path.read_text())["sites"][1]["reason"] == "flwr exit 1"


# --- the coordinator over real site nodes, in process ------------------------------------------------


class InProcessGrid:
    """A Grid whose nodes are site nodes in this process, answered by the ClientApp's own handlers."""

    def __init__(self, sites: dict[int, Path]) -> None:
        from flwr.supercore.task_identity import TaskIdentity

        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # what a ServerApp process has
        self.sites = sites
        self.replies: dict[str, Message] = {}
        self.sent: list[tuple[int, str, str]] = []  # (node, message type, part) of every message

    def get_node_ids(self) -> list[int]:
        return list(self.sites)

    def push_messages(self, messages: list[Message]) -> list[str]:
        from site_node import clientapp

        handlers = {"train": clientapp.train, "query": clientapp.admit, "evaluate": clientapp.evaluate}
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = message_id = uuid.uuid4().hex  # as the SuperLink sets it
            node = message.metadata.dst_node_id
            part = message.content.config_records["instruction"].get("part", "")
            self.sent.append((node, message.metadata.message_type, part))
            context = Context(1, node, {"site-config": str(self.sites[node])}, RecordDict(), {})
            self.replies[message_id] = handlers[message.metadata.message_type](message, context)
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: list[str]) -> list[Message]:
        return [self.replies.pop(i) for i in message_ids if i in self.replies]


@pytest.fixture(scope="module")
def three_sites(prepared_site: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loso-sites")
    return {site: site_folder(prepared_site, root / site, site) for site in SITES}


def _run(spec, sites: dict[str, Path], held_out: str, folder: Path, approved=SITES):
    study_file = folder / "study.json"
    folder.mkdir(parents=True)
    study_file.write_bytes(canonical_json(spec))
    for site in approved:
        approve(sites[site], study_file, "test")
    grid = InProcessGrid({node: sites[site] for node, site in enumerate(sites, start=11)})
    runner = StudyRunner(grid, spec, "run", folder / "run", node_wait_seconds=0.2, held_out_site=held_out)
    result = runner.run()
    write_model_card(folder / "run", spec, result)
    return result, grid, read_receipts(folder / "run" / "receipts.jsonl")


def test_the_held_out_site_trains_in_no_round_validates_nothing_and_alone_is_tested(three_sites, tmp_path):
    spec = _study()
    variant = loso.variants(spec, SITES)[2]
    result, grid, receipts = _run(variant.spec, three_sites, "cedar", tmp_path / "cedar")
    assert result.status == "completed" and result.held_out_site == "cedar"
    cedar = 13
    # asked which site it is (admission: checks only), then never sent training or validation
    assert [(kind, part) for node, kind, part in grid.sent if node == cedar] == [
        ("query", "test"), ("evaluate", "test"), ("evaluate", "test")
    ]  # fmt: skip
    assert [node for node, kind, _ in grid.sent if kind == "query"] == [11, 12, 13], "asked once, in round 1"
    train = [r for r in receipts if r.phase == "train"]
    assert len(train) == 2
    for receipt in train:
        assert {s.site_id for s in receipt.sites if s.status == Participation.TRAINED} == {"aster", "birch"}
        assert "held-out site cedar (node 13) is not sent training" in receipt.note
    assert [(s.site_id, s.status) for s in train[0].sites if s.site_id == "cedar"] == [("cedar", Participation.READY)]
    assert "held out (leave-one-site-out)" in train[0].sites[-1].reason
    validation = [r for r in receipts if r.part == "validation"]
    assert validation and all({s.site_id for s in r.sites} == {"aster", "birch"} for r in validation)
    test = [r for r in receipts if r.part == "test"]
    assert [r.phase for r in test] == ["strata", "evaluate"]
    assert all([(s.site_id, s.status) for s in r.sites] == [("cedar", Participation.EVALUATED)] for r in test)
    assert "asked of held-out site cedar (node 13) alone" in test[-1].note

    card = json.loads((tmp_path / "cedar" / "run" / "model-card.json").read_text())
    assert card["evaluation"]["held_out_site"] == "cedar"
    assert "trained without site cedar" in card["model"]["selection"]
    assert card["sites"]["cedar"]["rounds_trained"] == 0 and card["sites"]["cedar"]["epsilon_training"] == 0

    node = SiteNode(load_site_config(three_sites["cedar"]))
    entries = [e for e in node.governance.audit.entries() if e.payload.get("study_hash") == variant.hash]
    assert [e.kind for e in entries if e.kind in ("round-admitted", "round-trained", "evaluated")] == [
        "round-admitted", "evaluated", "evaluated"
    ]  # fmt: skip
    spent = node.governance.ledger.spent_by_purpose(variant.id)
    assert spent["train"] == 0 and 0 < spent["evaluate"] <= spec.evaluation.epsilon

    report = loso.held_out_result(spec, variant, tmp_path / "cedar" / "run")
    assert report.evaluated and report.held_out_trained_rounds == 0 and report.training_sites == ["aster", "birch"]
    assert report.internal_validation is not None and (report.metric.value is not None or report.metric.note)


def test_a_held_out_site_that_is_not_connected_or_not_approving_is_reported(three_sites, tmp_path):
    spec = _study()
    variant = loso.variants(spec, [*SITES, "dogwood"])[3]
    result, grid, receipts = _run(variant.spec, three_sites, "dogwood", tmp_path / "dogwood")
    assert result.status == "completed" and result.evaluation is None
    assert not [sent for sent in grid.sent if sent[1:] == ("evaluate", "test")], "no one is tested"
    assert all(
        {s.site_id for s in r.sites if s.status == Participation.TRAINED} == set(SITES)
        for r in receipts
        if r.phase == "train"
    )
    assert "held-out site dogwood has not answered" in receipts[0].note
    missing = loso.held_out_result(spec, variant, tmp_path / "dogwood" / "run")
    assert missing.reason.startswith("No external validation: held-out site dogwood is not among the answers of the 3")

    variant = loso.variants(spec, SITES)[0]
    result, grid, receipts = _run(variant.spec, three_sites, "aster", tmp_path / "aster", approved=["birch", "cedar"])
    assert result.status == "completed"
    first = next(s for s in receipts[0].sites if s.site_id == "aster")
    assert first.status == Participation.REFUSED and first.code == "unapproved-study"
    refused = loso.held_out_result(spec, variant, tmp_path / "aster" / "run")
    assert not refused.evaluated and refused.unapproved_at == ["aster"]
    assert "refused (unapproved-study)" in refused.reason and refused.held_out_trained_rounds == 0
