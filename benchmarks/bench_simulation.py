"""Benchmark: the example study with many simulated sites in Flower's simulation engine (`twinfed study simulate`).

Question: how long does a round take, and how much memory does the whole simulation hold, as the
consortium grows to tens of sites, on one small machine? Each configuration is one run of
`federation.local.simulation` (the same path as the command): N approved site folders over the hospitals of
`make demo` (demo-output/omop, assigned round-robin), the real ServerApp and ClientApp, Ray with one
CPU per ClientApp. The simulated sites share three OMOP databases, so the AUROC is not the point.

Reproduce: `make demo` (for demo-output/omop), then `.venv/bin/python -m benchmarks.bench_simulation
[--sites 10 50] [--rounds 2]`.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from benchmarks.machine import write_section
from federation.contract import load_study
from federation.local.simulation import (
    SHARED_DATA_NOTE,
    SimulationLayout,
    SimulationSettings,
    hospitals_from,
    prepare_sites,
    run_simulation,
    write_study,
)

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "configs" / "study-inpatient-mortality.yaml"


def run(sites: int, rounds: int, omop_dir: Path, scratch: Path) -> dict:
    spec = load_study(STUDY)
    spec = spec.model_copy(update={"training": spec.training.model_copy(update={"rounds": rounds})})
    layout = SimulationLayout(scratch / f"sites-{sites}")
    layout.prepare()
    write_study(spec, layout.study_file)
    site_list = prepare_sites(layout, sites, hospitals_from([], [], omop_dir), None)
    return run_simulation(spec, layout, site_list, SimulationSettings(sites=sites, run_name="simulation"))


def _f(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--omop-dir", type=Path, default=ROOT / "demo-output" / "omop")
    args = parser.parse_args()
    rows = [
        "| simulated sites | round | trained | round s | train exchange s | slowest site s | s per site "
        "| peak RSS MiB | peak PSS MiB | processes |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    totals = []
    with tempfile.TemporaryDirectory(prefix="twinfed-bench-simulation-") as scratch:
        for sites in args.sites:
            report = run(sites, args.rounds, args.omop_dir, Path(scratch))
            for row in report["rounds"]:
                rows.append(
                    f"| {sites} | {row['round']} | {row['trained_sites']} | {_f(row['seconds'])} "
                    f"| {_f(row['train_seconds'])} | {_f(row['slowest_site_seconds'])} "
                    f"| {row['seconds'] / sites:.2f} | {_f(row['peak_rss_mib'])} | {_f(row['peak_pss_mib'])} "
                    f"| {row['processes']} |"
                )
            peak = report["peak"]
            totals.append(
                f"{sites} sites: whole run {report['run_seconds']:.0f} s, peak {_f(peak['peak_pss_mib'])} MiB PSS "
                f"/ {_f(peak['peak_rss_mib'])} MiB RSS over {peak['processes']} processes ({report['status']})"
            )
            print(totals[-1], flush=True)
    hospitals = ", ".join(sorted(p.stem for p in args.omop_dir.glob("*.sqlite")))
    write_section(
        "simulation",
        f"`twinfed study simulate`: the example study ({args.rounds} rounds, 2 local epochs, DP-SGD) with N "
        f"simulated sites in Flower's simulation engine (Ray), one CPU per ClientApp, so two ClientApps run "
        f"at once on {os.cpu_count()} cores. Sites read the `make demo` hospitals ({hospitals}) round-robin. "
        "'round s' is the round's wall time at the coordinator (train exchange, aggregation, checkpoint, and "
        "in the last round the one test evaluation); 'train exchange s' the train exchange alone; 'slowest site "
        "s' the last site's answer in it (queueing behind other sites included: Ray runs two at a time). "
        "Memory is the sum over the "
        "simulation's processes (SuperLink, simulation process, Ray, its ClientApp workers, flwr CLI), "
        "sampled from /proc every 0.5 s; RSS counts shared pages in every process, PSS splits them. "
        "Round 1 includes starting Ray's ClientApp actors (importing torch in each).\n\n"
        + "\n".join(rows)
        + "\n\n"
        + "\n".join(f"- {line}" for line in totals)
        + f"\n\n{SHARED_DATA_NOTE}\n\nReproduce: `make demo`, then `.venv/bin/python -m benchmarks.bench_simulation`.",
    )


if __name__ == "__main__":
    main()
