"""The lowest shared layer (federation.common): one environment for every process twinfed starts, and one
free-port helper, so the demo, the simulation, the coordinator and the site node agree on one rule:
third-party telemetry is off unless the operator explicitly turned it on."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from federation.common.flower import QUIET_BY_DEFAULT, flower_env, quiet_by_default
from federation.common.processes import free_loopback_port
from federation.local import simulation


def test_every_process_gets_telemetry_off_by_default(monkeypatch, tmp_path):
    for name in QUIET_BY_DEFAULT:
        monkeypatch.delenv(name, raising=False)
    env = flower_env(tmp_path)
    assert env["FLWR_TELEMETRY_ENABLED"] == "0" and env["FLWR_DISABLE_UPDATE_CHECK"] == "1"
    assert env["RAY_USAGE_STATS_ENABLED"] == "0" and env["FLWR_HOME"] == str(tmp_path)
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)  # Flower starts helpers by name


def test_an_operator_who_turns_telemetry_on_is_obeyed_everywhere(monkeypatch):
    """The demo and the simulation used to force it off while the site node and coordinator kept the
    operator's choice: one rule now, the operator's."""
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "1")
    assert flower_env()["FLWR_TELEMETRY_ENABLED"] == "1"
    simulated = simulation._environment()
    assert simulated["FLWR_TELEMETRY_ENABLED"] == "1"
    assert simulated["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"  # required there, not a default
    quiet_by_default()
    assert os.environ["FLWR_TELEMETRY_ENABLED"] == "1"


def test_a_free_loopback_port_can_be_listened_on():
    port = free_loopback_port()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", port))
        listener.listen()
