"""`twinfed site start`: run this hospital's Flower SuperNode, checked before it starts and supervised after.

The SuperNode connects outbound only (the hospital opens no inbound port): it dials the consortium's
SuperLink over TLS, verifies it with the consortium CA, and proves who it is with the site's private key.
It runs its own Runtime API on 127.0.0.1 for the ClientApp processes; two SuperNodes on one host need
different runtime ports and FLWR_HOME folders. The site file reaches every ClientApp call as
`--node-config 'site-config="/absolute/site.yaml"'` (node-config values are TOML, hence the inner quotes).

Two ways to run the ClientApp (`--isolation`):

* `process` (default): the SuperNode runs in our process with short waits between pulls
  (site_node.flower_runtime), next to a long-lived executor that has torch, Opacus and the site code
  imported once and forks a process per task (site_node.warm_executor): seconds less per message
  (docs/benchmarks.md, rounds). The executor and the SuperNode share a secret, new at every start, so no
  other local process can take the SuperNode's tasks.
* `subprocess`: plain `flower-supernode` with Flower's own executor, which starts a fresh process per
  message (seconds of imports each) and waits up to 3 s between pulls. It relies on nothing but Flower's
  command line: the fallback when the warm runtime does not support the installed Flower.

Everything that would make Flower fail later, or retry forever, is checked first and refused with a
sentence: a site file that does not load, a missing or exposed key, a CA that is not a certificate, a
SuperLink that answers with a certificate the CA does not vouch for, a runtime port already taken.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from federation.common.flower import flower_env, flower_executable, format_address, probe_superlink, split_address
from federation.common.keys import ProvisionError, load_certificate
from federation.common.processes import (
    DeploymentError,
    ProcessSpec,
    StopRequested,
    Supervised,
    check_port_free,
    stop_signals,
)
from site_node.config import SiteConfig, SiteConfigError, load_site_config
from site_node.flower_runtime import FlowerInternalsError, check_flower
from site_node.keys import SiteKeyError, fingerprint_of, load_site_private_key
from site_node.warm_executor import READY_TEXT

SITE_CONFIG_KEY = "site-config"  # what site_node.clientapp reads from context.node_config
DEFAULT_RUNTIME_PORT = 9094
RUNTIME_HOST = "127.0.0.1"  # the Runtime API serves only this host's ClientApp processes
ISOLATION_MODES = ("process", "subprocess")
DEFAULT_ISOLATION = "process"
# Flower 1.42: an unregistered key gets HTTP 412 on /v1/fleet/activate-node; the SuperNode then logs
# "Exit Code: 305 ... [code: 2004] Failed to activate SuperNode." and the process exits with status 1.
ACTIVATION_FAILED_TEXT = "Failed to activate SuperNode"


class SuperNodeError(RuntimeError):
    """The SuperNode cannot start or has stopped; the message says what the hospital's IT can do."""


@dataclass(frozen=True)
class SiteLaunch:
    """A checked SuperNode start: every path absolute, the key loaded once and fingerprinted."""

    site_id: str
    site_config: Path
    superlink: str
    ca: Path
    key: Path
    fingerprint: str
    runtime_port: int
    flwr_home: Path
    log_file: Path
    isolation: str = DEFAULT_ISOLATION

    @property
    def auth_secret_file(self) -> Path:
        """The SuperNode/executor shared secret (process isolation); rewritten at every start."""
        return self.flwr_home / "superexec.secret"


def node_config_arg(site_config: Path) -> str:
    """`site-config="<path>"`: a TOML string; Flower's parser takes a double-quoted value without inner quotes."""
    text = str(site_config)
    if '"' in text:
        raise SuperNodeError(f"{site_config}: the site file's path contains a double quote; move it to a plain path.")
    return f"{SITE_CONFIG_KEY}={json.dumps(text)}"


