"""Processes twinfed starts and watches (SuperLink, SuperNode, the warm executor, the demo's nodes): what is
executed, how it is supervised and stopped (its whole process group, SIGTERM then SIGKILL after a grace), and
the signals that stop the supervisor. Shared by the coordinator's deployment and the site node.
"""

from __future__ import annotations

import ctypes
import datetime as dt
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

STOP_GRACE_S = 15.0


class DeploymentError(RuntimeError):
    """A Flower process cannot be started or has failed; the message says what to check."""


class StopRequested(BaseException):
    """SIGINT or SIGTERM arrived: stop the children and leave. BaseException so no `except Exception` eats it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclass(frozen=True)
class ProcessSpec:
    """Exactly what is executed: argv, the complete environment, and where its output goes."""

    argv: list[str]
    env: dict[str, str]
    log_file: Path


@contextmanager
def stop_signals() -> Iterator[None]:
    """Turn SIGINT (Ctrl-C) and SIGTERM into StopRequested, so `finally` blocks stop the children."""

    def _raise(signum: int, _frame: object) -> None:
        raise StopRequested(signum)

    previous = {s: signal.signal(s, _raise) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _die_with_parent() -> None:
    """Linux: the child gets SIGTERM if we are killed outright (kill -9), instead of living on unsupervised."""
    with suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


@dataclass
class Supervised:
    """One Flower process in its own process group, its output appended to its log file."""

    spec: ProcessSpec
    process: subprocess.Popen | None = None
    _log: IO[bytes] | None = field(default=None, repr=False)
    _stopped: bool = field(default=False, repr=False)

    def start(self) -> None:
        self.spec.log_file.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.spec.log_file, "ab")  # noqa: SIM115 (closed in stop())
        stamp = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        self._log.write(f"\n===== {stamp} twinfed starts: {' '.join(self.spec.argv)}\n".encode())
        self._log.flush()
        self.process = subprocess.Popen(
            self.spec.argv,
            env=self.spec.env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,  # safe: we start no threads
        )

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def wait(self) -> int:
        assert self.process is not None
        return self.process.wait()

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.spec.log_file.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        """SIGTERM the whole group, wait for it to empty, SIGKILL what is left after `grace` seconds.

        Further Ctrl-C/SIGTERM are ignored meanwhile: the stop is already bounded by `grace`.
        """
        if self.process is None or self._stopped:
            return
        self._stopped = True
        previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            group = self.process.pid  # the child leads its own session and group
            _signal_group(group, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and (self.process.poll() is None or _group_alive(group)):
                time.sleep(0.1)
            if self.process.poll() is None or _group_alive(group):
                _signal_group(group, signal.SIGKILL)
            self.process.wait()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            if self._log is not None:
                self._log.close()
                self._log = None


def _signal_group(group: int, signum: int) -> None:
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(group, signum)


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the kernel's pick), for a process about to listen on it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def check_port_free(host: str, port: int, purpose: str) -> None:
    from federation.common.diagnostics import port_free

    check = port_free(host, port, purpose)
    if check.status == "fail":
        raise DeploymentError(check.detail)
