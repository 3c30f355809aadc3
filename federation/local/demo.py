"""The federated part of `make demo`: a whole consortium on this machine, started the way users start it.

Given hospitals already loaded into OMOP (one SQLite database and site secret each, as `make demo`'s ETL
step leaves them), it provisions the consortium's keys, writes each hospital's site file and policy,
has each hospital's data steward approve the study, starts the coordinator and one site node per
hospital as separate `twinfed` processes talking TLS on loopback, runs the study to its model card,
verifies every site's audit log, and writes a report folder. Every process is stopped at the end, on
error and on Ctrl-C; a second run starts from fresh governance state (the OMOP databases are kept).

With a patient-twin study (`twin_study`), the same consortium then trains it too, each hospital's data
steward having approved it and listed it in the site policy's `twin_query_studies`; after the consortium
stops, one hospital runs `twinfed twin patient` on one of its own patients under the example scenarios
(the first patients of its FHIR export, asked in batch mode, then the first in the cohort alone) and the
report links to the answer's plot and JSON, which stay in that hospital's site folder.

With a hospital section (`hospital_demo`), the first hospital's IT adds its wards and beds to its site file, and
at the end its bed manager runs `twinfed twin hospital` for the next 30 days under the example what-ifs;
the report links to the HTML page, which stays in that hospital's site folder.

It only ever runs `twinfed` commands (and edits a policy file as a steward would), so it exercises
exactly what hospital IT, a consortium and a data steward run.
"""

from __future__ import annotations

import contextlib
import html
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from federation.common.flower import flower_env
from federation.common.processes import ProcessSpec, Supervised, free_loopback_port

TWINFED = str(Path(sys.executable).parent / "twinfed")
DEMO_STOP_GRACE_S = 20.0  # a site node finishing its round, a coordinator writing its last receipt


class DemoError(RuntimeError):
    """A step of the demo failed; the message says which and where its log is."""


@dataclass(frozen=True)
class Hospital:
    site_id: str
    omop_db: Path
    secret: Path


def find_hospitals(omop_dir: Path) -> list[Hospital]:
    """Hospitals whose OMOP database and site secret `make demo`'s ETL step wrote (<site>.sqlite, <site>.secret)."""
    hospitals = [
        Hospital(db.stem, db.resolve(), db.with_suffix(".secret").resolve())
        for db in sorted(omop_dir.glob("*.sqlite"))
        if db.with_suffix(".secret").exists()
    ]
    if not hospitals:
        raise DemoError(
            f"{omop_dir} holds no <site>.sqlite with its <site>.secret: run the ETL step of `make demo` first."
        )
    return hospitals


def _run(args: list[str], what: str, log: Path) -> str:
    """Run one `twinfed` command to completion; its output goes to `log`; a failure stops the demo."""
    done = subprocess.run([TWINFED, *args], env=flower_env(), capture_output=True, text=True, check=False)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a", encoding="utf-8") as handle:
        handle.write(f"$ twinfed {' '.join(args)}\n{done.stdout}{done.stderr}\n")
    if done.returncode != 0:
        raise DemoError(f"{what} failed (exit {done.returncode}): {(done.stderr or done.stdout).strip()[-800:]}")
    return done.stdout


