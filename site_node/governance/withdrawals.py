"""Consent withdrawals recorded by the site, and which rounds each patient took part in.

A patient may withdraw consent after their data was loaded. The withdrawal is recorded here the moment
the steward learns of it, so the next cohort excludes that person even before the next ETL run. DP-SGD
bounds what any single round revealed, but a steward still has to be able to answer "which studies used
my data?": round membership keeps, for each round, the person ids that trained in it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import insert, select

from site_node.governance.store import GovernanceStore, parse_time, utc_now

INSERT_CHUNK = 10_000  # rows per INSERT batch: one round's cohort can be large


@dataclass(frozen=True)
class Withdrawal:
    """One person's consent withdrawal as the site recorded it."""

    person_id: int
    recorded_by: str
    reason: str
    recorded_at: datetime


class ConsentWithdrawals:
    """The site's register of people whose data must no longer be used for research."""

    def __init__(self, store: GovernanceStore) -> None:
        self.store = store
        self.table = store.tables["withdrawals"]

    def withdraw(self, person_id: int, recorded_by: str, reason: str = "") -> Withdrawal:
        """Record a withdrawal; recording the same person again keeps the first record (its date matters)."""
        if isinstance(person_id, bool) or int(person_id) != person_id:
            raise ValueError(f"a person id is the OMOP person_id, a whole number (got {person_id!r})")
        if not recorded_by or not recorded_by.strip():
            raise ValueError("say who records the withdrawal; the register names them for later audits")
        person_id = int(person_id)
        with self.store.locked("withdrawals") as connection:
            existing = connection.execute(select(self.table).where(self.table.c.person_id == person_id)).first()
            if existing is None:
                connection.execute(
                    insert(self.table).values(
                        person_id=person_id, recorded_by=recorded_by.strip(), reason=reason or "", recorded_at=utc_now()
                    )
                )
                existing = connection.execute(select(self.table).where(self.table.c.person_id == person_id)).one()
        return Withdrawal(existing.person_id, existing.recorded_by, existing.reason, parse_time(existing.recorded_at))

    def list(self) -> list[Withdrawal]:
        """Every withdrawal, oldest first."""
        with self.store.engine.connect() as connection:
            rows = connection.execute(select(self.table).order_by(self.table.c.recorded_at, self.table.c.person_id))
            return [Withdrawal(r.person_id, r.recorded_by, r.reason, parse_time(r.recorded_at)) for r in rows]

    def person_ids(self) -> set[int]:
        """The ids to exclude from every cohort."""
        with self.store.engine.connect() as connection:
            return {int(pid) for pid in connection.execute(select(self.table.c.person_id)).scalars()}


class RoundMembership:
    """For each round of each study, the person ids whose data it trained on.

    Erasure (`twinfed erase`) leaves these rows on purpose: what a person contributed to a model that
    was already trained cannot be taken out of it (DP-SGD bounds it), so after an erasure the site must
    still be able to say which models carry it. What is kept is the OMOP person_id only, and with
    twinfed's ETL that is a number handed out in sequence, not derived from any source identifier
    (person_source_value, the keyed hash of the Patient id, goes with the person row). Erasure deletes
    the person row and the id map, the only links from the number to the patient, and the number is
    never handed out again, so a row here names no one once the person is erased and cannot come to
    name someone else. docs/data-steward.md (erasure) says what a steward checks.
    """

    def __init__(self, store: GovernanceStore) -> None:
        self.store = store
        self.table = store.tables["membership"]

    def record(self, study_hash: str, round_key: str, person_ids: Iterable[int]) -> int:
        """Record who is in a round; returns how many new ids were added.

        Recording the same round again (a retry) adds to the earlier set instead of replacing it: an
        attempt that crashed may already have read those patients, so forgetting them would under-report.
        """
        ids = {int(p) for p in person_ids}
        now = utc_now()
        with self.store.locked("membership") as connection:
            known = set(
                connection.execute(
                    select(self.table.c.person_id).where(
                        self.table.c.study_hash == study_hash, self.table.c.round_key == round_key
                    )
                ).scalars()
            )
            new = sorted(ids - known)
            for start in range(0, len(new), INSERT_CHUNK):
                connection.execute(
                    insert(self.table),
                    [
                        {"study_hash": study_hash, "round_key": round_key, "person_id": pid, "recorded_at": now}
                        for pid in new[start : start + INSERT_CHUNK]
                    ],
                )
        return len(new)

    def members(self, study_hash: str, round_key: str) -> set[int]:
        """The person ids recorded for one round."""
        with self.store.engine.connect() as connection:
            return set(
                connection.execute(
                    select(self.table.c.person_id).where(
                        self.table.c.study_hash == study_hash, self.table.c.round_key == round_key
                    )
                ).scalars()
            )

    def rounds_including(self, person_id: int) -> list[tuple[str, str, datetime]]:
        """Every (study hash, round key, recorded at) whose training set held this person, oldest first."""
        query = (
            select(self.table.c.study_hash, self.table.c.round_key, self.table.c.recorded_at)
            .where(self.table.c.person_id == int(person_id))
            .order_by(self.table.c.recorded_at, self.table.c.study_hash, self.table.c.round_key)
        )
        with self.store.engine.connect() as connection:
            return [(r.study_hash, r.round_key, parse_time(r.recorded_at)) for r in connection.execute(query)]
