"""The audit log: every governance decision and everything that left the site, in a signed hash chain.

Each entry's hash covers the previous entry's hash and the entry itself (sequence number, time, kind,
payload as canonical JSON), so editing, deleting or reordering rows in the database breaks the chain
at a place `verify` can name. Deleting the newest entries leaves a shorter chain that is still
consistent, so the sequence number and hash of the newest entry are also written to a head file kept
outside the database; a chain that ends before the head file says has been truncated.

Each entry and the head file are signed with the site's audit key (site_node.governance.audit_key), a
file kept outside the database: an entry added past the head, or a chain and head rewritten together,
cannot carry a valid signature without that key. Whoever holds the key file *and* the database can still
rewrite everything; each round's answer therefore names the site's audit head, the consortium keeps it in
its receipts, and `twinfed site audit verify --receipts` checks the chain against what the consortium saw.

There is deliberately no update or delete API.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, insert, select
from sqlalchemy.engine import Connection, Row

from site_node.governance.audit_key import AuditKey, AuditKeyError, create_audit_key, load_audit_key
from site_node.governance.store import GovernanceStore, parse_time, utc_now

GENESIS = "0" * 64


@dataclass(frozen=True)
class AuditEntry:
    """One link of the chain."""

    seq: int
    at: datetime | None  # UTC; hashed as `at.isoformat(timespec="microseconds")`; None if the stored text was edited
    kind: str
    payload: dict[str, Any]
    prev_hash: str
    hash: str
    signature: str | None = None

    @property
    def when(self) -> str:
        """The time for a person to read, or a mark that the stored time is not a time any more."""
        return self.at.isoformat(timespec="seconds") if self.at is not None else "(time edited)"


@dataclass(frozen=True)
class AuditHead:
    """What the head file records: the newest entry, from which entry on the chain is signed, and its signature."""

    seq: int
    hash: str
    signed_from: int | None = None
    signature: str | None = None

    def message(self) -> str:
        return f"audit-head:{self.seq}:{self.hash}:{self.signed_from}"


@dataclass
class AuditVerification:
    """The result of re-checking the chain; each problem names an entry and what is wrong with it."""

    ok: bool
    problems: list[str] = field(default_factory=list)
    entries: int = 0  # how many entries were checked
    head_checked: bool = False
    signed: bool = False  # entries from `signed_from` on carry valid signatures of the site's audit key
    signed_from: int | None = None
    notes: list[str] = field(default_factory=list)  # findings that are not tampering (e.g. entries before signing)
    head: AuditHead | None = None


class AuditHeadError(ValueError):
    """The head file cannot be read; the message names it and says what to do."""


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


def entry_message(digest: str) -> str:
    """What an entry's signature covers: its hash, which covers its seq, time, kind, payload and its past."""
    return f"audit-entry:{digest}"


def _safe_time(value: str) -> datetime | None:
    try:
        return parse_time(value)
    except (TypeError, ValueError):
        return None


def _entry(row: Row) -> AuditEntry:
    """An entry as stored; a payload or time edited into something unreadable is shown, never fatal."""
    try:
        payload = json.loads(row.payload)
    except (TypeError, ValueError):
        payload = None
    if not isinstance(payload, dict):
        payload = {"unreadable_payload": str(row.payload)}
    return AuditEntry(row.seq, _safe_time(row.at), row.kind, payload, row.prev_hash, row.hash, row.signature)


def default_key_file(head_file: Path) -> Path:
    """The audit key beside the head file: 'audit.head' -> 'audit.key' (both outside the database)."""
    return head_file.with_suffix(".key")


