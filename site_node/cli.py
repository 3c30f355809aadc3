"""`twinfed site ...`: commands a hospital's IT team and data steward run on the site node.

Every command but `doctor` and `init` takes the site file (`--site-config`, or $TWINFED_SITE_CONFIG):
it names the OMOP database, the governance database and the policy, so each command acts on exactly
one hospital.
"""

from __future__ import annotations

import datetime as dt
import getpass
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

site_app = typer.Typer(
    help="Run and govern a hospital's site node (data stays here; only model updates leave).",
    no_args_is_help=True,
)
audit_app = typer.Typer(help="Read and verify the site's hash-chained audit log.", no_args_is_help=True)
consent_app = typer.Typer(help="Research consent: who is excluded, and recording withdrawals.", no_args_is_help=True)
site_app.add_typer(audit_app, name="audit")
site_app.add_typer(consent_app, name="consent")

console = Console()
SiteFile = Annotated[
    Path,
    typer.Option(
        "--site-config",
        "-s",
        envvar="TWINFED_SITE_CONFIG",
        dir_okay=False,
        help="The site file (site id, OMOP database, governance database, policy). Env: TWINFED_SITE_CONFIG.",
    ),
]
ModelFile = Annotated[
    Path | None,
    typer.Option(
        "--model",
        exists=True,
        dir_okay=False,
        help="Weights to apply (a model card's final-model.pt). Default: the latest global model of the study the "
        "coordinator sent this site.",
    ),
]
Who = Annotated[
    str, typer.Option("--by", help="Who does this (name or role); recorded in the audit log. Default: the OS user.")
]


def _fail(message: str, code: int = 2) -> typer.Exit:
    Console(stderr=True, soft_wrap=True).print(message, markup=False, highlight=False)
    return typer.Exit(code)


def _node(site_config: Path):
    """The site node for a site file, with configuration errors turned into one readable sentence."""
    from site_node.config import SiteConfigError, load_site_config
    from site_node.governance import PolicyError
    from site_node.participation import SiteNode

    try:
        return SiteNode(load_site_config(site_config))
    except (SiteConfigError, PolicyError) as exc:
        raise _fail(str(exc)) from None


def _study(path: Path):
    from federation.contract import StudyError, load_study, study_hash

    try:
        spec = load_study(path)
    except StudyError as exc:
        raise _fail(str(exc)) from None
    return spec, study_hash(spec)


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


@site_app.command("doctor")
def doctor(
    db: Annotated[
        str | None,
        typer.Option(
            "--db", help="OMOP database URL to check, e.g. sqlite:///omop.sqlite or postgresql://user@host/db."
        ),
    ] = None,
    schema: Annotated[
        str | None, typer.Option("--schema", help="PostgreSQL schema that holds the CDM tables, e.g. cdm.")
    ] = None,
    secret_file: Annotated[
        Path | None,
        typer.Option(
            "--secret-file",
            dir_okay=False,
            help="The site secret (the site file's secret_file): checked against the fingerprint twinfed etl "
            "stored when it loaded the database.",
        ),
    ] = None,
    study: Annotated[
        Path | None,
        typer.Option(
            "--study",
            dir_okay=False,
            help="Check the vocabulary for this study's concepts (default: configs/study-inpatient-mortality.yaml).",
        ),
    ] = None,
) -> None:
    """Check that this machine can run a site node, and (with --db) that its database is a usable OMOP CDM v5.4.

    Always: Python, training and FHIR libraries, Flower, telemetry. With --db: the connection (server
    version, may this user create tables; nothing is left behind), then the OMOP database itself: every
    CDM v5.4 table and column (missing ones are named), cdm_source and its CDM version, the vocabulary
    holds the standard concepts the study uses (which are missing, and that an Athena vocabulary load
    fixes it), row counts of person, visit_occurrence, condition_occurrence, measurement, drug_exposure,
    observation and death, and, if twinfed etl loaded the database, whether --secret-file is the secret
    it was loaded with. Nothing is written to the OMOP database. Exits with status 1 when a check fails.
    """
    from federation.common import diagnostics as d
    from site_node.environment import database_check, torch_check, warm_runtime_check

    checks = [
        d.python_version(),
        torch_check(),
        d.package_version("opacus", "differentially private training"),
        d.package_version("fhir.resources", "validating FHIR R4 input"),
        d.package_version("SQLAlchemy", "the OMOP database"),
        d.flower_version(),
        d.executable("flower-supernode", "connecting this site to a consortium"),
        warm_runtime_check(),
        d.telemetry_off(),
    ]
    if db:
        connection = database_check(db)
        checks.append(connection)
        if connection.status != "fail":
            from site_node.omop_check import omop_checks

            checks.extend(omop_checks(db, schema, study, secret_file))
    if not d.render(checks, "Site node check"):
        raise typer.Exit(1)


