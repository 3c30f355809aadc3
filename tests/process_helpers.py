"""Real processes for end-to-end tests: commands in their own session with their output collected,
free loopback ports, and a check that nothing is left running."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from federation.common.flower import flower_env
from federation.common.processes import free_loopback_port

BIN = Path(sys.executable).parent
TWINFED = str(BIN / "twinfed")
# Flower starts its helpers (flower-superexec, flwr-clientapp) by bare name: without this environment's bin
# folder on PATH a plain flower-supernode dies with FileNotFoundError and then hangs (seen with Flower 1.42).
FLOWER_ENV = flower_env()
free_port = free_loopback_port


class Running:
    """A command in its own session whose output lines are collected as they come."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.process = subprocess.Popen(
            argv, env=FLOWER_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, text: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if text in line:
                    return line
            if self.process.poll() is not None:
                self._reader.join(timeout=2)
                if text in self.output:
                    return next(line for line in self.lines if text in line)
                raise AssertionError(f"exited ({self.process.returncode}) before {text!r}:\n{self.output}")
            time.sleep(0.1)
        raise AssertionError(f"no {text!r} within {timeout} s:\n{self.output}")

    def wait(self, timeout: float = 30.0) -> int:
        code = self.process.wait(timeout=timeout)
        self._reader.join(timeout=2)
        return code

    def kill_group(self) -> None:
        """Test clean-up only: a graceful stop first (our children live in their own process groups), then
        whatever is left of this command's group is killed."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=20)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that mention `text` (a test's unique tmp path)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = next((ln for ln in (proc / "status").read_text().splitlines() if ln.startswith("State:")), "")
        except OSError:
            continue
        if text in cmdline and "Z" not in state.split()[1:2]:
            found.append(f"{proc.name}: {cmdline}")
    return found




def simulate_on_site(study: Path, site_folder: Path, out: Path, sites: int, rounds: int) -> subprocess.CompletedProcess:
    """`twinfed study simulate` of `study` with `sites` simulated sites over one prepared site's OMOP database,
    secret and policy (tests/conftest.py's prepared_site), `rounds` rounds, into `out`."""
    site = yaml.safe_load((site_folder / "site.yaml").read_text())
    return subprocess.run(
        [TWINFED, "study", "simulate", str(study), "--sites", str(sites), "--rounds", str(rounds),
         "--omop", site["omop"]["url"], "--secret", site["secret_file"],
         "--policy", str(site_folder / "policy.yaml"), "--out", str(out)],
        env=FLOWER_ENV, capture_output=True, text=True, timeout=280, check=False,
    )  # fmt: skip
