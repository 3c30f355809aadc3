"""A hospital's side of a federated round, on a real synthetic hospital loaded by the ETL into SQLite:
approvals by hash, policy, privacy ledger, consent, cell-count floor, audit, and the Flower ClientApp."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, Context, Message, Metadata, RecordDict

from federation.contract import study_hash
from federation.contract.protocol import EvaluationRelease, RefusalCode, RoundInstruction, SiteAnswer, SiteStatus
from site_node.clientapp import ANSWER_KEY, INSTRUCTION_KEY
from site_node.clientapp import app as client_app
from site_node.cohort import build_dataset, most_removed, render_attrition
from site_node.config import load_site_config
from site_node.participation import SiteNode
from tests.site_helpers import fresh_site, initial_state, instruction, study


def _node(prepared_site: Path, tmp_path: Path, **policy) -> SiteNode:
    return SiteNode(load_site_config(fresh_site(prepared_site, tmp_path / "site", **policy)))


def _approve(node: SiteNode, spec) -> str:
    digest = study_hash(spec)
    node.governance.approvals.approve(digest, spec.study.id, "test steward")
    return digest


def _start(node: SiteNode, spec) -> dict:
    return initial_state(spec, node.feature_count(spec))


def test_unapproved_study_is_refused_before_any_data_and_audited(prepared_site, tmp_path):
    node = _node(prepared_site, tmp_path)
    spec = study(training={"rounds": 2})
    outcome = node.train(instruction(spec), _start(node, spec))
    assert outcome.answer.status == SiteStatus.REFUSED and outcome.answer.code == RefusalCode.UNAPPROVED_STUDY
    assert outcome.state_dict is None and outcome.metrics == {}
    kinds = [entry.kind for entry in node.governance.audit.entries()]
    assert kinds == ["refused"], "nothing but the refusal may happen for an unapproved study"


def test_altered_study_is_refused(prepared_site, tmp_path):
    node = _node(prepared_site, tmp_path)
    spec = study(training={"rounds": 2})
    _approve(node, spec)
    altered = study(training={"rounds": 2}, privacy={"target_epsilon": 50.0})
    forged = instruction(altered).model_copy(update={"study_hash": study_hash(spec)})  # claims the approved hash
    outcome = node.train(forged, _start(node, spec))
    assert outcome.answer.code == RefusalCode.STUDY_HASH_MISMATCH
    unapproved = node.train(instruction(altered), _start(node, spec))
    assert unapproved.answer.code == RefusalCode.UNAPPROVED_STUDY


def test_trained_round_spends_budget_and_audits_what_left(prepared_site, tmp_path):
    node = _node(prepared_site, tmp_path)
    spec = study(training={"rounds": 3})
    digest = _approve(node, spec)
    outcome = node.train(instruction(spec), _start(node, spec))
    assert outcome.answer.status == SiteStatus.TRAINED, outcome.answer.reason
    assert 0 < outcome.answer.epsilon_spent < spec.privacy.target_epsilon
    assert outcome.answer.epsilon_spent == pytest.approx(node.governance.ledger.spent(digest))
    assert set(outcome.state_dict) == set(_start(node, spec))
    assert outcome.metrics["num-examples"] >= 50 and outcome.metrics["epsilon"] == outcome.answer.epsilon_spent
    entries = node.governance.audit.entries()
    # the budget is reserved and committed in the chain, in the same transactions as the ledger's rows
    assert [e.kind for e in entries] == ["ledger-reserved", "round-started", "ledger-committed", "round-trained"]
    assert entries[2].payload["row"]["status"] == "committed" and entries[2].payload["row"]["lineage"] == spec.study.id
    assert outcome.answer.audit_hash == entries[-1].hash  # the witness: the hash, never the entry's number
    assert "audit_seq" not in outcome.answer.model_dump()
    entries = [e for e in entries if not e.kind.startswith("ledger-")]
    left = entries[-1].payload["left_the_site"]
    assert left["tensors"] == {name: list(t.shape) for name, t in outcome.state_dict.items()}
    assert left["update_norm"] > 0 and left["metrics"] == outcome.metrics
    assert entries[0].payload["cohort_snapshot"] and entries[0].payload["noise_multiplier"] > 0.3
    assert node.governance.audit.verify().ok


def test_whole_schedule_stays_within_target_and_next_round_is_refused(prepared_site, tmp_path):
    node = _node(prepared_site, tmp_path)
    spec = study(training={"rounds": 3})
    _approve(node, spec)
    state = _start(node, spec)
    spent = []
    for server_round in (1, 2, 3):
        outcome = node.train(instruction(spec, server_round=server_round), state)
        assert outcome.answer.status == SiteStatus.TRAINED, outcome.answer.reason
        state = outcome.state_dict
        spent.append(outcome.answer.epsilon_spent)
    assert spent == sorted(spent) and spent[-1] <= spec.privacy.target_epsilon * 1.001
    assert spent[-1] > 0.8 * spec.privacy.target_epsilon, "noise is calibrated to use the budget, not waste it"
    extra = node.train(instruction(spec, server_round=4), state)
    assert extra.answer.code == RefusalCode.BUDGET and "epsilon" in extra.answer.reason
    # With the budget spent, the refusal comes before any patient data is read: a site whose OMOP
    # database is gone still answers "budget", not a database error.
    missing = node.config.omop.model_copy(update={"url": f"sqlite:///{tmp_path / 'gone.sqlite'}"})
    node.config = node.config.model_copy(update={"omop": missing})
    again = node.train(instruction(spec, server_round=5), state)
    assert again.answer.code == RefusalCode.BUDGET, again.answer.reason


def test_site_ceiling_below_study_target_refuses(prepared_site, tmp_path):
    node = _node(prepared_site, tmp_path, site_epsilon_ceiling=0.5)
    spec = study(training={"rounds": 3})
    _approve(node, spec)
    outcome = node.train(instruction(spec), _start(node, spec))
    assert outcome.answer.code == RefusalCode.BUDGET
    assert node.governance.ledger.site_spent() == 0


def test_retry_of_a_trained_round_resends_the_same_update_and_spends_nothing(prepared_site, tmp_path):
    node = _node(prepared_site, tmp_path)
    spec = study(training={"rounds": 3})
    digest = _approve(node, spec)
    first = node.train(instruction(spec), _start(node, spec))
    again = node.train(instruction(spec), _start(node, spec))  # the coordinator restarted and asks again
    assert first.answer.status == SiteStatus.TRAINED and again.answer.status == SiteStatus.TRAINED
    assert all(torch.equal(first.state_dict[k], again.state_dict[k]) for k in first.state_dict)
    assert again.answer.epsilon_spent == first.answer.epsilon_spent
    assert node.governance.ledger.spent(digest) == pytest.approx(first.answer.epsilon_spent)
    assert [e.kind for e in node.governance.audit.entries()][-1] == "round-resent"
    # without the kept copy (a crash right after the commit) the retry is refused, never trained twice
    for kept in (node.config.base_dir / "released").rglob("*.pt"):
        kept.unlink()
    third = node.train(instruction(spec), _start(node, spec))
    assert third.answer.code == RefusalCode.ALREADY_TRAINED
    assert node.governance.ledger.spent(digest) == pytest.approx(first.answer.epsilon_spent)


def test_small_cohort_is_refused_naming_the_criterion_that_removed_most_under_the_floor(prepared_site, tmp_path):
    node = _node(prepared_site, tmp_path, min_cohort_size=100_000)
    spec = study(cohort={"min_age": 80})
    _approve(node, spec)
    outcome = node.train(instruction(spec), _start(node, spec))
    assert outcome.answer.code == RefusalCode.COHORT_TOO_SMALL and "100000" in outcome.answer.reason
    cohort = build_dataset(node.config.omop.url, spec, split_key=node.config.split_key())
    top = most_removed(cohort.attrition)
    assert top.name == "age" and top.criterion in outcome.answer.reason
    floor = node.policy.min_cell_count
    display = render_attrition(cohort.attrition, floor, name_most_removed=True, cohort_below=100_000)
    assert display.sentence in outcome.answer.reason
    shown = [int(v) for step in display.steps for v in (step.persons, step.removed_persons) if v.isdigit()]
    assert shown and all(v == 0 or v >= floor for v in shown), "no count under the floor leaves the site"
    assert node.governance.ledger.spent(study_hash(spec)) == 0


def test_a_refusal_never_tells_a_difference_of_fewer_than_the_floor(prepared_site, tmp_path):
    node = _node(prepared_site, tmp_path, min_cohort_size=100_000)
    spec = study()
    _approve(node, spec)
    first = node.train(instruction(spec), _start(node, spec))
    cohort = build_dataset(node.config.omop.url, spec, split_key=node.config.split_key())
    assert f"{len(cohort)} remain" in first.answer.reason, "a count at or above the floor may be told"
    # One patient withdraws: the next refusal would say one patient fewer, which describes that patient.
    node.governance.withdrawals.withdraw(int(cohort.person_ids[0]), "steward", "phoned")
    again = node.train(instruction(spec, server_round=2), _start(node, spec))
    assert again.answer.code == RefusalCode.COHORT_TOO_SMALL
    assert f"{len(cohort) - 1} remain" not in again.answer.reason
    assert most_removed(cohort.attrition).criterion in again.answer.reason


def test_exact_evaluation_under_a_floor_above_the_cohort_withholds_everything(prepared_site, tmp_path):
    node = _node(prepared_site, tmp_path, min_cell_count=10_000, evaluation_release="exact")
    spec = study()
    _approve(node, spec)
    outcome = node.evaluate(instruction(spec), _start(node, spec))
    assert outcome.answer.status == SiteStatus.EVALUATED
    release = outcome.evaluation
    assert release.mode == "withheld" and release.examples is None and release.auroc is None
    assert "fewer than 10000" in release.withheld_reason and "auroc" in release.withheld
    audit = node.governance.audit.entries()[-1]
    assert audit.kind == "evaluated" and audit.payload["left_the_site"]["evaluation"]["mode"] == "withheld"
    assert node.governance.ledger.spent(study_hash(spec)) == 0, "an exact release spends no epsilon"


def test_consent_withdrawal_is_honoured_in_the_next_round(prepared_site, tmp_path):
    node = _node(prepared_site, tmp_path)
    spec = study(training={"rounds": 3})
    digest = _approve(node, spec)
    first = node.train(instruction(spec, server_round=1), _start(node, spec))
    assert first.answer.status == SiteStatus.TRAINED
    members = _round_members(node, digest, "run-1:1")
    person = min(members)
    node.governance.withdrawals.withdraw(person, "test steward", "phoned")
    assert [r[1] for r in node.governance.membership.rounds_including(person)] == ["run-1:1"]
    second = node.train(instruction(spec, server_round=2), first.state_dict)
    assert second.answer.status == SiteStatus.TRAINED
    assert person not in _round_members(node, digest, "run-1:2")
    started = [e for e in node.governance.audit.entries() if e.kind == "round-started"]
    assert started[1].payload["withdrawals_on_record"] == 1
    assert started[0].payload["cohort_snapshot"] != started[1].payload["cohort_snapshot"]


def _round_members(node: SiteNode, digest: str, round_key: str) -> set[int]:
    database = node.config.governance_db.removeprefix("sqlite:///")
    with sqlite3.connect(database) as connection:
        tables = [r[0] for r in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        table = next(t for t in tables if "member" in t)
        columns = [r[1] for r in connection.execute(f"PRAGMA table_info({table})")]
        person_column = next(c for c in columns if "person" in c)
        round_column = next(c for c in columns if "round" in c)
        rows = connection.execute(f"SELECT {person_column} FROM {table} WHERE {round_column} = ?", (round_key,))
        return {int(r[0]) for r in rows}


def test_secure_aggregation_required_by_policy(prepared_site, tmp_path):
    node = _node(prepared_site, tmp_path, require_secure_aggregation=True)
    spec = study(federation={"secure_aggregation": False, "min_sites": 2})
    digest = _approve(node, spec)
    outcome = node.train(instruction(spec), _start(node, spec))
    # the code the coordinator reads to run the next rounds with SecAgg+; nothing was reserved or spent
    assert outcome.answer.code == RefusalCode.NEEDS_SECURE_AGGREGATION and "secure aggregation" in outcome.answer.reason
    assert node.governance.ledger.reservations(digest) == []
    assert node.admit(instruction(spec)).answer.code == RefusalCode.NEEDS_SECURE_AGGREGATION
    # approvable: the coordinator turns SecAgg+ on for later rounds; the steward is told so
    assert node.policy_conflicts(spec) == [] and "refuse its plain rounds" in node.policy_notes(spec)[0]
    robust = study(federation={"secure_aggregation": False, "min_sites": 2, "strategy": "median"})
    assert "cannot use" in node.policy_conflicts(robust)[0]
    # the same study, its rounds run with secure aggregation: admitted, then trained
    secure = RoundInstruction.for_study(spec, "run-1", 1, secure_aggregation=True)
    ready = node.admit(secure)
    assert ready.answer.status == SiteStatus.READY and ready.metrics["num-examples"] > 0
    assert node.governance.ledger.reservations(digest) == []  # admission reserves nothing
    assert node.train(secure, _start(node, spec)).answer.status == SiteStatus.TRAINED


def test_clientapp_answers_through_flower_messages(prepared_site, tmp_path):
    site_file = fresh_site(prepared_site, tmp_path / "site")
    node = SiteNode(load_site_config(site_file))
    spec = study(training={"rounds": 3})
    _approve(node, spec)
    state = _start(node, spec)
    for message_type, expected in (("train", SiteStatus.TRAINED), ("evaluate", SiteStatus.EVALUATED)):
        metadata = Metadata(
            run_id=1,
            message_id=f"m-{message_type}",
            src_node_id=0,
            dst_node_id=7,
            reply_to_message_id="",
            group_id="1",
            created_at=time.time(),
            ttl=3600.0,
            message_type=message_type,
        )
        # an evaluation's first stage (adaptive strata): the scores' distribution, as a DP release record
        sent = instruction(spec) if message_type == "train" else instruction(spec, stage="scores")
        content = RecordDict({"arrays": ArrayRecord(state), INSTRUCTION_KEY: sent.to_config_record()})
        context = Context(run_id=1, node_id=7, node_config={"site-config": str(site_file)}, state=RecordDict(),
                          run_config={})  # fmt: skip
        reply = client_app(Message(content, metadata=metadata), context)
        answer = SiteAnswer.from_config_record(reply.content.config_records[ANSWER_KEY], ANSWER_KEY)
        assert answer.status == expected, answer.reason
        if message_type == "train":
            returned = reply.content.array_records["arrays"].to_torch_state_dict()
            assert not torch.equal(returned["0.weight"], state["0.weight"])
            assert reply.content.metric_records["metrics"]["num-examples"] > 0
        else:
            release = EvaluationRelease.from_config_record(reply.content.config_records["evaluation"], "evaluation")
            assert release.stage == "scores" and release.mode == "dp" and len(release.scores) > 10


_KILL_MID_TRAINING = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from site_node.config import load_site_config
    from site_node.participation import SiteNode
    from tests.site_helpers import initial_state, instruction, study
    node = SiteNode(load_site_config(Path(sys.argv[1])))
    spec = study(training={"rounds": 2, "local_epochs": 40, "batch_size": 4})  # long enough to be killed
    node.train(instruction(spec), initial_state(spec, node.feature_count(spec)))
    """
)


