"""Leave one site out (TRIPOD type 3 external validation): train without one hospital, evaluate at it, for each.

For every site of a consortium the study has a **variant**: the same study under a derived id
(`<study-id>.without-<site>`, shortened with a short hash when it would pass the 64 characters a study id may
have), with a title and description that name the site it leaves out. A variant is its own study: its own
hash, which every site's steward approves, and its own privacy budget at every site (budgets follow the
study id, site_node/governance/ledger.py). It runs with that site held out (`held-out-site`,
federation.coordinator.runner): the site is sent neither training nor validation, and the chosen model's
test evaluation is asked of it alone. The report then lists, per held-out site, the kind's headline metric
there with its interval, its patients, and the training sites' pooled internal validation.

What it costs: each site trains in K-1 of the K variants, each with the study's training budget and the
validation releases of its evaluation budget, and in the variant that holds it out spends only (part of)
that variant's evaluation budget on the test release; so a site spends up to (K-1) times the study's
epsilon, plus one evaluation budget, in all. `budget_statement` says it with the study's numbers.

Both `twinfed study simulate --leave-one-site-out` (the simulated sites, `simulate`) and `twinfed study run
--leave-one-site-out` (the consortium's registered sites, `run_on_consortium`) use this module; the
commands only parse and print.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from federation.contract import StudySpec, canonical_json, load_study, parse_study, study_hash
from federation.contract.receipts import Participation, RoundReceipt, read_receipts
from federation.contract.spec import SECURE_AGGREGATION_MIN_SITES, STUDY_ID_PATTERN
from federation.twins import kind_of
from federation.twins.pooling import Estimate

STUDY_ID = re.compile(STUDY_ID_PATTERN)
MAX_ID_LENGTH = 64  # the pattern's 1 + 63 characters
MARK = ".without-"
HASH_CHARS = 8
FOLDER = "leave-one-site-out"  # under studies/<study-id>/: the variant files and the report
REPORT_FILE = "loso-report.json"
UNAPPROVED = "unapproved-study"
SHARED_DATABASES = (
    "Simulated sites share OMOP databases ({sites} sites over {databases} database(s)): a held-out site's "
    "patients are also patients of sites that trained (with other splits), so this leave-one-site-out measures "
    "the procedure, not external validity."
)
OWN_DATABASES = (
    "Each simulated site reads its own OMOP database: no variant's model saw its held-out site's patients, so "
    "each row is an external validation (TRIPOD type 3) at that database."
)
HOSPITALS = (
    "Each held-out site is a hospital whose data its variant's model never saw: each row is an external "
    "validation (TRIPOD type 3) at that hospital."
)


class LeaveOneSiteOutError(ValueError):
    """The study cannot be run leaving one site out (too few sites, an id that cannot be derived...)."""


# --- the variants ---------------------------------------------------------------------------------


def variant_id(study_id: str, site_id: str) -> str:
    """`<study-id>.without-<site>`, or, when that is too long or not a valid id, a shortened form ending in a
    short hash of both whole ids (deterministic, and distinct for distinct sites)."""
    plain = f"{study_id}{MARK}{site_id}"
    if len(plain) <= MAX_ID_LENGTH and STUDY_ID.match(plain):
        return plain
    digest = hashlib.sha256(f"{study_id}\0{site_id}".encode()).hexdigest()[:HASH_CHARS]
    site = re.sub(r"[^a-z0-9_.-]", "-", site_id.lower())
    room = MAX_ID_LENGTH - len(MARK) - 1 - HASH_CHARS  # what the study's and the site's parts share
    site_part = site[: max(room - len(study_id), min(len(site), room // 3))]
    study_part = study_id[: room - len(site_part)]
    derived = f"{study_part}{MARK}{site_part}-{digest}"
    if not STUDY_ID.match(derived):
        raise LeaveOneSiteOutError(f"cannot derive a study id from {study_id!r} without site {site_id!r}")
    return derived


def variant_spec(spec: StudySpec, site_id: str) -> StudySpec:
    """The study without `site_id`: a derived id, and a title and description that name the site left out."""
    info = spec.study
    description = (
        f"Leave-one-site-out variant of study '{info.id}': trained without site '{site_id}', whose test part "
        f"alone evaluates the model (external validation, TRIPOD type 3). It is its own study, with its own "
        "privacy budget at every site."
    )
    if info.description:
        description += f" The study: {info.description}"
    data = spec.model_dump(mode="json")
    data["study"] = {
        **data["study"],
        "id": variant_id(info.id, site_id),
        "title": f"{info.title} (leave-one-site-out: without {site_id})",
        "description": description,
    }
    return parse_study(data, source=f"study {info.id} without site {site_id}")


@dataclass(frozen=True)
class Variant:
    held_out_site: str
    spec: StudySpec

    @property
    def id(self) -> str:
        return self.spec.study.id

    @property
    def hash(self) -> str:
        return study_hash(self.spec)

    def __str__(self) -> str:
        return f"{self.id} (hash {self.hash[:12]}), holding out {self.held_out_site}"


def training_sites_needed(spec: StudySpec) -> int:
    """How many sites must train in every round of a variant: the study's min_sites, and 3 with SecAgg+."""
    needed = spec.federation.min_sites
    if spec.federation.secure_aggregation:
        needed = max(needed, SECURE_AGGREGATION_MIN_SITES)
    return needed


