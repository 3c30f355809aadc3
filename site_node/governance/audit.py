"""The audit log: every governance decision and everything that left the site, in a hash chain.

Each entry's hash covers the previous entry's hash and the entry itself (sequence number, time, kind,
payload as canonical JSON), so editing, deleting or reordering rows in the database breaks the chain
at a place `verify` can name. Deleting the newest entries leaves a shorter chain that is still
consistent, so the sequence number and hash of the newest entry are also written to a head file kept
outside the database; a chain that ends before the head file says has been truncated.

The chain makes tampering evident to anyone who re-verifies; it does not stop someone with write access
to both the database and the head file from rewriting everything. Keep the head file where the
database's users cannot write (or copy it off the machine) for the truncation check to mean something.

There is deliberately no update or delete API.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, insert, select
from sqlalchemy.engine import Row

from site_node.governance.store import GovernanceStore, parse_time, utc_now

GENESIS = "0" * 64


@dataclass(frozen=True)
class AuditEntry:
    """One link of the chain."""

    seq: int
    at: datetime  # UTC; hashed as `at.isoformat(timespec="microseconds")`
    kind: str
    payload: dict[str, Any]
    prev_hash: str
    hash: str


@dataclass
class AuditVerification:
    """The result of re-checking the chain; each problem names an entry and what is wrong with it."""

    ok: bool
    problems: list[str] = field(default_factory=list)
    entries: int = 0  # how many entries were checked
    head_checked: bool = False


def _json_default(value: object) -> object:
    """Values a payload may reasonably carry that JSON has no type for (numpy scalars, paths, times)."""
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, set | frozenset):
        return sorted(value)
    raise TypeError(f"an audit payload holds a {type(value).__name__}, which cannot be written as JSON")


def canonical_json(value: object) -> str:
    """One text for one value: sorted keys, no spaces, so the same payload always hashes the same."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_json_default)


def entry_hash(prev_hash: str, seq: int, at: str, kind: str, payload: dict[str, Any]) -> str:
    """sha256 over the previous hash and the canonical JSON of this entry's seq, time, kind and payload."""
    body = canonical_json({"seq": seq, "at": at, "kind": kind, "payload": payload})
    return hashlib.sha256((prev_hash + body).encode("utf-8")).hexdigest()


def _entry(row: Row) -> AuditEntry:
    return AuditEntry(row.seq, parse_time(row.at), row.kind, json.loads(row.payload), row.prev_hash, row.hash)


