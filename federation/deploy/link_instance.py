"""Which start of the coordinator's SuperLink a ServerApp belongs to, so a run outlives no restart.

Why: when the coordinator is killed (a crash, kill -9, a host reboot), the ServerApp of the study it was
running is not always gone with it: Flower stops it only once its parent exits, and the dying SuperLink
lingers while it drains connections. Meanwhile a restarted coordinator listens on the same address over
the same state database, where the old run's token is still known. The old ServerApp then reconnects
and carries on its study beside the resumed one: it sends the sites messages of a run they ignore and
writes the same run folder. So every start of the SuperLink gets a fresh instance id, written to
DIR/superlink/instance before the SuperLink starts and given to it (and so to every ServerApp it
launches) in the environment; a ServerApp whose id is no longer the file's stops at its next exchange.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

INSTANCE_ENV = "TWINFED_SUPERLINK_INSTANCE"
INSTANCE_FILE = "instance"


def start_instance(superlink_dir: Path) -> str:
    """A new instance id for a SuperLink about to start from `superlink_dir`, written there atomically."""
    instance = secrets.token_hex(8)
    superlink_dir.mkdir(parents=True, exist_ok=True)
    tmp = superlink_dir / f".{INSTANCE_FILE}.tmp"
    tmp.write_text(instance + "\n", encoding="utf-8")
    os.replace(tmp, superlink_dir / INSTANCE_FILE)
    return instance


class RunSuperseded(RuntimeError):
    """The coordinator was restarted under this ServerApp: it must stop without sending or writing more."""


@dataclass(frozen=True)
class LinkInstance:
    """The instance this process was started under, and the file that names the current one."""

    instance: str
    file: Path

    @classmethod
    def from_environment(cls, superlink_dir: Path) -> LinkInstance | None:
        """This process's instance when a twinfed coordinator started it (None elsewhere: the local
        simulation, a SuperLink someone started by hand, where no restart can happen under it)."""
        instance = os.environ.get(INSTANCE_ENV, "").strip()
        return cls(instance, superlink_dir / INSTANCE_FILE) if instance else None

    def current(self) -> str | None:
        try:
            return self.file.read_text(encoding="utf-8").strip() or None
        except FileNotFoundError:
            return None

    def check(self) -> None:
        """Raise RunSuperseded when the coordinator has been restarted since this process started."""
        now = self.current()
        if now != self.instance:
            raise RunSuperseded(
                f"the coordinator was restarted under this run (SuperLink instance {self.instance}, now "
                f"{now or 'none'} in {self.file}); this run stops here and `twinfed study run --resume` on the "
                "restarted coordinator carries the study on from its last completed round"
            )


class GuardedGrid:
    """The Grid a study runner talks through: every call first checks that the SuperLink is still the one
    that started the run. Everything else is the Flower Grid's own."""

    def __init__(self, grid, instance: LinkInstance) -> None:
        self._grid = grid
        self._instance = instance

    def push_messages(self, messages):
        self._instance.check()
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids):
        self._instance.check()
        replies = list(self._grid.pull_messages(message_ids))
        self._instance.check()  # replies a restarted SuperLink gave an old run are not acted on
        return replies

    def get_node_ids(self):
        self._instance.check()
        return self._grid.get_node_ids()

    def send_and_receive(self, messages, *, timeout=None):
        self._instance.check()
        return self._grid.send_and_receive(messages, timeout=timeout)

    def __getattr__(self, name: str):
        return getattr(self._grid, name)
