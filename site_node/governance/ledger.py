"""The privacy ledger: a site's epsilon across every round, restart and study, and the refusal to overspend.

A round is *reserved* (durably, before any patient data is read), then *committed* once trained, or
*released* if it failed before touching data. A reserved round that was never resolved (the process
was killed mid-round) keeps counting: the ledger may over-count after a crash, never under-count. A
retry of the same round key gets the same reservation back, so it is counted once.

Epsilon is recomputed from the stored events with Opacus's accountants (`accounting`), per study; the
site total is the sum over studies (basic composition), and each study's epsilon is stated at the
smallest delta any of its rounds used, the strictest reading of its guarantee.

A study's budget belongs to its *lineage*: its id at this site, shared by every version (hash) of it. A
re-approved edit, or the new hashes a twinfed upgrade gives every study, inherits what the earlier
versions spent, so no edit opens a fresh budget on the same patients.

A reservation held by a live training carries a *lease* (its holder and an expiry, renewed while it
trains): a second taker of the same round is refused while the lease is live, so two messages for one
round never train twice for one charge; a crashed holder's lease lapses (at once on the same machine,
where the holder's process is seen to be gone) and a retry takes the reservation over.

Every change to the ledger is written to the audit chain in the same transaction (entries 'ledger-*'
carrying the row as it now stands), so `site_node.governance.integrity` can replay the chain and find
rows deleted, edited or inserted behind the site node's back.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import BaseModel
from sqlalchemy import insert, select, update
from sqlalchemy.engine import Connection, Row

from site_node.governance.accounting import PrivacyEvent, check_accountant, epsilon_of
from site_node.governance.audit import AuditLog
from site_node.governance.policy import SitePolicy
from site_node.governance.store import GovernanceStore, parse_time, utc_now

__all__ = [
    "BudgetRefused",
    "Inheritance",
    "LedgerError",
    "PrivacyEvent",
    "PrivacyLedger",
    "Reservation",
    "RoundAlreadyTrained",
    "RoundInProgress",
    "StudyBudget",
]

RESERVED, COMMITTED, RELEASED = "reserved", "committed", "released"
# What a row's budget paid for. Training and evaluation releases compose in one accountant per study (the
# figure the ceilings bind); each alone is shown too. A non-private round has no epsilon: it is kept so
# the ledger says it happened, and it never enters an epsilon figure (which would otherwise be infinite).
TRAIN, EVALUATE, NON_PRIVATE = "train", "evaluate", "non-private"
PURPOSES = (TRAIN, EVALUATE, NON_PRIVATE)
LEASE_SECONDS = 120.0  # how long a reservation's holder may go without renewing before a retry may take it
# The fields of a ledger row that decide what was spent: written to the audit chain with every change, and
# compared with the chain by the integrity check. The lease (holder, expiry) is bookkeeping, not spending.
STATE_FIELDS = (
    "id",
    "study_hash",
    "lineage",
    "round_key",
    "attempt",
    "status",
    "purpose",
    "noise_multiplier",
    "sample_rate",
    "steps",
    "delta",
    "accountant",
    "study_ceiling",
)


class BudgetRefused(Exception):
    """The ledger will not let this round run; `reason` is a sentence for the data steward."""

    def __init__(
        self,
        reason: str,
        *,
        limit: float | None = None,
        spent: float | None = None,
        projected: float | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.limit = limit
        self.spent = spent
        self.projected = projected


class RoundAlreadyTrained(BudgetRefused):
    """This round key was trained and committed already; running it again would spend its budget twice."""


class RoundInProgress(BudgetRefused):
    """Another live process holds this round's reservation and is training it now."""


class LedgerError(RuntimeError):
    """A reservation was used out of order (commit after release, release after commit)."""


@dataclass(frozen=True)
class Reservation:
    """Budget held for one round of one study; pass it back to `commit` or `release`."""

    id: int
    study_hash: str
    round_key: str
    attempt: int
    event: PrivacyEvent
    delta: float
    accountant: str
    study_ceiling: float
    projected_study_epsilon: float
    projected_site_epsilon: float
    reserved_at: datetime
    status: str
    purpose: str = TRAIN
    lineage: str = ""
    holder: str | None = None  # who holds the lease (host:pid:start:token) while the round trains


