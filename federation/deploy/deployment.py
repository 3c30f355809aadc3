"""Starting the real Flower processes of a consortium, secure by default, and keeping them supervised.

Flower 1.42's SuperLink serves the Fleet, Control and Runtime APIs on one HTTPS port. We always start it
with the consortium's TLS certificate, SuperNode authentication, a state database (runs survive a
restart) and no runtime dependency installation (the SuperLink would otherwise run `uv sync` per run and
fail offline with exit code 608). What we learnt from Flower's own behaviour is encoded here:

* The SuperLink launches `flower-superexec`, which launches `flwr-serverapp`, by bare name: the virtual
  environment's bin folder must be on PATH. Both inherit the SuperLink's environment, which is how the
  ServerApp learns the consortium folder ($TWINFED_COORDINATOR_DIR).
* That SuperExec dials the SuperLink's own API at the listening address (0.0.0.0 becomes 127.0.0.1) and
  verifies the certificate there, so the certificate must cover that address or no ServerApp ever starts.
* `flwr supernode register` answers a key that is already registered with "Public key already in use":
  for us that is success (registration is idempotent; the state database keeps keys across restarts).
* Children are started in their own session so that stopping them reaches the whole process group
  (SuperExec and any running ServerApp/ClientApp included): nothing is left orphaned.

Folder layout added to the consortium folder of `federation.deploy.provision`:

```
DIR/superlink/state.db          the SuperLink's state (runs, registered SuperNodes)
DIR/superlink/superlink.log     everything the SuperLink and its children print
DIR/superlink/flwr-home/        the SuperLink's FLWR_HOME
DIR/superlink/node-ids.yaml     site -> Flower node id, as returned at registration
DIR/superlink/coordinator.lock  held while a coordinator runs: two SuperLinks must not share state.db
DIR/flwr-cli/config.toml        the `flwr` CLI connection "twinfed" (FLWR_HOME=DIR/flwr-cli)
DIR/studies/                    where the ServerApp writes reports and checkpoints
```
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import yaml
from cryptography import x509

from federation.common.flower import (
    Probe,
    flower_env,
    flower_executable,
    format_address,
    local_dial_host,
    probe_superlink,
)
from federation.common.keys import ProvisionError, load_certificate
from federation.common.processes import (
    DeploymentError,
    ProcessSpec,
    StopRequested,
    Supervised,
    check_port_free,
    stop_signals,
)
from federation.deploy.link_instance import INSTANCE_ENV, start_instance
from federation.deploy.provision import Consortium, ConsortiumLayout, load_consortium

CONNECTION_NAME = "twinfed"
COORDINATOR_DIR_ENV = "TWINFED_COORDINATOR_DIR"
DEFAULT_SUPERLINK_PORT = 9092
STARTUP_TIMEOUT_S = 60.0
REGISTER_TIMEOUT_S = 60.0


# ---------------------------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class CoordinatorLayout:
    """The files the running coordinator adds to a consortium folder."""

    root: Path

    @property
    def keys(self) -> ConsortiumLayout:
        return ConsortiumLayout(self.root)

    @property
    def state_db(self) -> Path:
        return self.keys.superlink_dir / "state.db"

    @property
    def log_file(self) -> Path:
        return self.keys.superlink_dir / "superlink.log"

    @property
    def flwr_home(self) -> Path:
        return self.keys.superlink_dir / "flwr-home"

    @property
    def lock_file(self) -> Path:
        return self.keys.superlink_dir / "coordinator.lock"

    @property
    def node_ids(self) -> Path:
        return self.keys.superlink_dir / "node-ids.yaml"

    @property
    def cli_home(self) -> Path:
        return self.root / "flwr-cli"

    @property
    def cli_config(self) -> Path:
        return self.cli_home / "config.toml"

    @property
    def studies(self) -> Path:
        return self.root / "studies"


# ------------------------------------------------------------------------------------ commands and env


def certificate_hosts(cert: x509.Certificate) -> list[str]:
    """DNS names and IP addresses a certificate is valid for (its subjectAltName)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*san.get_values_for_type(x509.DNSName), *(str(ip) for ip in san.get_values_for_type(x509.IPAddress))]


def superlink_process(root: Path, host: str = "127.0.0.1", port: int = DEFAULT_SUPERLINK_PORT) -> ProcessSpec:
    """The flower-superlink command for a consortium folder: TLS, SuperNode auth, state database, no uv sync."""
    layout = CoordinatorLayout(Path(root).resolve())
    keys = layout.keys
    needed = {
        keys.server_cert: "the SuperLink certificate",
        keys.server_key: "its private key",
        keys.superlink_ca: "the consortium CA certificate",
    }
    for path, what in needed.items():
        if not path.is_file():
            raise DeploymentError(
                f"{path} does not exist ({what}); create the consortium with `twinfed provision init`."
            )
    dial = local_dial_host(host)
    covered = certificate_hosts(load_certificate(keys.server_cert))
    if dial not in covered:
        raise DeploymentError(
            f"the SuperLink certificate {keys.server_cert} is valid for {', '.join(covered)} but not for {dial}, "
            f"the address at which the SuperLink (listening on {host}) launches its own ServerApps over TLS; "
            "listen on 0.0.0.0 or on one of those addresses, or provision the consortium with that --host."
        )
    argv = [
        flower_executable("flower-superlink"),
        "--ssl-ca-certfile", str(keys.superlink_ca),
        "--ssl-certfile", str(keys.server_cert),
        "--ssl-keyfile", str(keys.server_key),
        "--enable-supernode-auth",
        "--database", str(layout.state_db),
        "--disable-runtime-dependency-installation",
        "--host", host,
        "--port", str(port),
    ]  # fmt: skip
    env = flower_env(layout.flwr_home, **{COORDINATOR_DIR_ENV: str(layout.root)})
    return ProcessSpec(argv=argv, env=env, log_file=layout.log_file)


