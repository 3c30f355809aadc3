"""The generator's command: `twinfed synth`, a synthetic hospital consortium with its ground truth.

The generator is the stand-in for real hospital EHRs, not something a site runs, so its command lives
with it rather than in the data layer. Imports of the heavy parts happen inside the command, so
`twinfed --help` stays instant.
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
    """Attach the generator's command to the root `twinfed` application."""
    app.command("synth", rich_help_panel="Data")(synth)


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

    from synthetic import SynthConfig, generate_consortium, load_profiles
    from synthetic.consortium import OutputDirectoryNotEmpty

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
    table.add_column("")
    for site in result.sites:
        table.add_column(site.site_id, justify="right")
    rows = [
        ("patients", lambda r: f"{r.patients:,}"),
        ("inpatient stays", lambda r: f"{r.stays:,}"),
        ("in-hospital deaths", lambda r: f"{r.in_hospital_deaths:,}"),
        ("FHIR resources", lambda r: f"{sum(r.lines_by_type.values()):,}"),
        ("injected defects", lambda r: f"{r.defects:,}"),
        ("research opt-outs", lambda r: f"{r.denying_consent:,}"),
        ("measurements missing", lambda r: f"{r.missing_rate:.0%}"),
        ("best AUROC: death", lambda r: f"{r.outcome_auroc['in_hospital_death']:.3f}"),
        ("best AUROC: stay > 7 d", lambda r: f"{r.outcome_auroc['los_over_7_days']:.3f}"),
        ("best AUROC: readmission", lambda r: f"{r.outcome_auroc['readmission_30d']:.3f}"),
    ]
    for label, cell in rows:
        table.add_row(label, *(cell(r) for r in result.sites))
    console.print(table)
    console.print("[dim]best AUROC = what a model knowing the latent patient state would reach (ground truth)[/dim]")
    console.print(f"Index: {result.index_file}")
    console.print(f"Ground truth (never part of an export): {out / 'ground-truth'}")
    if report:
        from synthetic.report import write_report

        with console.status("Writing the report with plots..."):
            html = write_report(out)
        console.print(f"Report: {html}")
