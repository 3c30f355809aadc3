"""The warm ClientApp executor that `twinfed site start` runs next to the SuperNode (`--isolation process`).

Flower's default executor starts a fresh `flwr-clientapp` process for every message, which imports
flwr, torch, Opacus, pandas and SQLAlchemy again each time: seconds per message on a hospital's small
server. This process imports them once, then for each task the SuperNode has, forks a child that runs
Flower's own ClientApp body (`flower_runtime.run_clientapp_task`). A child starts in milliseconds with
everything imported and still gives each round what a fresh process gives: its own database
connections, memory that ends with the task, a crash that takes down that task only (the SuperNode
reports it to the coordinator as a failed ClientApp). One thing is carried from round to round: a
study's dataset, which a child sends back through a pipe and the next child reuses only while the
study, the OMOP database's state and the consent state are provably the same (site_node.cohort.cache);
a consent withdrawal or a new load is seen by the next round exactly as before.

Fork safety is why the parent only imports: it opens no database connection and runs no torch
operation (torch's thread pools start on first use, and a pool inherited across fork can deadlock).
Each child reseeds Python's and NumPy's global generators; the DP noise and Poisson sampling never used
them (they draw fresh operating-system entropy per round, see site_node.training.local).

Run by `twinfed site start`, not by hand:
`python -m site_node.warm_executor --runtime-api-address 127.0.0.1:9094 --auth-secret-file F --parent-pid P`
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import random
import select
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from site_node.cohort.cache import CACHE as COHORTS
from site_node.flower_runtime import (
    TASK_POLL_ENV,
    FlowerInternalsError,
    check_flower,
    client_app_task_type,
    launch_result,
    run_clientapp_task,
    serve_tasks,
)

READY_TEXT = "twinfed warm executor ready"  # site_node.supernode waits for this line in the log
# Flower's SuperExec loop asks the SuperNode for a task, then sleeps TASK_POLL_S (its own setting; Flower's
# default is 1 s); our reconcile() then waits more the longer the node has been quiet (see TaskPacing).
TASK_POLL_S = 0.02
CHILD_CHECK_S = 0.02
# A round's process runs a little below the node's own (the SuperNode, the executor), so that their
# transfers, short and on every round's critical path, are not queued behind training on a busy host.
CHILD_NICENESS = 5
# What a round imports: loaded once here so that no child pays for it. site_node.clientapp brings the
# site's whole round (participation, cohort, governance, training: torch, Opacus, pandas, SQLAlchemy).
PRELOAD = (
    "site_node.clientapp",
    "torch._dynamo",  # first imported by the first optimizer step (0.6 s)
    "flwr.supernode.runtime.run_clientapp",
    "flwr.clientapp.utils",
    "flwr.cli.install",
    "sqlalchemy.dialects.sqlite",
    "sqlalchemy.dialects.postgresql",
    "opacus.accountants.rdp",
    "opacus.accountants.prv",
    "scipy.stats",
)


def preload() -> float:
    """Import what a round needs; returns the seconds it took. Only imports: see the module docstring."""
    started = time.perf_counter()
    for name in PRELOAD:
        with contextlib.suppress(ImportError):  # an optional driver (psycopg) may be absent
            importlib.import_module(name)
    return time.perf_counter() - started


@dataclass
class _Child:
    task_id: int
    started: float
    pipe: int | None = None  # what the child sends back: the cohorts it built (site_node.cohort.cache)
    received: bytearray = field(default_factory=bytearray)


@dataclass
class TaskPacing:
    """How often to ask the SuperNode for a task: soon after the last one ended, then less and less often.

    The next task follows the last one by the other sites' training time plus a fraction of a second, so
    the wait starts at `first_s` and grows by `growth` of every quiet second, up to `idle_s` (Flower's
    fixed interval). While a task runs no other can come (the SuperNode hands out one message at a time
    and waits for its reply), so the executor only watches its child, which costs no request.
    """

    first_s: float = TASK_POLL_S
    growth: float = 0.02
    idle_s: float = 1.0
    last_work: float = field(default_factory=time.monotonic)

    def wait(self) -> float:
        return min(self.idle_s, self.first_s + self.growth * (time.monotonic() - self.last_work))


class ForkExecutor:
    """Flower's executor interface (launch, capacity, reconcile, close), launching tasks as forked children."""

    def __init__(self, pacing: TaskPacing | None = None) -> None:
        self.children: dict[int, _Child] = {}
        self.pacing = pacing or TaskPacing()

    def get_eligible_capacity(
        self, supported_task_types: set[Any], *, insecure: bool = False, root_certificates_path: str | None = None
    ) -> tuple[set[Any], set[str]]:
        """ClientApp tasks only: that is all a hospital's SuperNode runs."""
        wanted = client_app_task_type()
        return ({wanted} & set(supported_task_types)), set()

    def wait_for_capacity(
        self,
        task_type: Any = None,
        *,
        fab_hash: str | None = None,
        insecure: bool = False,
        root_certificates_path: str | None = None,
    ) -> None:
        """No capacity gate: the SuperNode hands out one message at a time."""

    def launch(self, spec: Any) -> Any:
        try:
            read_end, write_end = os.pipe()
        except OSError as exc:
            return launch_result(False, f"twinfed warm executor could not open a pipe for a ClientApp: {exc}")
        try:
            pid = os.fork()
        except OSError as exc:
            os.close(read_end)
            os.close(write_end)
            return launch_result(False, f"twinfed warm executor could not fork a ClientApp process: {exc}")
        if pid == 0:
            os.close(read_end)
            for other in self.children.values():
                if other.pipe is not None:
                    os.close(other.pipe)
            COHORTS.sink = write_end
            _run_child(spec)
        os.close(write_end)
        os.set_blocking(read_end, False)
        self.children[pid] = _Child(spec.task_id, time.monotonic(), read_end)
        self.pacing.last_work = time.monotonic()
        return launch_result(True)

    def reconcile(self) -> None:
        """Between two requests for a task: reap finished children, then wait as TaskPacing says.

        Flower's loop calls this before each request, which makes it the place to pace the requests.
        """
        self._reap()
        deadline = time.monotonic() + self.pacing.idle_s
        while self.children and time.monotonic() < deadline:
            self._listen(CHILD_CHECK_S)
            self._reap()
        COHORTS.expire()
        extra = self.pacing.wait() - TASK_POLL_S
        if extra > 0:
            time.sleep(extra)

    def _listen(self, timeout: float) -> None:
        """Wait up to `timeout` for what running children send (a child blocks once its pipe is full)."""
        pipes = {c.pipe: c for c in self.children.values() if c.pipe is not None}
        if not pipes:
            time.sleep(timeout)
            return
        ready, _, _ = select.select(list(pipes), [], [], timeout)
        for fd in ready:
            _read_available(pipes[fd])

    def _reap(self) -> None:
        """Collect finished children (no zombies), keep the cohorts they built, say which ones failed."""
        for pid in list(self.children):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0
            if done == 0:
                continue
            child = self.children.pop(pid)
            _read_available(child)  # the child has exited: the rest of what it sent, up to the end
            if child.pipe is not None:  # not at its end: a grandchild holds it open; what came is enough
                os.close(child.pipe)
            COHORTS.absorb(bytes(child.received))
            self.pacing.last_work = time.monotonic()
            code = os.waitstatus_to_exitcode(status)
            if code != 0:
                print(
                    f"twinfed warm executor: the ClientApp process of task {child.task_id} (pid {pid}) ended with "
                    f"status {code} after {time.monotonic() - child.started:.1f} s; see the lines above.",
                    flush=True,
                )

    def close(self) -> None:
        """On shutdown: ask running children to stop (Flower's handler reports the task as failed), then reap."""
        for pid in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 5.0
        while self.children and time.monotonic() < deadline:
            self._listen(CHILD_CHECK_S)
            self._reap()


