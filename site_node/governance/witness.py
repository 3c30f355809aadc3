"""The consortium as a witness of a site's audit chain.

Every answer a site sends names its audit head (the newest entry's seq and hash) and the coordinator keeps
it in the run's receipts, outside the site. Whoever holds the site's audit key and its database could
rewrite the chain so that it verifies on its own; they cannot change what the consortium already saw. This
module checks a site's chain against those receipts: every head the consortium saw must still be an entry
of the chain (the hash covers the entry's number and everything before it, so it cannot move).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from federation.contract.receipts import read_receipts
from site_node.governance.audit import AuditLog


class ReceiptsError(ValueError):
    """The receipts file cannot be read; the message names it."""


@dataclass
class WitnessReport:
    """How the site's chain compares with the heads the consortium recorded for it."""

    receipts_file: Path
    site_id: str
    heads_seen: int = 0  # answers of this site that named an audit head
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_against_receipts(audit: AuditLog, site_id: str, receipts_file: Path) -> WitnessReport:
    """Compare the chain with every audit head the receipts hold for `site_id`."""
    receipts_file = Path(receipts_file)
    if not receipts_file.is_file():
        raise ReceiptsError(f"{receipts_file}: no such receipts file.")
    try:
        receipts = read_receipts(receipts_file)
    except (OSError, ValueError, ValidationError) as exc:
        reason = str(exc).splitlines()[0]
        raise ReceiptsError(
            f"{receipts_file}: the receipts cannot be read ({reason}); use the receipts.jsonl the coordinator "
            "wrote for the run (in its run folder)."
        ) from None
    report = WitnessReport(receipts_file, site_id)
    chain = {entry.hash for entry in audit.entries()}
    for receipt in receipts:
        for site in receipt.sites:
            if site.site_id != site_id or site.audit_hash is None:
                continue
            report.heads_seen += 1
            if site.audit_hash not in chain:
                where = f"round {receipt.server_round} {receipt.phase} of run '{receipt.run_name}'"
                report.problems.append(
                    f"{where}: the consortium saw this site's audit head {site.audit_hash[:16]}, and no entry of "
                    "the chain has that hash: entries were removed or rewritten after that round, or the "
                    "governance database was replaced."
                )
    return report
