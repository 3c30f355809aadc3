"""The deployment as it runs at a consortium: real `twinfed coordinator start` and `twinfed site start`
processes (Flower SuperLink and SuperNodes) on loopback, with TLS and SuperNode authentication.

What must hold: a registered hospital gets in, an unregistered key and a plaintext SuperNode do not, a
SuperNode refuses a SuperLink its CA does not vouch for, and stopping the coordinator leaves no Flower
process behind. Each test is bounded (pytest-timeout) well under a minute.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from federation.common.flower import flower_bin_dir, split_address
from federation.common.processes import DeploymentError, check_port_free
from federation.deploy.deployment import (
    CONNECTION_NAME,
    COORDINATOR_DIR_ENV,
    CoordinatorLayout,
    register_site,
    superlink_process,
    write_cli_connection,
)
from federation.deploy.provision import ConsortiumLayout, add_site, init_consortium
from site_node.config import load_site_config
from site_node.governance import Governance
from site_node.keys import generate_site_keys
from site_node.supernode import (
    SuperNodeError,
    executor_process,
    node_config_arg,
    prepare_launch,
    supernode_process,
)
from tests.process_helpers import BIN, FLOWER_ENV, TWINFED, Running, free_port, processes_mentioning


def write_site_config(folder: Path, site_id: str) -> Path:
    """A site file that loads (the SuperNode only needs it to load; no study runs in these tests)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "site.yaml"
    site = {
        "site_id": site_id,
        "omop": {"url": "sqlite:///omop.sqlite"},
        "governance_db": "sqlite:///governance.sqlite",
        "policy": "policy.yaml",
        "secret_file": "site.secret",
    }
    path.write_text(yaml.safe_dump(site), encoding="utf-8")
    (folder / "policy.yaml").write_text("min_cell_count: 10\n", encoding="utf-8")  # the node checks its governance
    return path


