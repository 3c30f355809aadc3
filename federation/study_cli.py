"""`twinfed study ...`: commands for whoever writes a study (a consortium) and whoever approves one (a site)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

study_app = typer.Typer(
    help="Write and check a study: cohort, covariates, outcome, twin model, privacy.", no_args_is_help=True
)
console = Console()
plain = Console(soft_wrap=True, highlight=False, markup=False)  # lines that carry paths, ids and site sentences

StudyFile = Annotated[Path, typer.Argument(help="The study YAML file (see configs/study-inpatient-mortality.yaml).")]


def _load(path: Path):
    from federation.contract import StudyError, load_study

    try:
        return load_study(path)
    except StudyError as exc:
        raise _fail(str(exc)) from None


@study_app.command("hash")
def hash_(study: StudyFile) -> None:
    """Print the study's canonical hash: the value a site's data steward approves.

    The hash covers every setting (defaults written out) and the version of the twin code, so a changed
    study, or the same study run by different code, needs a new approval.
    """
    from federation.contract import study_hash

    typer.echo(study_hash(_load(study)))


class _PlainTable(Table):
    """A table whose cells are plain text: values that come from a study file are printed, not interpreted."""

    def add_row(self, *cells: str | None, **kwargs) -> None:
        super().add_row(*(None if cell is None else Text(cell) for cell in cells), **kwargs)


@study_app.command("check")
def check(study: StudyFile) -> None:
    """Validate a study file and summarise what it asks every site to compute.

    Exits with status 2 and a list of the fields that are wrong when the file is not a valid study.
    """
    from federation.contract import study_hash

    spec = _load(study)
    covariates = spec.covariates
    # The title is free text from the study's author: shown as written, never read as rich markup ("[/x]"
    # in a title made rich raise MarkupError instead of printing the summary).
    table = _PlainTable(title=Text(f"{spec.study.id}: {spec.study.title}"), show_header=False)
    table.add_column("part")
    table.add_column("setting", overflow="fold")
    table.add_row("cohort", spec.cohort.summary())
    table.add_row(
        "covariates",
        f"demographics {', '.join(covariates.demographics) or 'none'}; {len(covariates.occurrences)} occurrence, "
        f"{len(covariates.values)} value, {len(covariates.categorical)} categorical, "
        f"{len(covariates.time_series)} time-series covariates",
    )
    table.add_row("outcome", spec.outcome.summary())
    if spec.study.intended_use:
        table.add_row("intended use", spec.study.intended_use)
    from federation.twins import kind_of

    table.add_row("model", f"{spec.model.kind}: {kind_of(spec.model).describe(spec.model, spec.evaluation)}")
    table.add_row(
        "training",
        f"{spec.training.rounds} rounds x {spec.training.local_epochs} local epoch(s), "
        f"batch {spec.training.batch_size}, {spec.training.optimizer} lr {spec.training.learning_rate:g}",
    )
    delta = f"{spec.privacy.target_delta:g}" if spec.privacy.target_delta else "1/(10 n) per site"
    if spec.privacy.private:
        table.add_row(
            "privacy",
            f"epsilon {spec.privacy.target_epsilon:g} per site for training and {spec.evaluation.epsilon:g} for "
            f"{spec.evaluation_releases()} evaluation release(s), delta {delta}, clip {spec.privacy.max_grad_norm:g}, "
            f"{spec.privacy.accountant} accountant",
        )
    else:
        table.add_row("privacy", "NOT DIFFERENTIALLY PRIVATE (mode none): only sites whose policy allows it take part")
    split = spec.evaluation.split
    if split.kind == "random":
        parts = f"random split {split.train:g}/{split.validation:g}/{split.test:g} (train/validation/test)"
    else:
        validation = f", validation from {split.validation_from}" if split.validation_from else ""
        parts = f"temporal split: test from {split.test_from}{validation}"
    chosen = "best validation round" if split.has_validation else "last round"
    table.add_row(
        "evaluation",
        f"{parts}; model: {chosen}; test released {'every round' if spec.evaluation.every_round else 'once'}; "
        f"threshold {spec.evaluation.threshold:g}; {len(spec.evaluation.score_edges) + 1} risk strata",
    )
    table.add_row(
        "federation",
        f"{spec.federation.strategy}, at least {spec.federation.min_sites} sites, secure aggregation "
        f"{'on' if spec.federation.secure_aggregation else 'off'}",
    )
    table.add_row("hash", study_hash(spec))
    console.print(table)


@study_app.command("run")
def run(
    study: StudyFile,
    coordinator_dir: Annotated[
        Path,
        typer.Option(
            "--coordinator-dir",
            "-c",
            file_okay=False,
            help="The consortium folder of a running `twinfed coordinator start` (its flwr-cli connection is used).",
        ),
    ],
    name: Annotated[
        str | None, typer.Option("--name", help="Name of this run (default: the study id); outputs are kept per name.")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the named run from its last completed round.")
    ] = False,
    wait_for_sites: Annotated[
        float, typer.Option("--wait-for-sites", min=0, help="Seconds to wait for the study's min_sites to connect.")
    ] = 120.0,
    leave_one_site_out: Annotated[
        bool,
        typer.Option(
            "--leave-one-site-out",
            help="External validation: for every registered site, a variant of the study (its own id, hash and "
            "budget) trained without that site and tested at it alone; ends with a report per held-out site.",
        ),
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="With --leave-one-site-out: write the variants' study files, print their ids and hashes and the "
            "`twinfed site approve` commands for the stewards, and run nothing.",
        ),
    ] = False,
) -> None:
    """Run a study on the consortium: submit it to the coordinator and follow its rounds until it ends.

    Every site checks the study against its own approvals and policy; each round's progress line says
    how many sites trained, refused (and why), failed or timed out. The outputs (receipts of every round,
    checkpoints, the model card in JSON and HTML, the final weights) are written under
    COORDINATOR_DIR/studies/<study-id>/<name>/. Exits with status 1 when the study stopped before its
    last round (for example because fewer than min_sites sites could train).

    With --leave-one-site-out, one variant per site of the consortium's registry runs in turn (outputs under
    studies/<variant-id>/), and the report goes to studies/<study-id>/leave-one-site-out/loso-report.json;
    every site must have approved every variant (run --dry-run first to get their files and hashes). Exits
    with status 1 unless every variant completed with an estimate at its held-out site.
    """
    import json
    import time

    from federation.deploy.deployment import CoordinatorLayout
    from federation.deploy.submission import submit

    spec = _load(study)
    layout = CoordinatorLayout(coordinator_dir.resolve())
    if dry_run and not leave_one_site_out:
        raise _fail("--dry-run goes with --leave-one-site-out (a plain run has nothing to prepare: see `study hash`).")
    if leave_one_site_out:
        _run_leave_one_site_out(spec, layout, name, resume, wait_for_sites, dry_run)
        return
    if not (layout.cli_home / "config.toml").exists():
        raise _fail(
            f"{layout.cli_home / 'config.toml'} does not exist: start the coordinator first "
            f"(twinfed coordinator start --dir {coordinator_dir})."
        )
    run_name = name or spec.study.id
    folder = layout.studies / spec.study.id / run_name
    if (folder / "checkpoint.pt").exists() and not resume:
        raise _fail(
            f"A run named '{run_name}' exists in {folder}; pass --resume to continue it, or --name for a new one."
        )
    submitted = time.time()
    code = submit(spec, layout.cli_home, run_name=run_name, resume=resume, node_wait_seconds=wait_for_sites)
    card = folder / "model-card.json"
    if code != 0 or not card.exists() or card.stat().st_mtime < submitted:
        raise _fail(f"The run did not finish (flwr exit {code}); the coordinator's log is {layout.log_file}.", 1)
    result = json.loads(card.read_text(encoding="utf-8"))
    console.print(f"Study {result['run']['status']}: {result['run']['reason']}")
    console.print(f"Model card: {folder / 'model-card.html'}")
    if result["run"]["status"] != "completed":
        raise typer.Exit(1)


def _run_leave_one_site_out(spec, layout, name: str | None, resume: bool, wait: float, dry_run: bool) -> None:
    from federation.common.keys import ProvisionError
    from federation.local import leave_one_site_out as loso

    try:
        found = loso.consortium_variants(spec, layout.root)
    except (ProvisionError, loso.LeaveOneSiteOutError) as exc:
        raise _fail(str(exc)) from None
    files = loso.write_variants(found, layout.studies / spec.study.id / loso.FOLDER)
    _print_variants(spec, found, files)
    commands = loso.approval_commands(list(files.values()))
    if dry_run:
        plain.print(f"Every site's data steward approves all {len(found)} variants before the run, with:")
        for command in commands:
            plain.print(f"  {command}")
        return
    if not (layout.cli_home / "config.toml").exists():
        raise _fail(
            f"{layout.cli_home / 'config.toml'} does not exist: start the coordinator first "
            f"(twinfed coordinator start --dir {layout.root})."
        )
    if not resume:
        existing = [
            str(layout.studies / v.id / (name or v.id))
            for v in found
            if (layout.studies / v.id / (name or v.id) / "checkpoint.pt").exists()
        ]
        if existing:
            raise _fail(
                f"Runs of these variants exist: {', '.join(existing)}; pass --resume to continue them, or --name."
            )
    plain.print(
        "Every site must have approved every variant: a site that has not refuses it (unapproved-study), and the "
        "report says so (`--dry-run` prints the approval commands)."
    )
    report, path = loso.run_on_consortium(
        spec, found, layout.root, name=name, resume=resume, node_wait_seconds=wait, say=plain.print
    )
    _print_report(report, path)
    missing = {r.held_out_site: r for r in report.sites if r.unapproved_at}
    for site, result in missing.items():
        plain.print(
            f"Variant {result.variant_id} was refused as not approved at {', '.join(result.unapproved_at)}: there, "
            f"the data steward runs `twinfed site approve {files[site]}`."
        )
    if not report.complete:
        raise typer.Exit(1)


def _print_variants(spec, found, files: dict[str, Path]) -> None:
    from federation.local.leave_one_site_out import budget_statement

    table = _PlainTable(title=Text(f"{spec.study.id}: leave-one-site-out, {len(found)} variants"))
    for column in ("held-out site", "variant study id", "hash", "study file"):
        table.add_column(column, overflow="fold")
    for variant in found:
        table.add_row(variant.held_out_site, variant.id, variant.hash, str(files[variant.held_out_site]))
    console.print(table)
    plain.print(budget_statement(spec, len(found)))


def _estimate(estimate, digits: int = 3) -> str:
    return "-" if estimate is None else estimate.text(digits)


def _print_report(report, path: Path) -> None:
    table = _PlainTable(title=Text(f"{report.study_id}: leave-one-site-out ({report.metric} at each held-out site)"))
    columns = ("held-out site", "run", f"test {report.metric} (95% CI)", "patients", "internal validation", "note")
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in report.sites:
        patients = row.patients.value if row.patients is not None else None
        table.add_row(
            row.held_out_site,
            row.run_status or "not finished",
            _estimate(row.metric) if row.evaluated else "-",
            "-" if patients is None else f"{patients:.0f}",
            _estimate(row.internal_validation) if report.validation_cut else "not cut",
            row.reason,
        )
    console.print(table)
    plain.print(report.note)
    plain.print(report.budget)
    plain.print(f"Report: {path}")


def _fail(message: str, code: int = 2) -> typer.Exit:
    Console(stderr=True, soft_wrap=True).print(message, markup=False, highlight=False)
    return typer.Exit(code)


@study_app.command("simulate")
def simulate(
    study: StudyFile,
    sites: Annotated[int, typer.Option("--sites", "-n", min=1, help="How many simulated sites (virtual nodes).")],
    omop: Annotated[
        list[str] | None,
        typer.Option("--omop", help="URL of an OMOP database loaded by `twinfed etl` (repeatable; give --secret too)."),
    ] = None,
    secret: Annotated[
        list[Path] | None,
        typer.Option("--secret", dir_okay=False, help="The secret file of each --omop database, in order."),
    ] = None,
    omop_dir: Annotated[
        Path | None,
        typer.Option("--omop-dir", file_okay=False, help="A folder of <site>.sqlite + <site>.secret files."),
    ] = None,
    out: Annotated[
        Path, typer.Option("--out", "-o", file_okay=False, help="Output folder: site folders, studies/, the report.")
    ] = Path("simulation-output"),
    rounds: Annotated[
        int | None, typer.Option("--rounds", min=1, help="Run this many rounds instead of the study's (a new hash).")
    ] = None,
    policy: Annotated[
        Path | None, typer.Option("--policy", dir_okay=False, help="Policy file for every simulated site.")
    ] = None,
    cpus_per_site: Annotated[
        int, typer.Option("--cpus-per-site", min=1, help="CPUs Ray reserves per ClientApp (cores / this run at once).")
    ] = 1,
    leave_one_site_out: Annotated[
        bool,
        typer.Option(
            "--leave-one-site-out",
            help="For each simulated site, a variant of the study trained without it and tested at it alone, each "
            "its own run; ends with a report per held-out site (real external validation only when every site "
            "has its own OMOP database).",
        ),
    ] = False,
) -> None:
    """Run the study with N simulated sites in Flower's simulation engine; report time and memory per round.

    The same ServerApp and ClientApp as a deployment run, with the same approvals, policy checks, DP
    training, privacy ledger, receipts and model card. Each simulated site is a real site folder
    (OUT/sites/sim-001, ...) with its own governance database and secret, reading one of the OMOP
    databases (assigned round-robin), and approves the study as "simulation". Sites sharing a database
    see the same patients: the simulation measures coordination time and memory, not model quality.
    Writes simulation-report.json next to the model card (OUT/studies/<study-id>/simulation/).

    With --leave-one-site-out every simulated site approves one variant per site, each variant runs as its own
    simulation (OUT/studies/<variant-id>/simulation/), and loso-report.json goes to
    OUT/studies/<study-id>/leave-one-site-out/. Exits with status 1 unless every variant completed with an
    estimate at its held-out site.
    """
    from federation.local.simulation import (
        SimulationError,
        SimulationLayout,
        SimulationSettings,
        hospitals_from,
        prepare_sites,
        run_simulation,
        write_study,
    )

    spec = _load(study)
    if rounds is not None:
        spec = spec.model_copy(update={"training": spec.training.model_copy(update={"rounds": rounds})})
    if leave_one_site_out:
        _simulate_leave_one_site_out(spec, sites, omop, secret, omop_dir, out, policy, cpus_per_site)
        return
    if sites < spec.federation.min_sites:
        raise _fail(f"The study needs at least {spec.federation.min_sites} sites (federation.min_sites), not {sites}.")
    layout = SimulationLayout(out.resolve())
    try:
        hospitals = hospitals_from(omop or [], secret or [], omop_dir)
        layout.prepare()
        write_study(spec, layout.study_file)
        console.print(f"Preparing {sites} simulated sites over {len(hospitals)} OMOP database(s) in {layout.sites}")
        site_list = prepare_sites(layout, sites, hospitals, policy)
        report = run_simulation(spec, layout, site_list, SimulationSettings(sites=sites, run_name="simulation"))
    except SimulationError as exc:
        raise _fail(str(exc), 1) from None
    table = Table(title=f"{spec.study.id}: {sites} simulated sites, {report['cpus']} CPUs")
    for column in ("round", "trained", "round s", "train s", "slowest site s", "peak RSS MiB", "peak PSS MiB"):
        table.add_column(column, justify="right")
    for row in report["rounds"]:
        cells = ("seconds", "train_seconds", "slowest_site_seconds", "peak_rss_mib", "peak_pss_mib")
        table.add_row(str(row["round"]), str(row["trained_sites"]), *(_cell(row[c]) for c in cells))
    console.print(table)
    peak = report["peak"]
    console.print(
        f"Whole run {report['run_seconds']:.1f} s (SuperLink and Ray start included); peak memory "
        f"{_cell(peak['peak_pss_mib'])} MiB PSS / {_cell(peak['peak_rss_mib'])} MiB RSS "
        f"over {peak['processes']} processes."
    )
    console.print(f"Study {report['status']}: {report['reason']}. Report: {layout.run_folder(spec, 'simulation')}")
    console.print(report["note"])
    if report["status"] != "completed":
        raise typer.Exit(1)


def _simulate_leave_one_site_out(spec, sites, omop, secret, omop_dir, out, policy, cpus_per_site) -> None:
    from federation.local import leave_one_site_out as loso
    from federation.local.simulation import SimulationError, SimulationLayout, hospitals_from, simulated_site_ids

    layout = SimulationLayout(out.resolve())
    try:
        loso.variants(spec, simulated_site_ids(sites))  # refused before anything is written
        hospitals = hospitals_from(omop or [], secret or [], omop_dir)
        layout.prepare()
        plain.print(loso.budget_statement(spec, sites))
        report, path = loso.simulate(
            spec, layout, hospitals, sites, policy, cpus_per_site=cpus_per_site, say=plain.print
        )
    except (SimulationError, loso.LeaveOneSiteOutError) as exc:
        raise _fail(str(exc), 1) from None
    _print_report(report, path)
    if not report.complete:
        raise typer.Exit(1)


def _cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"