class Processes:
    """Long-running `twinfed` processes of the demo, each supervised in its own process group, stopped together."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.running: list[tuple[str, Supervised]] = []

    def start(self, name: str, args: list[str]) -> Path:
        log = self.logs / f"{name}.log"
        log.unlink(missing_ok=True)  # this run's output only: readiness is read from the log
        child = Supervised(ProcessSpec(argv=[TWINFED, *args], env=flower_env(), log_file=log))
        child.start()
        self.running.append((name, child))
        return log

    def wait_for(self, log: Path, text: str, timeout: float, name: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if log.exists() and text in log.read_text(encoding="utf-8", errors="replace"):
                return
            for other, child in self.running:
                if other == name and child.exit_code() is not None:
                    raise DemoError(f"{name} exited ({child.exit_code()}) before it was ready; see {log}")
            time.sleep(0.2)
        raise DemoError(f"{name} was not ready within {timeout:.0f} s; see {log}")

    def stop(self) -> None:
        """Stop every process, newest first: SIGTERM to its group (it stops its Flower children), SIGKILL
        to what is left after the grace."""
        for _, child in reversed(self.running):
            child.stop(grace=DEMO_STOP_GRACE_S)
        self.running.clear()


@contextlib.contextmanager
def _stopped_on_signals(processes: Processes) -> Iterator[None]:
    """Ctrl-C or SIGTERM: stop every demo process before leaving."""

    def handler(signum: int, _frame) -> None:
        processes.stop()
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        processes.stop()
        for sig, old in previous.items():
            signal.signal(sig, old)


@dataclass(frozen=True)
class TwinDemo:
    """The demo's patient twin: the study, the scenarios asked, and the hospitals' FHIR exports (a patient
    is named by the hospital's own id, which only its export knows)."""

    study: Path
    scenarios: Path
    exports: Path  # <site>/fhir/Patient.ndjson per hospital


@dataclass(frozen=True)
class HospitalDemo:
    """The demo's hospital twin: the `hospital:` section the first hospital's IT adds to its site file, and
    the what-if scenarios its bed manager asks."""

    hospital: Path
    scenarios: Path


HOSPITAL_TWIN_RUNS = 300  # replications of the demo's hospital twin (seconds on two cores)

TWIN_CANDIDATES = 60  # the first patients of the export asked in batch mode; the first in the cohort is shown


def run_demo(
    omop_dir: Path,
    out: Path,
    study: Path,
    say: Callable[[str], None] = print,
    twin: TwinDemo | None = None,
    hospital_demo: HospitalDemo | None = None,
) -> Path:
    """Run the federated demo; returns the report's index.html."""
    hospitals = find_hospitals(omop_dir)
    root = out / "consortium"
    for stale in (root, out / "sites", out / "logs", out / "report"):
        shutil.rmtree(stale, ignore_errors=True)
    logs = out / "logs"
    steps = logs / "commands.log"
    ids = [h.site_id for h in hospitals]
    say(f"Provisioning keys for {len(ids)} hospitals: {', '.join(ids)}")
    _run(["provision", "init", str(root), "--host", "127.0.0.1", "--host", "localhost",
          *[arg for site in ids for arg in ("--site", site)]], "provisioning", steps)  # fmt: skip
    site_files: dict[str, Path] = {}
    for hospital in hospitals:
        folder = out / "sites" / hospital.site_id
        _run(["site", "init", str(folder), "--site-id", hospital.site_id, "--omop-url", f"sqlite:///{hospital.omop_db}",
              "--secret-file", str(hospital.secret)], f"site init at {hospital.site_id}", steps)  # fmt: skip
        site_files[hospital.site_id] = folder / "site.yaml"
        for approved in [study] + ([twin.study] if twin else []):
            _run(["site", "approve", str(approved), "--site-config", str(folder / "site.yaml"),
                  "--by", f"{hospital.site_id} data steward", "--note", "make demo"],
                 f"approval at {hospital.site_id}", steps)  # fmt: skip
        if twin:
            _allow_twin_queries(folder / "policy.yaml", twin.study)
        if hospital_demo and len(site_files) == 1:  # the first hospital's IT describes its wards for the twin
            _add_hospital_section(folder / "site.yaml", hospital_demo.hospital)
    say("Each hospital's data steward approved the " + ("studies" if twin else "study") + " by its hash.")
    processes = Processes(logs)
    port = free_loopback_port()
    with _stopped_on_signals(processes):
        log = processes.start("coordinator", ["coordinator", "start", "--dir", str(root), "--port", str(port)])
        processes.wait_for(log, "Coordinator running", 90, "coordinator")
        say(f"Coordinator running on 127.0.0.1:{port} (TLS, SuperNode authentication); log {log}")
        for site_id, site_file in site_files.items():
            bundle = root / "sites" / site_id
            command = ["site", "start", "--site-config", str(site_file), "--superlink", f"127.0.0.1:{port}",
                       "--ca", str(bundle / "ca.crt"), "--key", str(bundle / f"{site_id}.key"),
                       "--runtime-port", str(free_loopback_port())]  # fmt: skip
            site_log = processes.start(f"site-{site_id}", command)
            processes.wait_for(site_log, "Connected to the SuperLink as node", 90, f"site-{site_id}")
            say(f"Site node {site_id} connected (outbound only); log {site_log}")
        say("Running the study (progress per round below):")
        command = [TWINFED, "study", "run", str(study), "--coordinator-dir", str(root), "--wait-for-sites", "60"]
        run = subprocess.run(command, env=flower_env(), check=False)
        if run.returncode != 0:
            raise DemoError(f"the study did not complete (exit {run.returncode}); see {logs}")
        if twin:
            say("Running the patient-twin study (a trajectory model, DP at the patient unit):")
            command = [TWINFED, "study", "run", str(twin.study), "--coordinator-dir", str(root),
                       "--wait-for-sites", "60"]  # fmt: skip
            run = subprocess.run(command, env=flower_env(), check=False)
            if run.returncode != 0:
                raise DemoError(f"the patient-twin study did not complete (exit {run.returncode}); see {logs}")
    say("All processes stopped.")
    audits = {
        site_id: subprocess.run(
            [TWINFED, "site", "audit", "verify", "--site-config", str(site_file)],
            env=flower_env(),
            capture_output=True,
            text=True,
            check=False,
        )
        for site_id, site_file in site_files.items()
    }
    index = write_report(out / "report", root, study, audits, say)
    if twin:
        site_id = next(iter(site_files))
        shown = patient_twin(twin, root, site_id, site_files[site_id], steps, say)
        _link_twin(index, shown, twin, site_id)
    if hospital_demo:
        site_id = next(iter(site_files))
        page = hospital_twin(hospital_demo, site_id, site_files[site_id], steps, say)
        _link_hospital_twin(index, page, site_id)
    if twin or hospital_demo:
        say(f"Report: {index}")
    return index


def _add_hospital_section(site_file: Path, hospital: Path) -> None:
    """Hospital IT's edit: the wards, beds and care sites of the hospital twin, as `hospital:` in site.yaml."""
    import yaml

    section = yaml.safe_load(hospital.read_text(encoding="utf-8"))
    site = yaml.safe_load(site_file.read_text(encoding="utf-8")) or {}
    site["hospital"] = section
    site_file.write_text(yaml.safe_dump(site, sort_keys=False), encoding="utf-8")


def hospital_twin(hospital: HospitalDemo, site_id: str, site_file: Path, steps: Path, say: Callable[[str], None]
                  ) -> Path:  # fmt: skip
    """The first hospital's twin: the next 30 days from the state at the end of its data, baseline and the
    example scenarios; returns the HTML page, which stays in the site's folder (SITE/twins/hospital)."""
    say(f"Hospital twin at {site_id}: the next 30 days of its wards, {HOSPITAL_TWIN_RUNS} replications, "
        "baseline and the example what-ifs:")  # fmt: skip
    command = ["twin", "hospital", "-s", str(site_file), "--days", "30", "--runs", str(HOSPITAL_TWIN_RUNS),
               "--scenario", str(hospital.scenarios), "--by", f"{site_id} demo bed manager"]  # fmt: skip
    say(_run(command, f"the hospital twin at {site_id}", steps).rstrip())
    pages = sorted((site_file.parent / "twins" / "hospital").glob("hospital-twin-*.html"))
    if not pages:
        raise DemoError(f"the hospital twin at {site_id} wrote no report; see {steps}")
    return pages[-1]


def _link_hospital_twin(index: Path, page: Path, site_id: str) -> None:
    """The report's hospital-twin section, before its end."""
    here = Path(os.path.relpath(page, index.parent)).as_posix()
    section = (
        f"<h2>Hospital twin at {html.escape(site_id)}</h2><p>The next 30 days of the hospital's wards from the "
        "state at the end of its data, learnt from its own history only: midnight census bands per ward, the "
        "chance of being full, patients waiting for a bed, and the example what-ifs (four more general-ward "
        "beds; a two-week wave of 20% more emergency arrivals) against the baseline with their 95% intervals. "
        "It stays in the hospital's own folder; this page links to it only because every site of the demo "
        f'runs on this machine.</p><p><a href="{html.escape(here)}">the hospital twin\'s report (at the site)</a></p>'
    )
    text = index.read_text(encoding="utf-8")
    index.write_text(text.replace("</body></html>", section + "</body></html>"), encoding="utf-8")


def _allow_twin_queries(policy_file: Path, study: Path) -> None:
    """The steward's edit: list the study under `twin_query_studies` in the site policy."""
    import yaml

    from federation.contract import load_study

    policy = yaml.safe_load(policy_file.read_text(encoding="utf-8")) or {}
    listed = list(policy.get("twin_query_studies") or [])
    study_id = load_study(study).study.id
    if study_id not in listed:
        policy["twin_query_studies"] = [*listed, study_id]
    policy_file.write_text(yaml.safe_dump(policy, sort_keys=False), encoding="utf-8")


def patient_twin(
    twin: TwinDemo, root: Path, site_id: str, site_file: Path, steps: Path, say: Callable[[str], None]
) -> Path:
    """One hospital's patient twin of one of its patients, from the study's final model; returns its plot.
    The plot and the answer stay in the site's folder (SITE/twins/<study>): the report links to them there
    and copies nothing patient-level into the consortium's folders."""
    from federation.contract import load_study

    spec = load_study(twin.study)
    model = root / "studies" / spec.study.id / spec.study.id / "final-model.pt"
    export = twin.exports / site_id / "fhir" / "Patient.ndjson"
    try:
        lines = export.read_text(encoding="utf-8").splitlines()[:TWIN_CANDIDATES]
        ids = [str(json.loads(line)["id"]) for line in lines if line.strip()]
    except (OSError, ValueError, KeyError) as exc:
        raise DemoError(f"{export}: cannot read the hospital's Patient ids for its patient twin: {exc}") from None
    folder = site_file.parent / "twins" / spec.study.id
    candidates = folder / "demo-candidates.txt"
    folder.mkdir(parents=True, exist_ok=True)
    candidates.write_text("\n".join(ids) + "\n", encoding="utf-8")
    common = ["twin", "patient", "-s", str(site_file), "--study", str(twin.study), "--model", str(model),
              "--scenario", str(twin.scenarios), "--by", f"{site_id} demo clinician"]  # fmt: skip
    done = subprocess.run([TWINFED, *common, "--batch", str(candidates)], env=flower_env(), capture_output=True,
                          text=True, check=False)  # fmt: skip
    with steps.open("a", encoding="utf-8") as handle:
        handle.write(f"$ twinfed {' '.join(common)} --batch {candidates}\n{done.stdout}{done.stderr}\n")
    answers = folder / "demo-candidates.jsonl"
    rows = [json.loads(line) for line in answers.read_text(encoding="utf-8").splitlines()] if answers.exists() else []
    first = next((i for i, row in enumerate(rows) if "error" not in row), None)
    if first is None:
        raise DemoError(f"none of the first {len(ids)} patients of {export} is in the patient-twin study's cohort at "
                        f"{site_id}; see {steps}")  # fmt: skip
    say(f"Patient twin at {site_id}: {sum('error' not in r for r in rows)} of {len(ids)} patients asked are in the "
        "study's cohort; the first of them, under the example scenarios:")  # fmt: skip
    say(_run([*common, "--person", ids[first]], f"the patient twin at {site_id}", steps).rstrip())
    key = rows[first]["person_key"][:16]  # the files are named by the keyed patient, never by the id
    plot, answer = folder / f"{key}.png", folder / f"{key}.json"
    if not plot.exists() or not answer.exists():
        raise DemoError(f"the patient twin at {site_id} did not write {plot.name} and {answer.name}; see {steps}")
    return plot


def _link_twin(index: Path, plot: Path, twin: TwinDemo, site_id: str) -> None:
    """The report's patient-twin section, before its end."""
    from federation.contract import load_study

    spec = load_study(twin.study)
    answer = json.loads(plot.with_suffix(".json").read_text(encoding="utf-8"))
    risks = ", ".join(f"{s['scenario']} {s['event_risk']:.1%}" for s in [answer["factual"], *answer["scenarios"]])
    here = Path(os.path.relpath(plot, index.parent)).as_posix()  # the site's own folder, on this machine
    section = (
        f"<h2>Patient twin at {html.escape(site_id)}</h2><p>{html.escape(spec.study.title)}: one patient "
        f"(keyed {html.escape(answer['person_key'][:12])}), {html.escape(answer['event'])}: {html.escape(risks)}. "
        "Recorded values (dots), the forecast median with its 80% and 95% intervals (calibrated at the site), "
        "and each scenario's median (dashed). It stays in the hospital's own folder; this page can show it "
        "only because every site of the demo runs on this machine. Decision support for research, not a "
        "medical device.</p>"
        f'<p><img src="{html.escape(here)}" style="max-width:100%"></p>'
        f'<p><a href="{html.escape(here.removesuffix(".png"))}.json">the answer (JSON, at the site)</a></p>'
    )
    text = index.read_text(encoding="utf-8")
    index.write_text(text.replace("</body></html>", section + "</body></html>"), encoding="utf-8")


def write_report(
    report: Path, root: Path, study: Path, audits: dict[str, subprocess.CompletedProcess], say: Callable[[str], None]
) -> Path:
    """The demo's report folder: the model card (with its plots), receipts and each site's audit result."""
    from federation.contract import load_study
    from federation.coordinator.model_card import aggregation_text
    from federation.twins import kind_of

    spec = load_study(study)
    run_folder = root / "studies" / spec.study.id / spec.study.id
    report.mkdir(parents=True, exist_ok=True)
    for name in ("model-card.html", "model-card.json", "receipts.jsonl", "final-model.pt"):
        shutil.copy2(run_folder / name, report / name)
    card = json.loads((report / "model-card.json").read_text(encoding="utf-8"))
    rows = "".join(
        f"<tr><td>{html.escape(site)}</td><td>{'verified' if done.returncode == 0 else 'FAILED'}</td>"
        f"<td>{html.escape((done.stdout or done.stderr).strip())}</td></tr>"
        for site, done in sorted(audits.items())
    )
    kind = kind_of(spec.model)
    pooled = card["evaluation"]["pooled"]
    summary = f"pooled held-out {kind.headline(pooled)}" if pooled else f"not evaluated: {card['model']['selection']}"
    validation = kind.validation_lines(pooled)
    privacy = card["privacy"]["statement"]
    index = report / "index.html"
    index.write_text(
        f"""<!doctype html><html><head><meta charset="utf-8"><title>twinfed demo</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}td,th{{border:1px solid #ccc;padding:4px 8px}}
table{{border-collapse:collapse}}</style></head><body><h1>twinfed demo: {html.escape(spec.study.title)}</h1>
<p><b>{html.escape(privacy)}</b></p>
<p>Run {html.escape(card["run"]["status"])}: {html.escape(card["run"]["reason"])}; {html.escape(summary)}.</p>
<ul>{"".join(f"<li>{html.escape(line)}</li>" for line in validation)}</ul>
<p>{html.escape(aggregation_text(card.get("aggregation", {})))}</p>
<p><a href="model-card.html">Model card</a> (intended use, training data, the metric per round, calibration,
subgroups, epsilon per site per round, participation, study hash, per-site epsilon and snapshot hashes)
&middot; <a href="model-card.json">JSON</a> &middot;
<a href="receipts.jsonl">participation receipts</a></p>
<h2>Audit log verification at each site</h2><table><tr><th>site</th><th>result</th><th>detail</th></tr>{rows}</table>
</body></html>""",
        encoding="utf-8",
    )
    for site, done in sorted(audits.items()):
        say(f"Audit log at {site}: {'verified' if done.returncode == 0 else 'FAILED: ' + done.stdout + done.stderr}")
    say(f"Study {card['run']['status']}: {summary}.")
    for line in validation:
        say(f"  {line}")
    say(f"Report: {index}")
    return index