def _training_in_another_process(prepared_site: Path, tmp_path: Path):
    """A site node and a second process of the same site that is training a long round of a study."""
    site_file = fresh_site(prepared_site, tmp_path / "site")
    node = SiteNode(load_site_config(site_file))
    spec = study(training={"rounds": 2, "local_epochs": 40, "batch_size": 4})
    digest = _approve(node, spec)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    child = subprocess.Popen([sys.executable, "-c", _KILL_MID_TRAINING, str(site_file)], env=env)
    deadline = time.monotonic() + 120
    while not any(e.kind == "round-started" for e in node.governance.audit.entries()):
        assert child.poll() is None, "the training process ended before the test could act"
        assert time.monotonic() < deadline, "training never started"
        time.sleep(0.2)
    return node, spec, digest, child


def test_kill_9_during_training_never_under_counts(prepared_site, tmp_path):
    node, spec, digest, child = _training_in_another_process(prepared_site, tmp_path)
    time.sleep(0.5)  # inside the DP-SGD loop now
    child.send_signal(signal.SIGKILL)
    child.wait()
    reserved = node.governance.ledger.spent(digest)
    assert reserved > 0, "a round killed during training counts as spent"
    retry = node.train(instruction(spec), _start(node, spec))
    assert retry.answer.status == SiteStatus.TRAINED, retry.answer.reason
    assert node.governance.ledger.spent(digest) == pytest.approx(reserved), "the retry reused the reservation"


