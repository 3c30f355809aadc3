"""Submitting a study to a coordinator as a Flower run, the way `flwr run` does, without Flower's templates.

A Flower run needs an app (a FAB: a pyproject.toml naming the ServerApp and ClientApp). Ours is written
here, not downloaded (`flwr new` needs the internet): its components are the installed
`federation.coordinator.serverapp:app` and `site_node.clientapp:app`, so sites run the code they installed and
approved, never code shipped inside the FAB. The study travels in the run configuration, base64 of its
canonical JSON, from which every site recomputes the hash it approved.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from federation.common.flower import flower_env
from federation.contract import StudySpec, canonical_json
from federation.coordinator.serverapp import encode_study
from federation.deploy.deployment import CONNECTION_NAME
from federation.deploy.provision import SITE_ID_PATTERN

APP_NAME = "twinfed-study"
SIMULATION_SITES_KEY = "simulation-sites"


def app_pyproject(version: str, extra_config: str = "") -> str:
    return f"""[project]
name = "{APP_NAME}"
version = "{version}"
description = "A twinfed study: the coordinator's ServerApp and the sites' ClientApp, both from installed twinfed"
requires-python = ">=3.11,<3.13"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "twinfed"

[tool.flwr.app.components]
serverapp = "federation.coordinator.serverapp:app"
clientapp = "site_node.clientapp:app"

[tool.flwr.app.config]
study = ""
run-name = ""
resume = false
node-wait-seconds = 120.0
held-out-site = ""
{extra_config}"""


@contextmanager
def study_app(extra_config: str = "") -> Iterator[Path]:
    """A temporary app folder holding only the pyproject.toml of our Flower app (plus `extra_config` lines
    of its [tool.flwr.app.config]: Flower refuses run settings the app does not declare)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        release = version("twinfed")
    except PackageNotFoundError:
        release = "0.0.0"
    with tempfile.TemporaryDirectory(prefix="twinfed-app-") as folder:
        app = Path(folder) / APP_NAME
        app.mkdir()
        (app / "pyproject.toml").write_text(app_pyproject(release, extra_config), encoding="utf-8")
        (app / "README.md").write_text("twinfed study app: components come from the installed twinfed.\n")
        yield app


def run_config_args(
    spec: StudySpec, run_name: str, resume: bool, node_wait_seconds: float, held_out_site: str | None = None
) -> list[str]:
    """The run's settings for the ServerApp; `held_out_site`: the site a leave-one-site-out variant holds out."""
    study = encode_study(canonical_json(spec))
    values = f'study="{study}" run-name="{run_name}" resume={"true" if resume else "false"}'
    values += f" node-wait-seconds={node_wait_seconds}"
    if held_out_site:
        if not re.match(SITE_ID_PATTERN, held_out_site):  # also what keeps the quoted TOML value plain
            raise ValueError(f"held-out site {held_out_site!r} is not a site id")
        values += f' held-out-site="{held_out_site}"'
    return ["--run-config", values]


def simulation_app() -> AbstractContextManager[Path]:
    """The same app for Flower's simulation engine: it also declares `simulation-sites`, the list of site
    files from which a virtual node (which only knows its partition id) learns which site it is."""
    return study_app(extra_config=f'{SIMULATION_SITES_KEY} = ""\n')


def simulation_config_args(site_list: Path) -> list[str]:
    return ["--run-config", f'{SIMULATION_SITES_KEY}="{site_list.resolve()}"']


def flwr_executable() -> str:
    local = Path(sys.executable).parent / "flwr"
    return str(local) if local.exists() else "flwr"


def submit(
    spec: StudySpec,
    flwr_home: Path,
    *,
    run_name: str,
    resume: bool = False,
    node_wait_seconds: float = 120.0,
    held_out_site: str | None = None,
    stream: bool = True,
) -> int:
    """Run `flwr run` for the study over the `twinfed` connection in `flwr_home` (written by `twinfed
    coordinator start`); returns its exit code.

    With `stream`, the run's log (the coordinator's progress lines) is followed until the run ends.
    `held_out_site`: a leave-one-site-out variant's held-out site (federation.coordinator.runner).
    """
    env = flower_env(flwr_home)
    with study_app() as app:
        settings = run_config_args(spec, run_name, resume, node_wait_seconds, held_out_site)
        command = [flwr_executable(), "run", str(app), CONNECTION_NAME, *settings]
        if stream:
            command.append("--stream")
        return subprocess.run(command, env=env, check=False).returncode
