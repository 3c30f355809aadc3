"""Read access to a site's OMOP CDM v5.4 database, the same on SQLite and PostgreSQL (optional schema).

All times leave the database as whole seconds since 1970 (computed in SQL), because SQLite stores times as
text (or numbers) and PostgreSQL as timestamps: comparing integers gives the same answer on both, exact to the second,
and integers cross the driver much faster than datetime objects. OMOP times are local wall-clock times
without a zone; they are read as if they were UTC, which keeps differences between them exact.

The chosen examples (person, index, prediction time, visit end) are written to a temporary table so that
every covariate window is applied by the database in a join, and only the rows inside a window come back.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import pandas as pd
from sqlalchemy import (
    BigInteger,
    Column,
    MetaData,
    Table,
    case,
    cast,
    extract,
    func,
    inspect,
    or_,
    select,
    text,
)
from sqlalchemy.engine import Connection
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.selectable import Select

from omop_etl.database import DatabaseUnavailable, open_engine, redact
from omop_etl.schema import cdm_metadata
from site_node.cohort.errors import CohortError

SUPPORTED_DIALECTS = ("sqlite", "postgresql")
INDEX_TABLE = "twinfed_cohort_index"
# Anchors of the temporary index table that windows can be measured from.
ANCHORS = ("index_s", "prediction_s", "visit_end_s")


# Up to this many chosen patients, SQLite is told the size of their temporary table (`write_index`).
FEW_PATIENTS = 100


class OmopSource:
    """One open, read-only session on an OMOP database; use `OmopSource.open` as a context manager."""

    def __init__(self, connection: Connection, schema: str | None, where: str) -> None:
        self.connection = connection
        self.schema = schema
        self.where = where  # "the database at <url>[ in schema 'x']", for messages
        self.dialect = connection.dialect.name
        self.cdm = cdm_metadata(schema)
        self.present = self._table_names()
        self._index: Table | None = None
        self._has_ancestors: bool | None = None

    @classmethod
    @contextmanager
    def open(cls, db_url: str, schema: str | None = None) -> Iterator[OmopSource]:
        """Connect, check the dialect and that OMOP tables are there; roll back and disconnect on exit."""
        engine = open_engine(db_url)
        where = f"the database at {redact(db_url)}" + (f" in schema '{schema}'" if schema else "")
        try:
            if engine.dialect.name not in SUPPORTED_DIALECTS:
                raise CohortError(
                    f"{where} is a {engine.dialect.name} database; cohorts are built on "
                    f"{' or '.join(SUPPORTED_DIALECTS)} OMOP databases"
                )
            try:
                connection = engine.connect()
            except OperationalError as exc:
                reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
                raise DatabaseUnavailable(
                    f"Cannot connect to {redact(db_url)}: {reason}. Check that the server is running and reachable."
                ) from None
            try:
                yield cls(connection, schema, where)
            finally:
                connection.rollback()
                connection.close()
        finally:
            engine.dispose()

    # --- tables -----------------------------------------------------------------------------------

    def _table_names(self) -> set[str]:
        try:
            return set(inspect(self.connection).get_table_names(schema=self.schema))
        except SQLAlchemyError as exc:
            raise CohortError(f"Cannot list the tables of {self.where}: {_first_line(exc)}") from None

    def require(self, names: Iterable[str]) -> None:
        """Raise CohortError naming what is missing when the database lacks OMOP tables the study reads."""
        cdm_names = {t.name for t in self.cdm.tables.values()}
        if not self.present & cdm_names:
            raise CohortError(
                f"{self.where} has no OMOP CDM tables (it has {len(self.present)} other table(s)). Load it with "
                "`twinfed etl` first, or name the schema that holds the CDM tables."
            )
        if "person" not in self.present:
            raise CohortError(f"{self.where} has no person table, so it is not a usable OMOP CDM database.")
        missing = sorted(set(names) - self.present)
        if missing:
            raise CohortError(f"{self.where} lacks the OMOP table(s) this study reads: {', '.join(missing)}.")

    def has(self, name: str) -> bool:
        return name in self.present

    def table(self, name: str) -> Table:
        """The CDM table `name` as the v5.4 specification defines it (in this source's schema)."""
        for candidate in self.cdm.tables.values():
            if candidate.name == name:
                return candidate
        raise KeyError(name)

    def extra_table(self, table: Table) -> Table | None:
        """A non-CDM table (e.g. the consent registry) re-homed in this source's schema, if present."""
        if table.name not in self.present:
            return None
        return table.to_metadata(MetaData(), schema=self.schema)

    # --- expressions ------------------------------------------------------------------------------

    def epoch(self, *columns: ColumnElement) -> ColumnElement:
        """Whole seconds since 1970 of the first non-null column (e.g. a datetime, then its date).

        SQLite has no time type: SQLAlchemy and the ETL store ISO text, while OHDSI's DatabaseConnector
        (e.g. the Eunomia test databases) stores numbers of seconds since 1970. Both are read.
        """
        value = func.coalesce(*columns) if len(columns) > 1 else columns[0]
        if self.dialect == "sqlite":
            return case(
                (func.typeof(value).in_(("integer", "real")), cast(value, BigInteger)),
                else_=cast(func.strftime("%s", value), BigInteger),
            )
        return cast(func.floor(extract("epoch", value)), BigInteger)

    def has_concept_ancestors(self) -> bool:
        """Whether the vocabulary's concept_ancestor table is there and filled (a bundled subset has none)."""
        if self._has_ancestors is None:
            self._has_ancestors = self.has("concept_ancestor") and (
                self.connection.execute(select(self.table("concept_ancestor").c.ancestor_concept_id).limit(1)).first()
                is not None
            )
        return self._has_ancestors

    def concept_filter(self, column: ColumnElement, concept_ids: Sequence[int], descendants: bool) -> ColumnElement:
        """`column` is one of the concepts, or (with `descendants`, when the vocabulary has them) below one."""
        ids = sorted({int(c) for c in concept_ids})
        if not descendants or not self.has_concept_ancestors():
            return column.in_(ids)
        ancestor = self.table("concept_ancestor")
        below = select(ancestor.c.descendant_concept_id).where(ancestor.c.ancestor_concept_id.in_(ids))
        return or_(column.in_(ids), column.in_(below))

    # --- reading ----------------------------------------------------------------------------------

    def frame(self, statement: Select) -> pd.DataFrame:
        """Run a SELECT and return its rows as a DataFrame with the statement's column names."""
        try:
            result = self.connection.execute(statement)
            names = list(result.keys())
            columns = list(zip(*result.fetchall(), strict=True)) or [() for _ in names]
        except SQLAlchemyError as exc:
            raise CohortError(
                f"Reading {self.where} failed: {_first_line(exc)}. Is it an OMOP CDM v5.4 database?"
            ) from None
        # Column-wise construction: pandas probes each Row object one by one otherwise (several times slower).
        return pd.DataFrame({name: list(values) for name, values in zip(names, columns, strict=True)})

    # --- the temporary table of chosen examples ---------------------------------------------------

    def write_index(self, examples: pd.DataFrame) -> Table:
        """Store person_id + anchors (seconds) of the chosen examples in a session-private temporary table."""
        table = Table(
            INDEX_TABLE,
            MetaData(),
            Column("person_id", BigInteger, primary_key=True, autoincrement=False),
            *(Column(anchor, BigInteger, nullable=False) for anchor in ANCHORS),
            prefixes=["TEMPORARY"],
        )
        table.create(self.connection)  # the connection is this build's own, so the name is free
        rows = examples[["person_id", *ANCHORS]].astype("int64").to_dict("records")
        if rows:
            self.connection.execute(table.insert(), rows)
        if self.dialect == "postgresql":
            self.connection.execute(text(f"ANALYZE {INDEX_TABLE}"))  # a temporary table has no statistics
        elif self.dialect == "sqlite" and len(rows) <= FEW_PATIENTS:
            # Told the table's size, SQLite reads these few patients' rows by person (a twin query: 50 ms a
            # concept less on a small hospital, more on a large one); not told, it reads every patient's rows of
            # each concept, which stays the faster plan for a whole cohort.
            self.connection.execute(text(f"ANALYZE temp.{INDEX_TABLE}"))
        self._index = table
        return table

    @property
    def index(self) -> Table:
        if self._index is None:
            raise RuntimeError("write_index must run before windows are read")
        return self._index


def _first_line(exc: Exception) -> str:
    orig = getattr(exc, "orig", None)
    return (str(orig) if orig is not None else str(exc)).strip().splitlines()[0]