@site_app.command("init")
def init(
    folder: Annotated[Path, typer.Argument(help="Folder for the site file, policy and governance database.")],
    site_id: Annotated[str, typer.Option("--site-id", help="Short id of this hospital, e.g. aster-university.")],
    omop_url: Annotated[str, typer.Option("--omop-url", help="URL of the site's OMOP CDM v5.4 database.")],
    secret_file: Annotated[
        Path | None,
        typer.Option(
            "--secret-file",
            dir_okay=False,
            help="The site secret: the file `twinfed etl --secret-file` loaded the OMOP database with, if twinfed "
            "loaded it. Created (mode 0600) when it does not exist. Default: $TWINFED_SITE_SECRET_FILE or "
            "~/.config/twinfed/site-secret, the ETL's default.",
        ),
    ] = None,
    omop_schema: Annotated[str | None, typer.Option("--omop-schema", help="PostgreSQL schema of the CDM.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing site file and policy.")] = False,
) -> None:
    """Write a site file and a default policy for a new site node (the data steward then edits the policy).

    Creates FOLDER/site.yaml and FOLDER/policy.yaml; the governance database (approvals, privacy ledger,
    audit log) is FOLDER/governance.sqlite and is created on first use.

    The site secret keys the site's train/test split (and, when twinfed etl loads the database, every
    pseudonymous id). An existing secret file is used; when there is none, one is created and the command
    says where: back it up with the database. If twinfed etl loaded the OMOP database, the secret must be
    the one it used: a different secret, or a new one, is refused.
    """
    from site_node.config import write_site_folder
    from site_node.governance import SitePolicy
    from site_node.omop_check import SiteSecretError, provide_site_secret

    site_file, policy_file = folder / "site.yaml", folder / "policy.yaml"
    for path in (site_file, policy_file):
        if path.exists() and not force:
            raise _fail(f"{path} exists; pass --force to overwrite it.")
    try:
        secret = provide_site_secret(secret_file, omop_url, omop_schema, site_folder=folder.resolve())
    except SiteSecretError as exc:
        raise _fail(f"Site file not written. {exc}") from None
    write_site_folder(
        folder,
        site_id,
        omop_url,
        secret.path,
        SitePolicy().model_dump(mode="json"),
        omop_schema=omop_schema,
    )
    console.print(f"Wrote {site_file} and {policy_file}. Next: the data steward reviews the policy.")
    if secret.created:
        console.print(
            f"Created the site secret {secret.path} (mode 0600, fingerprint {secret.fingerprint[:12]}). Back it up "
            "together with the OMOP database: without it the train/test split and the pseudonymous ids cannot be "
            "reproduced, and every study would start over on a different split.",
            highlight=False,
        )
    else:
        matched = "; it is the one twinfed etl loaded the OMOP database with" if secret.database_fingerprint else ""
        console.print(
            f"Using the site secret {secret.path} (fingerprint {secret.fingerprint[:12]}){matched}.", highlight=False
        )
    if secret.database_note:
        console.print(
            f"Could not compare the secret with the OMOP database: {secret.database_note}. "
            "Run `twinfed site doctor --db URL --secret-file FILE` once it is reachable.",
            highlight=False,
            markup=False,
        )


