"""`twinfed coordinator ...`: commands for whoever runs a consortium's coordinator (the Flower SuperLink)."""

from __future__ import annotations

from typing import Annotated

import typer

coordinator_app = typer.Typer(
    help="Run a consortium's coordinator (Flower SuperLink) and check its host.",
    no_args_is_help=True,
)


@coordinator_app.command("doctor")
def doctor(
    host: Annotated[str, typer.Option(help="Address the coordinator will listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port the coordinator will listen on.")] = 8000,
) -> None:
    """Check that this machine can run a coordinator: Flower version and executables, telemetry, free port.

    Exits with status 1 when a check fails, so it can gate a deployment script.
    """
    from federation import diagnostics as d

    checks = [
        d.python_version(),
        d.flower_version(),
        d.executable("flower-superlink", "the coordinator process"),
        d.executable("flwr", "submitting and following runs"),
        d.telemetry_off(),
        d.port_free(host, port, "the coordinator's Fleet/Control API"),
    ]
    if not d.render(checks, "Coordinator host check"):
        raise typer.Exit(1)