def prepare_launch(
    site_config: Path,
    superlink: str,
    ca: Path,
    key: Path,
    runtime_port: int = DEFAULT_RUNTIME_PORT,
    flwr_home: Path | None = None,
    log_file: Path | None = None,
    isolation: str = DEFAULT_ISOLATION,
) -> SiteLaunch:
    """Check everything the SuperNode needs, locally (no network), and fix the paths it will use."""
    if isolation not in ISOLATION_MODES:
        raise SuperNodeError(f"Not starting: --isolation is one of {', '.join(ISOLATION_MODES)}, not {isolation!r}.")
    if isolation == "process":
        try:
            check_flower()
        except FlowerInternalsError as exc:
            raise SuperNodeError(f"Not starting: {exc}") from None
    try:
        config = load_site_config(Path(site_config))
    except SiteConfigError as exc:
        raise SuperNodeError(f"Not starting: {exc}") from None
    try:
        split_address(superlink)
    except DeploymentError as exc:
        raise SuperNodeError(f"Not starting: --superlink {exc}") from None
    try:
        private_key = load_site_private_key(Path(key))
        load_certificate(Path(ca))
    except (SiteKeyError, ProvisionError) as exc:
        raise SuperNodeError(f"Not starting: {exc}") from None
    node_config_arg(Path(site_config).resolve())  # a path Flower's --node-config parser cannot carry
    check_governance(config)
    site_folder = config.base_dir
    return SiteLaunch(
        site_id=config.site_id,
        site_config=Path(site_config).resolve(),
        superlink=superlink,
        ca=Path(ca).resolve(),
        key=Path(key).resolve(),
        fingerprint=fingerprint_of(private_key),
        runtime_port=runtime_port,
        flwr_home=Path(flwr_home).resolve() if flwr_home else site_folder / "flwr-home",
        log_file=Path(log_file).resolve() if log_file else site_folder / "supernode.log",
        isolation=isolation,
    )


def check_governance(config: SiteConfig) -> None:
    """Refuse to connect a site whose governance state and audit chain disagree (ledger rows deleted or
    edited, the governance database replaced by an empty one, entries forged past the audit head): every
    round would be refused anyway, and the steward must know before the consortium does."""
    from site_node.governance import Governance, GovernanceInconsistent, PolicyError
    from site_node.governance.audit_key import AuditKeyError

    try:
        governance = Governance.of_site(config)
    except (PolicyError, AuditKeyError, ValueError, RuntimeError) as exc:
        raise SuperNodeError(f"Not starting: {exc}") from None
    try:
        governance.require_intact()
    except GovernanceInconsistent as exc:
        raise SuperNodeError(f"Not starting: {exc}") from None
    finally:
        governance.close()


def supernode_process(launch: SiteLaunch) -> ProcessSpec:
    """The exact SuperNode command: TLS verified by the CA, key authentication, site file, own port.

    `subprocess` isolation runs Flower's flower-supernode as is; `process` runs the same command through
    site_node.flower_runtime (short waits) and leaves the ClientApps to the warm executor.
    """
    flower_args = [
        "--superlink", launch.superlink,
        "--root-certificates", str(launch.ca),
        "--auth-supernode-private-key", str(launch.key),
        "--node-config", node_config_arg(launch.site_config),
        "--host", RUNTIME_HOST,
        "--port", str(launch.runtime_port),
    ]  # fmt: skip
    if launch.isolation == "subprocess":
        argv = [flower_executable("flower-supernode"), *flower_args]
    else:
        argv = [
            sys.executable, "-m", "site_node.flower_runtime", *flower_args,
            "--isolation", "process",
            "--superexec-auth-secret-file", str(launch.auth_secret_file),
        ]  # fmt: skip
    return ProcessSpec(argv=argv, env=flower_env(launch.flwr_home), log_file=launch.log_file)


def executor_process(launch: SiteLaunch, supernode_pid: int) -> ProcessSpec:
    """The warm executor next to a `process`-isolation SuperNode; it stops when that SuperNode is gone."""
    argv = [
        sys.executable, "-m", "site_node.warm_executor",
        "--runtime-api-address", format_address(RUNTIME_HOST, launch.runtime_port),
        "--auth-secret-file", str(launch.auth_secret_file),
        "--parent-pid", str(supernode_pid),
    ]  # fmt: skip
    return ProcessSpec(argv=argv, env=flower_env(launch.flwr_home), log_file=launch.log_file)


def write_auth_secret(launch: SiteLaunch) -> None:
    """A fresh secret (mode 0600) for this start: only our executor can take the SuperNode's tasks."""
    path = launch.auth_secret_file
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(secrets.token_bytes(32))


def check_superlink(launch: SiteLaunch) -> str | None:
    """Refuse a SuperLink whose certificate the CA does not vouch for; a note when it is not reachable yet.

    A wrong CA or an address missing from the certificate would otherwise make the SuperNode retry for ever.
    """
    host, port = split_address(launch.superlink)
    probe = probe_superlink(host, port, launch.ca)
    if probe.status == "tls-error":
        raise SuperNodeError(f"Not starting: {probe.detail}")
    if probe.status == "unreachable":
        return f"{probe.detail}; the SuperNode will keep trying until the coordinator is up."
    return None


