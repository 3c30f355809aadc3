"""Command-line commands of the data layer: `twinfed inspect`, `etl`, `erase`, `quarantine`, `dq`, `vocab`, `omop`.

Imports of the heavy parts happen inside the commands, so `twinfed --help` stays instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from omop_etl.dq_cli import dq
from omop_etl.omop_cli import omop_app
from omop_etl.vocab_cli import vocab_app

console = Console()


def register(app: typer.Typer) -> None:
    """Attach this package's commands to the root `twinfed` application."""
    app.command("inspect", rich_help_panel="Data")(inspect)
    app.command("etl", rich_help_panel="Data")(etl)
    app.command("erase", rich_help_panel="Data")(erase)
    app.command("quarantine", rich_help_panel="Data")(quarantine)
    app.command("dq", rich_help_panel="Data")(dq)
    app.add_typer(vocab_app, name="vocab", rich_help_panel="Data")
    app.add_typer(omop_app, name="omop", rich_help_panel="Data")


def inspect(
    path: Annotated[Path, typer.Argument(help="A Bulk Data export folder, or a folder written by 'twinfed synth'.")],
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the summary as JSON to this file.")
    ] = None,
    codes: Annotated[int, typer.Option("--codes", min=0, help="Observation codes to compare across exports.")] = 10,
) -> None:
    """Summarise FHIR NDJSON exports without loading them: counts, patients, units, consent, broken lines."""
    import orjson
    from rich.markup import escape
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    from omop_etl.export_inspect import NoExportFound, export_size, find_exports, inspect_export

    try:
        exports = find_exports(path)
    except NoExportFound as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    summaries = []
    with Progress(
        TextColumn("{task.description:<22}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=console,
        transient=True,
    ) as progress:
        for label, directory in exports:
            task = progress.add_task(label, total=export_size(directory))
            summaries.append(inspect_export(label, directory, lambda size, t=task: progress.advance(t, size)))

    overview = Table(title=f"FHIR exports in {path}")
    overview.add_column("")
    for s in summaries:
        overview.add_column(s.label, justify="right")
    classes = sorted({c for s in summaries for c in s.encounters_by_class})

    def count(s, resource_type: str) -> str:
        return f"{s.resources_by_type.get(resource_type, 0):,}"

    overview.add_row("patients", *(f"{s.patients:,}" for s in summaries))
    for cls in classes:
        overview.add_row(f"encounters {cls}", *(f"{s.encounters_by_class.get(cls, 0):,}" for s in summaries))
    for resource_type in (
        "Observation",
        "Condition",
        "MedicationRequest",
        "MedicationAdministration",
        "Procedure",
        "Consent",
    ):
        overview.add_row(resource_type, *(count(s, resource_type) for s in summaries))
    overview.add_row("first encounter", *((s.first_encounter or "-")[:10] for s in summaries))
    overview.add_row("last encounter", *((s.last_encounter or "-")[:10] for s in summaries))
    overview.add_row(
        "lines that are not JSON",
        *((f"[red]{s.malformed_lines:,}[/red]" if s.malformed_lines else "0") for s in summaries),
    )
    overview.add_row(
        "duplicate ids", *((f"[yellow]{s.duplicate_ids:,}[/yellow]" if s.duplicate_ids else "0") for s in summaries)
    )
    console.print(overview)
    if codes:
        totals: dict[tuple[str, str], int] = {}
        names: dict[tuple[str, str], str] = {}
        for s in summaries:
            for c in s.observation_codes:
                totals[(c.system, c.code)] = totals.get((c.system, c.code), 0) + c.count
                names[(c.system, c.code)] = c.display
        top = sorted(totals, key=lambda key: -totals[key])[:codes]
        units = Table(title="Units each Observation code arrives in (most frequent codes)")
        units.add_column("code")
        for s in summaries:
            units.add_column(s.label)
        for key in top:
            cells = []
            for s in summaries:
                found = next((c for c in s.observation_codes if (c.system, c.code) == key), None)
                cells.append(escape(", ".join(sorted(found.units))) if found else "-")
            units.add_row(f"{key[1]} {escape(names[key][:22])}", *cells)
        console.print(units)
    for s in summaries:
        if s.consent_provisions:
            text = ", ".join(f"{k}: {v}" for k, v in s.consent_provisions.items())
            console.print(f"[bold]{s.label}[/bold] research consents: {text}")
        if s.malformed_lines:
            where = "; ".join(f"{f.file} lines {f.first_malformed}" for f in s.files if f.malformed_lines)
            console.print(f"[bold]{s.label}[/bold] lines that are not JSON (first of each file): {where}")
    if json_out:
        json_out.write_bytes(orjson.dumps([s.model_dump() for s in summaries], option=orjson.OPT_INDENT_2))
        console.print(f"Summary written to {json_out}")


DB_HELP = "OMOP database URL: sqlite:///omop.sqlite (default store) or postgresql://user@host:5432/dbname."
SCHEMA_HELP = "PostgreSQL schema for the CDM tables (e.g. cdm); created if missing. Ignored on SQLite."
SECRET_HELP = (
    "File holding the site secret that keys pseudonymous ids (default: $TWINFED_SITE_SECRET_FILE or "
    "~/.config/twinfed/site-secret, created on first use). Back it up: later loads need the same secret."
)


def etl(
    input: Annotated[
        list[Path],
        typer.Option("--input", "-i", help="FHIR Bulk Data folder/NDJSON file or Bundle file/folder; repeatable."),
    ],
    db: Annotated[str, typer.Option("--db", help=DB_HELP)],
    report: Annotated[Path | None, typer.Option("--report", help="Write the load report as JSON to this file.")] = None,
    schema: Annotated[str | None, typer.Option("--schema", help=SCHEMA_HELP)] = None,
    secret_file: Annotated[Path | None, typer.Option("--secret-file", help=SECRET_HELP)] = None,
    exclude_opted_out: Annotated[
        bool,
        typer.Option(
            "--exclude-opted-out", help="Keep patients whose Consent denies research use out of OMOP entirely."
        ),
    ] = False,
    workers: Annotated[int | None, typer.Option("--workers", min=1, help="Worker processes for validation.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=100, help="Records per transaction.")] = 10000,
) -> None:
    """Load FHIR R4 exports into an OMOP CDM v5.4 database; every record is accounted for.

    Each input record ends as loaded, quarantined (file, position and the rule it broke; kept in the
    twinfed_quarantine table to fix and re-run), skipped (not something OMOP takes) or excluded
    (consent). Loads are transactional per batch and incremental: unchanged files are recognised by
    content and skipped, an interrupted load continues where it stopped, and re-loading a record
    updates it instead of duplicating it. No names, addresses or identifiers enter OMOP.
    """
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn, TransferSpeedColumn

    from omop_etl.database import DatabaseUnavailable
    from omop_etl.identity import SecretError
    from omop_etl.load.csv_extract import MappingError
    from omop_etl.load.pipeline import EtlSettings, run_etl
    from omop_etl.load.sources import InputError

    settings = EtlSettings(
        db_url=db,
        schema=schema,
        secret_file=secret_file,
        exclude_opted_out=exclude_opted_out,
        workers=workers,
        batch_size=batch_size,
    )
    try:
        with Progress(
            TextColumn("{task.description:<28}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        ) as progress:
            task = progress.add_task("loading", total=None)

            def on_progress(done: int, total: int, what: str) -> None:
                progress.update(task, completed=done, total=total, description=what[:28])

            result = run_etl(input, settings, on_progress)
    except (InputError, MappingError, DatabaseUnavailable, SecretError) as exc:
        console.print(f"[red]Cannot load:[/red] {escape_markup(str(exc))}")
        raise typer.Exit(2) from None
    if report:
        report.write_text(result.model_dump_json(indent=2), encoding="utf-8")
    print_etl_report(result)
    if report:
        console.print(f"Report written to {report}")


def print_etl_report(result) -> None:
    """The console summary of an ETL report (the same numbers as the JSON)."""
    unchanged = sum(1 for f in result.files if f.status == "unchanged")
    table = Table(
        title=f"Load into {result.database}: {result.seconds:.1f} s, {result.records_per_second:,.0f} records/s"
    )
    table.add_column("resource type")
    for column in ("input", "loaded", "quarantined", "skipped", "excluded"):
        table.add_column(column, justify="right")
    types = sorted(result.input.by_resource_type)
    for resource_type in types:
        table.add_row(
            resource_type,
            *(
                f"{getattr(result, status).by_resource_type.get(resource_type, 0):,}"
                for status in ("input", "loaded", "quarantined", "skipped", "excluded")
            ),
        )
    table.add_row(
        "[bold]total",
        *(f"[bold]{getattr(result, s).total:,}" for s in ("input", "loaded", "quarantined", "skipped", "excluded")),
    )
    console.print(table)
    verdict = "[green]reconciles[/green]" if result.reconciles else "[red]DOES NOT reconcile[/red]"
    console.print(f"input = loaded + quarantined + skipped + excluded: {verdict}")
    if unchanged:
        console.print(f"{unchanged} input file(s) unchanged since an earlier load: not read again.")
    duplicates = [f.path for f in result.files if f.status == "duplicate"]
    if duplicates:
        console.print(f"{len(duplicates)} input file(s) have the same content as another input file and were loaded "
                      f"once: {', '.join(Path(p).name for p in duplicates[:5])}")  # fmt: skip
    if result.quarantine_by_rule:
        rules = ", ".join(f"{rule} {n:,}" for rule, n in result.quarantine_by_rule.items())
        console.print(f"Quarantined by rule: {rules}  (see: twinfed quarantine --db ...)")
    if result.excluded_by_reason:
        console.print("Excluded: " + ", ".join(f"{why} ({n:,})" for why, n in result.excluded_by_reason.items()))
    if result.site_mapped_events:
        top = ", ".join(f"{escape_markup(c.code)} ({c.count:,})" for c in result.site_mapped_codes[:8])
        console.print(
            f"Mapped by the site's source_to_concept_map (twinfed vocab map): {result.site_mapped_events:,} events; "
            f"{top}"
        )
    if result.unmapped_codes:
        top = ", ".join(f"{c.code} ({c.count:,})" for c in result.unmapped_codes[:8])
        console.print(f"Codes without a standard concept (loaded with concept_id 0): {top}")
    if result.unconverted_units:
        top = ", ".join(f"{u.code} in {escape_markup(u.unit)} ({u.count:,})" for u in result.unconverted_units[:5])
        console.print(f"Units without a conversion rule (loaded as sent): {top}")
    rows = ", ".join(f"{name} {n:,}" for name, n in result.rows_by_table.items())
    console.print(f"Rows written: {rows or 'none'}")


def escape_markup(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def erase(
    db: Annotated[str, typer.Option("--db", help=DB_HELP)],
    patient: Annotated[
        str | None, typer.Option("--patient", help="The FHIR Patient id of the person to erase.")
    ] = None,
    person_id: Annotated[
        int | None, typer.Option("--person-id", help="Or the OMOP person_id (needs the site secret too).")
    ] = None,
    schema: Annotated[str | None, typer.Option("--schema", help=SCHEMA_HELP)] = None,
    secret_file: Annotated[Path | None, typer.Option("--secret-file", help=SECRET_HELP)] = None,
) -> None:
    """Erase one person from every table (right to erasure) and keep them out of later loads.

    Removes their rows from every CDM table, the id map and the quarantine, unlinks their consent
    records, and records a keyed hash of their source id so the next load excludes them.
    """
    from omop_etl.database import DatabaseUnavailable
    from omop_etl.identity import SecretError
    from omop_etl.load.erasure import PersonNotFound
    from omop_etl.load.erasure import erase as erase_person

    try:
        result = erase_person(db, patient_id=patient, person_id=person_id, schema=schema, secret_file=secret_file)
    except (ValueError, PersonNotFound, DatabaseUnavailable, SecretError) as exc:
        console.print(f"[red]Cannot erase:[/red] {exc}")
        raise typer.Exit(2) from None
    who = f"Patient/{patient}" if patient else f"person_id {person_id}"
    removed = {name: count for name, count in result.removed.items() if count}
    if result.person_id is None and not removed:
        console.print(f"{who} was not loaded; nothing to remove. It is recorded as erased: later loads exclude it.")
        return
    loaded = f" (person_id {result.person_id})" if result.person_id is not None else " (never loaded)"
    table = Table(title=f"Erased {who}{loaded}")
    table.add_column("table")
    table.add_column("rows removed", justify="right")
    for name, count in sorted(removed.items()):
        table.add_row(name, f"{count:,}")
    console.print(table)
    console.print("Recorded as erased: later loads exclude this patient.")


def quarantine(
    db: Annotated[str, typer.Option("--db", help=DB_HELP)],
    schema: Annotated[str | None, typer.Option("--schema", help=SCHEMA_HELP)] = None,
    rule: Annotated[str | None, typer.Option("--rule", help="Only records that broke this rule.")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="How many records to list.")] = 20,
    export: Annotated[
        Path | None, typer.Option("--export", help="Write the quarantined records (raw) as NDJSON to this file.")
    ] = None,
) -> None:
    """List quarantined records: file, position, rule and what is wrong; optionally export them to fix and re-load."""
    from sqlalchemy import func, select

    from omop_etl.database import DatabaseUnavailable, open_engine
    from omop_etl.load.state import etl_metadata
    from omop_etl.load.state import table as named

    quarantine_table = named(etl_metadata(schema), "twinfed_quarantine")
    try:
        engine = open_engine(db)
        with engine.connect() as connection:
            counts = connection.execute(
                select(quarantine_table.c.rule, func.count()).group_by(quarantine_table.c.rule)
            ).all()
            query = select(quarantine_table).order_by(quarantine_table.c.quarantine_id)
            if rule:
                query = query.where(quarantine_table.c.rule == rule)
            rows = connection.execute(query if export else query.limit(limit)).all()
    except DatabaseUnavailable as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    summary = ", ".join(f"{r} {n:,}" for r, n in sorted(counts, key=lambda x: -x[1]))
    console.print(f"Quarantined records by rule: {summary or 'none'}")
    listing = Table(title="Quarantined records")
    for column in ("file", "where", "type", "rule", "what is wrong"):
        listing.add_column(column)
    for row in rows[:limit]:
        listing.add_row(
            Path(row.file).name,
            f"{row.position_kind} {row.position}",
            row.resource_type,
            row.rule,
            escape_markup(row.detail),
        )
    console.print(listing)
    if export:
        with export.open("w", encoding="utf-8") as handle:
            for row in rows:
                if row.raw:
                    handle.write(row.raw.rstrip("\n") + "\n")
        console.print(
            f"{sum(1 for r in rows if r.raw):,} raw records written to {export}; fix them and load that file."
        )
