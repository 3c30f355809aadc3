"""Benchmark: how fast the synthetic consortium is generated, and how its time and memory grow with size.

Runs `generate_consortium` in fresh subprocesses (so peak memory is per run) and records wall time,
resources written per second and the peak resident memory of the worker processes. The issue's target:
3 sites x 2,000 patients "in well under a minute" on the 2-core reference machine.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

from benchmarks.machine import write_section

OUTPUT = Path(__file__).resolve().parent / "output" / "synth"

_RUNNER = textwrap.dedent(
    """
    import json, resource, sys, time
    from pathlib import Path
    from synthetic import SynthConfig, generate_consortium
    sites, patients, workers, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    began = time.perf_counter()
    result = generate_consortium(SynthConfig(sites=sites, patients_per_site=patients, seed=7), out, workers=workers)
    seconds = time.perf_counter() - began
    peak_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    peak_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({
        "seconds": seconds,
        "resources": sum(sum(s.lines_by_type.values()) for s in result.sites),
        "stays": sum(s.stays for s in result.sites),
        "bytes": sum(p.stat().st_size for p in out.rglob("*.ndjson")),
        "peak_mib": max(peak_children, peak_self),
    }))
    """
)


def run_case(sites: int, patients: int, workers: int) -> dict:
    out = OUTPUT / f"{sites}x{patients}"
    shutil.rmtree(out, ignore_errors=True)
    completed = subprocess.run(
        [sys.executable, "-c", _RUNNER, str(sites), str(patients), str(workers), str(out)],
        check=True,
        capture_output=True,
        text=True,
    )
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    result.update(sites=sites, patients=patients, workers=workers)
    shutil.rmtree(out, ignore_errors=True)
    return result


def main() -> None:
    cases = [(3, 2000, 2), (1, 500, 1), (1, 2000, 1), (1, 8000, 1)]
    rows = []
    for sites, patients, workers in cases:
        r = run_case(sites, patients, workers)
        rows.append(r)
        print(
            f"{sites} x {patients:>5} patients, {workers} worker(s): {r['seconds']:6.1f} s, "
            f"{r['resources'] / r['seconds']:>9,.0f} resources/s, peak {r['peak_mib']:.0f} MiB"
        )
    table = [
        "| sites x patients | workers | wall time | FHIR resources | resources/s | NDJSON size "
        "| peak memory per process |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        table.append(
            f"| {r['sites']} x {r['patients']:,} | {r['workers']} | {r['seconds']:.1f} s | {r['resources']:,} | "
            f"{r['resources'] / r['seconds']:,.0f} | {r['bytes'] / 2**20:,.0f} MiB | {r['peak_mib']:.0f} MiB |"
        )
    body = (
        "### Synthetic consortium generation (`twinfed synth`, seed 7)\n\n"
        "Target (issue 2): 3 sites x 2,000 patients well under a minute. The export is streamed to disk, so "
        "memory grows with a site's simulation arrays, not with the size of the files written.\n\n"
        + "\n".join(table)
        + "\n\nReproduce: `make bench` (or `.venv/bin/python -m benchmarks.bench_synth`)."
    )
    write_section("synth", body)


if __name__ == "__main__":
    main()
