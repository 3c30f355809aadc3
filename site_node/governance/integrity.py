"""Whether a site's governance state still agrees with its audit chain.

The ledger decides what may still be spent, so it is what someone would edit to get budget back: delete
its rows (every budget back to 0), mark a committed round released, lower a round's steps, or replace the
whole governance database with a new empty one. Each ledger change is chained in the same transaction
(entries 'ledger-*' carry the row as it then stood), so replaying the chain gives the ledger as the site
node left it; any difference from the table is an edit made behind the node's back. Together with the
chain's own verification (links, signatures, the head file outside the database) this is what the node
checks before it starts and before every round, and what `twinfed site audit verify` reports.

What it cannot see: someone holding the site's audit key and the database may rewrite both consistently.
The consortium's receipts (each answer names the site's audit head) are the witness for that case.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from sqlalchemy import select

from site_node.governance.audit import AuditEntry, AuditLog, AuditVerification
from site_node.governance.ledger import RELEASED, PrivacyLedger, row_state, study_epsilon


class GovernanceInconsistent(RuntimeError):
    """The governance database and the audit chain disagree: the site node does not run rounds."""

    def __init__(self, report: IntegrityReport) -> None:
        super().__init__(report.sentence())
        self.report = report


@dataclass
class IntegrityReport:
    """The chain's verification and the ledger's comparison with it; `ok` only when both hold."""

    chain: AuditVerification
    ledger_problems: list[str] = field(default_factory=list)
    ledger_rows_checked: int = 0

    @property
    def ok(self) -> bool:
        return self.chain.ok and not self.ledger_problems

    @property
    def problems(self) -> list[str]:
        return [*self.chain.problems, *self.ledger_problems]

    def sentence(self) -> str:
        first = self.problems[0] if self.problems else ""
        more = f" (and {len(self.problems) - 1} more finding(s))" if len(self.problems) > 1 else ""
        return (
            f"the site's governance state does not agree with its audit chain: {first}{more}. The site node runs "
            "no round until the data steward has restored the governance database and the audit files from a "
            "backup; `twinfed site audit verify` lists every finding."
        )


def _epsilon(states: list[dict[str, Any]]) -> float:
    """A lineage's epsilon from row states, by the ledger's own computation."""
    return study_epsilon([SimpleNamespace(**s) for s in states if s["status"] != RELEASED])


def chained_ledger(entries: list[AuditEntry]) -> tuple[dict[int, dict[str, Any]], dict[int, int]]:
    """The ledger as the chain recorded it: each row's last state, and the entry that recorded it."""
    states: dict[int, dict[str, Any]] = {}
    where: dict[int, int] = {}
    for entry in (e for e in entries if e.kind.startswith("ledger-")):
        rows = entry.payload.get("rows") if entry.kind == "ledger-adopted" else [entry.payload.get("row")]
        for state in rows or []:
            if isinstance(state, dict) and "id" in state:
                states[int(state["id"])] = state
                where[int(state["id"])] = entry.seq
    return states, where


def ledger_problems(ledger: PrivacyLedger, audit: AuditLog) -> tuple[list[str], int]:
    """Every difference between the ledger table and the ledger the chain records, in sentences."""
    entries = audit.entries()  # read once for both replays
    expected, where = chained_ledger(entries)
    with ledger.store.engine.connect() as connection:
        actual = {row.id: row_state(row) for row in connection.execute(select(ledger.table))}
    problems: list[str] = []
    for row_id, state in sorted(expected.items()):
        label = f"ledger row #{row_id} (round '{state['round_key']}' of study '{state['lineage']}', {state['purpose']})"
        if row_id not in actual:
            problems.append(
                f"{label}, recorded in audit entry {where[row_id]}, is missing from the ledger: rows were deleted, "
                "which gives back budget that was spent."
            )
            continue
        changed = [name for name in state if state[name] != actual[row_id].get(name)]
        if changed:
            diffs = ", ".join(
                f"{name} {state[name]!r} in the chain, {actual[row_id].get(name)!r} in the ledger" for name in changed
            )
            problems.append(f"{label} was edited after audit entry {where[row_id]} recorded it: {diffs}.")
    for row_id in sorted(set(actual) - set(expected)):
        state = actual[row_id]
        problems.append(
            f"ledger row #{row_id} (round '{state['round_key']}' of study '{state['lineage']}') is not in the audit "
            "chain: it was written to the database by something other than the site node."
        )
    problems.extend(_rounds_without_a_row(entries, actual))
    if problems:
        problems.extend(_spending_differences(expected, actual))
    return problems, len(actual)


def _rounds_without_a_row(entries: list[AuditEntry], actual: dict[int, dict[str, Any]]) -> list[str]:
    """Rounds the chain says read patient data (a training round started, a DP evaluation released) whose
    ledger row is missing or was given back. This holds for chains written before the ledger's changes
    were chained too, so rows deleted before an upgrade are found as well."""
    counted = {(s["study_hash"], s["round_key"]) for s in actual.values() if s["status"] != RELEASED}
    found = []
    for entry in (e for e in entries if e.kind in ("round-started", "evaluated")):
        payload = entry.payload
        if entry.kind == "evaluated":
            release = (payload.get("left_the_site") or {}).get("evaluation") or {}
            if release.get("mode") != "dp":
                continue  # an exact release spends no epsilon: it has no ledger row
        key = (payload.get("study_hash"), payload.get("round"))
        if None not in key and key not in counted:
            what = "training round" if entry.kind == "round-started" else "DP evaluation release"
            found.append(
                f"audit entry {entry.seq} records {what} '{key[1]}' of study {str(key[0])[:12]}, but the ledger has no "
                "row that counts it (deleted, or marked released after it read patient data): its budget was given "
                "back."
            )
    return found


def _spending_differences(expected: dict[int, dict[str, Any]], actual: dict[int, dict[str, Any]]) -> list[str]:
    """Per study, the epsilon the chain's rounds spent where the ledger now shows less."""
    chain_by, table_by = defaultdict(list), defaultdict(list)
    for state in expected.values():
        chain_by[state["lineage"]].append(state)
    for state in actual.values():
        table_by[state["lineage"]].append(state)
    found = []
    for lineage in sorted(chain_by):
        in_chain, in_table = _epsilon(chain_by[lineage]), _epsilon(table_by.get(lineage, []))
        if in_chain > in_table + 1e-9:
            found.append(
                f"study '{lineage}' has spent epsilon {in_chain:.3f} here by the audit chain's record of its rounds, "
                f"but the ledger shows {in_table:.3f}."
            )
    return found


def check_integrity(ledger: PrivacyLedger, audit: AuditLog) -> IntegrityReport:
    """Verify the chain (links, signatures, head file) and compare the ledger with it."""
    chain = audit.verify()
    problems, rows = ledger_problems(ledger, audit)
    return IntegrityReport(chain=chain, ledger_problems=problems, ledger_rows_checked=rows)