class AuditLog:
    """Append-only, hash-chained, signed log in the governance database, with a head file outside it.

    `key_file` holds the Ed25519 key that signs each entry and the head (default: beside the head file). A
    log with neither a head file nor a key file is a bare hash chain (unit tests of the chain itself).
    """

    def __init__(self, store: GovernanceStore, head_file: Path | None = None, key_file: Path | None = None) -> None:
        self.store = store
        self.table = store.tables["audit"]
        self.head_file = Path(head_file) if head_file is not None else None
        if key_file is None and self.head_file is not None:
            key_file = default_key_file(self.head_file)
        self.key_file = Path(key_file) if key_file is not None else None
        self._key: AuditKey | None = None
        self._pending: list[tuple[AuditEntry, int | None]] = []

    # --- key and head file ----------------------------------------------------------------------------

    def key(self) -> AuditKey | None:
        """The signing key, or None when this log has no key file or the key was never created."""
        if self._key is None and self.key_file is not None:
            self._key = load_audit_key(self.key_file)
        return self._key

    def _signing_key(self, head: AuditHead | None) -> AuditKey | None:
        """The key to sign the next entry with, created with a site's first signed entry. Once the chain has
        been signed it never goes on unsigned: a deleted key must be restored, not replaced."""
        if self.key_file is None:
            return None
        key = self.key()
        if key is not None:
            return key
        if head is not None and head.signed_from is not None:
            raise AuditKeyError(
                f"{self.key_file}: the audit signing key is missing, and this site's audit chain has been signed "
                f"since entry {head.signed_from}. Restore the key file from the site's key backup; a new key would "
                "leave every earlier entry unverifiable, so none is made."
            )
        self._key = create_audit_key(self.key_file)
        return self._key

    def head(self) -> AuditHead | None:
        """The head file's record of the newest entry, or None if it was never written."""
        if self.head_file is None or not self.head_file.exists():
            return None
        try:
            data = json.loads(self.head_file.read_text(encoding="utf-8"))
            signed_from = data.get("signed_from")
            signature = data.get("signature")
            return AuditHead(
                int(data["seq"]),
                str(data["hash"]),
                None if signed_from is None else int(signed_from),
                None if signature is None else str(signature),
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise AuditHeadError(
                f"{self.head_file}: the audit head file is unreadable ({type(exc).__name__}); it should hold the seq "
                "and hash of the newest audit entry. Restore it from a backup before trusting the audit log."
            ) from None

    def read_head(self) -> tuple[int, str] | None:
        """(seq, hash) of the newest entry as last recorded outside the database, or None if never written."""
        head = self.head()
        return None if head is None else (head.seq, head.hash)

    @contextmanager
    def _head_lock(self) -> Iterator[None]:
        """Serialise head-file writers on this machine, so two appenders never move the head backwards."""
        assert self.head_file is not None
        self.head_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.head_file.with_name(self.head_file.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _write_head(self, entry: AuditEntry, signed_from: int | None) -> None:
        """Atomically replace the head file, never moving it backwards (two appenders may race here)."""
        if self.head_file is None:
            return
        with self._head_lock():
            try:
                current = self.head()
            except AuditHeadError:
                current = None  # garbled: verify says so; the newest entry is what the head should hold now
            if current is not None and current.seq >= entry.seq:
                return
            head = AuditHead(entry.seq, entry.hash, signed_from)
            key = self.key() if signed_from is not None else None
            signature = key.sign(head.message()) if key is not None else None
            record = {"seq": head.seq, "hash": head.hash, "signed_from": signed_from, "signature": signature}
            fd, tmp = tempfile.mkstemp(dir=self.head_file.parent, prefix=self.head_file.name, suffix=".tmp")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as out:
                    json.dump(record, out)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(tmp, self.head_file)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise

    # --- writing --------------------------------------------------------------------------------------

    def append(self, kind: str, payload: dict[str, Any]) -> AuditEntry:
        """Add one entry at the end of the chain and record it in the head file."""
        with self.store.locked("audit") as connection:
            entry, signed_from = self._insert(connection, kind, payload)
        self._write_head(entry, signed_from)
        return entry

    @contextmanager
    def appending(self, connection: Connection) -> Iterator[Callable[[str, dict[str, Any]], AuditEntry]]:
        """Append entries inside a caller's transaction (the ledger's): they commit, or vanish, with its rows.

        Yields `add(kind, payload)`. The audit lock is taken in the caller's transaction on first use (callers
        take their own lock first and the audit lock second; nothing takes them the other way round). Call
        `flush_heads` once the caller's transaction has committed, to bring the head file up to date.
        """
        locked = False

        def add(kind: str, payload: dict[str, Any]) -> AuditEntry:
            nonlocal locked
            if not locked:
                self.store.take_lock(connection, "audit")
                locked = True
            entry, signed_from = self._insert(connection, kind, payload)
            self._pending.append((entry, signed_from))
            return entry

        yield add

    def flush_heads(self) -> None:
        """Write the head file for entries appended inside a transaction that has now committed."""
        pending, self._pending = self._pending, []
        if pending:
            entry, signed_from = max(pending, key=lambda item: item[0].seq)
            self._write_head(entry, signed_from)

    def discard_pending(self) -> None:
        """Forget entries of a transaction that rolled back: they were never written."""
        self._pending = []

    def _insert(self, connection: Connection, kind: str, payload: dict[str, Any]) -> tuple[AuditEntry, int | None]:
        """Write one entry after the newest (under the audit lock the caller holds).

        If the head file is ahead of the database (entries were deleted from the end), the chain continues
        from the head file's entry, so the gap stays visible to `verify` instead of being papered over.
        """
        if not kind or not isinstance(kind, str):
            raise ValueError("an audit entry needs a kind, e.g. 'study-approved'")
        if not isinstance(payload, dict):
            raise TypeError(f"an audit payload is a mapping, not a {type(payload).__name__}")
        text = canonical_json(payload)
        stored_payload = json.loads(text)  # exactly what a reader will get back, numpy scalars already converted
        last = connection.execute(select(self.table).order_by(self.table.c.seq.desc()).limit(1)).first()
        seq, prev_hash = (last.seq + 1, last.hash) if last is not None else (1, GENESIS)
        try:
            head = self.head()
        except AuditHeadError:
            head = None
        if head is not None and head.seq >= seq:
            seq, prev_hash = head.seq + 1, head.hash
        key = self._signing_key(head)
        signed_from = None
        if key is not None:
            signed_from = head.signed_from if head is not None and head.signed_from is not None else seq
        at = utc_now()
        digest = entry_hash(prev_hash, seq, at, kind, stored_payload)
        signature = key.sign(entry_message(digest)) if key is not None else None
        connection.execute(
            insert(self.table).values(
                seq=seq, at=at, kind=kind, payload=text, prev_hash=prev_hash, hash=digest, signature=signature
            )
        )
        return AuditEntry(seq, parse_time(at), kind, stored_payload, prev_hash, digest, signature), signed_from

    # --- reading --------------------------------------------------------------------------------------

    def entries(self, kind: str | None = None, since_seq: int = 0) -> list[AuditEntry]:
        """Entries in sequence order, optionally of one kind (or of kinds starting with 'prefix*'), after a seq."""
        query = select(self.table).where(self.table.c.seq > since_seq).order_by(self.table.c.seq)
        if kind is not None and kind.endswith("*"):
            query = query.where(self.table.c.kind.startswith(kind[:-1]))
        elif kind is not None:
            query = query.where(self.table.c.kind == kind)
        with self.store.engine.connect() as connection:
            return [_entry(row) for row in connection.execute(query)]

    def latest(self) -> AuditEntry | None:
        """The newest entry in the database (what a round's answer names as this site's audit head)."""
        with self.store.engine.connect() as connection:
            row = connection.execute(select(self.table).order_by(self.table.c.seq.desc()).limit(1)).first()
        return None if row is None else _entry(row)

    def count(self) -> int:
        with self.store.engine.connect() as connection:
            return int(connection.execute(select(func.count()).select_from(self.table)).scalar_one())

    def verify(self) -> AuditVerification:
        """Re-derive every hash, link and signature; name each entry edited, deleted, reordered, cut off or forged."""
        with self.store.engine.connect() as connection:
            rows = list(connection.execute(select(self.table).order_by(self.table.c.seq)))
        problems = _ChainCheck(rows).problems()
        result = AuditVerification(ok=False, problems=problems, entries=len(rows))
        head: AuditHead | None = None
        if self.head_file is not None:
            result.head_checked = True
            try:
                head = self.head()
            except AuditHeadError as exc:
                problems.append(str(exc))
                result.head_checked = False
        result.head = head
        try:
            key = self.key()
        except AuditKeyError as exc:
            problems.append(str(exc))
            key = None
        signatures = _SignatureCheck(rows, head, key, self.key_file)
        problems.extend(signatures.problems())
        result.notes.extend(signatures.notes)
        result.signed, result.signed_from = signatures.signed, signatures.signed_from
        if result.head_checked:
            problems.extend(_head_problems(rows, head, self.head_file, signatures.valid))
        result.ok = not problems
        return result


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


class _SignatureCheck:
    """Which entries carry a valid signature of the site's audit key, and which should and do not."""

    def __init__(self, rows: list[Row], head: AuditHead | None, key: AuditKey | None, key_file: Path | None) -> None:
        self.rows, self.head, self.key, self.key_file = rows, head, key, key_file
        self.notes: list[str] = []
        self.valid: set[int] = set()
        first_signed = next((row.seq for row in rows if row.signature), None)
        self.signed_from = head.signed_from if head is not None and head.signed_from is not None else first_signed
        self.signed = False

    def problems(self) -> list[str]:
        found: list[str] = []
        if self.key is None:
            if self.key_file is None:
                self.notes.append("signatures were not checked: no audit key file is configured for this check.")
                return found
            if self.signed_from is not None:
                found.append(
                    f"the audit chain is signed since entry {self.signed_from}, but the audit key "
                    f"{self.key_file} is missing: its signatures cannot be checked. "
                    "Restore the key file from the site's key backup."
                )
            elif self.rows:
                self.notes.append("the chain is not signed (this site has no audit key yet): it is hash-linked only.")
            return found
        key = self.key
        for row in self.rows:
            if row.signature and key.verifies(entry_message(row.hash), row.signature):
                self.valid.add(row.seq)
        if self.head is not None:
            if self.head.signed_from is not None and not key.verifies(self.head.message(), self.head.signature):
                found.append(
                    "the audit head file's signature is not the site's: the head file was rewritten without the "
                    "site's audit key (or with another key)."
                )
            elif self.head.signed_from is None and self.valid:
                found.append(
                    "the audit head file carries no signature although the chain's entries are signed: the head "
                    "file was rewritten without the site's audit key."
                )
        if self.signed_from is None:
            if self.rows:
                self.notes.append("no entry is signed yet: the next entry this site writes starts the signed chain.")
            return found
        unsigned = [row for row in self.rows if row.seq >= self.signed_from and row.seq not in self.valid]
        for row in unsigned:
            found.append(
                f"entry {row.seq} ({row.kind}, {row.at}) carries no valid signature of this site's audit key: it "
                "was written or rewritten by someone without the key, not by the site node."
            )
        if self.signed_from > 1:
            self.notes.append(
                f"entries 1-{self.signed_from - 1} were written before this site signed its chain: they are "
                "hash-linked, not signed."
            )
        self.signed = not unsigned
        return found


def _head_problems(rows: list[Row], head: AuditHead | None, head_file: Path | None, signed: set[int]) -> list[str]:
    """Truncation (the database ends before the head file's entry, or that entry differs) and additions (entries
    past the head file's entry that the site's key did not sign: the node writes the head after every entry, so
    only a crash between the two leaves an entry past it, and that entry carries the node's signature)."""
    if head is None:
        if rows:
            return [
                f"the audit head file {head_file} is missing although the log has {len(rows)} entries; "
                "restore it from a backup (truncation of the log cannot be checked without it)."
            ]
        return []
    last_seq = rows[-1].seq if rows else 0
    if last_seq < head.seq:
        cut = f"entry {head.seq} was" if last_seq + 1 == head.seq else f"entries {last_seq + 1}-{head.seq} were"
        return [
            f"the log was truncated: the head file {head_file} records entry {head.seq}, but the log ends at "
            f"entry {last_seq} ({cut} removed from the end, or the governance database was replaced)."
        ]
    found = []
    at_head = next((row for row in rows if row.seq == head.seq), None)
    if at_head is not None and at_head.hash != head.hash:
        found.append(
            f"entry {head.seq} does not match the head file {head_file}: the newest entry it recorded was replaced."
        )
    for row in rows:
        if row.seq > head.seq and row.seq not in signed:
            found.append(
                f"entry {row.seq} ({row.kind}, {row.at}) was added after the head file's newest entry {head.seq} "
                "without the site's signature: it was appended to the database by someone other than the site node."
            )
    return found
