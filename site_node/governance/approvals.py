"""Study approvals: the data steward signs off one exact study, by its hash, before anything runs.

Approving the hash rather than the study's name means any change to the study (a covariate, the epsilon
target, the rounds) makes it a different study that needs a new approval. Revoking keeps the record,
so the steward can always show what was approved, by whom, and when it stopped.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import insert, select, update
from sqlalchemy.engine import Row

from site_node.governance.store import GovernanceStore, parse_time, utc_now


class ApprovalError(ValueError):
    """An approval action that cannot be done as asked; the message says why."""


@dataclass(frozen=True)
class Approval:
    """One approval of one study hash, and its revocation if any."""

    id: int
    study_hash: str
    study_id: str
    approved_by: str
    note: str
    approved_at: datetime
    revoked_by: str | None = None
    revoked_at: datetime | None = None
    revoke_reason: str | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


def _approval(row: Row) -> Approval:
    return Approval(
        id=row.id,
        study_hash=row.study_hash,
        study_id=row.study_id,
        approved_by=row.approved_by,
        note=row.note,
        approved_at=parse_time(row.approved_at),
        revoked_by=row.revoked_by,
        revoked_at=parse_time(row.revoked_at),
        revoke_reason=row.revoke_reason,
    )


def _required(value: str, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ApprovalError(f"{what} must be given: the approval record names it for later audits")
    return value.strip()


class Approvals:
    """Which study hashes this site's data steward has approved."""

    def __init__(self, store: GovernanceStore) -> None:
        self.store = store
        self.table = store.tables["approvals"]

    def approve(self, study_hash: str, study_id: str, approved_by: str, note: str = "") -> Approval:
        """Approve a study hash; approving one that is already approved returns the standing approval."""
        study_hash = _required(study_hash, "the study hash")
        study_id = _required(study_id, "the study id")
        approved_by = _required(approved_by, "who approves")
        with self.store.locked("approvals") as connection:
            standing = self._active(connection, study_hash)
            if standing is not None:
                return _approval(standing)
            row_id = connection.execute(
                insert(self.table).values(
                    study_hash=study_hash,
                    study_id=study_id,
                    approved_by=approved_by,
                    note=note or "",
                    approved_at=utc_now(),
                )
            ).inserted_primary_key[0]
            return _approval(connection.execute(select(self.table).where(self.table.c.id == row_id)).one())

    def revoke(self, study_hash: str, by: str, reason: str) -> Approval:
        """Withdraw the standing approval: no further rounds of this study run here."""
        by = _required(by, "who revokes")
        reason = _required(reason, "the reason for revoking")
        with self.store.locked("approvals") as connection:
            standing = self._active(connection, study_hash)
            if standing is None:
                raise ApprovalError(
                    f"study {study_hash[:12]} has no standing approval at this site, so there is nothing to revoke."
                )
            connection.execute(
                update(self.table)
                .where(self.table.c.id == standing.id)
                .values(revoked_by=by, revoked_at=utc_now(), revoke_reason=reason)
            )
            return _approval(connection.execute(select(self.table).where(self.table.c.id == standing.id)).one())

    def _active(self, connection, study_hash: str) -> Row | None:
        return connection.execute(
            select(self.table).where(self.table.c.study_hash == study_hash, self.table.c.revoked_at.is_(None))
        ).first()

    def is_approved(self, study_hash: str) -> bool:
        """True if this exact study hash has an approval that was not revoked."""
        with self.store.engine.connect() as connection:
            return self._active(connection, study_hash) is not None

    def list(self) -> list[Approval]:
        """Every approval ever given here, revoked ones included, oldest first."""
        with self.store.engine.connect() as connection:
            return [_approval(row) for row in connection.execute(select(self.table).order_by(self.table.c.id))]
