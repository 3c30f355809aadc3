"""One site's governance in one object: the store, the steward's policy and everything built on them.

The site node opens this once at start-up; each part stays usable on its own (tests, the CLI) because
they share nothing but the store and the policy.
"""

from __future__ import annotations

from pathlib import Path

from site_node.governance.approvals import Approvals
from site_node.governance.audit import AuditLog
from site_node.governance.disclosure import DisclosureRegister
from site_node.governance.ledger import PrivacyLedger
from site_node.governance.policy import SitePolicy, load_policy
from site_node.governance.store import GovernanceStore
from site_node.governance.withdrawals import ConsentWithdrawals, RoundMembership


class Governance:
    """Store, policy, approvals, privacy ledger, audit log, withdrawals, round membership and the register of
    released counts of one site."""

    def __init__(
        self,
        url: str,
        policy: SitePolicy | Path,
        audit_head_file: Path | None = None,
        schema: str | None = None,
    ) -> None:
        self.policy = policy if isinstance(policy, SitePolicy) else load_policy(Path(policy))
        self.store = GovernanceStore(url, schema=schema)
        self.approvals = Approvals(self.store)
        self.ledger = PrivacyLedger(self.store, self.policy)
        self.audit = AuditLog(self.store, audit_head_file)
        self.withdrawals = ConsentWithdrawals(self.store)
        self.membership = RoundMembership(self.store)
        self.disclosures = DisclosureRegister(self.store)

    def close(self) -> None:
        """Release database connections."""
        self.store.dispose()
