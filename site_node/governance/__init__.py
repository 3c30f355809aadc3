"""Governance a hospital owns: the steward's policy, study approvals, the privacy ledger that refuses,
the hash-chained audit log, consent withdrawals and round membership, all in the site's own database.

Nothing here is advisory: an unapproved study, a round past a ceiling or a tampered log is an error the
site node acts on, and each error is a sentence the data steward can act on too.
"""

from site_node.governance.accounting import PrivacyEvent
from site_node.governance.approvals import Approval, ApprovalError, Approvals
from site_node.governance.audit import AuditEntry, AuditLog, AuditVerification
from site_node.governance.disclosure import DisclosureRegister
from site_node.governance.integrity import GovernanceInconsistent, IntegrityReport
from site_node.governance.ledger import (
    BudgetRefused,
    LedgerError,
    PrivacyLedger,
    Reservation,
    RoundAlreadyTrained,
    RoundInProgress,
    StudyBudget,
)
from site_node.governance.policy import PolicyError, SitePolicy, load_policy, parse_policy, suppress_small_counts
from site_node.governance.site import Governance
from site_node.governance.store import GovernanceStore
from site_node.governance.withdrawals import ConsentWithdrawals, RoundMembership, Withdrawal

__all__ = [
    "Approval",
    "ApprovalError",
    "Approvals",
    "AuditEntry",
    "AuditLog",
    "AuditVerification",
    "BudgetRefused",
    "ConsentWithdrawals",
    "DisclosureRegister",
    "Governance",
    "GovernanceInconsistent",
    "GovernanceStore",
    "IntegrityReport",
    "LedgerError",
    "PolicyError",
    "PrivacyEvent",
    "PrivacyLedger",
    "Reservation",
    "RoundAlreadyTrained",
    "RoundInProgress",
    "RoundMembership",
    "SitePolicy",
    "StudyBudget",
    "Withdrawal",
    "load_policy",
    "parse_policy",
    "suppress_small_counts",
]
