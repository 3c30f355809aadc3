"""The governance database: approvals, privacy ledger, audit log, withdrawals and round membership.

Governance lives in its own database (SQLite file by default, PostgreSQL in production), separate from
the OMOP data, because it is what the data steward answers for: it must survive a rebuilt OMOP store
and must not be writable by whoever loads clinical data. Every table is created here, from one
`MetaData`, optionally inside a PostgreSQL schema so several sites or test runs can share a server.

Writers that must see each other's effects (two processes reserving privacy budget at the same time,
two appends to the audit chain) serialise on a row of `gov_locks`: updating that row is the first
statement of their transaction, which takes a row lock on PostgreSQL and the write lock on SQLite,
so the reads that follow see every earlier writer's committed state.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    event,
    func,
    insert,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError, SQLAlchemyError

from omop_etl.database import DatabaseUnavailable, open_engine, redact

LOCK_NAMES = ("ledger", "audit", "approvals", "withdrawals", "membership", "disclosures")
# Columns added after a table was first created: (table key, column, DDL type and default). A database made by
# an earlier twinfed gets them on first use, with the default that describes every row it already holds.
ADDED_COLUMNS = (
    ("ledger", "purpose", "VARCHAR(16) NOT NULL DEFAULT 'train'"),
    ("ledger", "lineage", "VARCHAR(128) NOT NULL DEFAULT ''"),
    ("ledger", "holder", "VARCHAR(200)"),
    ("ledger", "lease_until", "VARCHAR(40)"),
    ("audit", "signature", "VARCHAR(200)"),
)
SQLITE_BUSY_TIMEOUT_MS = 30_000  # a concurrent reservation holds the lock for at most an accountant call


def utc_now() -> str:
    """The current time as ISO-8601 UTC text: identical on every backend, and part of audit hashes."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


def parse_time(value: str | None) -> datetime | None:
    """The inverse of `utc_now`, tolerating NULL."""
    return None if value is None else datetime.fromisoformat(value)


def _tables(metadata: MetaData) -> dict[str, Table]:
    """Every governance table; times are ISO-8601 UTC text so they read the same on SQLite and PostgreSQL."""
    return {
        "locks": Table(
            "gov_locks",
            metadata,
            Column("name", String(32), primary_key=True),
            Column("counter", BigInteger, nullable=False, default=0),
        ),
        "approvals": Table(
            "gov_study_approvals",
            metadata,
            Column("id", Integer, primary_key=True, autoincrement=True),
            Column("study_hash", String(128), nullable=False, index=True),
            Column("study_id", String(128), nullable=False),
            Column("approved_by", String(200), nullable=False),
            Column("note", Text, nullable=False, default=""),
            Column("approved_at", String(40), nullable=False),
            Column("revoked_by", String(200)),
            Column("revoked_at", String(40)),
            Column("revoke_reason", Text),
        ),
        "ledger": Table(
            "gov_privacy_ledger",
            metadata,
            Column("id", Integer, primary_key=True, autoincrement=True),
            Column("study_hash", String(128), nullable=False, index=True),
            Column("round_key", String(200), nullable=False),
            Column("attempt", Integer, nullable=False),
            Column("status", String(16), nullable=False),  # reserved | committed | released
            Column("noise_multiplier", Float, nullable=False),
            Column("sample_rate", Float, nullable=False),
            Column("steps", Integer, nullable=False),
            Column("delta", Float, nullable=False),
            Column("accountant", String(16), nullable=False),
            Column("study_ceiling", Float, nullable=False),
            Column("projected_study_epsilon", Float, nullable=False),
            Column("projected_site_epsilon", Float, nullable=False),
            Column("reserved_at", String(40), nullable=False),
            Column("resolved_at", String(40)),
            Column("release_reason", Text),
            # what spent it: train (DP-SGD), evaluate (a Gaussian score-histogram release), non-private (a round
            # of a study with privacy mode none: no epsilon, kept so the ledger says it happened)
            Column("purpose", String(16), nullable=False, server_default="train"),
            # whose budget it is: the study id at this site, shared by every version (hash) of that study, so a
            # re-approved edit or a twinfed upgrade (new hashes) inherits what earlier versions spent
            Column("lineage", String(128), nullable=False, server_default="", index=True),
            # the live training that holds a reservation, and until when (renewed while it runs): a second
            # taker is refused while the lease is live; a crashed holder's lease lapses so a retry can take it
            Column("holder", String(200)),
            Column("lease_until", String(40)),
            UniqueConstraint("study_hash", "round_key", "attempt", name="uq_gov_ledger_round_attempt"),
        ),
        "disclosures": Table(
            "gov_disclosures",
            metadata,
            Column("id", Integer, primary_key=True, autoincrement=True),
            Column("lineage", String(128), nullable=False, index=True),  # the study id at this site
            Column("study_hash", String(128), nullable=False),
            Column("part", String(32), nullable=False),  # train | validation | test
            Column("release_key", String(200), nullable=False),
            Column("counts", Text, nullable=False),  # JSON: {"cell+cell": count} of what left, by cells summed
            Column("released_at", String(40), nullable=False),
        ),
        "audit": Table(
            "gov_audit_log",
            metadata,
            Column("seq", BigInteger, primary_key=True, autoincrement=False),
            Column("at", String(40), nullable=False),
            Column("kind", String(100), nullable=False),
            Column("payload", Text, nullable=False),
            Column("prev_hash", String(64), nullable=False),
            Column("hash", String(64), nullable=False),
            # Ed25519 signature of `hash` with the site's audit key (kept outside this database): a forged or
            # rewritten entry cannot carry one. NULL only for entries written before the site signed its chain.
            Column("signature", String(200)),
        ),
        "withdrawals": Table(
            "gov_consent_withdrawals",
            metadata,
            Column("person_id", BigInteger, primary_key=True, autoincrement=False),
            Column("recorded_by", String(200), nullable=False),
            Column("reason", Text, nullable=False, default=""),
            Column("recorded_at", String(40), nullable=False),
        ),
        "membership": Table(
            "gov_round_membership",
            metadata,
            Column("study_hash", String(128), primary_key=True),
            Column("round_key", String(200), primary_key=True),
            Column("person_id", BigInteger, primary_key=True, autoincrement=False),
            Column("recorded_at", String(40), nullable=False),
            Index("ix_gov_round_membership_person", "person_id"),
        ),
    }


