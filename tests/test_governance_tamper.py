"""The ledger and the audit chain against an operator's mistake and an attacker's edit, on SQLite and
PostgreSQL: a reservation held by a live process refuses a second taker; a study's budget follows its id
across versions; deleted or edited ledger rows, a replaced governance database and entries forged past the
head are found, and the node refuses to run; the consortium's receipts witness a rewritten chain."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from sqlalchemy import delete, insert, text, update

from site_node.governance import (
    AuditLog,
    BudgetRefused,
    Governance,
    GovernanceStore,
    PrivacyEvent,
    PrivacyLedger,
    RoundInProgress,
    SitePolicy,
)
from site_node.governance.audit import entry_hash

ROOT = Path(__file__).resolve().parents[1]
DELTA = 1e-5
ROUND = PrivacyEvent(noise_multiplier=1.0, sample_rate=0.05, steps=40)


@pytest.fixture
def governance(backend, tmp_path):
    """A site's governance as the node opens it: the database, a head file and an audit key outside it."""
    url, schema = backend
    opened = Governance(url, SitePolicy(), audit_head_file=tmp_path / "audit.head", schema=schema)
    yield opened
    opened.close()


def reopen(governance: Governance) -> Governance:
    """The same site opened again, as a new process (a restarted node, a CLI command) would."""
    return Governance(
        governance.store.url,
        governance.policy,
        audit_head_file=governance.audit.head_file,
        schema=governance.store.schema,
    )


def _spend(governance: Governance, lineage: str, study_hash: str, rounds: int) -> None:
    for n in range(rounds):
        reservation = governance.ledger.reserve(study_hash, f"r{n}", ROUND, DELTA, "rdp", 10.0, lineage=lineage)
        governance.ledger.commit(reservation)


def _tamper(store: GovernanceStore, statement) -> None:
    with store.engine.begin() as connection:
        connection.execute(statement)


# --- the lease ------------------------------------------------------------------------------------------