def supernode_list(root: Path) -> list[dict]:
    layout = CoordinatorLayout(root)
    done = subprocess.run(
        [str(BIN / "flwr"), "supernode", "list", CONNECTION_NAME, "--format", "json"],
        env={**FLOWER_ENV, "FLWR_HOME": str(layout.cli_home)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(done.stdout)["nodes"]


# ------------------------------------------------------------------------------- commands, no processes


@pytest.fixture(scope="module")
def consortium(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("deploy") / "consortium"
    init_consortium(root, ["localhost", "127.0.0.1"], ["aster", "birch"])
    return root


def test_superlink_command_is_secure_by_default(consortium: Path):
    spec = superlink_process(consortium, "127.0.0.1", 9092)
    keys, layout = ConsortiumLayout(consortium), CoordinatorLayout(consortium)
    argv = spec.argv
    assert argv[0] == str(flower_bin_dir() / "flower-superlink")
    assert "--insecure" not in argv
    pairs = dict(itertools.pairwise(argv))
    assert pairs["--ssl-certfile"] == str(keys.server_cert)
    assert pairs["--ssl-keyfile"] == str(keys.server_key)
    assert pairs["--ssl-ca-certfile"] == str(keys.superlink_ca)
    assert pairs["--database"] == str(layout.state_db)
    assert pairs["--host"] == "127.0.0.1" and pairs["--port"] == "9092"
    assert "--enable-supernode-auth" in argv and "--disable-runtime-dependency-installation" in argv
    env = spec.env
    assert env["PATH"].split(os.pathsep)[0] == str(flower_bin_dir())  # SuperLink spawns flwr-serverapp by name
    assert env["FLWR_HOME"] == str(layout.flwr_home)
    assert env[COORDINATOR_DIR_ENV] == str(consortium)
    assert env["FLWR_TELEMETRY_ENABLED"] == "0"
    assert spec.log_file == consortium / "superlink" / "superlink.log"


def test_superlink_refuses_an_address_its_certificate_does_not_cover(consortium: Path):
    # Flower's SuperLink launches ServerApps through its own API at the listening address, over TLS
    with pytest.raises(DeploymentError, match=r"valid for localhost, 127\.0\.0\.1 but not for 10\.9\.9\.9"):
        superlink_process(consortium, "10.9.9.9", 9092)
    assert superlink_process(consortium, "0.0.0.0", 9092)  # reaches itself at 127.0.0.1, which is covered


def test_registering_needs_a_started_coordinator_and_a_known_site(tmp_path: Path):
    root = tmp_path / "consortium"
    init_consortium(root, ["localhost"], ["aster"])
    with pytest.raises(DeploymentError, match=r"flwr-cli/config\.toml does not exist: the coordinator has not been"):
        register_site(root, "aster")
    with pytest.raises(DeploymentError, match=r"site cedar is not in .*consortium\.yaml; add it first"):
        register_site(root, "cedar")


def test_a_taken_port_is_named(consortium: Path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(DeploymentError, match=rf"cannot listen on 127\.0\.0\.1:{port} .*another process uses it"):
            check_port_free("127.0.0.1", port, "the SuperLink")


def test_cli_connection_reads_back_with_flowers_own_reader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from flwr.cli.flower_config import read_superlink_connection

    ca = tmp_path / 'odd "dir"' / "ca.crt"
    write_cli_connection(tmp_path / "cli", "127.0.0.1:9092", ca)
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "cli"))
    connection = read_superlink_connection(CONNECTION_NAME)
    assert connection.address == "127.0.0.1:9092"
    assert connection.root_certificates == str(ca)
    assert read_superlink_connection(None).name == CONNECTION_NAME  # it is the default connection


def test_node_config_arg_parses_as_flower_does(tmp_path: Path):
    from flwr.common.config import parse_config_args

    from site_node.clientapp import SITE_CONFIG_KEY
    from site_node.supernode import SITE_CONFIG_KEY as OURS

    assert OURS == SITE_CONFIG_KEY
    path = tmp_path / "a folder with spaces" / "site.yaml"
    assert parse_config_args([node_config_arg(path)]) == {SITE_CONFIG_KEY: str(path)}


def test_supernode_command(consortium: Path, tmp_path: Path):
    keys = ConsortiumLayout(consortium)
    site_file = write_site_config(tmp_path / "aster", "aster")
    ca, key = keys.site_ca("aster"), keys.site_key("aster")
    launch = prepare_launch(site_file, "localhost:9092", ca, key, 9200, isolation="subprocess")
    spec = supernode_process(launch)
    pairs = dict(itertools.pairwise(spec.argv))
    assert spec.argv[0] == str(flower_bin_dir() / "flower-supernode") and "--insecure" not in spec.argv
    assert pairs["--superlink"] == "localhost:9092"
    assert pairs["--root-certificates"] == str(keys.site_ca("aster").resolve())
    assert pairs["--auth-supernode-private-key"] == str(keys.site_key("aster").resolve())
    assert pairs["--node-config"] == f'site-config="{site_file.resolve()}"'
    assert pairs["--port"] == "9200" and pairs["--host"] == "127.0.0.1"
    assert spec.env["FLWR_HOME"] == str(site_file.parent.resolve() / "flwr-home")
    assert spec.log_file == site_file.parent.resolve() / "supernode.log"

    # the default: the same Flower command, paced, next to the warm executor that shares its secret
    warm = prepare_launch(site_file, "localhost:9092", ca, key, 9200)
    node = supernode_process(warm)
    assert node.argv[:3] == [sys.executable, "-m", "site_node.flower_runtime"]
    assert node.argv[3 : 3 + len(spec.argv) - 1] == spec.argv[1:]
    node_pairs = dict(itertools.pairwise(node.argv))
    assert node_pairs["--isolation"] == "process"
    assert node_pairs["--superexec-auth-secret-file"] == str(warm.auth_secret_file)
    executor = executor_process(warm, supernode_pid=4321)
    executor_pairs = dict(itertools.pairwise(executor.argv))
    assert executor.argv[:3] == [sys.executable, "-m", "site_node.warm_executor"]
    assert executor_pairs["--runtime-api-address"] == "127.0.0.1:9200"
    assert executor_pairs["--auth-secret-file"] == str(warm.auth_secret_file)
    assert executor_pairs["--parent-pid"] == "4321" and executor.log_file == node.log_file


def test_site_start_refuses_what_would_fail_later(consortium: Path, tmp_path: Path):
    keys = ConsortiumLayout(consortium)
    ca, key = keys.site_ca("aster"), keys.site_key("aster")
    site_file = write_site_config(tmp_path / "aster", "aster")
    broken = tmp_path / "broken.yaml"
    broken.write_text("site_id: aster\n")
    cases = [
        ((broken, "localhost:9092", ca, key), rf"Not starting: {broken}: the site configuration is not valid"),
        ((tmp_path / "none.yaml", "localhost:9092", ca, key), r"none\.yaml: no such site configuration file"),
        ((site_file, "localhost", ca, key), r"--superlink 'localhost' is not HOST:PORT"),
        ((site_file, "localhost:9092", ca, tmp_path / "x.key"), r"x\.key does not exist; expected this site's"),
        ((site_file, "localhost:9092", tmp_path / "x.crt", key), r"x\.crt does not exist; expected the consortium"),
        ((site_file, "localhost:9092", key, key), r"aster\.key is not a PEM certificate"),
    ]
    for args, message in cases:
        with pytest.raises(SuperNodeError, match=message):
            prepare_launch(*args)
    assert split_address("[::1]:9092") == ("::1", 9092)
    # the governance database replaced by an empty one (its head file still records the chain): not started
    prepare_launch(site_file, "localhost:9092", ca, key)  # a new site: its governance is created, and consistent
    config = load_site_config(site_file)
    governance = Governance(config.governance_db, config.policy, audit_head_file=config.audit_head)
    governance.audit.append("approved", {"study_id": "s"})
    governance.close()
    (tmp_path / "aster" / "governance.sqlite").unlink()
    with pytest.raises(SuperNodeError, match=r"does not agree with its audit chain.*governance database was replaced"):
        prepare_launch(site_file, "localhost:9092", ca, key)


# ------------------------------------------------------------------------------------- real processes


@pytest.fixture(scope="module")
def coordinator(consortium: Path):
    """`twinfed coordinator start` on a free loopback port, with aster and birch registered."""
    port = free_port()
    running = Running([TWINFED, "coordinator", "start", "--dir", str(consortium), "--port", str(port)])
    try:
        running.wait_for("Coordinator running", timeout=45)
        yield consortium, port, running
    finally:
        running.kill_group()


@pytest.mark.timeout(60)
def test_a_registered_site_connects_and_stops_cleanly(coordinator, tmp_path: Path):
    root, port, running = coordinator
    assert "Site aster: key registered" in running.output and "Site birch: key registered" in running.output
    keys = ConsortiumLayout(root)
    site_file = write_site_config(tmp_path / "aster", "aster")
    site = Running([TWINFED, "site", "start", "--site-config", str(site_file), "--superlink", f"127.0.0.1:{port}",
                    "--ca", str(keys.site_ca("aster")), "--key", str(keys.site_key("aster")),
                    "--runtime-port", str(free_port()), "--flwr-home", str(tmp_path / "flwr")])  # fmt: skip
    try:
        line = site.wait_for("Connected to the SuperLink as node", timeout=30)
        node_id = line.rsplit("node", 1)[1].split(".")[0].strip()
        assert yaml.safe_load(CoordinatorLayout(root).node_ids.read_text())["aster"] == int(node_id)
        deadline = time.monotonic() + 15
        while (status := {n["node-id"]: n["status"] for n in supernode_list(root)}).get(node_id) != "online":
            assert time.monotonic() < deadline, status
            time.sleep(0.5)
        os.kill(site.process.pid, signal.SIGTERM)
        assert site.wait(timeout=25) == 0, site.output
        assert "SuperNode stopped." in site.output
        assert processes_mentioning(str(site_file.resolve())) == []  # no SuperNode, SuperExec or ClientApp left
    finally:
        site.kill_group()


@pytest.mark.timeout(60)
def test_an_unregistered_key_is_refused(coordinator, tmp_path: Path):
    root, port, _ = coordinator
    rogue = generate_site_keys(tmp_path / "rogue", "rogue")
    site_file = write_site_config(tmp_path / "rogue-site", "rogue")
    site = Running([TWINFED, "site", "start", "--site-config", str(site_file), "--superlink", f"127.0.0.1:{port}",
                    "--ca", str(ConsortiumLayout(root).site_ca("aster")), "--key", str(rogue.private_key),
                    "--runtime-port", str(free_port())])  # fmt: skip
    try:
        assert site.wait(timeout=45) == 1, site.output
        assert "refused this site's key" in site.output and rogue.fingerprint in site.output
        assert "Failed to activate SuperNode" in (site_file.parent / "supernode.log").read_text()
        superlink_log = CoordinatorLayout(root).log_file.read_text()
        assert '"POST /v1/fleet/activate-node HTTP/1.1" 412' in superlink_log
    finally:
        site.kill_group()


@pytest.mark.timeout(60)
def test_plaintext_or_unverified_connections_are_refused(coordinator, tmp_path: Path):
    root, port, _ = coordinator
    keys = ConsortiumLayout(root)
    # a plaintext SuperNode cannot talk to the TLS SuperLink (it would retry for ever; bounded here). Output
    # goes to a file: its orphaned flower-superexec keeps inherited pipes open after the SuperNode exits.
    log = tmp_path / "plain.log"
    with log.open("wb") as sink:
        plain = subprocess.Popen(
            [str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}",
             "--port", str(free_port()), "--max-retries", "1", "--max-wait-time", "10"],
            env={**FLOWER_ENV, "FLWR_HOME": str(tmp_path / "plain")}, stdout=sink, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        try:
            assert plain.wait(timeout=40) != 0
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(plain.pid, signal.SIGKILL)
    printed = log.read_text()
    assert "could not establish a connection to the SuperLink" in printed, printed
    assert "SuperNode ID" not in printed

    # a site given another consortium's CA refuses to start instead of retrying for ever
    other = tmp_path / "other"
    init_consortium(other, ["localhost"], [])
    site_file = write_site_config(tmp_path / "aster", "aster")
    site = Running([TWINFED, "site", "start", "--site-config", str(site_file), "--superlink", f"127.0.0.1:{port}",
                    "--ca", str(ConsortiumLayout(other).ca_cert), "--key", str(keys.site_key("aster")),
                    "--runtime-port", str(free_port())])  # fmt: skip
    try:
        assert site.wait(timeout=30) == 1
        assert "does not vouch for" in site.output and "Not starting" in site.output
        assert not (site_file.parent / "supernode.log").exists()  # refused before Flower started
    finally:
        site.kill_group()


@pytest.mark.timeout(60)
def test_a_site_added_while_running_is_registered(coordinator):
    root, _, _ = coordinator
    add_site(root, "cedar")
    command = [TWINFED, "coordinator", "register-site", str(root), "cedar"]
    first = subprocess.run(command, env=FLOWER_ENV, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0 and "Site cedar: key registered (node " in first.stdout, first.stdout + first.stderr
    again = subprocess.run(command, env=FLOWER_ENV, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "already registered" in again.stdout
    unknown = subprocess.run([*command[:-1], "nosuch"], env=FLOWER_ENV, capture_output=True, text=True, timeout=60)
    assert unknown.returncode == 1 and "site nosuch is not in" in unknown.stderr


@pytest.mark.timeout(60)
def test_sigterm_stops_the_coordinator_and_everything_it_started(tmp_path: Path):
    root = tmp_path / "consortium"
    init_consortium(root, ["localhost"], ["aster"])
    port = free_port()
    running = Running([TWINFED, "coordinator", "start", "--dir", str(root), "--port", str(port)])
    try:
        running.wait_for("Coordinator running", timeout=45)
        assert any("flower-superlink" in p for p in processes_mentioning(str(root)))
        superexec = next(p for p in processes_mentioning(str(root)) if "flower-superexec" in p)
        # the SuperLink's SuperExec (which spawns flwr-serverapp) inherits the consortium folder and our PATH
        environ = dict(
            item.split("=", 1)
            for item in Path(f"/proc/{superexec.split(':')[0]}/environ").read_bytes().decode().split("\0")
            if "=" in item
        )
        assert environ[COORDINATOR_DIR_ENV] == str(root.resolve())
        assert environ["PATH"].split(os.pathsep)[0] == str(flower_bin_dir())
        assert environ["FLWR_TELEMETRY_ENABLED"] == "0"
        # a second coordinator on the same folder would share state.db: refused with a sentence
        second = subprocess.run([TWINFED, "coordinator", "start", "--dir", str(root), "--port", str(free_port())],
                                env=FLOWER_ENV, capture_output=True, text=True, timeout=30)  # fmt: skip
        assert second.returncode == 1 and f"a coordinator already runs from {root}" in second.stderr
        os.kill(running.process.pid, signal.SIGTERM)  # the twinfed process only, as systemd or Ctrl-C would
        assert running.wait(timeout=30) == 0, running.output
        assert "SuperLink stopped." in running.output
        assert processes_mentioning(str(root)) == []
    finally:
        running.kill_group()


@pytest.mark.timeout(60)
def test_a_killed_coordinator_takes_its_superlink_with_it(tmp_path: Path):
    """kill -9 leaves no chance to clean up: the SuperLink is started to receive SIGTERM when its parent dies."""
    root = tmp_path / "consortium"
    init_consortium(root, ["localhost"], [])
    running = Running([TWINFED, "coordinator", "start", "--dir", str(root), "--port", str(free_port())])
    try:
        running.wait_for("Coordinator running", timeout=45)
        assert any("flower-superlink" in p for p in processes_mentioning(str(root)))
        os.kill(running.process.pid, signal.SIGKILL)
        running.wait(timeout=10)
        deadline = time.monotonic() + 30
        while (left := processes_mentioning(str(root))) and time.monotonic() < deadline:
            time.sleep(0.25)
        assert left == []
    finally:
        running.kill_group()