class AuditLog:
    """Append-only, hash-chained log in the governance database, with an optional head file."""

    def __init__(self, store: GovernanceStore, head_file: Path | None = None) -> None:
        self.store = store
        self.table = store.tables["audit"]
        self.head_file = Path(head_file) if head_file is not None else None

    # --- head file ------------------------------------------------------------------------------------

    def read_head(self) -> tuple[int, str] | None:
        """(seq, hash) of the newest entry as last recorded outside the database, or None if never written."""
        if self.head_file is None or not self.head_file.exists():
            return None
        try:
            data = json.loads(self.head_file.read_text(encoding="utf-8"))
            return int(data["seq"]), str(data["hash"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(
                f"{self.head_file}: the audit head file is unreadable ({exc}); it should hold the seq and hash "
                "of the newest audit entry. Restore it from a backup before trusting the audit log."
            ) from None

    def _write_head(self, seq: int, digest: str) -> None:
        """Atomically replace the head file, never moving it backwards (two appenders may race here)."""
        if self.head_file is None:
            return
        current = self.read_head()
        if current is not None and current[0] >= seq:
            return
        self.head_file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.head_file.parent, prefix=self.head_file.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump({"seq": seq, "hash": digest}, out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.head_file)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    # --- writing --------------------------------------------------------------------------------------

    def append(self, kind: str, payload: dict[str, Any]) -> AuditEntry:
        """Add one entry at the end of the chain and record it in the head file.

        If the head file is ahead of the database (entries were deleted from the end), the chain continues
        from the head file's entry, so the gap stays visible to `verify` instead of being papered over.
        """
        if not kind or not isinstance(kind, str):
            raise ValueError("an audit entry needs a kind, e.g. 'study-approved'")
        if not isinstance(payload, dict):
            raise TypeError(f"an audit payload is a mapping, not a {type(payload).__name__}")
        text = canonical_json(payload)
        stored_payload = json.loads(text)  # exactly what a reader will get back, numpy scalars already converted
        with self.store.locked("audit") as connection:
            last = connection.execute(select(self.table).order_by(self.table.c.seq.desc()).limit(1)).first()
            seq, prev_hash = (last.seq + 1, last.hash) if last is not None else (1, GENESIS)
            head = self.read_head()
            if head is not None and head[0] >= seq:
                seq, prev_hash = head[0] + 1, head[1]
            at = utc_now()
            digest = entry_hash(prev_hash, seq, at, kind, stored_payload)
            connection.execute(
                insert(self.table).values(seq=seq, at=at, kind=kind, payload=text, prev_hash=prev_hash, hash=digest)
            )
        self._write_head(seq, digest)
        return AuditEntry(seq, parse_time(at), kind, stored_payload, prev_hash, digest)

    # --- reading --------------------------------------------------------------------------------------

    def entries(self, kind: str | None = None, since_seq: int = 0) -> list[AuditEntry]:
        """Entries in sequence order, optionally of one kind and after a sequence number."""
        query = select(self.table).where(self.table.c.seq > since_seq).order_by(self.table.c.seq)
        if kind is not None:
            query = query.where(self.table.c.kind == kind)
        with self.store.engine.connect() as connection:
            return [_entry(row) for row in connection.execute(query)]

    def count(self) -> int:
        with self.store.engine.connect() as connection:
            return int(connection.execute(select(func.count()).select_from(self.table)).scalar_one())

    def verify(self) -> AuditVerification:
        """Re-derive every hash and link; name each entry that was edited, deleted, reordered or cut off."""
        with self.store.engine.connect() as connection:
            rows = list(connection.execute(select(self.table).order_by(self.table.c.seq)))
        problems = _ChainCheck(rows).problems()
        head_checked = False
        if self.head_file is not None:
            head_checked = True
            problems.extend(_head_problems(rows, self.read_head(), self.head_file))
        return AuditVerification(ok=not problems, problems=problems, entries=len(rows), head_checked=head_checked)


def _recompute(row: Row, seq: int) -> str | None:
    """The hash the row would have at `seq`, or None if its payload is no longer valid JSON."""
    try:
        payload = json.loads(row.payload)
    except ValueError:
        return None
    return entry_hash(row.prev_hash, seq, row.at, row.kind, payload)


class _ChainCheck:
    """Classifies each broken link; kept apart from `AuditLog` because the reasoning is the subtle part."""

    def __init__(self, rows: list[Row]) -> None:
        self.rows = rows
        self.by_hash = {row.hash: row for row in rows}
        self._written_seq: dict[int, int | None] = {}

    def written_seq(self, row: Row) -> int | None:
        """The seq this row was written with, found through the chain when it no longer sits there.

        A row that verifies where it is was written there. Otherwise its predecessor (found by
        `prev_hash`) tells which seq it had: one after the predecessor's. None means the content
        itself changed (or its predecessor is gone), i.e. the row was edited.
        """
        chain: list[Row] = []
        current: Row | None = row
        answer: int | None = None
        while current is not None and current.seq not in self._written_seq:
            if _recompute(current, current.seq) == current.hash:
                self._written_seq[current.seq] = current.seq
                break
            chain.append(current)
            if current.prev_hash == GENESIS:
                current = None
                answer = 0
                break
            current = self.by_hash.get(current.prev_hash)
            if current is not None and current in chain:  # a cycle of forged links
                current = None
        if current is not None:
            answer = self._written_seq[current.seq]
        for link in reversed(chain):
            candidate = None if answer is None else answer + 1
            answer = candidate if candidate is not None and _recompute(link, candidate) == link.hash else None
            self._written_seq[link.seq] = answer
        return self._written_seq[row.seq]

    def problems(self) -> list[str]:
        found: list[str] = []
        moved: set[int] = set()
        previous: Row | None = None
        for row in self.rows:
            expected_seq = previous.seq + 1 if previous is not None else 1
            if row.seq > expected_seq:
                missing = (
                    f"entry {expected_seq} is"
                    if row.seq == expected_seq + 1
                    else f"entries {expected_seq}-{row.seq - 1} are"
                )
                found.append(
                    f"{missing} missing: deleted from the log (entry {row.seq} follows entry {expected_seq - 1})."
                )
            written = self.written_seq(row)
            if written is None:
                found.append(
                    f"entry {row.seq} ({row.kind}, {row.at}) was edited: its content no longer matches its hash."
                )
            elif written != row.seq:
                moved.add(row.seq)
                found.append(
                    f"entry {row.seq} ({row.kind}, {row.at}) was written as entry {written}: entries were reordered."
                )
            elif previous is None and row.seq == 1 and row.prev_hash != GENESIS:
                found.append("entry 1 does not start the chain: earlier entries were removed and the rest renumbered.")
            elif (
                previous is not None
                and row.seq == previous.seq + 1
                and previous.seq not in moved
                and row.prev_hash != previous.hash
            ):
                found.append(
                    f"entry {row.seq} does not follow entry {previous.seq}: entry {previous.seq} was replaced "
                    "or its hash rewritten."
                )
            previous = row
        return found


def _head_problems(rows: list[Row], head: tuple[int, str] | None, head_file: Path) -> list[str]:
    """Truncation: the database ends before the entry the head file recorded, or that entry differs."""
    if head is None:
        if rows:
            return [
                f"the audit head file {head_file} is missing although the log has {len(rows)} entries; "
                "restore it from a backup (truncation of the log cannot be checked without it)."
            ]
        return []
    head_seq, head_hash = head
    last_seq = rows[-1].seq if rows else 0
    if last_seq < head_seq:
        cut = f"entry {head_seq} was" if last_seq + 1 == head_seq else f"entries {last_seq + 1}-{head_seq} were"
        return [
            f"the log was truncated: the head file {head_file} records entry {head_seq}, but the log ends at "
            f"entry {last_seq} ({cut} removed from the end)."
        ]
    at_head = next((row for row in rows if row.seq == head_seq), None)
    if at_head is not None and at_head.hash != head_hash:
        return [
            f"entry {head_seq} does not match the head file {head_file}: the newest entry it recorded was replaced."
        ]
    return []
