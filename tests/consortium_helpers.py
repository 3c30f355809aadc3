"""A consortium of real processes for end-to-end tests: site folders, `twinfed site start`, and a
coordinator with its site nodes connected, stopped whatever happens."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from federation.deploy.provision import ConsortiumLayout
from tests.process_helpers import TWINFED, Running, free_port
from tests.site_helpers import fresh_site


def site_folder(prepared_site: Path, folder: Path, site_id: str, **policy) -> Path:
    """A hospital's site folder over the prepared hospital, named `site_id`, with policy changes."""
    # The test split of the 700-patient hospital holds only a few deaths, and the split depends on the
    # site secret made for each test session: a cell floor of 1 keeps the pooled AUROC computable.
    site_file = fresh_site(prepared_site, folder, **{"min_cell_count": 1, **policy})
    config = yaml.safe_load(site_file.read_text())
    config["site_id"] = site_id
    site_file.write_text(yaml.safe_dump(config), encoding="utf-8")
    return site_file


def start_site(site_id: str, site_file: Path, keys: ConsortiumLayout, port: int) -> Running:
    """`twinfed site start` for one hospital, as its IT would run it."""
    return Running(
        [TWINFED, "site", "start", "--site-config", str(site_file), "--superlink", f"127.0.0.1:{port}",
         "--ca", str(keys.site_ca(site_id)), "--key", str(keys.site_key(site_id)), "--runtime-port", str(free_port())]
    )  # fmt: skip


def coordinator_command(root: Path, port: int) -> list[str]:
    return [TWINFED, "coordinator", "start", "--dir", str(root), "--port", str(port)]


@dataclass
class LiveConsortium:
    """A running coordinator and site nodes; `coordinator` may be replaced (a restarted coordinator)."""

    root: Path
    port: int
    coordinator: Running
    sites: dict[str, Running] = field(default_factory=dict)


@contextlib.contextmanager
def live_consortium(root: Path, site_files: dict[str, Path], connect_timeout: float = 90) -> Iterator[LiveConsortium]:
    """`twinfed coordinator start` on a free loopback port and every site node connected to it."""
    keys, port = ConsortiumLayout(root), free_port()
    live = LiveConsortium(root, port, Running(coordinator_command(root, port)))
    try:
        live.coordinator.wait_for("Coordinator running", timeout=60)
        for site_id, site_file in site_files.items():
            live.sites[site_id] = start_site(site_id, site_file, keys, port)
        for running in live.sites.values():
            running.wait_for("Connected to the SuperLink as node", timeout=connect_timeout)
        yield live
    finally:
        for running in live.sites.values():
            running.kill_group()
        live.coordinator.kill_group()