def variants(spec: StudySpec, site_ids: list[str]) -> list[Variant]:
    """One variant per site, in the order given; refused when the sites left could not train a variant."""
    sites = list(dict.fromkeys(site_ids))
    if len(sites) < 2:
        raise LeaveOneSiteOutError(f"leaving one site out needs at least 2 sites; there are {len(sites)}.")
    needed = training_sites_needed(spec)
    if len(sites) - 1 < needed:
        why = "federation.min_sites" + (" and secure aggregation" if spec.federation.secure_aggregation else "")
        raise LeaveOneSiteOutError(
            f"with {len(sites)} sites, each variant leaves {len(sites) - 1} to train, and the study needs {needed} "
            f"in every round ({why}): leave-one-site-out needs at least {needed + 1} sites, or a study that "
            f"needs fewer."
        )
    found = [Variant(site, variant_spec(spec, site)) for site in sites]
    if len({v.id for v in found}) != len(found):  # cannot happen with the hash suffix; never run two as one
        raise LeaveOneSiteOutError("two sites' variants got the same study id")
    return found


def budget_statement(spec: StudySpec, count: int) -> str:
    """What the K variants cost every site, in the study's numbers."""
    if not spec.privacy.private:
        return (
            f"The study is NOT differentially private: each of the {count} variants runs without a privacy budget "
            "(only at sites whose policy allows it)."
        )
    training = float(spec.privacy.target_epsilon)
    evaluation = spec.evaluation.epsilon
    whole = training + evaluation
    most = (count - 1) * whole + evaluation
    return (
        f"Privacy cost: each of the {count} variants is its own study with its own budget at every site. A site "
        f"trains in {count - 1} of them, each with the study's epsilon {whole:g} (training {training:g} and "
        f"evaluation {evaluation:g}), and in the one that holds it out spends only that variant's evaluation "
        f"budget ({evaluation:g} at most, on its test release): up to {count - 1} x {whole:g} + {evaluation:g} = "
        f"{most:g} in all at each site, against {whole:g} for the study run once. Each site's site-wide ceiling "
        "(site_epsilon_ceiling) bounds the total: a site past it refuses the later variants."
    )


def write_variants(found: list[Variant], folder: Path) -> dict[str, Path]:
    """Each variant as canonical JSON (a study file stewards approve), checked to read back with its hash."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for variant in found:
        path = folder / f"{variant.id}.json"
        path.write_bytes(canonical_json(variant.spec))
        if study_hash(load_study(path)) != variant.hash:
            raise LeaveOneSiteOutError(f"{path} does not read back as the same study (hash differs)")
        files[variant.held_out_site] = path
    return files


def approval_commands(files: list[Path], site_config: str | None = None) -> list[str]:
    """What a site's data steward runs to approve the variants (`twinfed site approve`, one per file)."""
    config = f" --site-config {site_config}" if site_config else ""
    return [f"twinfed site approve {path}{config}" for path in files]


# --- the report -----------------------------------------------------------------------------------


class HeldOutResult(BaseModel):
    """One variant: the model trained without `held_out_site`, evaluated at it."""

    model_config = ConfigDict(extra="forbid")

    held_out_site: str
    variant_id: str
    variant_hash: str
    database: str | None = None  # a simulation: the OMOP database the held-out site reads (password redacted)
    run_folder: str | None = None
    run_status: str | None = None  # completed | stopped; None when the run did not finish
    evaluated: bool = False  # the held-out site released its test evaluation
    selected_round: int | None = None
    metric: Estimate | None = None  # the kind's headline metric (AUROC, C-index) at the held-out site
    headline: str = ""
    patients: Estimate | None = None  # the held-out site's test patients (as released: with DP, noisy)
    internal_validation: Estimate | None = None  # the training sites' pooled validation at the chosen round
    training_sites: list[str] = []  # the sites that trained in at least one round of the variant
    held_out_trained_rounds: int = 0  # rounds in which the held-out site's receipt says it trained: always 0
    unapproved_at: list[str] = []  # sites that refused the variant as not approved (code unapproved-study)
    reason: str = ""  # why there is no metric, or how the result came about


