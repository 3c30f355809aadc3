"""One site's governance in one object: the store, the steward's policy and everything built on them.

The site node opens this once at start-up; each part stays usable on its own (tests, the CLI) because
they share nothing but the store and the policy.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from site_node.governance.approvals import Approvals
from site_node.governance.audit import AuditLog
from site_node.governance.disclosure import DisclosureRegister
from site_node.governance.integrity import GovernanceInconsistent, IntegrityReport, check_integrity
from site_node.governance.ledger import PrivacyLedger
from site_node.governance.policy import SitePolicy, load_policy
from site_node.governance.store import GovernanceStore
from site_node.governance.withdrawals import ConsentWithdrawals, RoundMembership

if TYPE_CHECKING:
    from site_node.config import SiteConfig


class Governance:
    """Store, policy, approvals, privacy ledger, audit log, withdrawals, round membership and the register of
    released counts of one site."""

    def __init__(
        self,
        url: str,
        policy: SitePolicy | Path,
        audit_head_file: Path | None = None,
        schema: str | None = None,
        audit_key_file: Path | None = None,
    ) -> None:
        self.policy = policy if isinstance(policy, SitePolicy) else load_policy(Path(policy))
        self.store = GovernanceStore(url, schema=schema)
        self.approvals = Approvals(self.store)
        self.audit = AuditLog(self.store, audit_head_file, audit_key_file)
        self.ledger = PrivacyLedger(self.store, self.policy, self.audit)
        self.ledger.adopt_into_chain()  # a ledger from before its changes were chained: recorded once, here
        self.withdrawals = ConsentWithdrawals(self.store)
        self.membership = RoundMembership(self.store)
        self.disclosures = DisclosureRegister(self.store)

    @classmethod
    def of_site(cls, config: SiteConfig, policy: SitePolicy | None = None) -> Governance:
        """A site's governance as its site file places it (database, schema, head file, audit key)."""
        return cls(
            config.governance_db,
            policy if policy is not None else config.policy,
            audit_head_file=config.audit_head,
            schema=config.governance_schema,
            audit_key_file=config.audit_key,
        )

    def integrity(self) -> IntegrityReport:
        """The audit chain verified and the ledger compared with it (site_node.governance.integrity)."""
        return check_integrity(self.ledger, self.audit)

    def require_intact(self) -> IntegrityReport:
        """The integrity report, or `GovernanceInconsistent` when governance state and chain disagree."""
        report = self.integrity()
        if not report.ok:
            raise GovernanceInconsistent(report)
        return report

    def close(self) -> None:
        """Release database connections."""
        self.store.dispose()