@site_app.command("approve")
def approve(
    study: Annotated[Path, typer.Argument(help="The study YAML file to approve.")],
    site_config: SiteFile,
    by: Who = "",
    note: Annotated[str, typer.Option("--note", help="Why, or under which agreement (kept in the audit).")] = "",
) -> None:
    """Approve a study at this site, by its hash: exactly this study, run by this twinfed version.

    The study is checked against the site policy first (epsilon ceiling, delta, secure aggregation);
    a study the policy would refuse anyway is not approved. Changing any setting of the study later
    changes its hash, and the changed study needs a new approval.
    """
    from site_node.governance import ApprovalError

    node = _node(site_config)
    spec, digest = _study(study)
    problems = node.policy_conflicts(spec)
    if problems:
        raise _fail(f"Not approved: {spec.study.id} conflicts with this site's policy: " + "; ".join(problems), 1)
    try:
        approval = node.governance.approvals.approve(digest, spec.study.id, by or _user(), note)
    except ApprovalError as exc:
        raise _fail(str(exc)) from None
    inherits = node.inheritance(spec, digest)
    node.governance.audit.append(
        "approved",
        {
            "study_hash": digest,
            "study_id": spec.study.id,
            "by": approval.approved_by,
            "note": note,
            **({"inherits": inherits.model_dump(mode="json")} if inherits else {}),
        },
    )
    console.print(f"Approved {spec.study.id} at {node.config.site_id}: hash {digest}")
    if inherits is not None:
        console.print(f"Inherits: {inherits.sentence()}", markup=False, highlight=False)
    for note in node.policy_notes(spec):
        console.print(f"Note: {note}.")


@site_app.command("revoke")
def revoke(
    study: Annotated[Path, typer.Argument(help="The study YAML file whose approval is withdrawn.")],
    site_config: SiteFile,
    reason: Annotated[str, typer.Option("--reason", help="Why (kept with the approval and in the audit).")],
    by: Who = "",
) -> None:
    """Withdraw this site's approval of a study: the next round of it is refused."""
    from site_node.governance import ApprovalError

    node = _node(site_config)
    spec, digest = _study(study)
    if not node.governance.approvals.is_approved(digest):
        raise _fail(f"{spec.study.id} (hash {digest[:12]}) is not approved at this site; nothing to revoke.", 1)
    try:
        node.governance.approvals.revoke(digest, by or _user(), reason)
    except ApprovalError as exc:
        raise _fail(str(exc)) from None
    node.governance.audit.append("revoked", {"study_hash": digest, "by": by or _user(), "reason": reason})
    console.print(f"Revoked the approval of {spec.study.id} at {node.config.site_id}.")


@site_app.command("status")
def status(site_config: SiteFile) -> None:
    """Show privacy budgets per study and for the site, approvals, and the latest rounds."""
    node = _node(site_config)
    ledger, policy = node.governance.ledger, node.policy
    budgets = Table(title=f"Privacy budget at {node.config.site_id}")
    for column in (
        "study",
        "rounds",
        "training epsilon",
        "evaluation epsilon (releases)",
        "composed, spent",
        "reserved (unfinished)",
        "ceiling",
    ):
        budgets.add_column(column)
    for budget in ledger.summary():
        versions = f" ({len(budget.versions)} versions)" if len(budget.versions) > 1 else ""
        name = f"{budget.lineage}{versions}" if budget.lineage != budget.study_hash else budget.study_hash[:12]
        if budget.non_private_rounds and not budget.evaluation_releases and budget.total_epsilon == 0:
            not_dp = ("NOT DIFFERENTIALLY PRIVATE", "-", "-", "-", "-")
            budgets.add_row(name, str(budget.rounds), *not_dp)
            continue
        budgets.add_row(
            name,
            str(budget.rounds),
            f"{budget.training_epsilon:.3f}",
            f"{budget.evaluation_epsilon:.3f} ({budget.evaluation_releases})",
            f"{budget.committed_epsilon:.3f}",
            f"{budget.reserved_epsilon:.3f}",
            f"{budget.ceiling:.3g}",
        )
    budgets.caption = f"Site total {ledger.site_spent():.3f} of {policy.site_epsilon_ceiling:g} (all studies)"
    console.print(budgets)
    approvals = Table(title="Approved studies")
    for column in ("study", "hash", "approved by", "at", "state"):
        approvals.add_column(column)
    for approval in node.governance.approvals.list():
        approvals.add_row(
            approval.study_id,
            approval.study_hash[:12],
            approval.approved_by,
            approval.approved_at.isoformat(timespec="seconds"),
            "revoked" if approval.revoked_at else "active",
        )
    console.print(approvals)
    rounds = Table(title="Latest rounds")
    for column in ("at", "event", "round", "detail"):
        rounds.add_column(column)
    events = [
        e for e in node.governance.audit.entries() if e.kind in ("round-trained", "refused", "evaluated", "scored")
    ]
    for entry in events[-10:]:
        epsilon = entry.payload.get("epsilon_after")
        detail = (
            f"epsilon {epsilon:.3f}"
            if entry.kind == "round-trained" and isinstance(epsilon, int | float)
            else entry.payload.get("reason", "")
        )
        rounds.add_row(entry.when, entry.kind, str(entry.payload.get("round", "")), str(detail))
    console.print(rounds)
    integrity = node.governance.integrity()
    if not integrity.ok:
        Console(stderr=True, soft_wrap=True).print(
            f"WARNING: {integrity.sentence()}", markup=False, highlight=False, style="bold red"
        )


