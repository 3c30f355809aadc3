"""`twinfed omop init`: an empty OMOP CDM v5.4 schema, or the missing parts of an incomplete one.

The tables and OHDSI indexes come from the bundled specification (see this package's docstring), so the
schema is the one OHDSI tools expect. Running it again is safe: a complete schema is reported and left
alone; an incomplete one gets the tables and indexes it lacks. Tables that exist are never altered: a
table without some v5.4 columns (a CDM 5.3 database, say) is reported, because adding columns to another
tool's table is a migration the site must decide on. Everything runs in one transaction, on SQLite
as on PostgreSQL: an interrupted initialisation leaves the database as it was.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field
from sqlalchemy import inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from omop_etl.database import DatabaseUnavailable, check_database, normalise_url, open_engine, redact
from omop_etl.schema import CDM_VERSION, cdm_metadata
from omop_etl.schema.inventory import SchemaInventory, take_inventory

SUPPORTED_DIALECTS = ("sqlite", "postgresql")


class SchemaInitError(RuntimeError):
    """The schema cannot be created; the message names the database and says what to do."""


class InitReport(BaseModel):
    """What `omop init` found and created."""

    database: str = Field(description="the database (password hidden) and schema")
    cdm_version: str = CDM_VERSION
    created_schema: bool = False
    created_tables: list[str] = Field(default_factory=list)
    created_indexes: list[str] = Field(default_factory=list)
    existing_tables: list[str] = Field(default_factory=list, description="CDM tables that were already there")
    missing_columns: dict[str, list[str]] = Field(
        default_factory=dict, description="existing tables that lack v5.4 columns (not altered)"
    )
    other_tables: list[str] = Field(default_factory=list, description="non-CDM tables present (left alone)")

    @property
    def created_anything(self) -> bool:
        return self.created_schema or bool(self.created_tables or self.created_indexes)

    @property
    def complete(self) -> bool:
        """The schema now has every CDM v5.4 table with every column."""
        return not self.missing_columns


def where(url: str, schema: str | None) -> str:
    """'<url>' or '<url>, schema <s>' with the password hidden, for messages."""
    return redact(url) + (f", schema {schema}" if schema else "")


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    return (str(orig).strip().splitlines() or [type(orig).__name__])[0]


def _check_target(url: str, schema: str | None) -> None:
    """Refuse URLs we do not support and SQLite paths whose folder is missing, before touching anything."""
    try:
        parsed = make_url(normalise_url(url))
    except Exception:
        return
    backend = parsed.get_backend_name()
    if backend not in SUPPORTED_DIALECTS:
        raise SchemaInitError(
            f"{redact(url)} is a {backend} database; twinfed creates OMOP schemas on SQLite and PostgreSQL. "
            "Use sqlite:///path/omop.sqlite or postgresql://user@host:5432/dbname."
        )
    if backend == "sqlite":
        if not parsed.database or parsed.database == ":memory:":
            raise SchemaInitError(
                "An in-memory SQLite database disappears when the command ends; name a file, e.g. "
                "sqlite:///omop.sqlite."
            )
        folder = Path(parsed.database).expanduser().resolve().parent
        if not folder.is_dir():
            raise SchemaInitError(
                f"The folder {folder} for the SQLite database {parsed.database} does not exist; create it first "
                "or choose another path."
            )
        if schema:
            raise SchemaInitError(
                f"--schema {schema} was given, but {redact(url)} is SQLite, which has no schemas; leave --schema out."
            )


def init_cdm_schema(url: str, schema: str | None = None) -> InitReport:
    """Create the CDM v5.4 tables and OHDSI indexes the database lacks (PostgreSQL: and the schema).

    Raises SchemaInitError or DatabaseUnavailable with a sentence naming the database and what to do.
    """
    _check_target(url, schema)
    at = where(url, schema)
    try:
        checked = check_database(url)
    except DatabaseUnavailable as exc:
        raise SchemaInitError(f"The OMOP schema was not created: {exc}") from None
    if not checked.can_create_tables:
        raise SchemaInitError(
            f"{at}: connected, but this database user may not create tables. Grant CREATE on the database "
            "(and schema), or run the command as the schema's owner."
        )
    report = InitReport(database=at)
    engine = open_engine(url)
    try:
        with engine.begin() as connection:
            if connection.dialect.name == "sqlite":
                # pysqlite runs DDL outside any transaction unless one is opened explicitly: one transaction makes
                # the initialisation all or nothing on SQLite too (and one disk sync instead of a hundred).
                connection.exec_driver_sql("BEGIN")
            if schema and schema not in inspect(connection).get_schema_names():
                connection.execute(text(f'CREATE SCHEMA "{schema}"'))
                report.created_schema = True
            before: SchemaInventory = take_inventory(connection, schema)
            metadata = cdm_metadata(schema)
            tables = {table.name: table for table in metadata.tables.values()}
            for name in before.missing_tables:
                tables[name].create(connection)  # with its OHDSI indexes
                report.created_tables.append(name)
                report.created_indexes.extend(sorted(str(index.name) for index in tables[name].indexes))
            indexes = {str(index.name): index for table in tables.values() for index in table.indexes}
            for name in before.missing_indexes:
                indexes[name].create(connection)
                report.created_indexes.append(name)
            report.existing_tables = before.present_tables
            report.missing_columns = before.missing_columns
            report.other_tables = before.other_tables
    except SQLAlchemyError as exc:
        raise SchemaInitError(
            f"{at} refused to create the OMOP schema: {_first_line(exc)}. Check that this user may create "
            "tables and indexes there; nothing was changed."
        ) from None
    finally:
        engine.dispose()
    return report
