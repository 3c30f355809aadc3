"""`twinfed demo`: the federated half of `make demo` (a consortium of local processes on loopback)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console(soft_wrap=True, highlight=False)


def demo(
    omop: Annotated[
        Path, typer.Option("--omop", file_okay=False, help="Folder of <site>.sqlite OMOP databases and <site>.secret.")
    ] = Path("demo-output/omop"),
    out: Annotated[Path, typer.Option("--out", help="Folder for keys, site files, logs and the report.")] = Path(
        "demo-output/federation"
    ),
    study: Annotated[Path, typer.Option("--study", dir_okay=False, help="The study to run.")] = Path(
        "configs/study-inpatient-mortality.yaml"
    ),
    twin_study: Annotated[
        Path | None,
        typer.Option("--twin-study", dir_okay=False, help="A patient-twin (trajectory) study to train next and show."),
    ] = None,
    scenarios: Annotated[
        Path, typer.Option("--scenarios", dir_okay=False, help="The what-if scenarios the patient twin is asked.")
    ] = Path("configs/scenario-example.yaml"),
    hospital: Annotated[
        Path | None,
        typer.Option("--hospital", dir_okay=False, help="A site file's `hospital:` section (wards, beds, care sites) "
                     "for the first hospital, whose hospital twin is then shown."),
    ] = None,
    hospital_scenarios: Annotated[
        Path, typer.Option("--hospital-scenarios", dir_okay=False, help="The what-ifs the hospital twin is asked.")
    ] = Path("configs/hospital-scenario-example.yaml"),
    exports: Annotated[
        Path,
        typer.Option("--exports", file_okay=False, help="The hospitals' exports (<site>/fhir/Patient.ndjson): the "
                     "patient twin names its patient by the hospital's own id."),
    ] = Path("demo-output/consortium"),
) -> None:
    """Run a whole consortium on this machine: keys, coordinator, one site node per hospital, the study.

    Every part runs as its own `twinfed` process talking TLS on loopback, exactly as hospital IT and a
    consortium start them: `provision init`, `site init`, `site approve` (each hospital's data steward),
    `coordinator start`, `site start`, `study run`, then `site audit verify` at every hospital. Writes
    OUT/report/index.html (model card with plots, receipts, audit results). Ctrl-C stops every process.

    With --twin-study, each steward also approves that study and allows its twin queries, the consortium
    trains it next, and one hospital then runs `twinfed twin patient` on one of its patients under the
    --scenarios: the table is printed, and the report links to the plot kept in that site's folder.

    With --hospital, the first hospital's site file gets that `hospital:` section and, at the end, its
    `twinfed twin hospital` runs the next 30 days under --hospital-scenarios; the report links its page.
    """
    from federation.local.demo import DemoError, HospitalDemo, TwinDemo, run_demo

    twin = TwinDemo(twin_study.resolve(), scenarios.resolve(), exports.resolve()) if twin_study else None
    beds = HospitalDemo(hospital.resolve(), hospital_scenarios.resolve()) if hospital else None
    try:
        run_demo(omop.resolve(), out.resolve(), study.resolve(), say=console.print, twin=twin, hospital_demo=beds)
    except DemoError as exc:
        Console(stderr=True, soft_wrap=True).print(f"Demo failed: {exc}", markup=False, highlight=False)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        Console(stderr=True).print("Interrupted: every demo process was stopped.")
        raise typer.Exit(130) from None
