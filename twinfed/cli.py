"""The `twinfed` command: one place that gathers each package's command group.

* data (omop_etl): `twinfed synth`, `twinfed inspect`
* site node (site_node): `twinfed site ...`
* coordinator (federation): `twinfed coordinator ...`, `twinfed provision ...`, `twinfed study ...`
"""

from __future__ import annotations

import inspect
import os
from typing import Annotated

import typer

from federation.cli import coordinator_app, provision_app
from federation.demo_cli import demo
from federation.study_cli import study_app
from omop_etl.cli import register as register_data_commands
from site_node.cli import site_app

# Third-party telemetry is off unless the operator explicitly turns it on (DESIGN: nothing phones home).
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

app = typer.Typer(
    name="twinfed",
    help="Federated learning for multi-hospital digital twins: FHIR -> OMOP at each hospital, "
    "local differentially private training, Flower aggregation. Patient-level data never leave a site.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)
register_data_commands(app)
app.add_typer(site_app, name="site", rich_help_panel="Hospital site node")
app.add_typer(coordinator_app, name="coordinator", rich_help_panel="Consortium coordinator")
app.add_typer(provision_app, name="provision", rich_help_panel="Consortium coordinator")
app.add_typer(study_app, name="study", rich_help_panel="Consortium coordinator")
app.command("demo", rich_help_panel="Demo")(demo)


def _reflow(text: str) -> str:
    """Join the lines of each paragraph: typer's rich mode keeps a docstring's line breaks, which would
    break sentences in the middle at 80 columns."""
    return "\n\n".join(" ".join(p.split()) for p in inspect.cleandoc(text).split("\n\n"))


def _reflow_help(typer_app: typer.Typer) -> None:
    """Give every command of the tree help text that re-flows to the terminal width."""
    for command in typer_app.registered_commands:
        if command.help is None and command.callback is not None and command.callback.__doc__:
            command.help = _reflow(command.callback.__doc__)
    for group in typer_app.registered_groups:
        if group.typer_instance is not None:
            _reflow_help(group.typer_instance)


_reflow_help(app)


def _version(value: bool) -> None:
    if value:
        from twinfed import __version__

        typer.echo(f"twinfed {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """twinfed command line."""


def main() -> None:
    app()