@dataclass(frozen=True)
class StudyBudget:
    """One study's spending at this site, all its versions together, for the data steward's overview."""

    study_hash: str  # the latest version's hash
    committed_epsilon: float
    reserved_epsilon: float  # what unresolved reservations add on top of the committed rounds
    total_epsilon: float  # committed and reserved together: what the ceilings are checked against
    ceiling: float
    delta: float
    accountant: str
    committed_rounds: int
    reserved_rounds: int
    released_rounds: int
    training_epsilon: float = 0.0  # the training rounds alone (committed and reserved)
    evaluation_epsilon: float = 0.0  # the evaluation releases alone
    evaluation_releases: int = 0
    non_private_rounds: int = 0  # rounds of a non-private study: not differentially private, no epsilon
    lineage: str = ""  # the study id at this site: every version below shares this budget
    versions: tuple[str, ...] = ()  # the study hashes that spent it, oldest first

    @property
    def rounds(self) -> int:
        """Rounds that count against the budget: committed and still reserved (released ones do not)."""
        return self.committed_rounds + self.reserved_rounds


class Inheritance(BaseModel):
    """What a re-approved study (a new version of the same study id) takes over from its earlier versions."""

    study_id: str
    earlier_versions: list[str]
    spent_epsilon: float
    training_epsilon: float
    evaluation_epsilon: float
    rounds: int
    ceiling: float

    def sentence(self) -> str:
        left = max(self.ceiling - self.spent_epsilon, 0.0)
        versions = ", ".join(v[:12] for v in self.earlier_versions)
        return (
            f"this is a new version of study '{self.study_id}', which already ran here as {versions}: it shares "
            f"that study's budget, of which {self.rounds} round(s) have spent epsilon {self.spent_epsilon:.3f} "
            f"(training {self.training_epsilon:.3f}, evaluation {self.evaluation_epsilon:.3f}); "
            f"{left:.3f} of its ceiling {self.ceiling:g} is left for every version together."
        )


def _event(row: Row) -> PrivacyEvent:
    return PrivacyEvent(noise_multiplier=row.noise_multiplier, sample_rate=row.sample_rate, steps=row.steps)


def _reservation(row: Row) -> Reservation:
    return Reservation(
        id=row.id,
        study_hash=row.study_hash,
        round_key=row.round_key,
        attempt=row.attempt,
        event=_event(row),
        delta=row.delta,
        accountant=row.accountant,
        study_ceiling=row.study_ceiling,
        projected_study_epsilon=row.projected_study_epsilon,
        projected_site_epsilon=row.projected_site_epsilon,
        reserved_at=parse_time(row.reserved_at),
        status=row.status,
        purpose=row.purpose,
        lineage=row.lineage,
        holder=row.holder,
    )


def study_epsilon(rows: list[Any]) -> float:
    """A study's epsilon over its active rows (ledger Rows, or anything with their attributes), at its smallest
    delta; the larger figure if accountants differ. Non-private rows have no epsilon and are left out (the
    summary counts them apart)."""
    rows = [r for r in rows if r.purpose != NON_PRIVATE]
    if not rows:
        return 0.0
    delta = min(r.delta for r in rows)
    events = [_event(r) for r in rows]
    return max(epsilon_of(events, delta, name) for name in {r.accountant for r in rows})


def row_state(row: Any) -> dict[str, Any]:
    """What a row spent, as the audit chain records it (a Row or a mapping with the STATE_FIELDS)."""
    get = row.get if isinstance(row, dict) else row._mapping.get
    state = {name: get(name) for name in STATE_FIELDS}
    for name in ("noise_multiplier", "sample_rate", "delta", "study_ceiling"):
        state[name] = float(state[name])
    for name in ("id", "attempt", "steps"):
        state[name] = int(state[name])
    return state