def _read_available(child: _Child) -> None:
    """Read what is in the child's pipe now; at its end (the child closed it), close our side."""
    while child.pipe is not None:
        try:
            chunk = os.read(child.pipe, 1 << 16)
        except BlockingIOError:
            return
        if not chunk:
            os.close(child.pipe)
            child.pipe = None
            return
        child.received += chunk


def _exit_status(done: SystemExit) -> int:
    if done.code is None:
        return 0
    return done.code if isinstance(done.code, int) else 1


def _run_child(spec: Any) -> NoReturn:
    """The forked child: Flower's ClientApp body for one task, then the child ends whatever happened.

    It must never return into the parent's loop, hence os._exit in `finally`.
    """
    code = 1
    try:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, signal.SIG_DFL)  # run_clientapp installs Flower's own handlers
        with contextlib.suppress(OSError):
            os.nice(CHILD_NICENESS)
        random.seed()
        np = sys.modules.get("numpy")
        if np is not None:
            np.random.seed()
        run_clientapp_task(spec)
        code = 0
    except SystemExit as done:
        code = _exit_status(done)
    except BaseException:
        traceback.print_exc()
    finally:
        logging.shutdown()
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m site_node.warm_executor", description=__doc__.splitlines()[0])
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API (127.0.0.1:PORT)")
    parser.add_argument("--auth-secret-file", type=Path, help="the secret shared with the SuperNode")
    parser.add_argument("--parent-pid", type=int, help="stop when this process (the SuperNode) is gone")
    args = parser.parse_args(argv)
    try:
        check_flower()
    except FlowerInternalsError as exc:
        print(f"twinfed warm executor: not starting: {exc}", file=sys.stderr, flush=True)
        return 2
    secret = args.auth_secret_file.read_bytes() if args.auth_secret_file else None
    seconds = preload()
    os.environ[TASK_POLL_ENV] = str(TASK_POLL_S)
    print(
        f"{READY_TEXT}: torch, Opacus, Flower and the site code imported once ({seconds:.1f} s); each task runs "
        f"in a forked process; serving the SuperNode at {args.runtime_api_address}.",
        flush=True,
    )
    # Flower's loop installs its own SIGINT/SIGTERM handlers and restores these after the first signal:
    # a second SIGINT (its parent watch raises one when the SuperNode is gone) must not interrupt the exit.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    serve_tasks(args.runtime_api_address, ForkExecutor(), auth_secret=secret, parent_pid=args.parent_pid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