class LeaveOneSiteOutReport(BaseModel):
    model_config = ConfigDict(extra="forbid")

    study_id: str
    study_hash: str
    title: str
    metric: str  # the headline metric's name (AUROC, C-index)
    validation_cut: bool  # whether the study cuts a validation part (the training sites' internal validation)
    created_at: str
    sites: list[HeldOutResult]
    budget: str
    shared_databases: bool | None = None  # a simulation: whether simulated sites shared OMOP databases
    note: str = ""

    @property
    def complete(self) -> bool:
        """Every variant ran to its end and has an estimate at its held-out site."""
        return all(r.run_status == "completed" and r.metric and r.metric.value is not None for r in self.sites)


def _final_test(receipts: list[RoundReceipt]) -> RoundReceipt | None:
    tests = [r for r in receipts if r.phase == "evaluate" and r.part == "test"]
    return tests[-1] if tests else None


def held_out_result(
    spec: StudySpec, variant: Variant, folder: Path, failure: str | None = None, database: str | None = None
) -> HeldOutResult:
    """What one variant's run folder (receipts and model card) says about its held-out site."""
    site = variant.held_out_site
    result = HeldOutResult(
        held_out_site=site, variant_id=variant.id, variant_hash=variant.hash, database=database, run_folder=str(folder)
    )
    receipts = read_receipts(folder / "receipts.jsonl")
    result.training_sites = sorted(
        {s.label for r in receipts if r.phase == "train" for s in r.sites if s.status == Participation.TRAINED} - {site}
    )
    result.held_out_trained_rounds = len(
        {r.server_round for r in receipts for s in r.sites if s.label == site and s.status == Participation.TRAINED}
    )
    result.unapproved_at = sorted({s.label for r in receipts for s in r.sites if s.code == UNAPPROVED})
    card_file = folder / "model-card.json"
    if failure is not None or not card_file.exists():
        result.reason = failure or f"the run did not finish: {card_file} was not written"
        return result
    card = json.loads(card_file.read_text(encoding="utf-8"))
    result.run_status = card["run"]["status"]
    result.selected_round = card["model"].get("selected_round")
    kind = kind_of(spec.model)
    row = next((h for h in card.get("history", []) if h.get("round") == result.selected_round), None)
    if row and row.get("validation"):
        result.internal_validation = Estimate.model_validate(row["validation"][kind.selection_metric])
    pooled = card["evaluation"].get("pooled")
    test = _final_test(receipts)
    mine = next((s for s in test.sites if s.label == site), None) if test is not None else None
    result.evaluated = mine is not None and mine.status == Participation.EVALUATED
    if pooled and result.evaluated:
        evaluation = kind.pooled_type.model_validate(pooled)
        result.metric = getattr(evaluation, kind.selection_metric)
        result.patients = getattr(evaluation, "patients", None)
        result.headline = kind.headline(pooled)
        result.reason = (
            f"round {result.selected_round}'s model, trained at {', '.join(result.training_sites) or 'no site'}"
            if result.metric.value is not None
            else f"{kind.selection_label} not estimable at {site}: "
            f"{result.metric.note or 'the noise leaves it undetermined'}"
        )
    elif result.run_status != "completed":
        result.reason = f"the variant stopped: {card['run']['reason']}"
    elif mine is not None:
        result.reason = f"{site} did not release its test evaluation: {mine.status.value}" + (
            f" ({mine.code}): {mine.reason}" if mine.code else f": {mine.reason}" if mine.reason else ""
        )
    else:
        result.reason = (test.note if test is not None else "") or f"{site} was not asked for a test evaluation"
    if result.held_out_trained_rounds:  # the coordinator would have broken the design: never let it pass quietly
        result.reason = f"INVALID: {site} trained in {result.held_out_trained_rounds} round(s). " + result.reason
    return result