@audit_app.command("verify")
def audit_verify(
    site_config: SiteFile,
    receipts: Annotated[
        Path | None,
        typer.Option(
            "--receipts",
            dir_okay=False,
            help="A run's receipts.jsonl from the coordinator: check the chain against the audit heads the "
            "consortium saw in this site's answers (a witness outside the site).",
        ),
    ] = None,
) -> None:
    """Check the audit chain and the ledger against it: any edited, deleted, reordered, forged or cut-off
    entry, and any ledger row deleted or edited behind the site node's back, is named.

    The chain's links, its signatures (the site's audit key) and the head file outside the database are
    checked, then the ledger is compared with the ledger changes the chain records. Exits with status 1
    when anything disagrees.
    """
    from site_node.governance.witness import ReceiptsError, check_against_receipts

    node = _node(site_config)
    report = node.governance.integrity()
    problems = list(report.problems)
    witness = None
    if receipts is not None:
        try:
            witness = check_against_receipts(node.governance.audit, node.config.site_id, receipts)
        except ReceiptsError as exc:
            raise _fail(str(exc)) from None
        problems.extend(witness.problems)
    chain = report.chain
    for note in chain.notes:
        console.print(f"Note: {note}", markup=False, highlight=False)
    if problems:
        err = Console(stderr=True, soft_wrap=True)
        err.print(f"Audit of {node.config.site_id} FAILED: {len(problems)} finding(s).", markup=False, highlight=False)
        for problem in problems:
            err.print(f"- {problem}", markup=False, highlight=False)
        raise typer.Exit(1)
    signed = f"signed since entry {chain.signed_from}" if chain.signed else "not signed"
    console.print(
        f"Audit log of {node.config.site_id} verified: {chain.entries} entries, chain intact ({signed}, head file "
        f"{'checked' if chain.head_checked else 'not configured'}); the ledger's {report.ledger_rows_checked} rows "
        "agree with it.",
        markup=False,
        highlight=False,
    )
    if witness is not None:
        console.print(
            f"Receipts {receipts}: the chain holds all {witness.heads_seen} audit heads the consortium saw.",
            markup=False,
            highlight=False,
        )


@audit_app.command("show")
def audit_show(
    site_config: SiteFile,
    last: Annotated[int, typer.Option("--last", min=1, help="How many of the latest entries to show.")] = 20,
) -> None:
    """Print the latest audit entries (what was approved, refused, trained and what left the site)."""
    import json

    node = _node(site_config)
    table = Table(title=f"Audit log of {node.config.site_id}")
    for column in ("seq", "at", "event", "details"):
        table.add_column(column, overflow="fold")
    for entry in node.governance.audit.entries()[-last:]:
        table.add_row(str(entry.seq), entry.when, entry.kind,
                      json.dumps(entry.payload, sort_keys=True))  # fmt: skip
    console.print(table)


