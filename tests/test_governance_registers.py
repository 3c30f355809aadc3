"""Approvals, consent withdrawals and round membership round-trip through the governance database
(SQLite and PostgreSQL), and the `Governance` bundle opens them all from a site's URL and policy file."""

from __future__ import annotations

import pytest

from omop_etl.database import DatabaseUnavailable
from site_node.governance import (
    ApprovalError,
    Approvals,
    ConsentWithdrawals,
    Governance,
    GovernanceStore,
    RoundMembership,
)

STUDY = "5f" * 32


@pytest.fixture
def store(backend):
    opened = GovernanceStore(*backend)
    yield opened
    opened.dispose()


def test_a_study_is_approved_by_hash_revoked_and_approved_again(store):
    approvals = Approvals(store)
    assert not approvals.is_approved(STUDY)
    first = approvals.approve(STUDY, "inpatient-mortality", "dr.steward", note="IRB 2025-117")
    assert approvals.is_approved(STUDY) and not approvals.is_approved("other")
    assert approvals.approve(STUDY, "inpatient-mortality", "someone.else") == first  # already approved: unchanged
    revoked = approvals.revoke(STUDY, by="dr.steward", reason="sponsor changed the outcome definition")
    assert not approvals.is_approved(STUDY) and not revoked.active
    assert revoked.revoke_reason == "sponsor changed the outcome definition"
    with pytest.raises(ApprovalError, match="nothing to revoke"):
        approvals.revoke(STUDY, by="dr.steward", reason="again")
    second = approvals.approve(STUDY, "inpatient-mortality", "dr.steward")
    listed = approvals.list()
    assert [a.id for a in listed] == [first.id, second.id]
    assert listed[0].note == "IRB 2025-117" and listed[0].revoked_by == "dr.steward" and listed[1].active
    assert listed[0].approved_at.tzinfo is not None


def test_an_approval_must_name_who_approves(store):
    with pytest.raises(ApprovalError, match="who approves"):
        Approvals(store).approve(STUDY, "s", " ")


def test_withdrawals_are_kept_once_with_their_first_date(store):
    withdrawals = ConsentWithdrawals(store)
    first = withdrawals.withdraw(1001, "records.office", "letter of 3 March")
    assert withdrawals.withdraw(1001, "someone.else") == first
    withdrawals.withdraw(2002, "records.office")
    assert withdrawals.person_ids() == {1001, 2002}
    assert [(w.person_id, w.recorded_by) for w in withdrawals.list()] == [
        (1001, "records.office"),
        (2002, "records.office"),
    ]
    with pytest.raises(ValueError, match="whole number"):
        withdrawals.withdraw(1.5, "records.office")


def test_membership_tells_which_rounds_included_a_withdrawn_person(store):
    membership = RoundMembership(store)
    assert membership.record(STUDY, "round-1", range(1, 25_001)) == 25_000
    membership.record(STUDY, "round-2", [3, 4, 5])
    membership.record("other-study", "round-1", (p for p in [4, 9]))
    assert membership.record(STUDY, "round-2", [5, 30_000]) == 1  # a retry adds, never forgets
    assert membership.members(STUDY, "round-2") == {3, 4, 5, 30_000}
    rounds = membership.rounds_including(4)
    assert {(s, r) for s, r, _ in rounds} == {(STUDY, "round-1"), (STUDY, "round-2"), ("other-study", "round-1")}
    assert [(s, r) for s, r, _ in membership.rounds_including(30_000)] == [(STUDY, "round-2")]
    assert membership.rounds_including(99_999) == []


def test_governance_opens_every_register_from_a_url_and_policy_file(backend, tmp_path):
    url, schema = backend
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text("study_epsilon_ceiling: 3\nmin_cell_count: 20\n", encoding="utf-8")
    governance = Governance(url, policy_file, audit_head_file=tmp_path / "head.json", schema=schema)
    try:
        assert governance.policy.study_epsilon_ceiling == 3 and governance.ledger.policy is governance.policy
        governance.approvals.approve(STUDY, "s", "steward")
        governance.withdrawals.withdraw(7, "steward")
        governance.audit.append("study-approved", {"study_hash": STUDY})
        again = Governance(url, governance.policy, audit_head_file=tmp_path / "head.json", schema=schema)
        assert again.approvals.is_approved(STUDY) and again.withdrawals.person_ids() == {7}
        assert again.audit.verify().ok and again.ledger.summary() == []
        again.close()
    finally:
        governance.close()


def test_an_unreachable_governance_database_is_a_sentence(tmp_path):
    with pytest.raises(DatabaseUnavailable, match="governance database") as error:
        GovernanceStore(f"sqlite:///{tmp_path / 'no-such-folder' / 'governance.sqlite'}")
    assert "no-such-folder" in str(error.value)
