"""`twinfed study ...`: commands for whoever writes a study (a consortium) and whoever approves one (a site)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

study_app = typer.Typer(
    help="Write and check a study: cohort, covariates, outcome, twin model, privacy.", no_args_is_help=True
)
console = Console()

StudyFile = Annotated[Path, typer.Argument(help="The study YAML file (see configs/study-inpatient-mortality.yaml).")]


def _load(path: Path):
    from federation.study import StudyError, load_study

    try:
        return load_study(path)
    except StudyError as exc:
        Console(stderr=True, soft_wrap=True).print(str(exc), markup=False, highlight=False)
        raise typer.Exit(2) from None


@study_app.command("hash")
def hash_(study: StudyFile) -> None:
    """Print the study's canonical hash: the value a site's data steward approves.

    The hash covers every setting (defaults written out) and the version of the twin code, so a changed
    study, or the same study run by different code, needs a new approval.
    """
    from federation.study import study_hash

    typer.echo(study_hash(_load(study)))


@study_app.command("check")
def check(study: StudyFile) -> None:
    """Validate a study file and summarise what it asks every site to compute.

    Exits with status 2 and a list of the fields that are wrong when the file is not a valid study.
    """
    from federation.study import study_hash

    spec = _load(study)
    covariates = spec.covariates
    table = Table(title=f"{spec.study.id}: {spec.study.title}", show_header=False)
    table.add_column("part")
    table.add_column("setting", overflow="fold")
    visits = ", ".join(str(c) for c in spec.cohort.visit_concept_ids)
    table.add_row(
        "cohort",
        f"visits {visits}, age {spec.cohort.min_age}-{spec.cohort.max_age or 'any'}, "
        f"{spec.cohort.one_per_person.value} stay per patient",
    )
    table.add_row(
        "covariates",
        f"demographics {', '.join(covariates.demographics) or 'none'}; {len(covariates.occurrences)} occurrence, "
        f"{len(covariates.values)} value, {len(covariates.categorical)} categorical, "
        f"{len(covariates.time_series)} time-series covariates",
    )
    window = f", within {spec.outcome.window_days:g} days" if spec.outcome.window_days else ""
    table.add_row("outcome", f"{spec.outcome.kind.value} after {spec.outcome.prediction_hours:g} h{window}")
    table.add_row("model", spec.model.kind)
    table.add_row(
        "training",
        f"{spec.training.rounds} rounds x {spec.training.local_epochs} local epoch(s), "
        f"batch {spec.training.batch_size}, {spec.training.optimizer} lr {spec.training.learning_rate:g}",
    )
    delta = f"{spec.privacy.target_delta:g}" if spec.privacy.target_delta else "1/(10 n) per site"
    table.add_row(
        "privacy",
        f"epsilon {spec.privacy.target_epsilon:g} per site for the whole study, delta {delta}, "
        f"clip {spec.privacy.max_grad_norm:g}, {spec.privacy.accountant} accountant",
    )
    table.add_row(
        "federation",
        f"{spec.federation.strategy}, at least {spec.federation.min_sites} sites, secure aggregation "
        f"{'on' if spec.federation.secure_aggregation else 'off'}",
    )
    table.add_row("hash", study_hash(spec))
    console.print(table)
