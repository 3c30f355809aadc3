"""Command-line commands of the data layer: `twinfed synth` and `twinfed inspect`.

Imports of the heavy parts happen inside the commands, so `twinfed --help` stays instant.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

console = Console()


def register(app: typer.Typer) -> None:
    """Attach this package's commands to the root `twinfed` application."""
    app.command("synth", rich_help_panel="Data")(synth)
    app.command("inspect", rich_help_panel="Data")(inspect)


def synth(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write the consortium into (created if missing).")],
    sites: Annotated[int, typer.Option("--sites", min=1, max=200, help="Number of hospitals.")] = 3,
    patients: Annotated[int, typer.Option("--patients", min=10, help="Patients per hospital.")] = 2000,
    seed: Annotated[int, typer.Option("--seed", min=0, help="Random seed; the same seed gives identical files.")] = 7,
    export_date: Annotated[
        str,
        typer.Option("--export-date", help="Date of the simulated $export (YYYY-MM-DD); history ends the day before."),
    ] = "2026-01-01",
    years: Annotated[
        float, typer.Option("--years", min=0.25, max=20, help="Years of history before the export date.")
    ] = 3.0,
    profiles: Annotated[
        Path | None,
        typer.Option(
            "--profiles",
            exists=True,
            dir_okay=False,
            help="YAML file of site profiles (see configs/synthetic-sites.yaml).",
        ),
    ] = None,
    workers: Annotated[
        int | None, typer.Option("--workers", min=1, help="Worker processes (default: one per CPU core).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a consortium previously written to --out.")] = False,
    report: Annotated[
        bool, typer.Option("--report/--no-report", help="Write an HTML report with plots to OUT/report.")
    ] = True,
) -> None:
    """Generate a synthetic hospital consortium: one FHIR R4 Bulk Data export per hospital.

    Each hospital gets OUT/<site>/fhir/*.ndjson (Patient, Encounter, Condition, Observation,
    MedicationRequest, MedicationAdministration, Procedure, Consent, Organization, Location) plus the
    $export manifest. The ground truth (injected defects, consent histories, true outcome
    probabilities, Bayes-optimal AUROC) goes to OUT/ground-truth/<site>.json, apart from the exports.
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from omop_etl.synthetic import SynthConfig, generate_consortium, load_profiles
    from omop_etl.synthetic.consortium import OutputDirectoryNotEmpty

    try:
        when = dt.date.fromisoformat(export_date)
    except ValueError:
        raise typer.BadParameter(
            f"'{export_date}' is not a date; use YYYY-MM-DD.", param_hint="--export-date"
        ) from None
    try:
        site_profiles = load_profiles(profiles) if profiles else None
        config = SynthConfig(
            sites=sites,
            patients_per_site=patients,
            seed=seed,
            export_date=when,
            history_years=years,
            profiles=site_profiles,
        )
    except ValueError as exc:
        console.print(f"[red]Cannot generate:[/red] {exc}")
        raise typer.Exit(2) from None

    names = [p.site_id for p in config.site_profiles()]
    console.print(
        f"Generating [bold]{len(names)}[/bold] hospitals x [bold]{patients}[/bold] patients "
        f"(seed {seed}, history {config.history_start} .. {when}) into [bold]{out}[/bold]"
    )
    with Progress(
        TextColumn("{task.description:<22}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TextColumn("[dim]{task.fields[stage]}"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        tasks = {name: progress.add_task(name, total=1.0, stage="waiting") for name in names}

        def on_progress(site_id: str, stage: str, fraction: float) -> None:
            progress.update(tasks[site_id], completed=fraction, stage=stage)

        try:
            result = generate_consortium(config, out, workers=workers, force=force, on_progress=on_progress)
        except OutputDirectoryNotEmpty as exc:
            progress.stop()
            console.print(f"[red]{exc}[/red]")
            raise typer.Exit(2) from None

    table = Table(title=f"Synthetic consortium, generated in {result.seconds:.1f} s")
    for column in ("site", "patients", "stays", "deaths", "resources", "defects", "opt-outs", "missing"):
        table.add_column(column, justify="left" if column == "site" else "right")
    ceiling = Table(title="Best achievable AUROC (ground truth; no model can do better)")
    for column in ("site", "in-hospital death", "stay > 7 days", "readmission 30 d"):
        ceiling.add_column(column, justify="left" if column == "site" else "right")
    for s in result.sites:
        table.add_row(
            s.site_id,
            f"{s.patients:,}",
            f"{s.stays:,}",
            f"{s.in_hospital_deaths:,}",
            f"{sum(s.lines_by_type.values()):,}",
            f"{s.defects:,}",
            f"{s.denying_consent:,}",
            f"{s.missing_rate:.0%}",
        )
        auroc = s.outcome_auroc
        ceiling.add_row(
            s.site_id,
            f"{auroc['in_hospital_death']:.3f}",
            f"{auroc['los_over_7_days']:.3f}",
            f"{auroc['readmission_30d']:.3f}",
        )
    console.print(table)
    console.print(ceiling)
    console.print(f"Index: {result.index_file}")
    console.print(f"Ground truth (never part of an export): {out / 'ground-truth'}")
    if report:
        from omop_etl.synthetic.report import write_report

        with console.status("Writing the report with plots..."):
            html = write_report(out)
        console.print(f"Report: {html}")


def inspect(
    path: Annotated[Path, typer.Argument(help="A Bulk Data export folder, or a folder written by 'twinfed synth'.")],
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the summary as JSON to this file.")
    ] = None,
    codes: Annotated[int, typer.Option("--codes", min=0, help="How many Observation codes to list per site.")] = 8,
) -> None:
    """Summarise FHIR NDJSON exports without loading them: counts, patients, units, consent, broken lines."""
    import orjson
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
    for column in (
        "export",
        "patients",
        "encounters (class)",
        "observations",
        "conditions",
        "medication admin.",
        "consents",
        "malformed lines",
        "duplicate ids",
    ):
        overview.add_column(column, justify="left" if column == "export" else "right")
    for s in summaries:
        r = s.resources_by_type
        classes = ", ".join(f"{k} {v:,}" for k, v in s.encounters_by_class.items())
        overview.add_row(
            s.label,
            f"{s.patients:,}",
            classes or "0",
            f"{r.get('Observation', 0):,}",
            f"{r.get('Condition', 0):,}",
            f"{r.get('MedicationAdministration', 0):,}",
            f"{r.get('Consent', 0):,}",
            f"[red]{s.malformed_lines:,}[/red]" if s.malformed_lines else "0",
            f"[yellow]{s.duplicate_ids:,}[/yellow]" if s.duplicate_ids else "0",
        )
    console.print(overview)
    if codes:
        units = Table(title="Most frequent Observation codes and the units they arrive in")
        units.add_column("export")
        units.add_column("code")
        units.add_column("display")
        units.add_column("count", justify="right")
        units.add_column("units")
        for s in summaries:
            for c in s.observation_codes[:codes]:
                units.add_row(
                    s.label,
                    c.code,
                    c.display[:40],
                    f"{c.count:,}",
                    ", ".join(f"{u} ({n:,})" for u, n in sorted(c.units.items(), key=lambda x: -x[1])),
                )
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