_HOLD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from site_node.governance import Governance, PrivacyEvent, SitePolicy
    url, schema, head = sys.argv[1], sys.argv[2] or None, Path(sys.argv[3])
    governance = Governance(url, SitePolicy(), audit_head_file=head, schema=schema)
    reservation = governance.ledger.reserve("study-a", "r1", PrivacyEvent(1.0, 0.05, 40), 1e-5, "rdp", 10.0)
    with governance.ledger.holding(reservation, every=0.5):
        print("holding", flush=True)
        time.sleep(120)  # training, as far as the ledger can tell
    """
)


def _holder(backend, tmp_path) -> subprocess.Popen:
    url, schema = backend
    child = subprocess.Popen(
        [sys.executable, "-c", _HOLD, url, schema or "", str(tmp_path / "audit.head")],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout.readline().strip() == "holding"
    return child


def test_a_round_held_by_a_live_process_refuses_a_second_taker(backend, governance, tmp_path):
    """Two train messages for one round: the one arriving while the other trains must not train too."""
    child = _holder(backend, tmp_path)
    try:
        with pytest.raises(RoundInProgress, match="being run at this site right now"):
            governance.ledger.reserve("study-a", "r1", ROUND, DELTA, "rdp", 10.0)
        time.sleep(1.5)  # the holder renews its lease; still refused
        with pytest.raises(RoundInProgress):
            governance.ledger.reserve("study-a", "r1", ROUND, DELTA, "rdp", 10.0)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    # the holder crashed: the retry takes the same reservation over at once (its process is seen to be gone)
    retry = governance.ledger.reserve("study-a", "r1", ROUND, DELTA, "rdp", 10.0)
    assert [r.id for r in governance.ledger.reservations()] == [retry.id]
    governance.ledger.commit(retry)
    assert governance.integrity().ok


def test_a_lapsed_lease_is_taken_over_and_the_old_holder_cannot_commit(governance):
    first = governance.ledger.reserve("study-a", "r1", ROUND, DELTA, "rdp", 10.0, holder="elsewhere:1:1:aa")
    with pytest.raises(RoundInProgress):
        governance.ledger.reserve("study-a", "r1", ROUND, DELTA, "rdp", 10.0)
    table = governance.store.tables["ledger"]
    _tamper(governance.store, update(table).values(lease_until="2000-01-01T00:00:00+00:00"))  # it lapsed
    second = governance.ledger.reserve("study-a", "r1", ROUND, DELTA, "rdp", 10.0)
    assert second.id == first.id and second.holder != first.holder
    with pytest.raises(Exception, match="taken over by another process"):
        governance.ledger.commit(first)
    governance.ledger.commit(second)


# --- the budget follows the study's lineage ------------------------------------------------------------


def test_a_new_version_of_a_study_inherits_its_spent_budget(governance):
    """'burn-1' spent 9.996 + 9.996 under a ceiling of 10 by re-approving after a title-only edit."""
    _spend(governance, "burn-1", "hash-v1" * 8, 8)
    spent = governance.ledger.spent("burn-1")
    inherited = governance.ledger.inherited("burn-1", "hash-v2" * 8, 10.0)
    assert inherited is not None and inherited.spent_epsilon == pytest.approx(spent)
    assert "shares that study's budget" in inherited.sentence()
    with pytest.raises(BudgetRefused, match=r"'burn-1' \(version hash-v2hash-\)"):
        for n in range(40):
            governance.ledger.reserve("hash-v2" * 8, f"r{n}", ROUND, DELTA, "rdp", spent + 0.5, lineage="burn-1")
    assert governance.ledger.spent("burn-1") <= spent + 0.5
    assert governance.ledger.spent("hash-v1" * 8) == governance.ledger.spent("burn-1")  # named by any version
    [budget] = governance.ledger.summary()
    assert budget.lineage == "burn-1" and budget.versions == ("hash-v1" * 8, "hash-v2" * 8)


def test_an_old_ledger_gets_its_lineage_from_the_approvals_and_is_adopted_into_the_chain(backend, tmp_path):
    url, schema = backend
    store = GovernanceStore(url, schema=schema)
    ledger, approvals = store.tables["ledger"], store.tables["approvals"]
    old_row = dict(
        study_hash="h1" * 32, round_key="r1", attempt=1, status="committed", noise_multiplier=1.0,
        sample_rate=0.05, steps=40, delta=DELTA, accountant="rdp", study_ceiling=10.0,
        projected_study_epsilon=1.0, projected_site_epsilon=1.0, reserved_at="2026-01-01T00:00:00+00:00",
        purpose="train", lineage="",
    )  # fmt: skip
    _tamper(store, insert(ledger).values(**old_row))
    _tamper(store, insert(approvals).values(study_hash="h1" * 32, study_id="old-study", approved_by="s", note="",
                                            approved_at="2026-01-01T00:00:00+00:00"))  # fmt: skip
    # as an earlier twinfed's database: its ledger has no lineage column at all
    name = f'"{schema}"."{ledger.name}"' if schema else f'"{ledger.name}"'
    index = f'"{schema}"."ix_gov_privacy_ledger_lineage"' if schema else '"ix_gov_privacy_ledger_lineage"'
    _tamper(store, text(f"DROP INDEX IF EXISTS {index}"))  # PostgreSQL drops it with the column
    _tamper(store, text(f'ALTER TABLE {name} DROP COLUMN "lineage"'))
    store.dispose()
    governance = Governance(url, SitePolicy(), audit_head_file=tmp_path / "audit.head", schema=schema)
    try:
        assert governance.ledger.reservations()[0].lineage == "old-study"
        assert [e.kind for e in governance.audit.entries()] == ["ledger-adopted"]
        assert governance.integrity().ok
        assert reopen(governance).audit.count() == 1, "adopted once"
    finally:
        governance.close()


# --- the ledger against the chain ------------------------------------------------------------------------


def test_deleted_ledger_rows_are_found_and_stop_the_node(governance):
    _spend(governance, "study-a", "h" * 64, 3)
    assert governance.integrity().ok
    _tamper(governance.store, delete(governance.store.tables["ledger"]))
    assert governance.ledger.spent("study-a") == 0  # what the attacker wanted
    report = reopen(governance).integrity()
    assert report.chain.ok, "the chain itself is intact: only the comparison can see this"
    assert not report.ok
    assert any("missing from the ledger" in p for p in report.problems)
    assert any("by the audit chain's record of its rounds" in p for p in report.problems)
    with pytest.raises(Exception, match="does not agree with its audit chain"):
        governance.require_intact()


def test_an_edited_ledger_row_is_named_field_by_field(governance):
    _spend(governance, "study-a", "h" * 64, 2)
    table = governance.store.tables["ledger"]
    _tamper(governance.store, update(table).where(table.c.id == 1).values(steps=1, status="released"))
    problems = governance.integrity().problems
    assert len([p for p in problems if "was edited after audit entry" in p]) == 1
    assert "steps 40 in the chain, 1 in the ledger" in problems[0] and "status 'committed'" in problems[0]


def test_a_replaced_governance_database_is_found(tmp_path):
    """Deleting the governance database made a new empty one without a word, and training went on."""
    db = tmp_path / "governance.sqlite"
    head = tmp_path / "audit.head"
    governance = Governance(f"sqlite:///{db}", SitePolicy(), audit_head_file=head)
    _spend(governance, "study-a", "h" * 64, 2)
    governance.close()
    db.unlink()
    fresh = Governance(f"sqlite:///{db}", SitePolicy(), audit_head_file=head)
    report = fresh.integrity()
    assert not report.ok and "governance database was replaced" in report.problems[0]
    fresh.close()


# --- the chain's head, key and signatures -------------------------------------------------------------


def _forge(store: GovernanceStore, seq: int, prev_hash: str, kind: str, payload: dict) -> None:
    at = "2026-12-01T10:00:00.000000+00:00"
    digest = entry_hash(prev_hash, seq, at, kind, payload)
    _tamper(
        store,
        insert(store.tables["audit"]).values(
            seq=seq, at=at, kind=kind, payload=json.dumps(payload), prev_hash=prev_hash, hash=digest
        ),
    )


def test_a_forged_entry_past_the_head_fails(governance):
    governance.audit.append("approved", {"study_id": "s"})
    last = governance.audit.append("revoked", {"study_id": "s"})
    _forge(governance.store, last.seq + 1, last.hash, "approved", {"study_id": "evil"})
    result = governance.audit.verify()
    assert not result.ok
    assert any("was added after the head file's newest entry" in p for p in result.problems)


def test_a_chain_and_head_rewritten_together_without_the_key_fail(governance, tmp_path):
    for n in range(3):
        governance.audit.append("approved", {"n": n})
    _tamper(governance.store, delete(governance.store.tables["audit"]))
    prev = "0" * 64
    for seq in (1, 2):  # a shorter, consistent history, as someone with the database and the folder writes it
        payload = {"n": seq, "rewritten": True}
        _forge(governance.store, seq, prev, "approved", payload)
        prev = entry_hash(prev, seq, "2026-12-01T10:00:00.000000+00:00", "approved", payload)
    (tmp_path / "audit.head").write_text(json.dumps({"seq": 2, "hash": prev, "signed_from": 1, "signature": "AAAA"}))
    result = governance.audit.verify()
    assert not result.ok
    assert any("head file's signature is not the site's" in p for p in result.problems)
    assert sum("carries no valid signature" in p for p in result.problems) == 2


def test_a_missing_key_is_named_and_the_chain_does_not_go_on_unsigned(governance, tmp_path):
    governance.audit.append("approved", {"n": 1})
    (tmp_path / "audit.key").unlink()
    again = reopen(governance)
    assert any("audit key" in p and "missing" in p for p in again.audit.verify().problems)
    with pytest.raises(Exception, match="Restore the key file"):
        again.audit.append("approved", {"n": 2})


def test_a_garbled_head_file_is_a_finding_not_a_crash(governance, tmp_path):
    governance.audit.append("approved", {"n": 1})
    (tmp_path / "audit.head").write_text('{"seq": "one", ')
    result = governance.audit.verify()
    assert not result.ok and "audit head file is unreadable" in result.problems[0]


def test_an_edited_time_is_shown_not_fatal(governance):
    governance.audit.append("round-trained", {"round": "r1", "epsilon_after": 0.5})
    table = governance.store.tables["audit"]
    _tamper(governance.store, update(table).values(at="yesterday", payload="{not json"))
    [entry] = governance.audit.entries()
    assert entry.at is None and entry.when == "(time edited)" and "unreadable_payload" in entry.payload
    assert "was edited" in governance.audit.verify().problems[0]


def test_audit_log_is_signed_by_default_and_verifies(governance):
    for n in range(3):
        governance.audit.append("approved", {"n": n})
    result = governance.audit.verify()
    assert result.ok and result.signed and result.signed_from == 1


def test_an_upgraded_chain_is_signed_from_its_next_entry(backend, tmp_path):
    url, schema = backend
    store = GovernanceStore(url, schema=schema)
    unsigned = AuditLog(store, tmp_path / "audit.head", key_file=tmp_path / "never-created.key")
    unsigned.key_file = None  # an earlier twinfed: no key at all
    unsigned.append("approved", {"n": 0})
    unsigned.append("approved", {"n": 1})
    upgraded = AuditLog(store, tmp_path / "audit.head")
    upgraded.append("approved", {"n": 2})
    result = upgraded.verify()
    assert result.ok and result.signed_from == 3
    assert any("entries 1-2 were written before this site signed" in n for n in result.notes)
    store.dispose()


def test_rows_deleted_before_an_upgrade_are_found_through_the_rounds_the_chain_records(backend, tmp_path):
    """An earlier twinfed did not chain its ledger: the round entries still say which rounds read data."""
    url, schema = backend
    store = GovernanceStore(url, schema=schema)
    old_ledger = PrivacyLedger(store, SitePolicy())  # an earlier twinfed: ledger changes not chained
    old_audit = AuditLog(store, tmp_path / "audit.head")
    reservation = old_ledger.reserve("h" * 64, "run-1:1", ROUND, DELTA, "rdp", 10.0)
    old_audit.append("round-started", {"study_hash": "h" * 64, "round": "run-1:1", "noise_multiplier": 1.0})
    old_ledger.commit(reservation)
    _tamper(store, delete(store.tables["ledger"]))
    store.dispose()
    governance = Governance(url, SitePolicy(), audit_head_file=tmp_path / "audit.head", schema=schema)
    try:
        problems = governance.integrity().problems
        assert any("records training round 'run-1:1'" in p and "budget was given back" in p for p in problems)
    finally:
        governance.close()