def test_a_second_train_message_for_a_round_in_training_is_refused(prepared_site, tmp_path):
    """Two train messages for the same round, arriving together: one trains, the other is refused while the
    first holds the reservation's lease; one charge, one update."""
    node, spec, digest, child = _training_in_another_process(prepared_site, tmp_path)
    try:
        second = node.train(instruction(spec), _start(node, spec))
        assert child.poll() is None, "the first training must still be running for this test to mean anything"
        assert second.answer.status == SiteStatus.REFUSED and second.answer.code == RefusalCode.IN_PROGRESS
        assert second.state_dict is None
        assert child.wait(timeout=600) == 0
    finally:
        if child.poll() is None:
            child.kill()
    [row] = node.governance.ledger.reservations(digest)
    assert row.status == "committed"
    assert [e.kind for e in node.governance.audit.entries()].count("round-trained") == 1
    assert node.governance.integrity().ok


def test_answers_never_count_what_happened_at_the_site_between_rounds(prepared_site, tmp_path):
    """The attack: a coordinator compares two answers' audit heads to count the events between them (three
    consent withdrawals here). The answer names the head by its hash only, and a governance refusal says
    nothing of which entries or rows disagree."""
    node = _node(prepared_site, tmp_path)
    spec = study(training={"rounds": 2})
    before = node.train(instruction(spec), _start(node, spec)).answer  # unapproved: refused, audited
    for person_id in (1, 2, 3):
        node.governance.withdrawals.withdraw(person_id, "steward")
        node.governance.audit.append("consent-withdrawn", {"person_id": person_id})
    after = node.train(instruction(spec, server_round=2), _start(node, spec)).answer
    for answer in (before, after):
        assert answer.audit_hash and set(answer.model_dump()) >= {"audit_hash"}
        assert not any(isinstance(v, int) and not isinstance(v, bool) for v in answer.model_dump().values())
    assert before.audit_hash != after.audit_hash
    table = node.governance.store.tables["audit"]
    with node.governance.store.engine.begin() as connection:
        connection.execute(table.update().where(table.c.kind == "consent-withdrawn").values(payload="{}"))
    refused = node.train(instruction(spec, server_round=3), _start(node, spec)).answer
    assert refused.code == RefusalCode.GOVERNANCE_INCONSISTENT
    assert "consent" not in refused.reason and "entry" not in refused.reason
