"""`twinfed site ...`: commands a hospital's IT team runs on the site node."""

from __future__ import annotations

from typing import Annotated

import typer

site_app = typer.Typer(
    help="Run and check a hospital's site node (data stays here; only model updates leave).",
    no_args_is_help=True,
)


@site_app.command("doctor")
def doctor(
    db: Annotated[
        str | None,
        typer.Option(
            "--db", help="OMOP database URL to check, e.g. sqlite:///omop.sqlite or postgresql://user@host/db."
        ),
    ] = None,
) -> None:
    """Check that this machine can run a site node: Python, training and FHIR libraries, Flower, database.

    With --db it also connects to the OMOP database, reports the server version and checks that tables
    can be created (in a transaction that is rolled back, so nothing is left behind). Exits with
    status 1 when a check fails.
    """
    from federation import diagnostics as d
    from site_node.environment import database_check, torch_check

    checks = [
        d.python_version(),
        torch_check(),
        d.package_version("opacus", "differentially private training"),
        d.package_version("fhir.resources", "validating FHIR R4 input"),
        d.package_version("SQLAlchemy", "the OMOP database"),
        d.flower_version(),
        d.executable("flower-supernode", "connecting this site to a consortium"),
        d.telemetry_off(),
    ]
    if db:
        checks.append(database_check(db))
    if not d.render(checks, "Site node check"):
        raise typer.Exit(1)
