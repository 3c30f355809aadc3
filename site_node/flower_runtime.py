"""Every Flower internal that twinfed's warm ClientApp runtime relies on, in one module, checked before use.

Why internals at all: under Flower's default `--isolation subprocess`, every message starts a fresh
`flwr-clientapp` process that re-imports flwr, torch and Opacus (seconds per message on a small host),
and the SuperNode's loop waits a fixed 3 s after each pull that found no message and 0.5 s steps while
the ClientApp works. Flower offers no setting for either wait, and no public way to plug in an executor
that keeps the imports warm. So `twinfed site start` (default `--isolation process`) runs:

* the SuperNode in our own process (`run_paced_supernode`), Flower's `flower-supernode` command itself,
  with those waits paced (`Pacing`); the Runtime API, the SuperLink connection, node authentication and
  TLS are Flower's, untouched;
* a long-lived executor (`site_node.warm_executor`) that runs Flower's own SuperExec loop
  (`serve_tasks`) with our executor in place of Flower's subprocess one, and runs Flower's own
  `run_clientapp` for each task in a forked child (`run_clientapp_task`).

Both, like the coordinator, also retry a message's arrays sooner than Flower's 1 s
(`federation.deploy.deployment.shorten_object_pull_backoff`, which keeps its own check).

What is used beyond Flower's documented CLI (tested with flwr 1.41 and 1.42, where it is identical):
`flwr.supernode.cli.flower_supernode.flower_supernode`; `flwr.supernode.start_client_internal`'s module
globals `time` and `_pull_and_store_message`; `flwr.supercore.superexec.run_superexec.run_superexec` and
its module global `get_executor`; the executor interface in `flwr.supercore.superexec.executor.types`
(ExecutionSpec's fields, LaunchResult); `flwr.supernode.runtime.run_clientapp.run_clientapp`;
`flwr.supercore.exit.exit_handler.registered_exit_handlers`; the SuperNode's in-memory message store
(`InMemoryNodeState.msg_store`, `lock_msg_store`, `MessageEntry.is_retrieved`), looked at to send a reply
the loop left behind (`paced_pull`); `MAX_RETRY_DELAY` in
`flwr.supercore.retry.http_retry` and `grpc_retry` (the SuperNode's reconnect wait, capped); in a task's
child, the defaults of `flwr.supercore.inflatable.inflatable_utils.pull_and_inflate_object_from_tree`.
`check_flower()` verifies the version and every one of these before a site starts, and says what to do when they do not
match: `twinfed site start --isolation subprocess` runs plain Flower and needs none of this.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from federation.common.flower import shorten_object_pull_backoff

TESTED_FLOWER = ("1.41", "1.42")
SUPERNODE_NO_MESSAGE_WAIT_S = 3.0  # start_client_internal: time.sleep(3) after a pull that found nothing
SUPERNODE_REPLY_WAIT_S = 0.5  # start_client_internal: time.sleep(0.5) steps while the ClientApp works
TASK_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"  # Flower's own setting for the SuperExec's polling
# Flower waits up to 20 s between two attempts to reach a SuperLink that is down. After a coordinator
# restart that left a site several attempts into its backoff, the site came back up to 20 s late and
# could miss a resumed round (seen in CI with a 60 s round timeout). 5 s keeps a site that waits for a
# coordinator to one attempt per 5 s, which costs the coordinator nothing.
RECONNECT_MAX_WAIT_S = 5.0

# (module, attribute, what it must be) for every internal used; checked by check_flower().
_INTERNALS: tuple[tuple[str, str, str], ...] = (
    ("flwr.supernode.cli.flower_supernode", "flower_supernode", "callable"),
    ("flwr.supernode.start_client_internal", "time", "module"),
    ("flwr.supernode.start_client_internal", "_pull_and_store_message", "callable"),
    ("flwr.supercore.superexec.run_superexec", "run_superexec", "callable"),
    ("flwr.supercore.superexec.run_superexec", "get_executor", "callable"),
    ("flwr.supercore.superexec.executor.types", "LaunchResult", "callable"),
    ("flwr.supercore.superexec.executor.types", "ExecutionSpec", "callable"),
    ("flwr.supercore.constant", "TaskType", "callable"),
    ("flwr.supercore.tls", "validate_and_resolve_root_certificates", "callable"),
    ("flwr.supernode.runtime.run_clientapp", "run_clientapp", "callable"),
    ("flwr.supercore.retry.http_retry", "MAX_RETRY_DELAY", "number"),
    ("flwr.supercore.retry.grpc_retry", "MAX_RETRY_DELAY", "number"),
    ("flwr.supercore.exit.exit_handler", "registered_exit_handlers", "list"),
)
_EXECUTION_SPEC_FIELDS = {
    "task_id",
    "runtime_api_address",
    "token",
    "insecure",
    "root_certificates_path",
    "parent_pid",
    "runtime_dependency_install",
}
_RUN_CLIENTAPP_PARAMETERS = (
    "runtime_api_address",
    "token",
    "insecure",
    "certificates",
    "parent_pid",
    "runtime_dependency_install",
)


class FlowerInternalsError(RuntimeError):
    """This Flower release does not have what the warm runtime needs; the message says how to go on."""


def flower_version() -> str:
    try:
        return version("flwr")
    except PackageNotFoundError:
        return "not installed"


def check_flower() -> None:
    """Refuse, with a sentence, a Flower release whose internals the warm runtime was not built for."""
    found = flower_version()
    fallback = (
        "Start this site with `twinfed site start ... --isolation subprocess` (plain Flower: the same rounds, "
        f"a few seconds slower each), or install Flower {' or '.join(TESTED_FLOWER)} (pip install 'flwr>=1.41,<1.43')."
    )
    if ".".join(found.split(".")[:2]) not in TESTED_FLOWER:
        raise FlowerInternalsError(
            f"twinfed's warm ClientApp runtime (--isolation process) is built for Flower "
            f"{' and '.join(TESTED_FLOWER)}; this environment has Flower {found}. {fallback}"
        )
    missing = []
    for module_name, attribute, kind in _INTERNALS:
        try:
            value = getattr(import_module(module_name), attribute)
        except (ImportError, AttributeError):
            missing.append(f"{module_name}.{attribute}")
            continue
        if (kind == "callable" and not callable(value)) or (kind == "list" and not isinstance(value, list)):
            missing.append(f"{module_name}.{attribute} ({kind})")
        if kind == "number" and not isinstance(value, int | float):
            missing.append(f"{module_name}.{attribute} (a number)")
        if kind == "module" and not hasattr(value, "sleep"):
            missing.append(f"{module_name}.{attribute} (the time module)")
    if not missing:
        missing += _shape_mismatches()
    if missing:
        raise FlowerInternalsError(
            f"Flower {found} lacks what twinfed's warm ClientApp runtime uses: {', '.join(missing)}. {fallback}"
        )


def _shape_mismatches() -> list[str]:
    """The executor interface and run_clientapp as the warm runtime calls them (names present: checked)."""
    from flwr.supercore.superexec.executor.types import ExecutionSpec
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    problems = []
    fields = {f.name for f in dataclasses.fields(ExecutionSpec)} if dataclasses.is_dataclass(ExecutionSpec) else set()
    if not fields >= _EXECUTION_SPEC_FIELDS:
        problems.append(f"ExecutionSpec fields {sorted(_EXECUTION_SPEC_FIELDS - fields)}")
    from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState, MessageEntry

    entry_fields = {f.name for f in dataclasses.fields(MessageEntry)} if dataclasses.is_dataclass(MessageEntry) else ()
    state_init = inspect.getsource(InMemoryNodeState.__init__)
    if not ({"message", "is_retrieved"} <= set(entry_fields) and "self.msg_store" in state_init
            and "self.lock_msg_store" in state_init):  # fmt: skip
        problems.append("InMemoryNodeState.msg_store of MessageEntry(message, is_retrieved)")
    parameters = tuple(inspect.signature(run_clientapp).parameters)
    if parameters[: len(_RUN_CLIENTAPP_PARAMETERS)] != _RUN_CLIENTAPP_PARAMETERS:
        problems.append(f"run_clientapp{parameters}")
    return problems


# ------------------------------------------------------------------------------------ the SuperNode


@dataclass
class Pacing:
    """How long the SuperNode waits between pulls, instead of Flower's fixed 3 s.

    The wait grows with the time since the node last had work: `first_s` right after a message or a reply
    (a study is running, and the next round's message follows the slowest site by a fraction of a second),
    then by `growth` of every second spent waiting, up to `idle_s` (an idle hospital does not load the
    coordinator). A message that arrives after a wait of W seconds is thus picked up at most
    first_s + growth * W late. While its ClientApp works, the SuperNode checks for the reply every
    `reply_s` (Flower: 0.5 s), a look at its own memory that costs nothing.
    """

    first_s: float = 0.05
    growth: float = 0.02
    idle_s: float = 1.0
    reply_s: float = 0.02
    last_work: float = field(default_factory=time.monotonic)  # a node that just started counts as busy

    def pull_wait(self) -> float:
        quiet = time.monotonic() - self.last_work
        return min(self.idle_s, self.first_s + self.growth * quiet)

    def worked(self) -> None:
        self.last_work = time.monotonic()


class _PacedTime:
    """Stands in for the `time` module inside start_client_internal: all of it is `time`, but its sleeps."""

    def __init__(self, pacing: Pacing) -> None:
        self._pacing = pacing

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        if seconds == SUPERNODE_NO_MESSAGE_WAIT_S:
            time.sleep(self._pacing.pull_wait())
        elif seconds == SUPERNODE_REPLY_WAIT_S:
            self._pacing.worked()
            time.sleep(self._pacing.reply_s)
        else:
            time.sleep(seconds)


def ready_reply_run(state: Any) -> int | None:
    """The run of a reply that a ClientApp finished and the SuperNode has not taken to send, if any.

    Looked at, not taken (Flower's get_messages_legacy marks what it returns as taken)."""
    with state.lock_msg_store:
        for entry in state.msg_store.values():
            metadata = entry.message.metadata
            if not entry.is_retrieved and metadata.reply_to_message_id:
                return int(metadata.run_id)
    return None


def paced_pull(pull: Callable[..., int | None], pacing: Pacing) -> Callable[..., int | None]:
    """The SuperNode loop's pull step, noting work for `pacing`, and never leaving a finished reply behind.

    Why the second: Flower's loop sends replies only right after a pull that brought a message, and then
    sends whatever reply is ready first. After a coordinator restart, a site may have pulled a message of
    the dead run whose receipt the new SuperLink refused (the run is finished); Flower drops it but its
    ClientApp has already started, so its reply is what the loop sends after the resumed run's message
    (refused: an old run), and the resumed run's own reply then waits for a next message that never comes:
    the round times out at every such site (seen in CI). So a pull that brings nothing but finds a reply
    waiting hands its run to the loop, which sends it at once."""

    def pull_and_note(*args: Any, **kwargs: Any) -> int | None:
        run_id = pull(*args, **kwargs)
        if run_id is None:
            state = kwargs.get("state", args[0] if args else None)
            run_id = ready_reply_run(state) if state is not None else None
        if run_id is not None:
            pacing.worked()
        return run_id

    return pull_and_note


def run_paced_supernode(flower_supernode_args: Sequence[str], pacing: Pacing) -> None:
    """Run Flower's `flower-supernode` command in this process, with `pacing` for its waits.

    Returns (or raises SystemExit) when the SuperNode stops, exactly as the command would.
    """
    check_flower()
    shorten_object_pull_backoff()
    for transport in ("http_retry", "grpc_retry"):  # the SuperNode's Fleet connection uses the first
        import_module(f"flwr.supercore.retry.{transport}").MAX_RETRY_DELAY = RECONNECT_MAX_WAIT_S
    loop = import_module("flwr.supernode.start_client_internal")
    from flwr.supernode.cli.flower_supernode import flower_supernode

    loop.time = _PacedTime(pacing)
    loop._pull_and_store_message = paced_pull(loop._pull_and_store_message, pacing)
    # argv[0] names the command: Flower picks its exit event by it, and argparse its usage line.
    sys.argv = ["flower-supernode", *flower_supernode_args]
    flower_supernode()


# ------------------------------------------------------------------------------------- the executor

LOCAL_PULL_BACKOFF_CAP_S = 0.1


def _poll_own_supernode_closely() -> None:
    """The task starts while the SuperNode is still pulling the message's arrays from the SuperLink; ask
    the SuperNode (on this host) for them every 0.1 s at most, not with Flower's backoff that doubles to
    10 s. Bounded by Flower's overall 2 h limit for a pull instead of its count of tries.
    Changes `pull_and_inflate_object_from_tree`'s defaults in this child only; does nothing if they differ.
    """
    from flwr.supercore.inflatable import inflatable_utils

    defaults = getattr(inflatable_utils.pull_and_inflate_object_from_tree, "__kwdefaults__", None) or {}
    if {"backoff_cap", "max_tries_per_object", "max_time"} <= set(defaults):
        defaults["backoff_cap"] = LOCAL_PULL_BACKOFF_CAP_S
        defaults["max_tries_per_object"] = None


def serve_tasks(
    runtime_api_address: str,
    executor: object,
    *,
    auth_secret: bytes | None,
    parent_pid: int | None,
) -> None:
    """Flower's SuperExec loop (`flower-superexec`'s body) against this node's Runtime API, with `executor`
    launching the tasks instead of Flower's SubprocessExecutor. Runs until SIGTERM/SIGINT (Flower exits
    the process through its own handlers)."""
    check_flower()
    module = import_module("flwr.supercore.superexec.run_superexec")

    def our_executor(*_args: Any, **_kwargs: Any) -> object:
        return executor

    module.get_executor = our_executor
    module.run_superexec(
        runtime_api_address=runtime_api_address,
        insecure=True,  # the Runtime API listens on 127.0.0.1 only, as in Flower's subprocess mode
        superexec_auth_secret=auth_secret,
        parent_pid=parent_pid,
    )


def client_app_task_type() -> object:
    from flwr.supercore.constant import TaskType

    return TaskType.CLIENT_APP


def launch_result(accepted: bool, message: str | None = None) -> object:
    from flwr.supercore.superexec.executor.types import LaunchResult

    return LaunchResult.accepted() if accepted else LaunchResult.failed(message)


def run_clientapp_task(spec: Any) -> None:
    """Flower's ClientApp process body for one task (`flwr-clientapp`), in a forked child. Never returns
    normally: Flower ends it with SystemExit, which the caller turns into the child's exit status."""
    from flwr.supercore.exit import exit_handler
    from flwr.supercore.tls import validate_and_resolve_root_certificates
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    # The executor's own exit handlers (closing its Runtime API client) are not this child's to run.
    exit_handler.registered_exit_handlers.clear()
    shorten_object_pull_backoff()
    _poll_own_supernode_closely()
    run_clientapp(
        runtime_api_address=spec.runtime_api_address,
        token=spec.token,
        insecure=spec.insecure,
        certificates=validate_and_resolve_root_certificates(spec.root_certificates_path, spec.insecure),
        parent_pid=spec.parent_pid,
        runtime_dependency_install=spec.runtime_dependency_install,
    )


def main() -> int:
    """`python -m site_node.flower_runtime <flower-supernode arguments>`: the paced SuperNode."""
    try:
        run_paced_supernode(sys.argv[1:], Pacing())
    except FlowerInternalsError as exc:
        print(f"twinfed: SuperNode not starting: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