def _toml_string(value: str) -> str:
    """A TOML basic string: JSON's escapes are valid TOML, and non-ASCII is escaped as \\uXXXX."""
    return json.dumps(value)


def write_cli_connection(cli_home: Path, address: str, root_certificates: Path) -> Path:
    """Write FLWR_HOME/config.toml with the connection `twinfed` (TLS verified by the consortium CA).

    The folder is ours alone, so the file is rewritten on every start (the address may have changed).
    """
    cli_home.mkdir(parents=True, exist_ok=True)
    path = cli_home / "config.toml"
    path.write_text(
        "# Written by `twinfed coordinator start`: the flwr CLI connection to this consortium's SuperLink.\n"
        f"# Use it with: FLWR_HOME={cli_home} flwr ls {CONNECTION_NAME}\n\n"
        f'[superlink]\ndefault = "{CONNECTION_NAME}"\n\n'
        f"[superlink.{CONNECTION_NAME}]\n"
        f"address = {_toml_string(address)}\n"
        f"root-certificates = {_toml_string(str(Path(root_certificates).resolve()))}\n",
        encoding="utf-8",
    )
    return path


# --------------------------------------------------------------------------------------- registration


@dataclass(frozen=True)
class Registration:
    site_id: str
    node_id: int | None  # None when the key was registered before (Flower does not say under which id)
    already_registered: bool


