"""Fast bulk insertion into CDM tables: COPY on PostgreSQL, executemany on SQLite.

Row-by-row ORM inserts would make a nightly load of millions of records take hours. Here rows are
plain tuples in the table's column order (or a given column subset) and travel in one round trip per
batch. Values are written as Python values: None, int, float, str, datetime.date, datetime.datetime.
On SQLite, dates and datetimes are stored as ISO-8601 text, the format SQLAlchemy's SQLite Date and
DateTime types read back.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence

from sqlalchemy import Table
from sqlalchemy.engine import Connection


def qualified_name(table: Table, dialect: str) -> str:
    """The quoted, schema-qualified table name for raw SQL."""
    name = f'"{table.name}"'
    if table.schema and dialect == "postgresql":
        return f'"{table.schema}".{name}'
    return name


def _sqlite_value(value: object) -> object:
    if isinstance(value, dt.datetime):
        return value.isoformat(sep=" ")
    if isinstance(value, dt.date):
        return value.isoformat()
    return value


def insert_rows(
    connection: Connection,
    table: Table,
    rows: Iterable[Sequence[object]],
    columns: Sequence[str] | None = None,
    *,
    plain: bool = False,
) -> int:
    """Insert `rows` (tuples in the order of `columns`, default: all table columns). Returns the row count.

    Runs inside the caller's transaction, so a batch is written completely or not at all. `plain=True`
    promises that values are already None/int/float/str/bytes (dates as ISO text), which skips a
    per-value conversion on SQLite.
    """
    names = list(columns) if columns is not None else [c.name for c in table.columns]
    dialect = connection.dialect.name
    target = qualified_name(table, dialect)
    column_list = ", ".join(f'"{n}"' for n in names)
    raw = connection.connection.driver_connection
    count = 0
    if dialect == "postgresql":
        with raw.cursor() as cursor, cursor.copy(f"COPY {target} ({column_list}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
                count += 1
        return count
    placeholders = ", ".join("?" for _ in names)
    materialised = rows if plain and isinstance(rows, list) else [tuple(_sqlite_value(v) for v in row) for row in rows]
    cursor = raw.cursor()
    try:
        cursor.executemany(f"INSERT INTO {target} ({column_list}) VALUES ({placeholders})", materialised)
    finally:
        cursor.close()
    return len(materialised)
