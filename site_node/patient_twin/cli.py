"""`twinfed twin ...`: run a study's twin at this site (nothing leaves it)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from site_node.cli import ModelFile, SiteFile, Who, _fail, _study, _user

twin_app = typer.Typer(help="Run a study's twin on this site's own patients (nothing leaves the site).",
                       no_args_is_help=True)  # fmt: skip
console = Console()


@twin_app.command("patient")
def patient(
    site_config: SiteFile,
    study: Annotated[Path, typer.Option("--study", exists=True, dir_okay=False, help="The trajectory study's YAML.")],
    person: Annotated[
        list[str] | None,
        typer.Option("--person", help="The patient's id at this hospital (FHIR Patient id or MRN); repeatable."),
    ] = None,
    batch: Annotated[
        Path | None,
        typer.Option(
            "--batch",
            exists=True,
            dir_okay=False,
            help="A file of hospital ids, one per line: every patient under every scenario, JSON lines out.",
        ),
    ] = None,
    at: Annotated[
        dt.datetime | None,
        typer.Option("--at", help="Answer at this time of the stay, from the history up to it (default: the patient's "
                     "latest decision time of the study)."),
    ] = None,
    scenario: Annotated[
        Path | None,
        typer.Option("--scenario", exists=True, dir_okay=False, help="A scenario YAML (one, or `scenarios: [...]`)."),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", file_okay=False, help="Folder for the JSON and the plot (default: SITE/twins/<study>)."),
    ] = None,
    model: ModelFile = None,
    by: Who = "",
) -> None:
    """The patient twin: recorded history, forecast of every signal with 80% and 95% intervals, and the same
    under each scenario (changes to the planned treatments), with the risk of the study's event.

    Runs at this site only, on the approved study's model, for studies the site policy lists under
    `twin_query_studies`. The patient is named by the hospital's own id, resolved through the ETL's keyed id
    map and shown back only as a keyed hash. Every query is an audit entry (who, study, keyed patient,
    when). Writes <key>.json and <key>.png per patient (0600) or, with --batch, one JSON line per patient.
    """
    from site_node.patient_twin.report import Plotter

    with Plotter(start=batch is None) as plotter:  # matplotlib is imported beside everything below
        _patient(plotter, site_config, study, person, batch, at, scenario, out, model, by)


def _patient(plotter, site_config: Path, study: Path, person: list[str] | None, batch: Path | None,
             at: dt.datetime | None, scenario: Path | None, out: Path | None, model: Path | None, by: str
             ) -> None:  # fmt: skip
    from site_node.config import SiteConfigError, load_site_config
    from site_node.governance import PolicyError
    from site_node.patient_twin import PatientTwin, ScenarioError, TwinQueryError, TwinSite, load_scenarios
    from site_node.patient_twin.report import summary, tables, warnings

    try:  # the site without its training machinery: a cold query does not import Opacus or Flower's client
        node = TwinSite.of(load_site_config(site_config))
    except (SiteConfigError, PolicyError) as exc:
        raise _fail(str(exc)) from None
    spec, _ = _study(study)
    ids = list(person or [])
    if batch is not None:
        ids += [line.strip() for line in batch.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not ids:
        raise _fail("Name a patient with --person ID, or give --batch FILE (one hospital id per line).")
    try:
        scenarios = load_scenarios(scenario, spec.model) if scenario is not None else []
        twin = PatientTwin.open(node, spec, model_file=model)
    except (ScenarioError, TwinQueryError) as exc:
        raise _fail(str(exc), 1) from None
    folder = out or node.config.base_dir / "twins" / spec.study.id
    folder.mkdir(parents=True, exist_ok=True)
    if batch is not None:  # every patient's row in one pass over the database
        _answer_batch(twin, ids, scenarios, at, by or _user(), folder / f"{batch.stem}.jsonl")
        return
    for hospital_id in ids:
        try:
            answer = twin.answer(hospital_id, scenarios, at=at, by=by or _user())
        except TwinQueryError as exc:
            raise _fail(str(exc), 1) from None
        key = answer.person_key[:16]
        plotter.draw(answer, folder / f"{key}.png")  # drawn beside the tables
        console.print(summary(answer))
        for sentence in warnings(answer):
            console.print(f"[yellow]{sentence}[/yellow]")
        for table in tables(answer):
            console.print(table)
        written = [_private(folder / f"{key}.json", answer.model_dump_json(indent=2)), plotter.wait()]
        console.print("Wrote " + ", ".join(str(p) for p in written) + " (kept at this site).")


def _answer_batch(twin, ids: list[str], scenarios, at: dt.datetime | None, by: str, path: Path) -> None:
    lines, failed = twin.answer_lines(ids, scenarios, at=at, by=by)
    _private(path, "\n".join(lines) + "\n")
    console.print(f"Answered {len(ids) - failed} of {len(ids)} patients x {1 + len(scenarios)} plans into {path}.")
    if failed:
        raise typer.Exit(1)


def _private(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    path.chmod(0o600)
    return path
