"""Environment checks shown by the `doctor` commands, with one shape for coordinator and site node.

A check passes, warns (works, but not as we recommend) or fails (will not work); its detail is a
sentence the operator can act on.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from rich.console import Console
from rich.table import Table

Status = Literal["ok", "warn", "fail"]
FLOWER_RANGE = ((1, 41), (1, 43))  # flwr >= 1.41, < 1.43 (the Message API we build on)


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str


def python_version() -> Check:
    ok = sys.version_info[:2] >= (3, 11)
    return Check(
        "python",
        "ok" if ok else "fail",
        f"Python {sys.version.split()[0]}" + ("" if ok else "; twinfed needs Python 3.11 or newer"),
    )


def package_version(distribution: str, purpose: str) -> Check:
    try:
        return Check(distribution, "ok", f"{importlib.metadata.version(distribution)} ({purpose})")
    except importlib.metadata.PackageNotFoundError:
        return Check(
            distribution, "fail", f"not installed; needed for {purpose}. Reinstall twinfed in this environment."
        )


def flower_version() -> Check:
    try:
        installed = importlib.metadata.version("flwr")
    except importlib.metadata.PackageNotFoundError:
        return Check("flwr", "fail", "Flower is not installed; reinstall twinfed in this environment.")
    parts = tuple(int(p) for p in installed.split(".")[:2] if p.isdigit())
    low, high = FLOWER_RANGE
    if low <= parts < high:
        return Check("flwr", "ok", f"{installed} (Message API, supported range >=1.41,<1.43)")
    return Check(
        "flwr", "fail", f"{installed} is outside the supported range >=1.41,<1.43; install twinfed's pinned Flower."
    )


def executable(name: str, purpose: str) -> Check:
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if found:
        return Check(name, "ok", f"{found} ({purpose})")
    return Check(name, "fail", f"'{name}' not found next to {sys.executable} or on PATH; needed for {purpose}.")


def telemetry_off() -> Check:
    value = os.environ.get("FLWR_TELEMETRY_ENABLED", "")
    if value in ("0", "false", "False"):
        return Check("telemetry", "ok", "Flower telemetry is off (FLWR_TELEMETRY_ENABLED=0)")
    return Check(
        "telemetry",
        "warn",
        "FLWR_TELEMETRY_ENABLED is not 0: processes started outside the twinfed "
        "command would send usage telemetry; set FLWR_TELEMETRY_ENABLED=0 in their environment.",
    )


def port_free(host: str, port: int, purpose: str) -> Check:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            return Check(
                f"port {port}",
                "fail",
                f"cannot listen on {host}:{port} ({exc.strerror}); "
                f"another process uses it or the address is wrong. Needed for {purpose}.",
            )
    return Check(f"port {port}", "ok", f"{host}:{port} is free ({purpose})")


def render(checks: list[Check], title: str, console: Console | None = None) -> bool:
    """Print the checks as a table; True when none failed."""
    console = console or Console()
    table = Table(title=title)
    table.add_column("check")
    table.add_column("status")
    table.add_column("detail")
    style = {"ok": "[green]ok[/green]", "warn": "[yellow]warn[/yellow]", "fail": "[red]FAIL[/red]"}
    for check in checks:
        table.add_row(check.name, style[check.status], check.detail)
    console.print(table)
    return all(c.status != "fail" for c in checks)