@consent_app.command("list")
def consent_list(site_config: SiteFile) -> None:
    """List the patients kept out of training now: active research denials in OMOP and recorded withdrawals."""
    from site_node.cohort.consent import denying_person_ids
    from site_node.cohort.omop_source import OmopSource

    node = _node(site_config)
    with OmopSource.open(node.config.omop.url, node.config.omop.schema_name) as source:
        denied = sorted(denying_person_ids(source, dt.datetime.now()))
    table = Table(title=f"Patients excluded from studies at {node.config.site_id}")
    for column in ("person_id", "source", "recorded", "by"):
        table.add_column(column)
    for person_id in denied:
        table.add_row(str(person_id), "research consent denied (FHIR Consent, loaded by the ETL)", "", "")
    withdrawals = node.governance.withdrawals.list()
    for withdrawal in withdrawals:
        table.add_row(
            str(withdrawal.person_id),
            "withdrawal recorded at this site",
            withdrawal.recorded_at.isoformat(timespec="seconds"),
            withdrawal.recorded_by,
        )
    table.caption = f"{len(set(denied) | {w.person_id for w in withdrawals})} patients excluded"
    console.print(table)


@consent_app.command("withdraw")
def consent_withdraw(
    person_id: Annotated[
        int, typer.Argument(help="The patient's OMOP person_id (the person table's id, not the hospital's number).")
    ],
    site_config: SiteFile,
    by: Who = "",
    reason: Annotated[str, typer.Option("--reason", help="Free text kept with the withdrawal.")] = "",
) -> None:
    """Record a patient's withdrawal of research consent: they are out of the next round of every study.

    The person must be in the site's OMOP database: an id that is not (a typo) is refused and nothing is
    recorded, so the patient who withdrew is never left in by mistake. Also lists the earlier rounds that
    included the patient (their contribution to models already trained cannot be taken back, but it is on
    record). Exits with status 2 when nothing was recorded.
    """
    from site_node.consent_withdrawal import WithdrawalRefused, withdraw_consent

    node = _node(site_config)
    try:
        outcome = withdraw_consent(node.config, node.governance, person_id, by or _user(), reason)
    except WithdrawalRefused as exc:
        raise _fail(str(exc)) from None
    earlier = outcome.earlier_rounds
    if outcome.already_recorded:
        first = outcome.withdrawal
        when = first.recorded_at.isoformat(timespec="seconds")
        console.print(
            f"Person {person_id}'s withdrawal was already recorded on {when} by {first.recorded_by}; it stands "
            "unchanged, and they are excluded from every study's next round.",
            markup=False,
        )
    else:
        console.print(f"Recorded: person {person_id} is excluded from the next round of every study.")
    if earlier:
        table = Table(title="Earlier rounds that included this patient")
        for column in ("study", "round", "at"):
            table.add_column(column)
        for study_hash, round_key, at in earlier:
            table.add_row(study_hash[:12], round_key, at.isoformat(timespec="seconds"))
        console.print(table)
    else:
        console.print("No earlier round included this patient.")


@site_app.command("train-local")
def train_local(
    study: Annotated[Path, typer.Argument(help="An approved study YAML file.")],
    site_config: SiteFile,
) -> None:
    """Run a study at this site alone, every round, with the same DP training, ledger and audit.

    The reference a site compares federated results with. It spends this site's privacy budget for the
    study's training like federated rounds do, so it needs the same approval. Its test metrics are exact
    and shown here only: nothing leaves the site, so no evaluation budget is spent.
    """
    from federation.twins import kind_of
    from site_node.local_actions import LocalActionError
    from site_node.local_actions import train_local as run_local

    node = _node(site_config)
    spec, _ = _study(study)
    table = Table(title=f"{spec.study.id} at {node.config.site_id} alone (test metrics exact, kept here)")
    # the kind's headline metric: AUROC for the risk kinds, Harrell's C for survival
    metric = kind_of(spec.model).selection_metric
    label = {"auroc": "AUROC", "c_index": "C-index"}.get(metric, metric)
    for column in ("round", "train loss", "epsilon", f"test {label}", "test loss"):
        table.add_column(column)

    def shown(value: float | int | None, digits: int) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    try:
        for row in run_local(node, spec):
            table.add_row(
                str(row.server_round),
                shown(row.train_loss, 4),
                f"{row.epsilon:.3f}",
                shown(row.test.get(metric), 3),
                shown(row.test.get("loss"), 4),
            )
            console.print(
                f"round {row.server_round}/{spec.training.rounds}: epsilon {row.epsilon:.3f}, "
                f"test {label} {shown(row.test.get(metric), 3)}"
            )
    except LocalActionError as exc:
        raise _fail(str(exc), 1) from None
    console.print(table)


