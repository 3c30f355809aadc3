"""`twinfed dq`: run the data-quality checks on an OMOP database and say, in one screen, what is wrong.

A plain function with typer annotations; the `twinfed` command registers it. The checks themselves live
in omop_etl.quality; heavy imports happen inside the command so `twinfed --help` stays instant.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Annotated

import typer

MAX_LISTED_FAILURES = 15


def dq(
    db: Annotated[
        str,
        typer.Option(
            "--db",
            help="OMOP database URL: sqlite:///omop.sqlite (a file) or postgresql://user@host:5432/dbname. "
            "Keep passwords out of the command line: PostgreSQL reads ~/.pgpass and PGPASSWORD.",
            show_default=False,
        ),
    ],
    schema: Annotated[
        str | None,
        typer.Option(
            "--schema",
            help="Schema that holds the CDM tables (PostgreSQL), e.g. cdm. Default: the database's default "
            "schema (public on PostgreSQL).",
        ),
    ] = None,
    report: Annotated[
        Path | None,
        typer.Option(
            "--report",
            dir_okay=False,
            help="Also write the full results as JSON to this file, e.g. dq.json (one record per check, "
            "with counts, threshold and explanation).",
        ),
    ] = None,
    html: Annotated[
        Path | None,
        typer.Option(
            "--html",
            dir_okay=False,
            help="Also write a self-contained HTML report to this file, e.g. dq.html (opens offline in any "
            "browser; failures listed first).",
        ),
    ] = None,
) -> None:
    """Check the data quality of an OMOP CDM v5.4 database, the way OHDSI's DataQualityDashboard does.

    Runs the DQD checks that matter for digital twins inside the database
    (nothing is copied out): required fields, references between tables,
    concept domains and standard concepts, records mapped to concept 0,
    plausible values, units and genders, dates after birth and not long
    after death, events inside their visit, one observation period per
    person without overlaps. Each check is compared with its DQD threshold
    and reported as passed, failed or not applicable (no data to check).

    Exit status: 0 when every applicable check passed; 1 when a check
    failed or could not run; 2 when the database could not be opened or a
    report could not be written. docs/data-quality.md explains each check.
    """
    from rich.console import Console

    from omop_etl.database import DatabaseUnavailable, open_engine
    from omop_etl.quality import run_checks, write_html

    console = Console()
    try:
        _refuse_missing_sqlite_file(db)
        engine = open_engine(db)
        try:
            result = run_checks(engine, schema)
        finally:
            engine.dispose()
    except DatabaseUnavailable as exc:
        Console(stderr=True).print(f"[red]Error:[/red] {_escape(str(exc))}")
        raise typer.Exit(2) from None

    written = []
    try:  # files first, so a summary piped into `head` cannot cost the reports
        if report is not None:
            report.parent.mkdir(parents=True, exist_ok=True)
            report.write_text(result.model_dump_json(indent=2), encoding="utf-8")
            written.append(f"JSON report written to {report}")
        if html is not None:
            write_html(result, html)
            written.append(f"HTML report written to {html}")
    except OSError as exc:
        Console(stderr=True).print(
            f"[red]Error:[/red] cannot write the report: {_escape(str(exc))}. Choose a folder you may write to."
        )
        raise typer.Exit(2) from None
    _print_summary(console, result)
    for line in written:
        console.print(_escape(line))
    raise typer.Exit(0 if result.ok else 1)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def _refuse_missing_sqlite_file(url: str) -> None:
    """SQLite would silently create an empty file for a mistyped path; say so instead."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    from omop_etl.database import DatabaseUnavailable, normalise_url

    try:
        parsed = make_url(normalise_url(url))
    except ArgumentError:
        return  # open_engine explains malformed URLs
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return
    if not Path(parsed.database).is_file():
        raise DatabaseUnavailable(
            f"There is no SQLite database at {parsed.database}. Give the path of the OMOP file: "
            "sqlite:///relative/path.sqlite, or sqlite:////absolute/path.sqlite (four slashes)."
        )


def _print_summary(console, result) -> None:
    from rich.table import Table

    from omop_etl.quality import Status

    counts = result.counts
    where = f"{result.database}" + (f" (schema {result.cdm_schema})" if result.cdm_schema else "")
    console.print(f"[bold]OMOP data quality[/bold] of {_escape(where)}")
    console.print(f"{len(result.results)} checks in {result.duration_s:.1f} s (thresholds of DQD {result.dqd_version})")
    for warning in result.warnings:
        console.print(f"[yellow]Warning:[/yellow] {_escape(warning)}")

    summary = Table(title="Results by Kahn category", title_justify="left")
    summary.add_column("Category")
    for label, style in (("Passed", "green"), ("Failed", "red"), ("N/A", "dim"), ("Error", "yellow")):
        summary.add_column(label, justify="right", style=style)
    for row in result.summary:
        summary.add_row(row.category, str(row.passed), str(row.failed), str(row.not_applicable), str(row.error))
    summary.add_row(
        "[bold]Total[/bold]",
        str(counts["passed"]),
        str(counts["failed"]),
        str(counts["not_applicable"]),
        str(counts["error"]),
    )
    console.print(summary)

    problems = [r for r in result.sorted_results() if r.status in (Status.FAILED, Status.ERROR)]
    if not problems:
        console.print("[green]All applicable checks passed.[/green]")
        return
    console.print(f"[bold red]{len(problems)} check(s) failed or could not run[/bold red], most serious first:")
    for number, item in enumerate(problems[:MAX_LISTED_FAILURES], start=1):
        label = "" if item.status is Status.FAILED else " [yellow](could not run)[/yellow]"
        console.print(f"{number:>2}. [bold]{_escape(item.name)}[/bold]{label}: {_escape(item.where)}")
        details = f"{item.explanation} ({item.check_type}, {item.severity})"
        width = max(console.width - 4, 40)
        console.print(_escape(textwrap.fill(details, width, initial_indent="    ", subsequent_indent="    ")))
    if len(problems) > MAX_LISTED_FAILURES:
        console.print(
            f"... and {len(problems) - MAX_LISTED_FAILURES} more; write --report dq.json or --html dq.html for all."
        )
