"""Run the benchmarks and update docs/benchmarks.md (`make bench`, i.e. `python -m benchmarks.run_all`).

Each benchmark runs as its own process (`python -m benchmarks.<name>`), one after the other, so that one's
memory, threads and child processes never weigh on the next one's timings, and each writes its own
section of docs/benchmarks.md. A failed benchmark is reported and the others still run; the command exits
1 when any failed. The whole set takes hours on a 2-core machine: `--only` and `--skip` choose.

bench_simulation reads the hospitals that `make demo` loaded (demo-output/omop): it runs after the demo
benchmark, and is skipped with a reason when they are not there.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Cheap and independent first; the demo before what reads the demo's hospitals.
ORDER = (
    "bench_synth",
    "bench_vocab",
    "bench_etl",
    "bench_etl_memory",
    "bench_integrity",
    "bench_dp",
    "bench_trajectory_dp",
    "bench_evaluation",
    "bench_calibration",
    "bench_utility",
    "bench_survival",
    "bench_rounds",
    "bench_demo",
    "bench_simulation",
    "bench_patient_twin",
    "bench_twin_whatif",
    "bench_hospital_twin",
    "bench_hospital_backtest",
)
NEEDS_DEMO_HOSPITALS = {"bench_simulation": ROOT / "demo-output" / "omop"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=ORDER, metavar="NAME", help="run only these benchmarks")
    parser.add_argument("--skip", nargs="+", choices=ORDER, default=[], metavar="NAME", help="leave these out")
    args = parser.parse_args(argv)
    chosen = [name for name in ORDER if (not args.only or name in args.only) and name not in args.skip]
    outcomes: list[tuple[str, str, float]] = []
    for number, name in enumerate(chosen, start=1):
        needed = NEEDS_DEMO_HOSPITALS.get(name)
        if needed is not None and not any(needed.glob("*.sqlite")):
            outcomes.append((name, f"skipped: {needed} holds no hospital; run `make demo` first", 0.0))
            continue
        print(f"[{number}/{len(chosen)}] {name}", flush=True)
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", f"benchmarks.{name}"], cwd=ROOT, check=False)
        seconds = time.monotonic() - started
        outcomes.append((name, "done" if done.returncode == 0 else f"FAILED (exit {done.returncode})", seconds))
    print("\n".join(f"{name}: {outcome}" + (f" in {seconds:.0f} s" if seconds else "")
                    for name, outcome, seconds in outcomes))  # fmt: skip
    return 1 if any(outcome.startswith("FAILED") for _, outcome, _ in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
