"""`twinfed omop ...`: the OMOP CDM v5.4 database itself (creating an empty one for a new site).

The logic is in omop_etl.schema.create; this module only renders. Heavy imports happen inside the command.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

console = Console()

omop_app = typer.Typer(
    help="The site's OMOP CDM v5.4 database: create an empty one (all tables and OHDSI indexes) on SQLite or "
    "PostgreSQL. A hospital that already has an OMOP database does not need this: point `twinfed site doctor "
    "--db URL` at it instead.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else ("es" if noun.endswith("x") else "s"))


def _listing(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


@omop_app.command("init")
def init(
    db: Annotated[
        str,
        typer.Option(
            "--db",
            help="Database URL: sqlite:///omop.sqlite (the file is created) or postgresql://user@host:5432/dbname "
            "(the database must exist; a password in the URL is never printed).",
        ),
    ],
    schema: Annotated[
        str | None,
        typer.Option("--schema", help="PostgreSQL schema for the CDM tables, e.g. cdm; created if missing."),
    ] = None,
) -> None:
    """Create an empty OMOP CDM v5.4 schema: all 39 tables from the official specification, with OHDSI's indexes.

    Safe to run again. A complete schema is reported and left as it is; an incomplete one gets the tables
    and indexes it lacks, and the command lists what it created. Existing tables are never changed or
    emptied: a table that lacks v5.4 columns (e.g. a CDM 5.3 database) is named, and the command exits
    with status 1, because upgrading it is a migration (OHDSI's CommonDataModel scripts) to plan.

    Foreign keys are not created as constraints, as in OHDSI's default DDL (they would need the full
    vocabulary); `twinfed dq` checks them. Next steps: `twinfed vocab load DIR` for the vocabulary, then
    `twinfed etl` to load data, or your own ETL tool.
    """
    from omop_etl.schema.create import SchemaInitError, init_cdm_schema

    try:
        report = init_cdm_schema(db, schema)
    except SchemaInitError as exc:
        console.print(f"[red]{escape(str(exc))}[/red]")
        raise typer.Exit(2) from None
    where = escape(report.database)
    if report.created_schema:
        console.print(f"Created schema {escape(schema or '')}.")
    if report.created_tables:
        state = "an empty OMOP CDM v5.4 schema" if not report.existing_tables else "the missing OMOP CDM v5.4 tables"
        console.print(
            f"Created {state} in {where}: {_count(len(report.created_tables), 'table')} "
            f"({_listing(report.created_tables)})."
        )
    if report.created_indexes:
        console.print(f"Created {_count(len(report.created_indexes), 'OHDSI index')}.")
    if report.existing_tables and report.created_tables:
        console.print(
            f"Left as they were: {len(report.existing_tables)} CDM tables that already existed "
            f"({_listing(report.existing_tables)})."
        )
    if not report.created_anything and report.complete:
        console.print(
            f"{where} already holds a complete OMOP CDM v5.4 schema ({len(report.existing_tables)} tables with "
            "their indexes); nothing was created."
        )
    if report.other_tables:
        console.print(f"[dim]Other tables present (left alone): {escape(_listing(report.other_tables))}[/dim]")
    if not report.complete:
        for table, columns in sorted(report.missing_columns.items()):
            console.print(f"[red]Table {escape(table)} lacks the v5.4 column(s) {escape(', '.join(columns))}.[/red]")
        console.print(
            "[red]twinfed does not alter existing tables. If this is an older CDM (5.3), migrate it to 5.4 with "
            "OHDSI's CommonDataModel migration scripts, then run this command again.[/red]"
        )
        raise typer.Exit(1)
