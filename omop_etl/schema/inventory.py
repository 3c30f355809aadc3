"""What a database holds compared with the OMOP CDM v5.4 specification: tables, columns and OHDSI indexes.

`twinfed omop init` uses it to create only what is missing, and `twinfed site doctor` to name what an
existing OMOP database (possibly written by another tool) lacks. Only names are compared: another tool
may well have chosen BIGINT where the spec says integer, or left out the primary keys (OHDSI's own DDL
puts them in a separate, optional script), and twinfed reads such a database all the same.
"""

from __future__ import annotations

from pydantic import BaseModel, Field
from sqlalchemy import inspect
from sqlalchemy.engine import Connection

from omop_etl.schema import cdm_metadata


class SchemaInventory(BaseModel):
    """The CDM tables, columns and indexes a database has and lacks (names only)."""

    dialect: str
    schema_name: str | None = None
    present_tables: list[str] = Field(default_factory=list, description="CDM v5.4 tables that exist")
    missing_tables: list[str] = Field(default_factory=list, description="CDM v5.4 tables that do not exist")
    missing_columns: dict[str, list[str]] = Field(
        default_factory=dict, description="existing CDM tables -> the v5.4 columns they lack"
    )
    missing_indexes: list[str] = Field(
        default_factory=list,
        description="OHDSI indexes (by name) of existing tables whose column is not indexed by any index",
    )
    other_tables: list[str] = Field(default_factory=list, description="tables that are not CDM tables")

    @property
    def complete(self) -> bool:
        """Every CDM v5.4 table with every column (indexes only make it faster)."""
        return not self.missing_tables and not self.missing_columns

    @property
    def has_cdm_tables(self) -> bool:
        return bool(self.present_tables)


def _indexed_first_columns(connection: Connection, table: str, schema: str | None) -> tuple[set[str], set[str]]:
    """(names of the table's indexes, columns that lead an index or the primary key)."""
    inspector = inspect(connection)
    names: set[str] = set()
    leading: set[str] = set()
    for index in inspector.get_indexes(table, schema=schema):
        if index.get("name"):
            names.add(index["name"])
        columns = [c for c in index.get("column_names") or [] if c]
        if columns:
            leading.add(columns[0])
    primary = inspector.get_pk_constraint(table, schema=schema).get("constrained_columns") or []
    if primary:
        leading.add(primary[0])
    return names, leading


def take_inventory(connection: Connection, schema: str | None = None) -> SchemaInventory:
    """Compare the database behind `connection` (in `schema`, PostgreSQL) with the CDM v5.4 specification."""
    inspector = inspect(connection)
    existing = set(inspector.get_table_names(schema=schema))
    metadata = cdm_metadata(schema)
    cdm_tables = {table.name: table for table in metadata.tables.values()}
    inventory = SchemaInventory(dialect=connection.dialect.name, schema_name=schema)
    for name in sorted(cdm_tables):
        if name not in existing:
            inventory.missing_tables.append(name)
            continue
        inventory.present_tables.append(name)
        # Databases created by earlier twinfed versions named note_nlp's offset column with its quotes ("offset").
        have = {column["name"].strip('"') for column in inspector.get_columns(name, schema=schema)}
        lacking = [c.name for c in cdm_tables[name].columns if c.name not in have]
        if lacking:
            inventory.missing_columns[name] = lacking
        if cdm_tables[name].indexes:
            index_names, leading = _indexed_first_columns(connection, name, schema)
            for index in sorted(cdm_tables[name].indexes, key=lambda ix: ix.name or ""):
                column = next(iter(index.columns)).name
                if index.name not in index_names and column not in leading and column in have:
                    inventory.missing_indexes.append(str(index.name))
    inventory.other_tables = sorted(existing - set(cdm_tables))
    return inventory