def _run_flwr(args: list[str], cli_home: Path) -> dict:
    """Run the flwr CLI with --format json; its JSON answer, or a sentence with what it printed."""
    argv = [flower_executable("flwr"), *args, "--format", "json"]
    try:
        done = subprocess.run(
            argv, env=flower_env(cli_home), capture_output=True, text=True, timeout=REGISTER_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired:
        raise DeploymentError(f"`flwr {' '.join(args)}` did not answer within {REGISTER_TIMEOUT_S:.0f} s.") from None
    try:
        answer = json.loads(done.stdout)
    except json.JSONDecodeError:
        printed = (done.stdout + done.stderr).strip().splitlines()[-5:]
        raise DeploymentError(
            f"`flwr {' '.join(args)}` failed (exit {done.returncode}): {' / '.join(printed)}"
        ) from None
    return answer if isinstance(answer, dict) else {"success": False, "error-message": str(answer)}


def register_site(root: Path, site_id: str) -> Registration:
    """Register one site's public key (from the registry) with the running SuperLink; idempotent."""
    layout = CoordinatorLayout(Path(root).resolve())
    consortium = load_consortium(layout.root)
    site = consortium.site(site_id)
    if site is None:
        raise DeploymentError(
            f"site {site_id} is not in {layout.keys.registry}; add it first with "
            f"`twinfed provision add-site {layout.root} {site_id}`."
        )
    if not layout.cli_config.is_file():
        raise DeploymentError(
            f"{layout.cli_config} does not exist: the coordinator has not been started from {layout.root}; "
            f"start it with `twinfed coordinator start --dir {layout.root}` (it registers every site itself)."
        )
    with tempfile.TemporaryDirectory(dir=layout.cli_home) as scratch:
        key_file = Path(scratch) / f"{site_id}.pub"
        key_file.write_text(site.public_key + "\n", encoding="ascii")  # the registry is the source of truth
        command = ["supernode", "register", str(key_file), CONNECTION_NAME, "--name", site_id]
        answer = _run_flwr(command, layout.cli_home)
    if answer.get("success"):
        node_id = int(answer["node-id"])
        _record_node_id(layout, site_id, node_id)
        return Registration(site_id, node_id, already_registered=False)
    message = str(answer.get("error-message", answer))
    if "already in use" in message:
        return Registration(site_id, None, already_registered=True)
    if "unavailable" in message:
        message += f" Is `twinfed coordinator start --dir {layout.root}` running?"
    raise DeploymentError(f"the SuperLink did not register site {site_id}: {' '.join(message.split())}")


def register_sites(root: Path) -> list[Registration]:
    """Register every site of the registry, in order (each call is idempotent)."""
    return [register_site(root, site.id) for site in load_consortium(Path(root)).sites]


def _record_node_id(layout: CoordinatorLayout, site_id: str, node_id: int) -> None:
    """Keep site -> node id: `flwr supernode list` shows node ids only, and Flower cannot be asked later."""
    known = yaml.safe_load(layout.node_ids.read_text(encoding="utf-8")) if layout.node_ids.exists() else None
    known = known if isinstance(known, dict) else {}
    known[site_id] = node_id
    tmp = layout.node_ids.with_name(layout.node_ids.name + ".tmp")
    tmp.write_text(yaml.safe_dump(known, sort_keys=True), encoding="utf-8")
    os.replace(tmp, layout.node_ids)


# ------------------------------------------------------------------------------------- object pulls


# ------------------------------------------------------------------------------------------------ probe


# ---------------------------------------------------------------------------------------- supervision


def wait_until_up(child: Supervised, host: str, port: int, ca: Path, timeout: float = STARTUP_TIMEOUT_S) -> None:
    """Wait until the SuperLink answers /health over verified TLS; fail fast when it dies or TLS is wrong."""
    deadline = time.monotonic() + timeout
    probe = Probe("unreachable", "not probed yet")
    while time.monotonic() < deadline:
        code = child.exit_code()
        if code is not None:
            raise DeploymentError(
                f"flower-superlink exited with code {code} while starting; "
                f"last lines of {child.spec.log_file}:\n{child.log_tail()}"
            )
        probe = probe_superlink(host, port, ca, timeout=2.0)
        if probe.status == "ok":
            return
        if probe.status == "tls-error":
            raise DeploymentError(f"the SuperLink started but its TLS set-up is wrong: {probe.detail}")
        time.sleep(0.25)
    raise DeploymentError(
        f"the SuperLink did not answer within {timeout:.0f} s ({probe.detail}); see {child.spec.log_file}."
    )


# ----------------------------------------------------------------------------------------- coordinator


@contextmanager
def coordinator_lock(layout: CoordinatorLayout) -> Iterator[None]:
    """Hold DIR/superlink/coordinator.lock: a second coordinator on the same folder would share state.db."""
    layout.lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(layout.lock_file, "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise DeploymentError(
                f"a coordinator already runs from {layout.root} ({holder}, lock {layout.lock_file}); "
                "stop it first: two SuperLinks must not share one state database."
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()


def run_coordinator(
    root: Path, host: str = "127.0.0.1", port: int = DEFAULT_SUPERLINK_PORT, say: Callable[[str], None] = print
) -> int:
    """Start the SuperLink, wait until it is up, register every site, then supervise it until stopped.

    Returns 0 after a requested stop (Ctrl-C, SIGTERM); raises DeploymentError when the SuperLink cannot
    start or stops on its own. The SuperLink is stopped, with its whole process group, on every way out.
    """
    layout = CoordinatorLayout(Path(root).resolve())
    try:
        consortium = load_consortium(layout.root)
    except ProvisionError as exc:
        raise DeploymentError(str(exc)) from None
    with coordinator_lock(layout):
        return _supervise_superlink(layout, consortium, host, port, say)


def _supervise_superlink(
    layout: CoordinatorLayout, consortium: Consortium, host: str, port: int, say: Callable[[str], None]
) -> int:
    """run_coordinator's body, under the folder's lock."""
    spec = superlink_process(layout.root, host, port)
    check_port_free(host, port, "the SuperLink (Fleet, Control and Runtime APIs)")
    dial = local_dial_host(host)
    cli_config = write_cli_connection(layout.cli_home, format_address(dial, port), layout.keys.superlink_ca)
    layout.studies.mkdir(parents=True, exist_ok=True)
    # This start's own instance id: a ServerApp of an earlier start (still draining after a crash) sees
    # the file change and stops instead of joining this SuperLink.
    instance = start_instance(layout.keys.superlink_dir)
    child = Supervised(replace(spec, env={**spec.env, INSTANCE_ENV: instance}))
    with stop_signals():
        try:
            child.start()
            say(f"Starting the SuperLink of {consortium.name} on {format_address(host, port)} (pid {child.pid}).")
            say(f"Log: {layout.log_file}")
            wait_until_up(child, dial, port, layout.keys.superlink_ca)
            say(
                f"SuperLink up: TLS with the consortium CA ({consortium.ca_fingerprint[:26]}...), "
                f"SuperNode authentication on, state in {layout.state_db}."
            )
            for registration in register_sites(layout.root):
                if registration.already_registered:
                    say(f"Site {registration.site_id}: key already registered.")
                else:
                    say(f"Site {registration.site_id}: key registered (node {registration.node_id}).")
            if not consortium.sites:
                say("No sites in the registry yet: add one with `twinfed provision add-site`.")
            say(f"flwr CLI: FLWR_HOME={layout.cli_home} flwr supernode list {CONNECTION_NAME}  ({cli_config})")
            say(f"Studies write to {layout.studies} (${COORDINATOR_DIR_ENV}={layout.root}).")
            say("Coordinator running; Ctrl-C or SIGTERM stops it.")
            code = child.wait()
            raise DeploymentError(
                f"flower-superlink stopped on its own with exit code {code}; "
                f"last lines of {layout.log_file}:\n{child.log_tail()}"
            )
        except StopRequested as stop:
            say(f"{stop} received: stopping the SuperLink...")
            child.stop()
            say("SuperLink stopped.")
            return 0
        finally:
            child.stop()