def build_report(
    spec: StudySpec,
    results: list[HeldOutResult],
    *,
    shared_databases: bool | None = None,
    note: str = "",
) -> LeaveOneSiteOutReport:
    kind = kind_of(spec.model)
    return LeaveOneSiteOutReport(
        study_id=spec.study.id,
        study_hash=study_hash(spec),
        title=spec.study.title,
        metric=kind.selection_label,
        validation_cut=spec.evaluation.split.has_validation,
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        sites=results,
        budget=budget_statement(spec, len(results)),
        shared_databases=shared_databases,
        note=note,
    )


def write_report(report: LeaveOneSiteOutReport, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / REPORT_FILE
    path.write_text(report.model_dump_json(indent=2), encoding="utf-8")
    return path


# --- running the variants -------------------------------------------------------------------------


Say = Callable[[str], None]


def simulate(
    spec: StudySpec,
    layout,
    hospitals: list,
    count: int,
    policy: Path | None,
    *,
    cpus_per_site: int = 1,
    say: Say = print,
) -> tuple[LeaveOneSiteOutReport, Path]:
    """`twinfed study simulate --leave-one-site-out`: `count` simulated sites approve every variant, and each
    variant runs as its own simulation holding its site out. Returns the report and where it was written.

    `layout` is a prepared federation.local.simulation.SimulationLayout, `hospitals` its HospitalSources."""
    from federation.local.simulation import (
        SimulationError,
        SimulationSettings,
        check_site_ids,
        hospital_of,
        prepare_sites,
        run_simulation,
        simulated_site_ids,
    )
    from omop_etl.database import redact

    found = variants(spec, simulated_site_ids(count))
    files = write_variants(found, layout.variants)
    say(f"Preparing {count} simulated sites over {len(hospitals)} OMOP database(s), each approving {len(found)} "
        f"variants, in {layout.sites}")  # fmt: skip
    site_list = prepare_sites(layout, count, hospitals, policy, studies=list(files.values()))
    check_site_ids(site_list, [v.held_out_site for v in found])
    results = []
    for index, variant in enumerate(found):
        database = redact(hospital_of(index, hospitals).omop_url)
        say(f"Variant {index + 1}/{len(found)}: {variant}")
        settings = SimulationSettings(
            sites=count, run_name="simulation", cpus_per_site=cpus_per_site, held_out_site=variant.held_out_site
        )
        failure = None
        try:
            run_simulation(variant.spec, layout, site_list, settings, say=say)
        except SimulationError as exc:
            failure = str(exc)
        folder = layout.run_folder(variant.spec, "simulation")
        results.append(held_out_result(spec, variant, folder, failure, database))
    databases = len({h.omop_url for h in hospitals[:count]})
    shared = count > databases
    note = SHARED_DATABASES.format(sites=count, databases=databases) if shared else OWN_DATABASES
    report = build_report(spec, results, shared_databases=shared, note=note)
    return report, write_report(report, layout.root / "studies" / spec.study.id / FOLDER)


def consortium_variants(spec: StudySpec, coordinator_dir: Path) -> list[Variant]:
    """The variants for every site in the consortium's registry (`twinfed provision`), in its order."""
    from federation.deploy.provision import load_consortium

    consortium = load_consortium(coordinator_dir)
    return variants(spec, [site.id for site in consortium.sites])


def run_on_consortium(
    spec: StudySpec,
    found: list[Variant],
    coordinator_dir: Path,
    *,
    name: str | None = None,
    resume: bool = False,
    node_wait_seconds: float = 120.0,
    say: Say = print,
) -> tuple[LeaveOneSiteOutReport, Path]:
    """`twinfed study run --leave-one-site-out`: submit each variant in turn to the running coordinator,
    holding its site out, then report. A variant that does not finish is reported with why; the others run."""
    from federation.deploy.deployment import CoordinatorLayout
    from federation.deploy.submission import submit

    layout = CoordinatorLayout(coordinator_dir)
    results = []
    for index, variant in enumerate(found):
        run_name = name or variant.id
        folder = layout.studies / variant.id / run_name
        say(f"Variant {index + 1}/{len(found)}: {variant}")
        started = time.time()
        code = submit(
            variant.spec,
            layout.cli_home,
            run_name=run_name,
            resume=resume,
            node_wait_seconds=node_wait_seconds,
            held_out_site=variant.held_out_site,
        )
        card = folder / "model-card.json"
        failure = None
        if code != 0 or not card.exists() or card.stat().st_mtime < started:
            failure = f"the run did not finish (flwr exit {code}); the coordinator's log is {layout.log_file}"
        results.append(held_out_result(spec, variant, folder, failure))
    report = build_report(spec, results, note=HOSPITALS)
    return report, write_report(report, layout.studies / spec.study.id / FOLDER)
