"""The lowest shared layer (federation.common): one error style for the files people write, one environment
for every process twinfed starts and one free-port helper, so the demo, the simulation, the coordinator and
the site node agree on one rule: third-party telemetry is off unless the operator explicitly turned it on."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import yaml

from federation.common.flower import QUIET_BY_DEFAULT, flower_env, quiet_by_default
from federation.common.processes import free_loopback_port
from federation.contract import StudyError, parse_study
from federation.local import simulation
from site_node.config import SiteConfigError, load_site_config, write_site_folder
from site_node.governance import PolicyError, parse_policy
from tests.site_helpers import EXAMPLE_STUDY


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


def test_one_error_style_names_the_settings_that_exist_where_a_misspelt_one_stands(tmp_path):
    """Study, policy and site file: a setting that does not exist is named with the settings that do."""
    raw = yaml.safe_load(EXAMPLE_STUDY.read_text())
    raw["training"]["epochz"] = 3
    with pytest.raises(StudyError, match=r"'training.epochz' is not a study setting .*in 'training' are: rounds, "):
        parse_study(raw, "study.yaml")
    with pytest.raises(PolicyError, match=r"'site_epsilon_ceilng' is not a policy setting .*: require_dp, "):
        parse_policy({"site_epsilon_ceilng": 3}, "policy.yaml")
    secret = tmp_path / "site.secret"
    secret.write_text("ab" * 32)
    site = write_site_folder(tmp_path / "site", "north-clinic", "sqlite:///omop.sqlite", secret, {})
    raw_site = yaml.safe_load(site.read_text())
    raw_site["omop"]["passwrd"] = "hunter2"
    site.write_text(yaml.safe_dump(raw_site))
    with pytest.raises(SiteConfigError, match=r"'omop.passwrd' is not a site file setting .*'omop' are: url, ") as err:
        load_site_config(site)
    assert "hunter2" not in str(err.value), "a site file's values are never repeated"
