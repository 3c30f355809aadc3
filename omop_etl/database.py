"""Database connections for the OMOP store: SQLite by default, PostgreSQL in production.

Hospital IT passes a SQLAlchemy URL (`sqlite:///omop.sqlite`, `postgresql://user@host/db`). Plain
`postgresql://` URLs are routed to the psycopg 3 driver we ship, and errors come back as sentences
that say what to check, never with the password in them.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Column, Integer, MetaData, Table, create_engine, event, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, OperationalError, SQLAlchemyError


class DatabaseUnavailable(RuntimeError):
    """The database cannot be reached or used; the message says what to check."""


def normalise_url(url: str) -> str:
    """Route `postgresql://` and `postgres://` URLs to psycopg 3; leave everything else alone."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://") :]
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    return url


def redact(url: str) -> str:
    """The URL with any password replaced, safe for logs and error messages."""
    try:
        return make_url(normalise_url(url)).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable database URL>"


def open_engine(url: str, *, connect_timeout: int = 5, bulk_load: bool = False) -> Engine:
    """An engine for `url`, with a short connect timeout on PostgreSQL so a wrong host fails fast.

    `bulk_load` puts SQLite in write-ahead-log mode with normal synchronisation: committed batches stay
    durable across a crash of the process, and loading is several times faster than the defaults.
    """
    try:
        parsed = make_url(normalise_url(url))
    except ArgumentError:
        raise DatabaseUnavailable(
            f"'{url}' is not a database URL. Use e.g. sqlite:///omop.sqlite or postgresql://user@host:5432/dbname."
        ) from None
    kwargs: dict = {"future": True}
    if parsed.get_backend_name() == "postgresql":
        kwargs["connect_args"] = {"connect_timeout": connect_timeout}
    try:
        engine = create_engine(parsed, **kwargs)
    except (ArgumentError, ImportError) as exc:
        raise DatabaseUnavailable(f"Cannot use {redact(url)}: {exc}") from None
    if bulk_load and parsed.get_backend_name() == "sqlite":

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection, _record) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA cache_size=-65536")
            cursor.execute("PRAGMA temp_store=MEMORY")
            cursor.close()

    return engine


def missing_sqlite_file(url: str) -> Path | None:
    """The file a sqlite:/// URL names when it does not exist (connecting would create it empty), else None.

    Checks and read-only commands call this first, so that a mistyped path is reported instead of leaving
    a new empty database behind.
    """
    try:
        parsed = make_url(normalise_url(url))
    except ArgumentError:
        return None
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    path = Path(parsed.database).expanduser()
    return None if path.exists() else path


@dataclass
class DatabaseCheck:
    """The result of a connectivity and permission check."""

    url: str
    dialect: str
    server_version: str
    can_create_tables: bool
    round_trip_ms: float


def check_database(url: str) -> DatabaseCheck:
    """Connect, read the server version, and create and drop a scratch table (in a rolled-back transaction).

    Raises DatabaseUnavailable with an actionable sentence when any step fails.
    """
    engine = open_engine(url)
    safe = redact(url)
    began = time.perf_counter()
    try:
        with engine.connect() as connection:
            dialect = engine.dialect.name
            if dialect == "postgresql":
                version = connection.execute(text("SHOW server_version")).scalar_one()
            elif dialect == "sqlite":
                version = connection.execute(text("SELECT sqlite_version()")).scalar_one()
            else:
                version = str(engine.dialect.server_version_info or "unknown")
            round_trip = (time.perf_counter() - began) * 1000
            connection.rollback()  # end the implicit transaction of the version query
            scratch = Table(f"twinfed_check_{uuid.uuid4().hex[:8]}", MetaData(), Column("x", Integer))
            transaction = connection.begin()
            try:
                scratch.create(connection)
                can_create = True
                scratch.drop(connection)  # SQLite runs DDL outside the transaction: the rollback alone would keep it
            except SQLAlchemyError:
                can_create = False
            finally:
                transaction.rollback()
    except OperationalError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        raise DatabaseUnavailable(
            f"Cannot connect to {safe}: {reason}. Check that the server is running, the host, port and "
            "database name are right, and that this machine may connect (pg_hba.conf, firewall)."
        ) from None
    except SQLAlchemyError as exc:
        raise DatabaseUnavailable(f"Database {safe} answered with an error: {exc}") from None
    finally:
        engine.dispose()
    return DatabaseCheck(
        url=safe, dialect=dialect, server_version=str(version), can_create_tables=can_create, round_trip_ms=round_trip
    )