class GovernanceStore:
    """Connection and tables of one site's governance database; creates what is missing on first use."""

    def __init__(self, url: str, schema: str | None = None) -> None:
        self.url = url
        self.schema = schema
        self.engine: Engine = open_engine(url)
        if self.engine.dialect.name == "sqlite":
            self._sqlite_waits_for_locks(self.engine)
        self.metadata = MetaData(schema=schema)
        self.tables = _tables(self.metadata)
        self._create()

    @staticmethod
    def _sqlite_waits_for_locks(engine: Engine) -> None:
        """Let a second process wait for the write lock instead of failing at once with 'database is locked'."""

        @event.listens_for(engine, "connect")
        def _busy_timeout(dbapi_connection, _record) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cursor.close()

    def _create(self) -> None:
        try:
            self._create_tables()
            self._ensure_lock_rows()
        except OperationalError as exc:
            reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
            raise DatabaseUnavailable(
                f"Cannot open the governance database {redact(self.url)}: {reason}. Check that the server is "
                "running (or the SQLite file's folder exists and is writable) and that this user may create tables."
            ) from None
        except SQLAlchemyError as exc:
            raise DatabaseUnavailable(
                f"The governance database {redact(self.url)} could not be prepared: {exc}"
            ) from None

    def _create_tables(self, attempts: int = 3) -> None:
        """Create what is missing. Several site-node processes may start at once on a new database; the
        loser of a CREATE race fails on the winner's table and simply retries against what now exists."""
        for attempt in range(attempts):
            try:
                with self.engine.begin() as connection:
                    if self.schema and self.engine.dialect.name == "postgresql":
                        connection.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"'))
                    self.metadata.create_all(connection, checkfirst=True)
                    self._add_missing_columns(connection)
                return
            except (IntegrityError, ProgrammingError):
                if attempt == attempts - 1:
                    raise

    def _add_missing_columns(self, connection: Connection) -> None:
        inspector = inspect(connection)
        added = set()
        for key, column, ddl in ADDED_COLUMNS:
            table = self.tables[key]
            present = {c["name"] for c in inspector.get_columns(table.name, schema=self.schema)}
            if column not in present:
                name = f'"{self.schema}"."{table.name}"' if self.schema else f'"{table.name}"'
                connection.execute(text(f'ALTER TABLE {name} ADD COLUMN "{column}" {ddl}'))
                added.add((key, column))
        if ("ledger", "lineage") in added:  # rows written since always carry it: a write only on the upgrade
            self._backfill_lineage(connection)

    def _backfill_lineage(self, connection: Connection) -> None:
        """Rows written before budgets followed the study's lineage get it from their approval (the study id);
        a row whose study was never approved here keeps its own hash as its lineage."""
        ledger, approvals = self.tables["ledger"], self.tables["approvals"]
        study_id = (
            select(approvals.c.study_id)
            .where(approvals.c.study_hash == ledger.c.study_hash)
            .order_by(approvals.c.id)
            .limit(1)
            .scalar_subquery()
        )
        connection.execute(
            update(ledger).where(ledger.c.lineage == "").values(lineage=func.coalesce(study_id, ledger.c.study_hash))
        )

    def _ensure_lock_rows(self) -> None:
        locks = self.tables["locks"]
        for name in LOCK_NAMES:
            try:
                with self.engine.begin() as connection:
                    if connection.execute(select(locks.c.name).where(locks.c.name == name)).first() is None:
                        connection.execute(insert(locks).values(name=name, counter=0))
            except IntegrityError:
                pass  # another process created it between our check and our insert

    @contextmanager
    def locked(self, name: str) -> Iterator[Connection]:
        """A transaction that holds the named lock until it commits (on leaving the block) or rolls back."""
        with self.engine.begin() as connection:
            self.take_lock(connection, name)
            yield connection

    def take_lock(self, connection: Connection, name: str) -> None:
        """Take the named lock inside a transaction already open on `connection` (held until it ends)."""
        locks = self.tables["locks"]
        result = connection.execute(update(locks).where(locks.c.name == name).values(counter=locks.c.counter + 1))
        if result.rowcount != 1:
            raise RuntimeError(
                f"The governance lock row '{name}' is missing from {redact(self.url)}; someone removed rows "
                "from gov_locks. Restart the site node so the rows are recreated."
            )

    def dispose(self) -> None:
        """Close pooled connections (tests and short-lived commands)."""
        self.engine.dispose()