def new_holder() -> str:
    """This process's claim on a reservation: the machine, the process (with its start time, so a reused
    pid is not mistaken for the holder) and a token of its own."""
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{_process_start(pid)}:{secrets.token_hex(4)}"


def _process_start(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux), or '' where it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            return handle.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _holder_gone(holder: str) -> bool:
    """True when the holder ran on this machine and its process is no longer running (it crashed)."""
    try:
        host, pid_text, started, _token = holder.rsplit(":", 3)
        pid = int(pid_text)
    except ValueError:
        return False
    if host != socket.gethostname():
        return False  # another machine's process: only its lease's expiry can tell
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return bool(started) and _process_start(pid) != started


def _lease_live(row: Row, now: datetime) -> bool:
    if row.holder is None or row.lease_until is None:
        return False
    if parse_time(row.lease_until) <= now:
        return False
    return not _holder_gone(row.holder)


def _lease_until(now: datetime) -> str:
    return (now + timedelta(seconds=LEASE_SECONDS)).isoformat(timespec="microseconds")


def _short(study_hash: str) -> str:
    return study_hash[:12]


class PrivacyLedger:
    """Reserve, commit and release rounds against the study and site ceilings of a `SitePolicy`."""

    def __init__(self, store: GovernanceStore, policy: SitePolicy, audit: AuditLog | None = None) -> None:
        self.store = store
        self.policy = policy
        self.table = store.tables["ledger"]
        self.audit = audit  # where every change is chained; None only for tests of the ledger alone

    @contextmanager
    def _transaction(self) -> Iterator[tuple[Connection, Callable[[str, dict[str, Any]], object]]]:
        """The ledger lock, and an `add(kind, payload)` that chains entries in the same transaction."""
        try:
            with self.store.locked("ledger") as connection:
                if self.audit is None:
                    yield connection, lambda kind, payload: None
                else:
                    with self.audit.appending(connection) as add:
                        yield connection, add
        except BaseException:
            if self.audit is not None:
                self.audit.discard_pending()
            raise
        if self.audit is not None:
            self.audit.flush_heads()

    def _row(self, connection: Connection, row_id: int) -> Row:
        return connection.execute(select(self.table).where(self.table.c.id == row_id)).one()

    def adopt_into_chain(self) -> int:
        """Chain the rows of a ledger written before its changes were chained (an upgraded site), once.

        Returns how many rows were adopted (0 when the chain already records the ledger)."""
        if self.audit is None:
            return 0
        audit_table = self.store.tables["audit"]

        def needed(connection: Connection) -> bool:
            chained = connection.execute(
                select(audit_table.c.seq).where(audit_table.c.kind.startswith("ledger-")).limit(1)
            ).first()
            return chained is None and connection.execute(select(self.table.c.id).limit(1)).first() is not None

        with self.store.engine.connect() as connection:
            if not needed(connection):  # the usual case, read without taking the lock (or writing anything)
                return 0
        with self._transaction() as (connection, add):
            chained = connection.execute(
                select(audit_table.c.seq).where(audit_table.c.kind.startswith("ledger-")).limit(1)
            ).first()
            rows = list(connection.execute(select(self.table).order_by(self.table.c.id)))
            if chained is not None or not rows:
                return 0
            add(
                "ledger-adopted",
                {
                    "note": "ledger rows written before this twinfed chained every ledger change; from here on "
                    "the chain records each change and the integrity check compares the two",
                    "rows": [row_state(r) for r in rows],
                },
            )
        return len(rows)

    # --- accounting -----------------------------------------------------------------------------------

    def epsilon(self, history: list[PrivacyEvent], delta: float, accountant: str) -> float:
        """Epsilon of `history` at `delta` by the Opacus accountant named ('rdp' or 'prv')."""
        return epsilon_of(history, delta, accountant)

    def _active_rows(self, connection: Connection, study: str | None = None) -> list[Row]:
        """Rows that count (not released), of every study or of one study's lineage."""
        query = select(self.table).where(self.table.c.status != RELEASED).order_by(self.table.c.id)
        if study is not None:
            query = query.where(self.table.c.lineage == self._lineage_of(connection, study))
        return list(connection.execute(query))

    def _lineage_of(self, connection: Connection, study: str) -> str:
        """A study named by its id at this site or by the hash of any of its versions: its lineage."""
        lineage = connection.execute(
            select(self.table.c.lineage).where(self.table.c.study_hash == study).limit(1)
        ).scalar_one_or_none()
        return lineage if lineage is not None else study

    @staticmethod
    def _by_lineage(rows: list[Row]) -> dict[str, list[Row]]:
        grouped: dict[str, list[Row]] = defaultdict(list)
        for row in rows:
            grouped[row.lineage].append(row)
        return grouped

    # --- reserving ------------------------------------------------------------------------------------

    def _check_policy(self, event: PrivacyEvent, delta: float) -> None:
        if delta > self.policy.max_delta:
            raise BudgetRefused(
                f"delta {delta:g} is above this site's maximum of {self.policy.max_delta:g} (max_delta in the "
                "site policy); the study must use a smaller delta."
            )
        if self.policy.require_dp and event.noise_multiplier < self.policy.min_noise_multiplier:
            raise BudgetRefused(
                f"noise multiplier {event.noise_multiplier:.3g} is below this site's privacy floor of "
                f"{self.policy.min_noise_multiplier:.3g} (min_noise_multiplier in the site policy): training with "
                "less noise is DP in name only. The study must be recalibrated with more noise, or the data "
                "steward lowers the floor."
            )

    def reserve(
        self,
        study_hash: str,
        round_key: str,
        event: PrivacyEvent,
        delta: float,
        accountant: str,
        study_ceiling: float,
        purpose: str = TRAIN,
        purpose_ceiling: float | None = None,
        *,
        lineage: str | None = None,
        holder: str | None = None,
    ) -> Reservation:
        """Hold the budget for one round, durably, or raise `BudgetRefused` saying which ceiling stops it.

        A second call for the same study and round key (a retry after a crash) returns the reservation
        already held instead of spending again; if that round was committed, `RoundAlreadyTrained`; if a live
        process holds it (its lease has not lapsed), `RoundInProgress`. The caller becomes the holder of the
        lease (`holder`, default a new claim of this process) and renews it with `holding` while it trains.
        `purpose` says what the budget pays for (TRAIN, EVALUATE); NON_PRIVATE rows are checked against
        nothing (the site's policy allowed the study) and spend no epsilon. `study_ceiling` binds the study's
        releases composed; `purpose_ceiling`, if given, binds this purpose's releases alone (training may not
        eat into the evaluation budget, nor evaluation into training's). `lineage` is the study's id at this
        site: every version of the study shares one budget (default: the hash alone, a study of one version).
        """
        check_accountant(accountant)
        if purpose not in PURPOSES:
            raise ValueError(f"a ledger row pays for one of {', '.join(PURPOSES)}, not '{purpose}'")
        if not 0 < delta < 1:
            raise ValueError(f"delta is a probability in (0, 1) (got {delta})")
        if not study_ceiling > 0:
            raise ValueError(f"a study's epsilon ceiling must be positive (got {study_ceiling})")
        if purpose != NON_PRIVATE:
            self._check_policy(event, delta)
        lineage = lineage or study_hash
        holder = holder or new_holder()
        with self._transaction() as (connection, add):
            rows = self._active_rows(connection)
            held = next((r for r in rows if r.study_hash == study_hash and r.round_key == round_key), None)
            if held is not None and held.status == COMMITTED:
                done = "trained" if held.purpose != EVALUATE else "released"
                raise RoundAlreadyTrained(
                    f"round '{round_key}' of study {_short(study_hash)} was already {done} here and its privacy "
                    f"cost committed on {held.resolved_at}; running it again would spend the budget twice. "
                    "The coordinator must start a new round (a new round key)."
                )
            now = datetime.now(UTC)
            if held is not None and held.holder != holder and _lease_live(held, now):
                raise RoundInProgress(
                    f"round '{round_key}' of study {_short(study_hash)} is being run at this site right now by "
                    f"another process (reserved {held.reserved_at}, lease renewed until {held.lease_until}); a "
                    "second run of the same round would release two differently noised results for one charge, "
                    "so this one does not run. If that process has died, a retry succeeds once its lease lapses."
                )
            unchanged = held is not None and (_event(held), held.delta, held.accountant, held.purpose) == (
                event,
                delta,
                accountant,
                purpose,
            )
            lease = {"holder": holder, "lease_until": _lease_until(now)}
            if unchanged:
                connection.execute(update(self.table).where(self.table.c.id == held.id).values(**lease))
                return _reservation(self._row(connection, held.id))
            row = self._reserve_new(
                connection,
                rows,
                held,
                study_hash,
                round_key,
                event,
                delta,
                accountant,
                study_ceiling,
                purpose,
                purpose_ceiling,
                lineage,
                lease,
            )
            add("ledger-changed" if held is not None else "ledger-reserved", {"row": row_state(row)})
        return _reservation(row)  # the transaction has committed: the reservation is durable, and chained

    def _reserve_new(
        self,
        connection: Connection,
        rows: list[Row],
        held: Row | None,
        study_hash: str,
        round_key: str,
        event: PrivacyEvent,
        delta: float,
        accountant: str,
        study_ceiling: float,
        purpose: str,
        purpose_ceiling: float | None,
        lineage: str,
        lease: dict[str, str],
    ) -> Row:
        by_lineage = self._by_lineage(rows)
        earlier = [r for r in by_lineage.pop(lineage, []) if held is None or r.id != held.id]
        name = _study_name(study_hash, lineage)
        other_accountants = {r.accountant for r in earlier} - {accountant}
        if other_accountants:
            raise BudgetRefused(
                f"study {name} was accounted with the '{other_accountants.pop()}' accountant in earlier rounds "
                f"and this round asks for '{accountant}'; one study keeps one accountant so its epsilon stays "
                "comparable. Give the study a new id (a new study, with its own budget) if the accountant must change."
            )
        spent_study = study_epsilon(earlier)
        private = [r for r in earlier if r.purpose != NON_PRIVATE]
        study_delta = min([delta, *(r.delta for r in private)])
        if purpose == NON_PRIVATE:
            projected_study = spent_study
        else:
            projected_study = epsilon_of([*(_event(r) for r in private), event], study_delta, accountant)
        others = sum(study_epsilon(group) for group in by_lineage.values())
        projected_site = others + projected_study
        ceiling = min(study_ceiling, self.policy.study_epsilon_ceiling)
        if purpose != NON_PRIVATE and purpose_ceiling is not None:
            same = [_event(r) for r in private if r.purpose == purpose]
            projected_purpose = epsilon_of([*same, event], study_delta, accountant)
            if projected_purpose > purpose_ceiling:
                spent_purpose = epsilon_of(same, study_delta, accountant) if same else 0.0
                what = "training rounds" if purpose == TRAIN else "evaluation releases"
                raise BudgetRefused(
                    f"round '{round_key}' of study {name} would take its {what} alone past their budget of "
                    f"ε={purpose_ceiling:.2f}: they have spent ε={spent_purpose:.2f} here (every version of the "
                    f"study together), and this one would bring them to ε={projected_purpose:.2f} at "
                    f"δ={study_delta:g}. The study's budget for {what} is spent; it does not run.",
                    limit=purpose_ceiling,
                    spent=spent_purpose,
                    projected=projected_purpose,
                )
        if purpose == NON_PRIVATE:
            pass  # no epsilon: nothing to check against a ceiling
        elif projected_study > ceiling:
            raise BudgetRefused(
                f"round '{round_key}' of study {name} would exceed the study privacy ceiling of "
                f"ε={ceiling:.2f} (the lower of the study's own target, {study_ceiling:.2f}, and this site's "
                f"study_epsilon_ceiling, {self.policy.study_epsilon_ceiling:.2f}): the study has spent "
                f"ε={spent_study:.2f} here so far (committed and reserved rounds of every version of it), and this "
                f"round would bring it to ε={projected_study:.2f} at δ={study_delta:g}. The round does not run; "
                "only a smaller round (fewer steps, more noise) fits, unless the data steward raises the ceiling.",
                limit=ceiling,
                spent=spent_study,
                projected=projected_study,
            )
        if purpose != NON_PRIVATE and projected_site > self.policy.site_epsilon_ceiling:
            raise BudgetRefused(
                f"round '{round_key}' of study {name} would exceed the site privacy ceiling of "
                f"ε={self.policy.site_epsilon_ceiling:.2f} for all studies together (site_epsilon_ceiling in "
                f"the site policy): studies here have spent ε={others + spent_study:.2f} so far, and this round "
                f"would bring the total to ε={projected_site:.2f}. The round does not run; the data steward "
                "decides whether to raise the site ceiling.",
                limit=self.policy.site_epsilon_ceiling,
                spent=others + spent_study,
                projected=projected_site,
            )
        values = {
            "noise_multiplier": float(event.noise_multiplier),
            "sample_rate": float(event.sample_rate),
            "steps": int(event.steps),
            "delta": float(delta),
            "accountant": accountant,
            "study_ceiling": float(study_ceiling),
            "projected_study_epsilon": projected_study,
            "projected_site_epsilon": projected_site,
            "purpose": purpose,
            "lineage": lineage,
            **lease,
        }
        if held is not None:  # a retry with different parameters: the same reservation, re-checked and updated
            connection.execute(update(self.table).where(self.table.c.id == held.id).values(**values))
            row_id = held.id
        else:
            attempt = 1 + len(
                connection.execute(
                    select(self.table.c.id).where(
                        self.table.c.study_hash == study_hash, self.table.c.round_key == round_key
                    )
                ).all()
            )
            row_id = connection.execute(
                insert(self.table).values(
                    study_hash=study_hash,
                    round_key=round_key,
                    attempt=attempt,
                    status=RESERVED,
                    reserved_at=utc_now(),
                    **values,
                )
            ).inserted_primary_key[0]
        return self._row(connection, row_id)

    # --- the lease ------------------------------------------------------------------------------------

    def renew(self, reservation: Reservation) -> bool:
        """Extend the holder's lease; False when the reservation is no longer this holder's (resolved, or
        taken over after the lease lapsed)."""
        now = datetime.now(UTC)
        with self.store.engine.begin() as connection:
            result = connection.execute(
                update(self.table)
                .where(
                    self.table.c.id == reservation.id,
                    self.table.c.holder == reservation.holder,
                    self.table.c.status == RESERVED,
                )
                .values(lease_until=_lease_until(now))
            )
        return result.rowcount == 1

    def end_lease(self, reservation: Reservation) -> None:
        """Let go of a reservation that stays reserved (the round failed after reading data): its budget
        keeps counting, and a retry may take it at once."""
        with self.store.engine.begin() as connection:
            connection.execute(
                update(self.table)
                .where(self.table.c.id == reservation.id, self.table.c.holder == reservation.holder)
                .values(holder=None, lease_until=None)
            )

    @contextmanager
    def holding(self, reservation: Reservation, every: float = LEASE_SECONDS / 4) -> Iterator[Reservation]:
        """Keep the reservation's lease alive while the block runs (training can outlast one lease), and
        let go of it when the block ends without resolving the reservation."""
        stop = threading.Event()

        def renew() -> None:
            while not stop.wait(every):
                try:
                    if not self.renew(reservation):
                        return
                except Exception:  # a database hiccup: the next beat tries again; the lease outlasts a few
                    continue

        beat = threading.Thread(target=renew, name=f"lease-{reservation.id}", daemon=True)
        beat.start()
        try:
            yield reservation
        finally:
            stop.set()
            beat.join()
            self.end_lease(reservation)

    # --- resolving ------------------------------------------------------------------------------------

    def _held_row(self, connection: Connection, reservation: Reservation) -> Row:
        row = connection.execute(select(self.table).where(self.table.c.id == reservation.id)).first()
        if row is None or (row.study_hash, row.round_key) != (reservation.study_hash, reservation.round_key):
            raise LedgerError(
                f"reservation #{reservation.id} (round '{reservation.round_key}' of study "
                f"{_short(reservation.study_hash)}) is not in this ledger: is the site node using another "
                "governance database than the one that reserved it, or were ledger rows deleted?"
            )
        return row

    def commit(self, reservation: Reservation, event_actual: PrivacyEvent | None = None) -> float:
        """Mark the round as spent (with what it actually did, if given); returns the study's epsilon now.

        Committing twice is harmless (a retry after a crash between commit and answer); committing a
        released round is an error, because its budget was given back before it trained; so is committing a
        round whose lease another process took over (its result must not leave: the other one's will).
        """
        with self._transaction() as (connection, add):
            row = self._held_row(connection, reservation)
            if row.status == RELEASED:
                raise LedgerError(
                    f"round '{row.round_key}' of study {_short(row.study_hash)} was released on {row.resolved_at} "
                    f"({row.release_reason}); its budget was given back, so it must not have trained. If it did, "
                    "reserve it again so its cost is counted."
                )
            if row.status == COMMITTED:
                if event_actual is not None and event_actual != _event(row):
                    raise LedgerError(
                        f"round '{row.round_key}' of study {_short(row.study_hash)} was already committed with "
                        f"{_event(row)}; it cannot be committed again with {event_actual}."
                    )
            else:
                if row.holder is not None and reservation.holder is not None and row.holder != reservation.holder:
                    raise LedgerError(
                        f"round '{row.round_key}' of study {_short(row.study_hash)} was taken over by another "
                        f"process ({row.holder}) after this one's lease lapsed; this result does not leave the site."
                    )
                values: dict = {"status": COMMITTED, "resolved_at": utc_now(), "holder": None, "lease_until": None}
                if event_actual is not None:
                    values.update(
                        noise_multiplier=float(event_actual.noise_multiplier),
                        sample_rate=float(event_actual.sample_rate),
                        steps=int(event_actual.steps),
                    )
                connection.execute(update(self.table).where(self.table.c.id == row.id).values(**values))
                add("ledger-committed", {"row": row_state(self._row(connection, row.id))})
        return self.spent(reservation.lineage or reservation.study_hash)

    def release(self, reservation: Reservation, reason: str) -> None:
        """Give back a reservation whose round failed before any patient data was read.

        A round that read data must be committed instead, even if it then failed: what it computed may
        already have been observed, so its cost is real.
        """
        if not reason or not reason.strip():
            raise ValueError("say why the round is released; the reason is kept in the ledger for the steward")
        with self._transaction() as (connection, add):
            row = self._held_row(connection, reservation)
            if row.status == COMMITTED:
                raise LedgerError(
                    f"round '{row.round_key}' of study {_short(row.study_hash)} was committed on "
                    f"{row.resolved_at}: its epsilon is spent and cannot be given back."
                )
            if row.status == RESERVED:
                connection.execute(
                    update(self.table)
                    .where(self.table.c.id == row.id)
                    .values(
                        status=RELEASED, resolved_at=utc_now(), release_reason=reason, holder=None, lease_until=None
                    )
                )
                add("ledger-released", {"row": row_state(self._row(connection, row.id)), "reason": reason})

    # --- reading --------------------------------------------------------------------------------------

    def history(self, study: str) -> list[PrivacyEvent]:
        """The study's rounds at this site (every version), committed and still reserved, in reservation order.

        Here and below, `study` names the study by its id at this site or by the hash of any of its versions."""
        with self.store.engine.connect() as connection:
            return [_event(r) for r in self._active_rows(connection, study)]

    def spent(self, study: str) -> float:
        """The study's epsilon here, every version of it, counting unresolved reservations (a crash never
        under-counts)."""
        with self.store.engine.connect() as connection:
            return study_epsilon(self._active_rows(connection, study))

    def spent_by_purpose(self, study: str) -> dict[str, float]:
        """The study's epsilon here from its training rounds alone, its evaluation releases alone, and both
        composed ('total', the figure the ceilings bind: less than the sum, by the accountant's composition)."""
        with self.store.engine.connect() as connection:
            rows = self._active_rows(connection, study)
        return {
            TRAIN: study_epsilon([r for r in rows if r.purpose == TRAIN]),
            EVALUATE: study_epsilon([r for r in rows if r.purpose == EVALUATE]),
            "total": study_epsilon(rows),
        }

    def site_spent(self) -> float:
        """Sum of every study's epsilon at this site (basic composition across studies)."""
        with self.store.engine.connect() as connection:
            grouped = self._by_lineage(self._active_rows(connection))
        return sum(study_epsilon(rows) for rows in grouped.values())

    def reservations(self, study_hash: str | None = None, lineage: str | None = None) -> list[Reservation]:
        """Every reservation, released ones included, for a steward who wants the round-by-round record: of one
        version (`study_hash`), of every version of a study (`lineage`, its id or any version's hash), or all."""
        query = select(self.table).order_by(self.table.c.id)
        with self.store.engine.connect() as connection:
            if study_hash is not None:
                query = query.where(self.table.c.study_hash == study_hash)
            if lineage is not None:
                query = query.where(self.table.c.lineage == self._lineage_of(connection, lineage))
            return [_reservation(r) for r in connection.execute(query)]

    def inherited(self, lineage: str, study_hash: str, ceiling: float) -> Inheritance | None:
        """What a new version `study_hash` of study `lineage` inherits from the versions before it, if any ran
        here: shown to the data steward when approving it, and kept in the approval's audit entry."""
        budget = next((b for b in self.summary() if b.lineage == lineage), None)
        if budget is None or set(budget.versions) <= {study_hash}:
            return None
        return Inheritance(
            study_id=lineage,
            earlier_versions=[v for v in budget.versions if v != study_hash],
            spent_epsilon=budget.total_epsilon,
            training_epsilon=budget.training_epsilon,
            evaluation_epsilon=budget.evaluation_epsilon,
            rounds=budget.rounds,
            ceiling=min(ceiling, self.policy.study_epsilon_ceiling),
        )

    def summary(self) -> list[StudyBudget]:
        """Per study (all its versions together): committed and reserved epsilon, the ceiling, round counts."""
        with self.store.engine.connect() as connection:
            rows = list(connection.execute(select(self.table).order_by(self.table.c.id)))
        budgets = []
        for lineage, group in self._by_lineage(rows).items():
            active = [r for r in group if r.status != RELEASED]
            committed = [r for r in group if r.status == COMMITTED]
            private = [r for r in active if r.purpose != NON_PRIVATE]
            total = study_epsilon(active)
            committed_epsilon = study_epsilon(committed)
            latest = group[-1]
            budgets.append(
                StudyBudget(
                    study_hash=latest.study_hash,
                    committed_epsilon=committed_epsilon,
                    reserved_epsilon=total - committed_epsilon,
                    total_epsilon=total,
                    ceiling=min(latest.study_ceiling, self.policy.study_epsilon_ceiling),
                    delta=min((r.delta for r in private), default=latest.delta),
                    accountant=latest.accountant,
                    committed_rounds=sum(r.purpose != EVALUATE for r in committed),
                    reserved_rounds=sum(r.status == RESERVED and r.purpose != EVALUATE for r in group),
                    released_rounds=sum(r.status == RELEASED for r in group),
                    training_epsilon=study_epsilon([r for r in active if r.purpose == TRAIN]),
                    evaluation_epsilon=study_epsilon([r for r in active if r.purpose == EVALUATE]),
                    evaluation_releases=sum(r.purpose == EVALUATE for r in active),
                    non_private_rounds=sum(r.purpose == NON_PRIVATE for r in active),
                    lineage=lineage,
                    versions=tuple(dict.fromkeys(r.study_hash for r in group)),
                )
            )
        return budgets


def _study_name(study_hash: str, lineage: str) -> str:
    """How a refusal names the study: its id at this site, with the version's hash when they differ."""
    if lineage == study_hash:
        return _short(study_hash)
    return f"'{lineage}' (version {_short(study_hash)})"
