"""Build the OHDSI indexes of big tables after a first load instead of during it.

Maintaining four B-trees per row is most of the cost of inserting into measurement. When a large table
is still empty at the start of a load, its secondary indexes are dropped and built once at the end,
from sorted data, which is much faster. A load that is killed in between leaves the indexes missing;
the next run creates every missing index before it starts, so the database always ends up complete.
"""

from __future__ import annotations

from sqlalchemy import MetaData, func, inspect, select
from sqlalchemy.engine import Engine

DEFERRABLE = ("measurement", "observation", "drug_exposure", "condition_occurrence", "procedure_occurrence",
              "visit_detail", "visit_occurrence")  # fmt: skip


def _indexes_of(metadata: MetaData, name: str) -> list:
    table = next(t for t in metadata.tables.values() if t.name == name)
    return list(table.indexes)


def ensure_indexes(engine: Engine, metadata: MetaData) -> int:
    """Create every index of `metadata` that the database lacks (after an interrupted load). Returns the count."""
    created = 0
    inspector = inspect(engine)
    for table in metadata.tables.values():
        existing = {ix["name"] for ix in inspector.get_indexes(table.name, schema=table.schema)}
        for index in table.indexes:
            if index.name not in existing:
                index.create(engine)
                created += 1
    return created


def defer_indexes(engine: Engine, metadata: MetaData) -> list[str]:
    """Drop the secondary indexes of the big tables that are empty; returns the table names affected."""
    deferred = []
    for name in DEFERRABLE:
        table = next(t for t in metadata.tables.values() if t.name == name)
        with engine.connect() as connection:
            empty = (
                connection.execute(select(func.count()).select_from(table.select().limit(1).subquery())).scalar() == 0
            )
        if not empty:
            continue
        for index in _indexes_of(metadata, name):
            index.drop(engine, checkfirst=True)
        deferred.append(name)
    return deferred


def restore_indexes(engine: Engine, metadata: MetaData, tables: list[str]) -> None:
    """Build the indexes dropped by `defer_indexes`."""
    for name in tables:
        for index in _indexes_of(metadata, name):
            index.create(engine, checkfirst=True)
