"""`twinfed study simulate`: the same study, with many simulated sites, in Flower's simulation engine.

What runs is what a consortium runs: our ServerApp (`federation.coordinator.serverapp:app`, receipts, checkpoints,
model card) and the sites' ClientApp (`site_node.clientapp:app`, approvals, policy, privacy ledger,
DP training, audit), submitted with `flwr run` to a simulation SuperLink that the flwr CLI starts
itself (connection address `:local-in-memory:`), so the result answers "how long does a round take,
and how much memory, with N sites" without N machines.

Simulated sites are real site folders (`site_node.simulated_sites` writes and approves them, in its
own process: the coordinator never imports site code). A virtual node only knows its partition id;
the run's `simulation-sites` setting names the list of site files it indexes. Several simulated
sites usually share one OMOP database: they see the same patients with different splits, so a
simulation measures coordination time and memory, not model quality.

With `--leave-one-site-out` (federation.local.leave_one_site_out) the same sites approve one variant of the
study per site, and each variant is its own simulation run here, holding its site out.

The flwr CLI leaves its local SuperLink running after the run; we give it ports of our own (Flower's
FLWR_LOCAL_SUPERLINK_HTTP_API_PORT / FLWR_LOCAL_CONTROL_API_PORT) so we start a fresh one with our
environment (TWINFED_COORDINATOR_DIR, no runtime `uv sync`, telemetry off) and can find it by its
port afterwards and stop it, with every process below it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from federation.common.flower import flower_env
from federation.common.processes import free_loopback_port
from federation.contract import StudySpec, canonical_json, load_study, study_hash
from federation.contract.receipts import read_receipts
from federation.deploy.deployment import COORDINATOR_DIR_ENV
from federation.deploy.submission import flwr_executable, run_config_args, simulation_app, simulation_config_args
from federation.local.process_memory import PROC, TreeSampler, descendants

CONNECTION = "twinfed-simulation"
MARKER = ".twinfed-simulation"
REPORT_FILE = "simulation-report.json"
MIB = 1024 * 1024
SHARED_DATA_NOTE = (
    "Simulated sites that share an OMOP database see the same patients (each with its own split): "
    "the simulation measures coordination time and memory, not model quality."
)


class SimulationError(RuntimeError):
    """The simulation could not be prepared or run; the message says which step and where its log is."""


@dataclass(frozen=True)
class HospitalSource:
    """An OMOP database loaded by `twinfed etl` and the secret file it was loaded with."""

    omop_url: str
    secret_file: Path


def hospitals_from(omop_urls: list[str], secret_files: list[Path], omop_dir: Path | None) -> list[HospitalSource]:
    """Pair each --omop URL with its --secret file, or take every <site>.sqlite + <site>.secret in a folder."""
    hospitals = []
    if omop_dir is not None:
        hospitals += [
            HospitalSource(f"sqlite:///{db.resolve()}", db.with_suffix(".secret").resolve())
            for db in sorted(omop_dir.glob("*.sqlite"))
            if db.with_suffix(".secret").exists()
        ]
        if not hospitals:
            raise SimulationError(f"{omop_dir} holds no <site>.sqlite with its <site>.secret (written by the ETL).")
    if len(omop_urls) != len(secret_files):
        raise SimulationError(
            f"{len(omop_urls)} --omop database(s) but {len(secret_files)} --secret file(s): "
            "give one secret per database."
        )
    hospitals += [HospitalSource(url, secret.resolve()) for url, secret in zip(omop_urls, secret_files, strict=True)]
    if not hospitals:
        raise SimulationError("no OMOP database: pass --omop URL --secret FILE (repeatable) or --omop-dir DIR.")
    missing = [str(h.secret_file) for h in hospitals if not h.secret_file.exists()]
    if missing:
        raise SimulationError(f"secret file(s) not found: {', '.join(missing)}")
    return hospitals


@dataclass(frozen=True)
class SimulationLayout:
    """The output folder: site folders, the flwr CLI's home, and the coordinator's studies/ (as deployed)."""

    root: Path

    @property
    def sites(self) -> Path:
        return self.root / "sites"

    @property
    def flwr_home(self) -> Path:
        return self.root / "flwr"

    @property
    def study_file(self) -> Path:
        return self.root / "study.json"

    @property
    def variants(self) -> Path:
        """Leave-one-site-out: the variant study files every simulated site approves."""
        return self.root / "variants"

    def run_folder(self, spec: StudySpec, run_name: str) -> Path:
        return self.root / "studies" / spec.study.id / run_name

    def prepare(self) -> None:
        """Start from fresh governance state; refuse a non-empty folder that is not an earlier simulation's."""
        if self.root.exists() and any(self.root.iterdir()) and not (self.root / MARKER).exists():
            raise SimulationError(
                f"{self.root} is not empty and not a simulation's output folder; choose another --out."
            )
        for stale in (self.sites, self.flwr_home, self.root / "studies", self.study_file, self.variants):
            if stale.is_dir():
                shutil.rmtree(stale)
            else:
                stale.unlink(missing_ok=True)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / MARKER).write_text("written by twinfed study simulate\n", encoding="utf-8")


