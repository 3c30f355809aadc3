"""The privacy ledger: a site's epsilon across every round, restart and study, and the refusal to overspend.

A round is *reserved* (durably, before any patient data is read), then *committed* once trained, or
*released* if it failed before touching data. A reserved round that was never resolved (the process
was killed mid-round) keeps counting: the ledger may over-count after a crash, never under-count. A
retry of the same round key gets the same reservation back, so it is counted once.

Epsilon is recomputed from the stored events with Opacus's accountants (`accounting`), per study; the
site total is the sum over studies (basic composition), and each study's epsilon is stated at the
smallest delta any of its rounds used, the strictest reading of its guarantee.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import insert, select, update
from sqlalchemy.engine import Connection, Row

from site_node.governance.accounting import PrivacyEvent, check_accountant, epsilon_of
from site_node.governance.policy import SitePolicy
from site_node.governance.store import GovernanceStore, parse_time, utc_now

__all__ = [
    "BudgetRefused",
    "LedgerError",
    "PrivacyEvent",
    "PrivacyLedger",
    "Reservation",
    "RoundAlreadyTrained",
    "StudyBudget",
]

RESERVED, COMMITTED, RELEASED = "reserved", "committed", "released"
# What a row's budget paid for. Training and evaluation releases compose in one accountant per study (the
# figure the ceilings bind); each alone is shown too. A non-private round has no epsilon: it is kept so
# the ledger says it happened, and it never enters an epsilon figure (which would otherwise be infinite).
TRAIN, EVALUATE, NON_PRIVATE = "train", "evaluate", "non-private"
PURPOSES = (TRAIN, EVALUATE, NON_PRIVATE)


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


@dataclass(frozen=True)
class StudyBudget:
    """One study's spending at this site, for the data steward's overview."""

    study_hash: str
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

    @property
    def rounds(self) -> int:
        """Rounds that count against the budget: committed and still reserved (released ones do not)."""
        return self.committed_rounds + self.reserved_rounds


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
    )


def _short(study_hash: str) -> str:
    return study_hash[:12]


class PrivacyLedger:
    """Reserve, commit and release rounds against the study and site ceilings of a `SitePolicy`."""

    def __init__(self, store: GovernanceStore, policy: SitePolicy) -> None:
        self.store = store
        self.policy = policy
        self.table = store.tables["ledger"]

    # --- accounting -----------------------------------------------------------------------------------

    def epsilon(self, history: list[PrivacyEvent], delta: float, accountant: str) -> float:
        """Epsilon of `history` at `delta` by the Opacus accountant named ('rdp' or 'prv')."""
        return epsilon_of(history, delta, accountant)

    def _study_epsilon(self, rows: list[Row]) -> float:
        """A study's epsilon over its active rows, at its smallest delta; the larger figure if accountants differ.

        Non-private rows have no epsilon and are left out (the summary counts them apart)."""
        rows = [r for r in rows if r.purpose != NON_PRIVATE]
        if not rows:
            return 0.0
        delta = min(r.delta for r in rows)
        events = [_event(r) for r in rows]
        return max(epsilon_of(events, delta, name) for name in {r.accountant for r in rows})

    def _active_rows(self, connection: Connection, study_hash: str | None = None) -> list[Row]:
        query = select(self.table).where(self.table.c.status != RELEASED).order_by(self.table.c.id)
        if study_hash is not None:
            query = query.where(self.table.c.study_hash == study_hash)
        return list(connection.execute(query))

    @staticmethod
    def _by_study(rows: list[Row]) -> dict[str, list[Row]]:
        grouped: dict[str, list[Row]] = defaultdict(list)
        for row in rows:
            grouped[row.study_hash].append(row)
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
    ) -> Reservation:
        """Hold the budget for one round, durably, or raise `BudgetRefused` saying which ceiling stops it.

        A second call for the same study and round key (a retry after a crash) returns the reservation
        already held instead of spending again; if that round was committed, `RoundAlreadyTrained`.
        `purpose` says what the budget pays for (TRAIN, EVALUATE); NON_PRIVATE rows are checked against
        nothing (the site's policy allowed the study) and spend no epsilon. `study_ceiling` binds the study's
        releases composed; `purpose_ceiling`, if given, binds this purpose's releases alone (training may not
        eat into the evaluation budget, nor evaluation into training's).
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
        with self.store.locked("ledger") as connection:
            rows = self._active_rows(connection)
            held = next((r for r in rows if r.study_hash == study_hash and r.round_key == round_key), None)
            if held is not None and held.status == COMMITTED:
                done = "trained" if held.purpose != EVALUATE else "released"
                raise RoundAlreadyTrained(
                    f"round '{round_key}' of study {_short(study_hash)} was already {done} here and its privacy "
                    f"cost committed on {held.resolved_at}; running it again would spend the budget twice. "
                    "The coordinator must start a new round (a new round key)."
                )
            unchanged = held is not None and (_event(held), held.delta, held.accountant, held.purpose) == (
                event,
                delta,
                accountant,
                purpose,
            )
            if unchanged:
                return _reservation(held)
            reservation = self._reserve_new(
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
            )
        return reservation  # the transaction has committed: the reservation is durable

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
    ) -> Reservation:
        by_study = self._by_study(rows)
        earlier = [r for r in by_study.pop(study_hash, []) if held is None or r.id != held.id]
        other_accountants = {r.accountant for r in earlier} - {accountant}
        if other_accountants:
            raise BudgetRefused(
                f"study {_short(study_hash)} was accounted with the '{other_accountants.pop()}' accountant in "
                f"earlier rounds and this round asks for '{accountant}'; one study keeps one accountant so its "
                "epsilon stays comparable. Re-approve the study as a new study if the accountant must change."
            )
        spent_study = self._study_epsilon(earlier)
        private = [r for r in earlier if r.purpose != NON_PRIVATE]
        study_delta = min([delta, *(r.delta for r in private)])
        if purpose == NON_PRIVATE:
            projected_study = spent_study
        else:
            projected_study = epsilon_of([*(_event(r) for r in private), event], study_delta, accountant)
        others = sum(self._study_epsilon(group) for group in by_study.values())
        projected_site = others + projected_study
        ceiling = min(study_ceiling, self.policy.study_epsilon_ceiling)
        if purpose != NON_PRIVATE and purpose_ceiling is not None:
            same = [_event(r) for r in private if r.purpose == purpose]
            projected_purpose = epsilon_of([*same, event], study_delta, accountant)
            if projected_purpose > purpose_ceiling:
                spent_purpose = epsilon_of(same, study_delta, accountant) if same else 0.0
                what = "training rounds" if purpose == TRAIN else "evaluation releases"
                raise BudgetRefused(
                    f"round '{round_key}' of study {_short(study_hash)} would take its {what} alone past their "
                    f"budget of ε={purpose_ceiling:.2f}: they have spent ε={spent_purpose:.2f} here, and this one "
                    f"would bring them to ε={projected_purpose:.2f} at δ={study_delta:g}. The study's budget for "
                    f"{what} is spent; it does not run.",
                    limit=purpose_ceiling,
                    spent=spent_purpose,
                    projected=projected_purpose,
                )
        if purpose == NON_PRIVATE:
            pass  # no epsilon: nothing to check against a ceiling
        elif projected_study > ceiling:
            raise BudgetRefused(
                f"round '{round_key}' of study {_short(study_hash)} would exceed the study privacy ceiling of "
                f"ε={ceiling:.2f} (the lower of the study's own target, {study_ceiling:.2f}, and this site's "
                f"study_epsilon_ceiling, {self.policy.study_epsilon_ceiling:.2f}): the study has spent "
                f"ε={spent_study:.2f} here so far (committed and reserved rounds), and this round would bring it "
                f"to ε={projected_study:.2f} at δ={study_delta:g}. The round does not run; only a smaller round "
                "(fewer steps, more noise) fits, unless the data steward raises the ceiling.",
                limit=ceiling,
                spent=spent_study,
                projected=projected_study,
            )
        if purpose != NON_PRIVATE and projected_site > self.policy.site_epsilon_ceiling:
            raise BudgetRefused(
                f"round '{round_key}' of study {_short(study_hash)} would exceed the site privacy ceiling of "
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
        return _reservation(connection.execute(select(self.table).where(self.table.c.id == row_id)).one())

    # --- resolving ------------------------------------------------------------------------------------

    def _held_row(self, connection: Connection, reservation: Reservation) -> Row:
        row = connection.execute(select(self.table).where(self.table.c.id == reservation.id)).first()
        if row is None or (row.study_hash, row.round_key) != (reservation.study_hash, reservation.round_key):
            raise LedgerError(
                f"reservation #{reservation.id} (round '{reservation.round_key}' of study "
                f"{_short(reservation.study_hash)}) is not in this ledger: is the site node using another "
                "governance database than the one that reserved it?"
            )
        return row

    def commit(self, reservation: Reservation, event_actual: PrivacyEvent | None = None) -> float:
        """Mark the round as spent (with what it actually did, if given); returns the study's epsilon now.

        Committing twice is harmless (a retry after a crash between commit and answer); committing a
        released round is an error, because its budget was given back before it trained.
        """
        with self.store.locked("ledger") as connection:
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
                values: dict = {"status": COMMITTED, "resolved_at": utc_now()}
                if event_actual is not None:
                    values.update(
                        noise_multiplier=float(event_actual.noise_multiplier),
                        sample_rate=float(event_actual.sample_rate),
                        steps=int(event_actual.steps),
                    )
                connection.execute(update(self.table).where(self.table.c.id == row.id).values(**values))
        return self.spent(reservation.study_hash)

    def release(self, reservation: Reservation, reason: str) -> None:
        """Give back a reservation whose round failed before any patient data was read.

        A round that read data must be committed instead, even if it then failed: what it computed may
        already have been observed, so its cost is real.
        """
        if not reason or not reason.strip():
            raise ValueError("say why the round is released; the reason is kept in the ledger for the steward")
        with self.store.locked("ledger") as connection:
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
                    .values(status=RELEASED, resolved_at=utc_now(), release_reason=reason)
                )

    # --- reading --------------------------------------------------------------------------------------

    def history(self, study_hash: str) -> list[PrivacyEvent]:
        """The study's rounds at this site, committed and still reserved, in the order they were reserved."""
        with self.store.engine.connect() as connection:
            return [_event(r) for r in self._active_rows(connection, study_hash)]

    def spent(self, study_hash: str) -> float:
        """The study's epsilon here, counting unresolved reservations (a crash never under-counts)."""
        with self.store.engine.connect() as connection:
            return self._study_epsilon(self._active_rows(connection, study_hash))

    def spent_by_purpose(self, study_hash: str) -> dict[str, float]:
        """The study's epsilon here from its training rounds alone, its evaluation releases alone, and both
        composed ('total', the figure the ceilings bind: less than the sum, by the accountant's composition)."""
        with self.store.engine.connect() as connection:
            rows = self._active_rows(connection, study_hash)
        return {
            TRAIN: self._study_epsilon([r for r in rows if r.purpose == TRAIN]),
            EVALUATE: self._study_epsilon([r for r in rows if r.purpose == EVALUATE]),
            "total": self._study_epsilon(rows),
        }

    def site_spent(self) -> float:
        """Sum of every study's epsilon at this site (basic composition across studies)."""
        with self.store.engine.connect() as connection:
            grouped = self._by_study(self._active_rows(connection))
        return sum(self._study_epsilon(rows) for rows in grouped.values())

    def reservations(self, study_hash: str | None = None) -> list[Reservation]:
        """Every reservation, released ones included, for a steward who wants the round-by-round record."""
        query = select(self.table).order_by(self.table.c.id)
        if study_hash is not None:
            query = query.where(self.table.c.study_hash == study_hash)
        with self.store.engine.connect() as connection:
            return [_reservation(r) for r in connection.execute(query)]

    def summary(self) -> list[StudyBudget]:
        """Per study: committed and reserved epsilon, the ceiling that applies, and round counts."""
        with self.store.engine.connect() as connection:
            rows = list(connection.execute(select(self.table).order_by(self.table.c.id)))
        budgets = []
        for study_hash, group in self._by_study(rows).items():
            active = [r for r in group if r.status != RELEASED]
            committed = [r for r in group if r.status == COMMITTED]
            private = [r for r in active if r.purpose != NON_PRIVATE]
            total = self._study_epsilon(active)
            committed_epsilon = self._study_epsilon(committed)
            latest = group[-1]
            budgets.append(
                StudyBudget(
                    study_hash=study_hash,
                    committed_epsilon=committed_epsilon,
                    reserved_epsilon=total - committed_epsilon,
                    total_epsilon=total,
                    ceiling=min(latest.study_ceiling, self.policy.study_epsilon_ceiling),
                    delta=min((r.delta for r in private), default=latest.delta),
                    accountant=latest.accountant,
                    committed_rounds=sum(r.purpose != EVALUATE for r in committed),
                    reserved_rounds=sum(r.status == RESERVED and r.purpose != EVALUATE for r in group),
                    released_rounds=sum(r.status == RELEASED for r in group),
                    training_epsilon=self._study_epsilon([r for r in active if r.purpose == TRAIN]),
                    evaluation_epsilon=self._study_epsilon([r for r in active if r.purpose == EVALUATE]),
                    evaluation_releases=sum(r.purpose == EVALUATE for r in active),
                    non_private_rounds=sum(r.purpose == NON_PRIVATE for r in active),
                )
            )
        return budgets
