"""`twinfed twin hospital`: the hospital twin at this site (the command; the work is in service.py)."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from site_node.cli import SiteFile, Who, _fail, _user

console = Console()


def hospital(
    site_config: SiteFile,
    days: Annotated[int, typer.Option("--days", min=1, max=366, help="Days to simulate from the start.")] = 30,
    runs: Annotated[int, typer.Option("--runs", min=2, max=100_000, help="Replications (more: smoother bands).")] = 500,
    scenario: Annotated[
        Path | None,
        typer.Option("--scenario", exists=True, dir_okay=False,
                     help="A scenario YAML (one, or `scenarios: [...]`): beds, staffing, arrivals, length of stay."),
    ] = None,
    start: Annotated[
        dt.datetime | None,
        typer.Option("--start", formats=["%Y-%m-%d"],
                     help="The first day (its midnight's state of the wards; default: the last day of the data)."),
    ] = None,
    backtest: Annotated[
        dt.datetime | None,
        typer.Option("--backtest", formats=["%Y-%m-%d"],
                     help="Simulate from this past day with only what was known then, and compare with what happened."),
    ] = None,
    history_days: Annotated[
        int | None, typer.Option("--history-days", min=28, help="Learn from this many days before the start only.")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", min=0, help="First replication's number (same seed: same run).")] = 0,
    workers: Annotated[
        int, typer.Option("--workers", min=0, max=64, help="Processes running replications (0: one per core).")
    ] = 0,
    out: Annotated[
        Path | None,
        typer.Option("--out", file_okay=False, help="Folder for the JSON and HTML (default: SITE/twins/hospital)."),
    ] = None,
    by: Who = "",
) -> None:
    """The hospital twin: midnight census and peak occupancy per ward and day, the chance of being full and
    boarding (patients waiting for a bed), over many replications from the wards' state at the start, and the
    same under each scenario with its effect (scenario minus baseline, paired, 95% interval).

    Learns arrivals, lengths of stay and transfers from this hospital's own OMOP history (the site file's
    `hospital:` section says which care sites are which ward, and the beds). Runs at this site only; each
    run is an audit entry. Writes hospital-twin-<start>.json and .html (0600).
    """
    from site_node.config import SiteConfigError, load_site_config
    from site_node.governance import Governance, PolicyError
    from site_node.hospital_twin.history import HospitalHistoryError
    from site_node.hospital_twin.report import html_page, tables
    from site_node.hospital_twin.scenario import HospitalScenarioError
    from site_node.hospital_twin.service import run_hospital_twin
    from site_node.hospital_twin.twin import HospitalTwinError

    if backtest is not None and start is not None:
        raise _fail("Give --start or --backtest, not both: a backtest starts on its own day.")
    start = backtest or start
    try:
        config = load_site_config(site_config)
        governance = Governance.of_site(config)
    except (SiteConfigError, PolicyError) as exc:
        raise _fail(str(exc)) from None
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        console=console, transient=True)  # fmt: skip
    task = progress.add_task("Replications", total=None)
    try:
        with progress:
            report = run_hospital_twin(
                config, governance, days=days, runs=runs, scenario_file=scenario,
                start=start.date() if start else None, history_days=history_days, seed=seed,
                workers=workers or min(os.cpu_count() or 1, 8), backtest=backtest is not None, by=by or _user(),
                on_start=lambda total: progress.update(task, total=total),
                on_progress=lambda done: progress.update(task, completed=done),
            )  # fmt: skip
    except (HospitalTwinError, HospitalHistoryError, HospitalScenarioError) as exc:
        raise _fail(str(exc), 1) from None
    finally:
        governance.close()
    for table in tables(report):
        console.print(table)
    for note in report.notes:
        console.print(f"[yellow]{note}[/yellow]")
    folder = out or config.base_dir / "twins" / "hospital"
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"hospital-twin-{report.start:%Y-%m-%d}"
    written = [_private(folder / f"{stem}.json", report.model_dump_json(indent=2)),
               _private(folder / f"{stem}.html", html_page(report))]  # fmt: skip
    console.print("Wrote " + ", ".join(str(p) for p in written) + " (kept at this site).")


def _private(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    path.chmod(0o600)
    return path
