"""The `twinfed` command: one place that gathers each package's command group.

* synthetic data (synthetic): `twinfed synth`
* data (omop_etl): `twinfed inspect`, `etl`, `erase`, `quarantine`, `dq`, `vocab`, `omop`
* site node (site_node): `twinfed site ...`
* coordinator (federation): `twinfed coordinator ...`, `twinfed provision ...`, `twinfed study ...`

No traceback is ever shown to an operator. Commands turn the errors they expect (a bad file, a refused
study) into sentences themselves; anything else that escapes a command is a bug, and `main` prints one
sentence (which command failed, on what kind of error, what to do, where to report it) and exits with
status 70. A traceback, and typer's "pretty" exceptions with local variables in particular, can print a
database password, a site secret or patient values held in a local; `--debug` (or TWINFED_DEBUG=1)
prints the plain traceback, without local variables, for whoever is asked to look.
"""

from __future__ import annotations

import inspect
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Annotated

import click
import typer
from rich.console import Console

from federation.cli import coordinator_app, provision_app
from federation.common.flower import quiet_by_default
from federation.local.demo_cli import demo
from federation.study_cli import study_app
from omop_etl.cli import register as register_data_commands
from site_node.cli import site_app
from site_node.hospital_twin.cli import hospital as hospital_twin
from site_node.patient_twin.cli import twin_app
from synthetic.cli import register as register_synthetic_commands

# Third-party telemetry is off unless the operator explicitly turns it on (DESIGN: nothing phones home).
quiet_by_default()

DEBUG_ENV = "TWINFED_DEBUG"
EXIT_INTERNAL_ERROR = 70  # EX_SOFTWARE (sysexits.h): 1 and 2 keep their meanings (failed, refused input)
REPORT_TO = "the twinfed developers through your consortium's operator"

app = typer.Typer(
    name="twinfed",
    help="Federated learning for multi-hospital digital twins: FHIR -> OMOP at each hospital, "
    "local differentially private training, Flower aggregation. Patient-level data never leave a site.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
    # Off: `main` answers unexpected errors itself, and the locals of a rich traceback can hold secrets.
    pretty_exceptions_enable=False,
    pretty_exceptions_show_locals=False,
)
register_synthetic_commands(app)
register_data_commands(app)
app.add_typer(site_app, name="site", rich_help_panel="Hospital site node")
twin_app.command("hospital")(hospital_twin)
app.add_typer(twin_app, name="twin", rich_help_panel="Hospital site node")
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


class _Session:
    """What the root options decided, for `main` to read after the command has run (or failed)."""

    debug = False


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    debug: Annotated[
        bool,
        typer.Option(
            "--debug",
            envvar=DEBUG_ENV,
            help="On an unexpected error, print the full traceback (no local variables) instead of one sentence; "
            "give it before the command (twinfed --debug site status ...). The traceback may hold paths and "
            f"values from your files: send it only to whoever supports you. Env: {DEBUG_ENV}=1.",
        ),
    ] = False,
) -> None:
    """twinfed command line."""
    _Session.debug = debug


def _debug_requested() -> bool:
    """--debug, or TWINFED_DEBUG set to a true value (the option may not have been parsed when it failed)."""
    return _Session.debug or os.environ.get(DEBUG_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def _command_path(args: Sequence[str]) -> str:
    """`twinfed site consent withdraw` from the arguments: command names only, never their values (an id,
    a path, a URL)."""
    command: click.Command = typer.main.get_command(app)
    words = ["twinfed"]
    context = click.Context(command)
    for arg in args:
        if arg.startswith("-"):
            continue
        if not isinstance(command, click.Group):
            break
        sub = command.get_command(context, arg)
        if sub is None:
            break
        words.append(arg)
        command = sub
    return " ".join(words)


def main(argv: Sequence[str] | None = None) -> None:
    """The `twinfed` console script: run the command; an unexpected error is one sentence, never a traceback."""
    args = list(sys.argv[1:] if argv is None else argv)
    _Session.debug = False
    try:
        app(args=args, prog_name="twinfed")
    except BrokenPipeError:  # the reader went away (`twinfed ... | head`): nothing left to say to anyone
        # Python flushes stdout once more at exit and would report the pipe again (the Python docs' recipe).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except Exception as exc:
        stderr = Console(stderr=True, soft_wrap=True)
        if _debug_requested():
            traceback.print_exception(exc, file=sys.stderr)
        stderr.print(
            f"{_command_path(args)} stopped on an unexpected error ({type(exc).__name__}), a fault in twinfed rather "
            "than something this command knows how to explain: "
            + (
                "the traceback above says where; "
                if _debug_requested()
                else f"run it again with --debug (or {DEBUG_ENV}=1) to see where, and "
            )
            + f"report it to {REPORT_TO}.",
            markup=False,
            highlight=False,
        )
        sys.exit(EXIT_INTERNAL_ERROR)