class _LogWatch:
    """Reads the lines the SuperNode appended since the last look, to tell the operator what happened."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0

    def new_lines(self) -> list[str]:
        try:
            with self.path.open("rb") as handle:
                handle.seek(self.offset)
                data = handle.read()
        except OSError:
            return []
        complete = data.rfind(b"\n") + 1
        self.offset += complete
        return data[:complete].decode("utf-8", errors="replace").splitlines()


def _refusal(launch: SiteLaunch, code: int, tail: str) -> SuperNodeError:
    if ACTIVATION_FAILED_TEXT in tail:
        return SuperNodeError(
            f"The SuperLink at {launch.superlink} refused this site's key ({launch.key}, fingerprint "
            f"{launch.fingerprint}): it is not registered there. Ask the coordinator to check that site "
            f"{launch.site_id} has this fingerprint in `twinfed provision show DIR` and to run "
            f"`twinfed coordinator register-site DIR {launch.site_id}` (a key you generated yourself is added "
            f"first with `twinfed provision add-site DIR {launch.site_id} --public-key {launch.site_id}.pub`); "
            "then start again."
        )
    return SuperNodeError(f"flower-supernode stopped with exit code {code}; last lines of {launch.log_file}:\n{tail}")


def run_supernode(launch: SiteLaunch, say: Callable[[str], None] = print) -> int:
    """Start the SuperNode (and, with `process` isolation, its warm executor) and supervise them until
    Ctrl-C/SIGTERM (returns 0) or until one stops on its own (the other is then stopped too).

    Each runs in its own process group, stopped whole on every way out (SuperExec and any running
    ClientApp included).
    """
    try:
        spec = supernode_process(launch)
        check_port_free(RUNTIME_HOST, launch.runtime_port, "this SuperNode's Runtime API (--runtime-port)")
    except DeploymentError as exc:
        raise SuperNodeError(f"Not starting: {exc}") from None
    note = check_superlink(launch)
    launch.flwr_home.mkdir(parents=True, exist_ok=True)
    if launch.isolation == "process":
        write_auth_secret(launch)
    watch = _LogWatch(launch.log_file)
    node = Supervised(spec)
    executor: Supervised | None = None
    with stop_signals():
        try:
            node.start()
            if launch.isolation == "process":
                executor = Supervised(executor_process(launch, node.pid))
                executor.start()
            runtime = format_address(RUNTIME_HOST, launch.runtime_port)
            say(
                f"Starting the SuperNode of {launch.site_id} (pid {node.pid}): SuperLink {launch.superlink} over "
                f"TLS, key fingerprint {launch.fingerprint}, runtime API {runtime}, {launch.isolation} isolation."
            )
            say(f"Log: {launch.log_file}")
            if note:
                say(note)
            _follow(launch, watch, node, executor, say)
            if executor is not None and executor.exit_code() is not None and node.exit_code() is None:
                raise SuperNodeError(
                    f"the warm ClientApp executor stopped with exit code {executor.exit_code()}; the SuperNode is "
                    f"stopped with it. Last lines of {launch.log_file}:\n{executor.log_tail()}\n"
                    "Start again; if it keeps failing, `--isolation subprocess` runs plain Flower."
                )
            raise _refusal(launch, node.exit_code() or 0, node.log_tail())
        except StopRequested as stop:
            say(f"{stop} received: stopping the SuperNode...")
            _stop(node, executor)
            say("SuperNode stopped.")
            return 0
        finally:
            _stop(node, executor)
            if launch.isolation == "process":
                launch.auth_secret_file.unlink(missing_ok=True)


def _follow(
    launch: SiteLaunch, watch: _LogWatch, node: Supervised, executor: Supervised | None, say: Callable[[str], None]
) -> None:
    """Tell the operator what the log says, until the SuperNode or the executor stops."""
    waiting_said = False
    while node.exit_code() is None and (executor is None or executor.exit_code() is None):
        for line in watch.new_lines():
            if "SuperNode ID:" in line:
                node_id = line.rsplit("SuperNode ID:", 1)[1].strip()
                say(f"Connected to the SuperLink as node {node_id}. Ctrl-C or SIGTERM stops the SuperNode.")
            elif READY_TEXT in line:
                say("ClientApp runtime ready: " + line.split(READY_TEXT, 1)[1].lstrip(": "))
            elif "Connection attempt failed" in line and not waiting_said:
                say(f"The SuperLink at {launch.superlink} does not answer yet; retrying (see the log).")
                waiting_said = True
        time.sleep(0.2)


def _stop(node: Supervised, executor: Supervised | None) -> None:
    """The SuperNode first (no new tasks), then the executor and any ClientApp it runs."""
    node.stop()
    if executor is not None:
        executor.stop()