@site_app.command("score")
def score(
    study: Annotated[Path, typer.Argument(help="The study YAML file whose model is applied.")],
    site_config: SiteFile,
    out: Annotated[
        Path | None,
        typer.Option("--out", dir_okay=False, help="CSV to write (default: SITE-FOLDER/scores/<study-id>.csv)."),
    ] = None,
    model: ModelFile = None,
    by: Who = "",
) -> None:
    """Apply a study's model to this site's own cohort, locally: one risk per patient in a CSV.

    Nothing leaves the site. Columns: person_id (OMOP), split_part, risk (the predicted probability) and
    whether it is at or above the study's threshold. Features are built and scaled exactly as in training
    (fixed by the study, not by this site's data; see docs/data-steward.md). The file is written 0600 and
    the action is in the audit log.
    """
    from site_node.local_actions import LocalActionError
    from site_node.local_actions import score as score_cohort

    node = _node(site_config)
    spec, _ = _study(study)
    target = out or node.config.base_dir / "scores" / f"{spec.study.id}.csv"
    try:
        report = score_cohort(node, spec, target, model_file=model, by=by or _user(), say=console.print)
    except LocalActionError as exc:
        raise _fail(str(exc), 1) from None
    console.print(
        f"Wrote {report.patients} risks to {report.out} ({report.at_or_above_threshold} at or above "
        f"{report.threshold:g}); model {report.model_source}, sha256 {report.model_sha256[:16]}."
    )


@site_app.command("keygen")
def keygen(
    folder: Annotated[Path, typer.Argument(help="Folder for the key pair (created if needed).")],
    site_id: Annotated[str, typer.Option("--site-id", help="This hospital's site id, as in its site.yaml.")],
) -> None:
    """Generate this site's SuperNode key pair here, so the private key never leaves the hospital.

    Writes FOLDER/SITE.key (mode 0600) and FOLDER/SITE.pub. Send only SITE.pub to the coordinator, who
    adds it with `twinfed provision add-site DIR SITE --public-key SITE.pub` and sends back ca.crt.
    Existing keys are never overwritten.
    """
    from site_node.keys import SiteKeyError, generate_site_keys

    try:
        keys = generate_site_keys(folder, site_id)
    except SiteKeyError as exc:
        raise _fail(str(exc), 1) from None
    typer.echo(f"Wrote {keys.private_key} (keep it here, mode 0600) and {keys.public_key}.")
    typer.echo(f"Fingerprint {keys.fingerprint}: read it to the coordinator when you send {keys.public_key.name}.")


