"""The Flower environment both sides run in: Flower's executables from this Python environment, the
environment a Flower process gets (its own FLWR_HOME, telemetry and update checks off unless the operator set
them), addresses, the short object-pull backoff, and a TLS probe of a SuperLink.
"""

from __future__ import annotations

import http.client
import os
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from federation.common.processes import (
    DeploymentError,
)


def flower_bin_dir() -> Path:
    """The bin folder of the running Python environment (not resolved: a venv's python is a symlink)."""
    return Path(sys.executable).parent


def flower_executable(name: str) -> str:
    """A Flower executable from this environment, so the SuperLink and its children match our flwr version."""
    path = flower_bin_dir() / name
    if not path.exists():
        raise DeploymentError(
            f"{path} does not exist: Flower's '{name}' is not installed in this environment; "
            "reinstall twinfed here (pip install twinfed) and run it from this environment."
        )
    return str(path)


# Third-party reporting that stays off unless the operator explicitly set it (DESIGN: nothing phones home by
# default; an operator who wants Flower's telemetry sets FLWR_TELEMETRY_ENABLED=1 and every process keeps it).
QUIET_BY_DEFAULT = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",  # Ray's own usage reporting (Flower's simulation engine)
}


def quiet_by_default() -> None:
    """Apply QUIET_BY_DEFAULT to this process (the `twinfed` command, a ClientApp, the ServerApp): what the
    operator set stays as set."""
    for name, value in QUIET_BY_DEFAULT.items():
        os.environ.setdefault(name, value)


def flower_env(flwr_home: Path | None = None, **extra: str) -> dict[str, str]:
    """The one environment every process twinfed starts gets (Flower's, and `twinfed` itself as a child).

    Our bin folder first on PATH (Flower starts its helpers by bare name), its own FLWR_HOME when given,
    third-party telemetry and update checks off unless the operator set them, unbuffered output so log
    lines reach the log file as they happen; `extra` last (what a caller requires, not a default).
    """
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(flower_bin_dir()), env.get("PATH", "")]).rstrip(os.pathsep)
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    for name, value in QUIET_BY_DEFAULT.items():
        env.setdefault(name, value)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def split_address(address: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' -> (host, port), with a sentence for anything else."""
    host, sep, port = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DeploymentError(f"{address!r} is not HOST:PORT (for example fl.consortium.example.org:9092).")
    return host, int(port)


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def local_dial_host(listen_host: str) -> str:
    """The address Flower's SuperLink uses to reach its own API: wildcards become loopback (Flower's rule)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(listen_host, listen_host)


OBJECT_PULL_BACKOFF_S = 0.02


_PULL_FUNCTIONS = ("pull_objects", "pull_and_inflate_object_from_tree")


def shorten_object_pull_backoff(initial_s: float = OBJECT_PULL_BACKOFF_S) -> bool:
    """Retry an object that is not there yet after `initial_s` instead of Flower's 1 s (then 2 s, 4 s...).

    A message travels as its metadata first and its arrays after, so whoever pulls it (a SuperNode from
    the SuperLink, a ClientApp from its SuperNode, the ServerApp a site's reply) often asks for the arrays
    milliseconds before they land, and Flower then waits a whole second: on loopback that wait alone was
    most of a round's overhead. The retries still double up to Flower's cap, so a slow network is treated
    as before. Flower has no setting for it: this changes the default of `initial_backoff` of two of its
    internal functions (flwr.supercore.inflatable.inflatable_utils, identical in 1.41 and 1.42), in this
    process only. On a Flower where they differ it changes nothing and returns False: rounds work as
    before, a little slower.
    """
    try:
        from flwr.supercore.inflatable import inflatable_utils
    except ImportError:
        return False
    functions = [getattr(inflatable_utils, name, None) for name in _PULL_FUNCTIONS]
    defaults = [getattr(function, "__kwdefaults__", None) or {} for function in functions]
    if not all("initial_backoff" in d for d in defaults):
        return False
    for d in defaults:
        d["initial_backoff"] = initial_s
    return True


@dataclass(frozen=True)
class Probe:
    """What a TLS request to a SuperLink's /health found."""

    status: Literal["ok", "unreachable", "tls-error"]
    detail: str


def probe_superlink(host: str, port: int, ca: Path, timeout: float = 3.0) -> Probe:
    """GET https://host:port/health, verifying the certificate against the CA and the host name.

    Tells apart "not up (yet)" from "up but not the server the CA vouches for" (wrong CA, host name not
    in the certificate, or no TLS at all): the second never fixes itself by waiting.
    """
    target = format_address(host, port)
    try:
        context = ssl.create_default_context(cafile=str(ca))
    except (OSError, ssl.SSLError) as exc:
        return Probe("tls-error", f"cannot use {ca} as the CA certificate: {exc}")
    connection = http.client.HTTPSConnection(host, port, context=context, timeout=timeout)
    try:
        connection.request("GET", "/health")
        response = connection.getresponse()
        if response.status == 200:
            return Probe("ok", f"{target} answered over TLS with a certificate the consortium CA signed")
        return Probe("tls-error", f"{target} answered HTTP {response.status} on /health: is this a Flower SuperLink?")
    except ssl.SSLCertVerificationError as exc:
        return Probe(
            "tls-error",
            f"{target} presented a certificate that {ca} does not vouch for ({exc.verify_message}): "
            "check that this is the consortium's CA certificate and that the address is one the SuperLink "
            "certificate was issued for.",
        )
    except ssl.SSLError as exc:
        return Probe("tls-error", f"TLS with {target} failed ({exc.reason or exc}); is it a TLS SuperLink?")
    except (OSError, http.client.HTTPException) as exc:
        return Probe("unreachable", f"{target} is not reachable ({exc})")
    finally:
        connection.close()
