"""`twinfed coordinator ...` and `twinfed provision ...`: commands for whoever runs a consortium's coordinator.

`provision` creates the consortium's keys once (and adds hospitals later); `coordinator start` runs the
Flower SuperLink with them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

if TYPE_CHECKING:
    from federation.deploy.provision import Consortium

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
    from federation.common import diagnostics as d

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


provision_app = typer.Typer(
    help="Create and extend a consortium's keys: the CA, the SuperLink's TLS certificate, one key per hospital.",
    no_args_is_help=True,
)

# soft_wrap: paths and fingerprints must stay whole (operators copy and compare them), whatever the width.
out = Console(soft_wrap=True, highlight=False)
ConsortiumDir = Annotated[Path, typer.Argument(help="The consortium folder (holds consortium.yaml and the keys).")]


def _fail(message: str, code: int = 1) -> typer.Exit:
    """Print one error sentence, unwrapped (hospital IT copies paths out of it), and exit."""
    Console(stderr=True, soft_wrap=True).print(message, markup=False, highlight=False)
    return typer.Exit(code)


@provision_app.command("init")
def provision_init(
    folder: Annotated[
        Path, typer.Argument(help="New consortium folder (created; existing keys are never overwritten).")
    ],
    hosts: Annotated[
        list[str],
        typer.Option(
            "--host",
            help="DNS name or IP address hospitals dial to reach the SuperLink; repeat for several. "
            "Goes into the server certificate. 127.0.0.1 is always added (the SuperLink reaches itself there).",
        ),
    ],
    sites: Annotated[
        list[str] | None,
        typer.Option("--site", help="Site id to issue a key bundle for (repeat; more later with add-site)."),
    ] = None,
    name: Annotated[str, typer.Option("--name", help="Consortium name, written into the CA certificate.")] = (
        "twinfed consortium"
    ),
) -> None:
    """Create a consortium: CA, SuperLink certificate and key, one key bundle per site, and consortium.yaml.

    Hand each hospital its folder FOLDER/sites/SITE/ (its private key SITE.key, SITE.pub and ca.crt) over a
    secure channel. A hospital that prefers to keep its private key in-house runs `twinfed site keygen`
    and is added with `twinfed provision add-site FOLDER SITE --public-key SITE.pub` instead.
    """
    from federation.common.keys import ProvisionError
    from federation.deploy.provision import ConsortiumLayout, init_consortium

    try:
        consortium = init_consortium(folder, hosts, sites or [], name=name)
    except ProvisionError as exc:
        raise _fail(str(exc)) from None
    layout = ConsortiumLayout(folder)
    out.print(f"Consortium '{consortium.name}' created in {folder}")
    out.print(f"  CA: {layout.ca_cert} ({consortium.ca_fingerprint}); keep {layout.ca_key} offline if you can")
    out.print(f"  SuperLink certificate for {', '.join(consortium.superlink.hosts)}: {layout.server_cert}")
    _print_sites(consortium)
    out.print(f"Next: `twinfed coordinator start --dir {folder}`; hand each hospital its sites/<site>/ folder.")


@provision_app.command("add-site")
def provision_add_site(
    folder: ConsortiumDir,
    site_id: Annotated[str, typer.Argument(help="The new site's id (the site_id of its site.yaml).")],
    public_key: Annotated[
        Path | None,
        typer.Option(
            "--public-key",
            dir_okay=False,
            help="The site's own public key (SITE.pub from `twinfed site keygen`): no private key is issued.",
        ),
    ] = None,
) -> None:
    """Add one hospital: issue its key bundle, or register the public key it generated itself.

    Only that site's files are written. If the coordinator is running, also run
    `twinfed coordinator register-site FOLDER SITE` (a restart registers every site anyway).
    """
    from federation.common.keys import ProvisionError
    from federation.deploy.provision import add_site

    try:
        issued = add_site(folder, site_id, public_key)
    except ProvisionError as exc:
        raise _fail(str(exc)) from None
    out.print(f"Site {site_id} added to {folder / 'consortium.yaml'} ({issued.entry.fingerprint}).")
    if issued.private_key is not None:
        out.print(f"Hand {issued.folder}/ to the hospital over a secure channel: it holds their private key.")
    else:
        out.print(f"The private key stays at the hospital; send it {issued.folder / 'ca.crt'}.")
    out.print(f"If the coordinator is running: twinfed coordinator register-site {folder} {site_id}")


@provision_app.command("show")
def provision_show(folder: ConsortiumDir) -> None:
    """List the consortium's sites with their key fingerprints (compare them with each hospital's)."""
    from federation.common.keys import ProvisionError
    from federation.deploy.provision import load_consortium

    try:
        consortium = load_consortium(folder)
    except ProvisionError as exc:
        raise _fail(str(exc)) from None
    out.print(
        f"{consortium.name}: CA {consortium.ca_fingerprint}\n"
        f"SuperLink certificate for {', '.join(consortium.superlink.hosts)}"
    )
    _print_sites(consortium)


def _print_sites(consortium: Consortium) -> None:
    from rich.table import Table

    table = Table(
        title=f"Sites ({len(consortium.sites)})", caption="private key: issued by the coordinator, or kept at the site"
    )
    table.add_column("site")
    table.add_column("key fingerprint", no_wrap=True)
    table.add_column("private key")
    table.add_column("added")
    for site in consortium.sites:
        origin = "issued" if site.key_origin == "issued" else "at site"
        table.add_row(site.id, site.fingerprint, origin, site.added_at.date().isoformat())
    Console(width=max(Console().width, 100)).print(table)


@coordinator_app.command("start")
def start(
    folder: Annotated[
        Path, typer.Option("--dir", help="The consortium folder from `twinfed provision init`.", file_okay=False)
    ],
    host: Annotated[
        str, typer.Option(help="Address to listen on: 0.0.0.0 for all interfaces, 127.0.0.1 for this host only.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="The SuperLink's HTTPS port (Fleet and Control API).")] = (
        9092
    ),
) -> None:
    """Start the consortium's Flower SuperLink (TLS, SuperNode authentication) and keep it running.

    Waits until it answers over TLS, registers every site key of consortium.yaml (keys registered before
    are fine), writes the flwr CLI connection 'twinfed' (FLWR_HOME=DIR/flwr-cli), and stays in the
    foreground. Logs go to DIR/superlink/superlink.log, state to DIR/superlink/state.db, and studies write
    under DIR/studies/ (the ServerApp finds DIR in $TWINFED_COORDINATOR_DIR). Ctrl-C or SIGTERM stops the
    SuperLink and everything it started.
    """
    from federation.common.keys import ProvisionError
    from federation.common.processes import DeploymentError
    from federation.deploy.deployment import run_coordinator

    try:
        code = run_coordinator(folder, host, port, say=typer.echo)
    except (DeploymentError, ProvisionError) as exc:
        raise _fail(f"Coordinator not running: {exc}") from None
    raise typer.Exit(code)


@coordinator_app.command("register-site")
def register_site(
    folder: ConsortiumDir,
    site_id: Annotated[str, typer.Argument(help="A site of consortium.yaml (added with `provision add-site`).")],
) -> None:
    """Register one site's key with the running SuperLink, so that site's SuperNode is let in.

    For a site added while the coordinator runs; `coordinator start` registers every site itself.
    Registering a key twice is harmless.
    """
    from federation.common.keys import ProvisionError
    from federation.common.processes import DeploymentError
    from federation.deploy.deployment import register_site as register

    try:
        registration = register(folder, site_id)
    except (DeploymentError, ProvisionError) as exc:
        raise _fail(str(exc)) from None
    if registration.already_registered:
        typer.echo(f"Site {site_id}: key already registered with the SuperLink.")
    else:
        typer.echo(f"Site {site_id}: key registered (node {registration.node_id}).")