@site_app.command("start")
def start(
    site_config: SiteFile,
    superlink: Annotated[
        str, typer.Option("--superlink", help="The consortium's SuperLink as HOST:PORT (outbound HTTPS).")
    ],
    ca: Annotated[Path, typer.Option("--ca", dir_okay=False, help="The consortium CA certificate (ca.crt).")],
    key: Annotated[Path, typer.Option("--key", dir_okay=False, help="This site's private key (SITE.key, 0600).")],
    runtime_port: Annotated[
        int,
        typer.Option("--runtime-port", min=1, max=65535, help="Local port (127.0.0.1) for this node's ClientApps."),
    ] = 9094,
    flwr_home: Annotated[
        Path | None,
        typer.Option("--flwr-home", file_okay=False, help="Flower's working folder. Default: SITE-FOLDER/flwr-home."),
    ] = None,
    log_file: Annotated[
        Path | None,
        typer.Option(
            "--log-file", dir_okay=False, help="Where the SuperNode logs. Default: SITE-FOLDER/supernode.log."
        ),
    ] = None,
    isolation: Annotated[
        str,
        typer.Option(
            "--isolation",
            help="How rounds run here. 'process' (default): a warm runtime, torch and the site code loaded once "
            "and a forked process per message (docs/benchmarks.md, rounds). 'subprocess': plain Flower, a new "
            "Python process per message (seconds of imports each); the fallback if 'process' refuses.",
        ),
    ] = "process",
) -> None:
    """Connect this site to the consortium: run its Flower SuperNode until Ctrl-C or SIGTERM.

    The connection is outbound only, over TLS checked against the consortium CA, and the site proves who it
    is with its private key (the coordinator must have registered the matching public key). Every round
    then runs this site's policy, ledger and audit from the site file. The site file, key and CA are
    checked before anything starts.
    """
    from site_node.supernode import SuperNodeError, prepare_launch, run_supernode

    try:
        launch = prepare_launch(site_config, superlink, ca, key, runtime_port, flwr_home, log_file, isolation)
        code = run_supernode(launch, say=typer.echo)
    except SuperNodeError as exc:
        raise _fail(str(exc), 1) from None
    raise typer.Exit(code)


@site_app.command("cohort")
def cohort(
    study: Annotated[Path, typer.Argument(help="A study YAML file (it need not be approved yet).")],
    site_config: SiteFile,
    by: Who = "",
) -> None:
    """Build a study's cohort at this site and show its attrition: who each criterion removed, in order.

    The cohort is built exactly as a round builds it (the same split key, consent denials and recorded
    withdrawals), so this is what the study would train and test on here. The table has full counts:
    it is shown at the site only, nothing leaves. Below it: the split parts the study cuts, and the one
    sentence a refusal for this cohort may send outside, under the site's cell-count floor. The look is
    recorded in the audit log (study, who, sizes; no patient data). Spends no privacy budget.
    """
    from omop_etl.database import DatabaseUnavailable
    from site_node.cohort import CohortError
    from site_node.inspection import inspect_cohort

    node = _node(site_config)
    spec, _ = _study(study)
    try:
        report = inspect_cohort(node, spec, by=by or _user())
    except (CohortError, DatabaseUnavailable) as exc:
        raise _fail(f"The cohort of '{spec.study.id}' cannot be built at {node.config.site_id}: {exc}", 1) from None
    table = Table(title=f"Attrition of {report.study_id} at {report.site_id} (study {report.study_hash[:12]})")
    for column in ("#", "criterion", "patients", "visits", "patients removed", "visits removed"):
        table.add_column(column, justify="left" if column == "criterion" else "right")
    for number, step in enumerate(report.attrition.steps, start=1):
        removed = "" if step.removed_persons is None else f"{step.removed_persons:,}"
        removed_visits = "" if step.removed_examples is None else f"{step.removed_examples:,}"
        highlight = report.most_removed is not None and step.name == report.most_removed.name
        table.add_row(str(number), step.criterion, f"{step.persons:,}", f"{step.examples:,}", removed, removed_visits,
                      style="bold" if highlight else None)  # fmt: skip
    table.caption = "Full counts, shown at this site only. Bold: the criterion that removed the most patients."
    console.print(table)
    parts = Table(title="Split parts (one visit per patient)")
    for column in ("part", "patients", "share", "defined by the study as"):
        parts.add_column(column, justify="right" if column in ("patients", "share") else "left")
    for part in report.parts:
        share = f"{part.persons / report.examples:.1%}" if report.examples else "-"
        parts.add_row(part.part, f"{part.persons:,}", share, part.definition)
    console.print(parts)
    console.print(f"Site minimum cohort: {report.min_cohort_size}; cell-count floor: {report.min_cell_count}.")
    console.print(f"A refusal may say outside the site: {report.outside_sentence}", markup=False, highlight=False)
    for note in report.notes:
        console.print(f"Note: {note}", markup=False, highlight=False)
