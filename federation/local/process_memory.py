"""Memory of a process tree over time, read from /proc (Linux): what a simulation really costs.

A Flower simulation is many processes (the SuperLink, its simulation process, Ray's GCS, raylet and
one worker per ClientApp actor), so one process's peak says little. We sample the whole tree below
the given roots and keep two sums: RSS (resident pages, shared ones counted in every process: an upper
bound) and PSS (shared pages split among the processes that map them: the tree's real footprint, Ray's
shared-memory object store included once). Reading /proc needs no extra package; where /proc is
missing (not Linux) the sampler records nothing and says so.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
KIB = 1024


@dataclass(frozen=True)
class Sample:
    at: float  # time.time()
    processes: int
    rss_bytes: int
    pss_bytes: int


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process we can see."""
    parents = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # the command name (field 2) is in parentheses and may hold spaces: split after its last ')'
        fields = stat[stat.rfind(")") + 2 :].split()
        parents[int(entry.name)] = int(fields[1])
    return parents


def descendants(roots: list[int]) -> list[int]:
    """The roots that still exist and every process below them."""
    parents = _parents()
    children: dict[int, list[int]] = {}
    for pid, parent in parents.items():
        children.setdefault(parent, []).append(pid)
    found: dict[int, None] = {}  # ordered and unique: a root may also be below another root
    stack = [pid for pid in roots if pid in parents]
    while stack:
        pid = stack.pop()
        if pid not in found:
            found[pid] = None
            stack.extend(children.get(pid, []))
    return list(found)


def _memory(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in bytes; (0, 0) when it is gone or unreadable."""
    try:
        text = (PROC / str(pid) / "smaps_rollup").read_text()
    except OSError:
        return 0, 0
    values = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name in ("Rss", "Pss"):
            values[name] = int(rest.split()[0]) * KIB
    return values.get("Rss", 0), values.get("Pss", 0)


def sample(roots: list[int]) -> Sample:
    pids = descendants(roots)
    rss = pss = 0
    for pid in pids:
        r, p = _memory(pid)
        rss, pss = rss + r, pss + p
    return Sample(time.time(), len(pids), rss, pss)


class TreeSampler:
    """Samples the trees below `roots()` every `interval` seconds in a background thread.

    `roots` is a callable because some roots appear while we watch (the SuperLink the flwr CLI starts).
    """

    def __init__(self, roots, interval: float = 0.5) -> None:
        self.roots = roots
        self.interval = interval
        self.samples: list[Sample] = []
        self.available = PROC.is_dir() and (PROC / str(os.getpid()) / "smaps_rollup").exists()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="memory-sampler", daemon=True)

    def __enter__(self) -> TreeSampler:
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            roots = self.roots()
            if roots:
                self.samples.append(sample(roots))
            self._stop.wait(self.interval)
