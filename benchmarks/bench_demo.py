"""Benchmark: how long `make demo` takes end to end, and where the time goes (issue 5: under 5 minutes).

Runs the real `make demo` (the Makefile's own steps, into a separate output folder so a user's
demo-output/ is left alone) with `.venv` already set up, timestamps every line it prints as it comes,
and splits the wall time at the lines each step prints first: synthetic consortium and its summary,
FHIR -> OMOP and data quality per hospital, then the consortium (keys, coordinator and site nodes
starting, approvals), the mortality study's rounds, the patient-twin study's rounds, the audits and report
after the consortium stops, and the patient twin one hospital then shows.

`python -m benchmarks.bench_demo [--no-write]`
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.machine import write_section

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = Path(__file__).resolve().parent / "output" / "demo"

# (step name, the first line of that step as `make demo` prints it)
MARKERS = (
    ("synthetic consortium and summary", re.compile(r"twinfed synth ")),
    ("FHIR -> OMOP and data quality, 3 hospitals", re.compile(r"^== .*: FHIR -> OMOP ==")),
    ("consortium start: keys, coordinator, site nodes, approvals", re.compile(r"twinfed demo ")),
    ("mortality study rounds", re.compile(r"starting at round 1")),
    ("patient-twin study rounds", re.compile(r"^Running the patient-twin study")),
    ("consortium stop, audits and report", re.compile(r"^All processes stopped")),
    ("patient twin at one hospital (batch, then one patient)", re.compile(r"^Patient twin at")),
)


@dataclass
class DemoTiming:
    total: float
    steps: list[tuple[str, float]]
    rounds: int
    secure: bool
    exit_code: int


def run_demo() -> DemoTiming:
    shutil.rmtree(OUTPUT, ignore_errors=True)
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    stamped: list[tuple[float, str]] = []
    with subprocess.Popen(
        ["make", "--no-print-directory", "demo", f"DEMO_DIR={OUTPUT}"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    ) as process:
        assert process.stdout is not None
        for line in process.stdout:
            stamped.append((time.monotonic() - started, line.rstrip("\n")))
        code = process.wait()
    total = time.monotonic() - started
    starts: list[tuple[str, float]] = []
    for name, pattern in MARKERS:
        at = next((t for t, line in stamped if pattern.search(line)), None)
        if at is not None:
            starts.append((name, at))
    steps = [(name, (starts[i + 1][1] if i + 1 < len(starts) else total) - at) for i, (name, at) in enumerate(starts)]
    rounds = sum(1 for _, line in stamped if re.match(r"^Round \d+/\d+:", line))
    secure = "secure aggregation" in (OUTPUT / "federation" / "report" / "index.html").read_text(encoding="utf-8")
    return DemoTiming(total, steps, rounds, secure, code)


def report(timing: DemoTiming) -> str:
    minutes, seconds = divmod(round(timing.total), 60)
    lines = [
        "### `make demo` end to end (issue 5: under 5 minutes)",
        "",
        "The real `make demo` with `.venv` already set up (a fresh machine first spends a few minutes "
        "installing it): 3 synthetic hospitals of 2,000 patients, each loaded into its own SQLite OMOP "
        "database and checked, then a coordinator and three site nodes as separate processes over TLS on "
        "loopback running the example mortality study and then the example patient-twin study "
        f"({timing.rounds} rounds in all"
        + (", secure aggregation (SecAgg+)" if timing.secure else "")
        + ", DP-SGD at every site), audits verified at each site, report written, and one hospital's patient "
        "twin of one patient under the example scenarios (`twinfed twin patient`, batch then single).",
        "",
        "| step | seconds |",
        "|---|---|",
    ]
    lines += [f"| {name} | {seconds_:.1f} |" for name, seconds_ in timing.steps]
    lines += [
        f"| **total** | **{timing.total:.1f}** ({minutes} min {seconds} s) |",
        "",
        f"Exit code {timing.exit_code}. Reproduce: `.venv/bin/python -m benchmarks.bench_demo`.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-write", action="store_true", help="print the table; leave docs/benchmarks.md alone")
    args = parser.parse_args(argv)
    timing = run_demo()
    body = report(timing)
    print(body)
    if timing.exit_code != 0:
        raise SystemExit(f"make demo failed with exit code {timing.exit_code}; nothing written")
    if not args.no_write:
        write_section("demo", body)


if __name__ == "__main__":
    main()