def write_study(spec: StudySpec, path: Path) -> Path:
    """The study every simulated site approves (its rounds possibly changed), as canonical JSON."""
    path.write_bytes(canonical_json(spec))
    if study_hash(load_study(path)) != study_hash(spec):
        raise SimulationError(f"{path} does not read back as the same study (hash differs)")
    return path


def _environment(**extra: str) -> dict[str, str]:
    """The common environment, plus what a simulation requires: Flower may not install dependencies at runtime."""
    return flower_env(FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", **extra)


def prepare_sites(
    layout: SimulationLayout,
    count: int,
    hospitals: list[HospitalSource],
    policy: Path | None,
    studies: list[Path] | None = None,
) -> Path:
    """Write `count` site folders, each approving the layout's study (or every file of `studies`), in a
    site-side process; returns the site list file."""
    command = [sys.executable, "-m", "site_node.simulated_sites", str(layout.sites), "--sites", str(count)]
    for study in studies or [layout.study_file]:
        command += ["--study", str(study)]
    for hospital in hospitals:
        command += ["--hospital", hospital.omop_url, str(hospital.secret_file)]
    if policy is not None:
        command += ["--policy", str(policy.resolve())]
    done = subprocess.run(command, env=_environment(), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SimulationError((done.stderr or done.stdout).strip()[-800:])
    return Path(done.stdout.strip().splitlines()[-1])


class LocalSimulationLink:
    """The simulation SuperLink the flwr CLI starts for a `:local-in-memory:` connection, on our own ports.

    Flower keeps it running after the run (it is detached); `stop` finds it by its port and ends it and
    every process below it (the simulation process and Ray's).
    """

    def __init__(self, flwr_home: Path) -> None:
        self.flwr_home = flwr_home
        self.http_port = free_loopback_port()
        self.control_port = free_loopback_port()
        flwr_home.mkdir(parents=True, exist_ok=True)
        (flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = ":local-in-memory:"\n',
            encoding="utf-8",
        )

    def environment(self, coordinator_dir: Path) -> dict[str, str]:
        return _environment(
            FLWR_HOME=str(self.flwr_home),
            FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(self.http_port),
            FLWR_LOCAL_CONTROL_API_PORT=str(self.control_port),
            **{COORDINATOR_DIR_ENV: str(coordinator_dir)},
        )

    def pids(self) -> list[int]:
        """The flower-superlink process(es) listening on our port."""
        wanted = ["--port", str(self.http_port)]
        found = []
        for entry in PROC.iterdir():
            if not entry.name.isdigit():
                continue
            try:
                args = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            except OSError:
                continue
            if any(a.endswith("flower-superlink") for a in args[:2]) and _contains(args, wanted):
                found.append(int(entry.name))
        return found

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM the SuperLink, then SIGKILL whatever is left of the processes that were below it."""
        links = self.pids()
        tree = descendants(links)
        for pid in links:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_alive(pid) for pid in tree):
            time.sleep(0.2)
        for pid in tree:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def simulated_site_ids(count: int) -> list[str]:
    """The ids site_node.simulated_sites gives `count` simulated sites (sim-001, ...), known before they are
    written (a leave-one-site-out simulation derives its variants from them); `check_site_ids` checks them."""
    return [f"sim-{index + 1:0{max(3, len(str(count)))}d}" for index in range(count)]


def check_site_ids(site_list: Path, expected: list[str]) -> None:
    """The site files the site-side process wrote name the sites `expected`, in partition order."""
    files = yaml.safe_load(site_list.read_text(encoding="utf-8"))
    found = [yaml.safe_load(Path(file).read_text(encoding="utf-8")).get("site_id") for file in files]
    if found != expected:
        raise SimulationError(f"the simulated sites are {found}, not the {expected} the variants were made for")


def hospital_of(index: int, hospitals: list[HospitalSource]) -> HospitalSource:
    """The OMOP database simulated site number `index` (from 0) reads: assigned round-robin."""
    return hospitals[index % len(hospitals)]


def _contains(args: list[str], sequence: list[str]) -> bool:
    return any(args[i : i + len(sequence)] == sequence for i in range(len(args)))


def _alive(pid: int) -> bool:
    try:
        state = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return False
    return state[state.rfind(")") + 2] != "Z"


@dataclass(frozen=True)
class SimulationSettings:
    sites: int
    run_name: str
    cpus_per_site: int = 1
    node_wait_seconds: float = 60.0
    held_out_site: str | None = None  # leave-one-site-out: the simulated site this run holds out


def run_simulation(
    spec: StudySpec,
    layout: SimulationLayout,
    site_list: Path,
    settings: SimulationSettings,
    say: Callable[[str], None] = print,
) -> dict:
    """`flwr run` the study on a local simulation SuperLink with one virtual node per site; returns the report."""
    link = LocalSimulationLink(layout.flwr_home)
    cpus = os.cpu_count() or 1
    federation = (
        f"num-supernodes={settings.sites} client-resources-num-cpus={settings.cpus_per_site} init-args-num-cpus={cpus}"
    )
    folder = layout.run_folder(spec, settings.run_name)
    with simulation_app() as app:
        command = [
            flwr_executable(), "run", str(app), CONNECTION,
            *run_config_args(spec, settings.run_name, False, settings.node_wait_seconds, settings.held_out_site),
            *simulation_config_args(site_list),
            "--federation-config", federation, "--stream",
        ]  # fmt: skip
        started = time.time()
        cli = subprocess.Popen(command, env=link.environment(layout.root))
        try:
            with TreeSampler(lambda: [*link.pids(), cli.pid]) as sampler:
                code = cli.wait()
        finally:
            if cli.poll() is None:  # interrupted: stop following the run, then stop the run itself
                cli.terminate()
                cli.wait()
            link.stop()
        run_seconds = time.time() - started
    card_file = folder / "model-card.json"
    if code != 0 or not card_file.exists() or card_file.stat().st_mtime < started:
        log = layout.flwr_home / "local-superlink" / "superlink.log"
        raise SimulationError(f"the simulation did not finish (flwr exit {code}); the SuperLink's log is {log}.")
    report = build_report(spec, settings, folder, sampler, run_seconds)
    (folder / REPORT_FILE).write_text(json.dumps(report, indent=2), encoding="utf-8")
    return report


def build_report(
    spec: StudySpec, settings: SimulationSettings, folder: Path, sampler: TreeSampler, run_seconds: float
) -> dict:
    """Per round: wall time and the slowest site (from the run's history), peak memory while it ran."""
    card = json.loads((folder / "model-card.json").read_text(encoding="utf-8"))
    windows: dict[int, list[float]] = {}
    for receipt in read_receipts(folder / "receipts.jsonl"):
        window = windows.setdefault(receipt.server_round, [receipt.started_at.timestamp(), 0.0])
        window[0] = min(window[0], receipt.started_at.timestamp())
        window[1] = max(window[1], receipt.finished_at.timestamp())
    rounds = []
    for row in card.get("history", []):
        start, end = windows.get(int(row["round"]), [None, None])
        participation = row.get("participation", {}).values()
        rounds.append(
            {
                "round": row["round"],
                "seconds": row.get("round_seconds", row.get("seconds")),
                "train_seconds": row.get("seconds"),
                "slowest_site_seconds": row.get("slowest_site_seconds"),
                "trained_sites": sum(1 for status in participation if status == "trained"),
                **_peaks(sampler, start, end),
            }
        )
    return {
        "study_id": spec.study.id,
        "study_hash": study_hash(spec),
        "run_name": settings.run_name,
        "status": card["run"]["status"],
        "reason": card["run"]["reason"],
        "simulated_sites": settings.sites,
        "held_out_site": settings.held_out_site,
        "cpus": os.cpu_count(),
        "cpus_per_site": settings.cpus_per_site,
        "run_seconds": run_seconds,
        "memory": (
            "sum over the simulation's processes (the local SuperLink, its simulation process, Ray and its "
            "ClientApp workers, and the flwr CLI), sampled from /proc every "
            f"{sampler.interval:g} s: RSS counts shared pages in every process, PSS splits them"
            if sampler.available
            else "not measured (no /proc on this system)"
        ),
        "peak": _peaks(sampler, None, None),
        "rounds": rounds,
        "note": SHARED_DATA_NOTE,
    }


def _peaks(sampler: TreeSampler, start: float | None, end: float | None) -> dict[str, float | int | None]:
    window = [s for s in sampler.samples if (start is None or s.at >= start) and (end is None or s.at <= end)]
    if not window:
        return {"peak_rss_mib": None, "peak_pss_mib": None, "processes": None}
    return {
        "peak_rss_mib": round(max(s.rss_bytes for s in window) / MIB, 1),
        "peak_pss_mib": round(max(s.pss_bytes for s in window) / MIB, 1),
        "processes": max(s.processes for s in window),
    }
