"""Benchmark: the hospital twin's speed and memory (issue 13), on a 300-bed hospital.

Target: 1,000 replications x 30 days of a 300-bed hospital in under 60 s on 2 cores (replications in
parallel), memory flat in the number of replications. The hospital: a 260-bed general ward and a 40-bed
ICU, emergency and elective arrivals learnt from a year of simulated history (hour of day, weekday,
day-to-day spread), lognormal stays learnt with a tenth still running, transfers both ways, and the wards
about 85% full at the start (and on average). Timed: the whole run as `twinfed twin hospital` does it after learning
(baseline and one +4-bed scenario, paired). Memory: peak resident set of a fresh process running 250,
500 and 1,000 replications, workers included.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np

from benchmarks.machine import write_section

RUNS = 1000
DAYS = 30
MEMORY_RUNS = (250, 500, 1000)


def hospital_plan():
    """A 300-bed hospital's plan, learnt from simulated history as the twin learns a real one."""
    from site_node.hospital_twin.arrivals import fit_arrivals
    from site_node.hospital_twin.config import HospitalConfig
    from site_node.hospital_twin.stays import fit_stays
    from site_node.hospital_twin.twin import ALL_KINDS, HospitalPlan

    rng = np.random.default_rng(0)
    start_day, days = 20089, 365  # 2025-01-01
    clock = 1 + 0.5 * np.sin((np.arange(24) - 8) / 24 * 2 * np.pi)

    def history(per_day: float) -> np.ndarray:
        times = []
        for day in range(days):
            effect = rng.gamma(25.0, 1 / 25.0)
            counts = rng.poisson(per_day / 24 * clock * effect)
            times.extend(day * 24 + h + rng.random(n) for h, n in enumerate(counts) if n)
        return np.concatenate(times)

    def stays(median_h: float, n: int):
        hours = rng.lognormal(np.log(median_h), 0.7, n)
        ended = rng.random(n) > 0.1
        return np.where(ended, hours, hours * rng.random(n)), ended

    arrivals = {
        ("general", "emergency"): fit_arrivals("emergency to general", history(38.0), start_day, days),
        ("general", "elective"): fit_arrivals("elective to general", history(10.0), start_day, days),
        ("icu", "emergency"): fit_arrivals("emergency to icu", history(6.0), start_day, days),
    }
    models = {}
    for ward, median in (("general", 80.0), ("icu", 60.0)):
        for kind in (ALL_KINDS, "emergency", "elective"):
            models[(ward, kind)] = fit_stays(ward, kind, *stays(median, 3000))
    config = HospitalConfig.model_validate({
        "wards": [{"name": "general", "beds": 260, "care_sites": ["HU"],
                   "shifts": [{"start_hour": 22, "end_hour": 7, "staffed_share": 0.95}]},
                  {"name": "icu", "beds": 40, "care_sites": ["ICU"]}],
        "emergency_department": ["ER"],
    })  # fmt: skip
    occupants = tuple(("general", "emergency", float(h)) for h in rng.exponential(60, 220)) + tuple(
        ("icu", "emergency", float(h)) for h in rng.exponential(40, 34)
    )
    return HospitalPlan(config, (start_day + days) * 86400, days, arrivals, models,
                        {"general": {"icu": 0.05}, "icu": {"general": 0.85}}, occupants)  # fmt: skip


def timed_run(runs: int, workers: int, paired: bool) -> dict:
    from site_node.hospital_twin.scenario import HospitalScenario
    from site_node.hospital_twin.twin import run

    plan = hospital_plan()
    plus4 = HospitalScenario.model_validate({"name": "plus4", "changes": [{"change": "beds", "ward": "general",
                                                                            "beds": 264}]})  # fmt: skip
    started = time.perf_counter()
    result = run(plan, DAYS, runs, [plus4] if paired else [], workers=workers)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss + resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    effect = result.effects["plus4"]["boarding_hours"] if paired else None
    q = result.baseline.quantiles(result.baseline.census)
    return {"seconds": seconds, "peak_kib": peak, "boarding_effect": effect.mean if effect else None,
            "interval": effect.interval() if effect else None,
            "day30_general": q[0, -1].tolist(), "day30_icu": q[1, -1].tolist()}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-write", action="store_true", help="print the table; leave docs/benchmarks.md alone")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--paired", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(timed_run(args.child, workers=2, paired=args.paired)))
        return

    def child(runs: int, paired: bool) -> dict:  # a fresh process, so its peak memory is its own
        command = [sys.executable, "-m", "benchmarks.bench_hospital_twin", "--child", str(runs)]
        out = subprocess.run(command + (["--paired"] if paired else []), capture_output=True, text=True, check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        print(runs, paired, result, flush=True)
        return result

    measured = {runs: (child(runs, False), child(runs, True)) for runs in MEMORY_RUNS}
    baseline, full = measured[RUNS]
    seconds = baseline["seconds"]
    rows = "\n".join(
        f"| {runs:,} | {alone['seconds']:.1f} | {paired['seconds']:.1f} | {alone['peak_kib'] / 1024:.0f} | "
        f"{paired['peak_kib'] / 1024:.0f} |" for runs, (alone, paired) in measured.items()
    )
    low, high = full["interval"]
    verdict = "met" if seconds < 60 else "NOT met"
    growth = measured[MEMORY_RUNS[-1]][1]["peak_kib"] / measured[MEMORY_RUNS[0]][1]["peak_kib"]
    body = "\n".join([
        "### Hospital twin: replications of a 300-bed hospital (issue 13)",
        "",
        f"{DAYS} days from a state 85% full, a 260-bed general ward and a 40-bed ICU with arrivals and stays learnt "
        "from a year of simulated history, the baseline alone and with a +4-bed scenario paired (each replication "
        "run twice), "
        f"2 worker processes. Target: {RUNS:,} replications in under 60 s on 2 cores, memory flat in the number of "
        "replications.",
        "",
        "| replications | seconds, baseline | seconds, baseline + scenario | peak MiB, baseline | peak MiB, paired |",
        "|---|---|---|---|---|",
        rows,
        "",
        f"{RUNS:,} replications took {seconds:.1f} s ({full['seconds']:.1f} s with a scenario run beside each, "
        f"paired): the target is {verdict}. "
        f"Peak memory grew {growth:.2f}x from {MEMORY_RUNS[0]:,} to {MEMORY_RUNS[-1]:,} paired replications (a run "
        f"keeps histograms and sums only). Day-30 midnight census, general ward, 2.5/10/50/90/97.5%: "
        f"{full['day30_general']}; ICU: {full['day30_icu']}. Four more general beds change the month's total "
        f"boarding by {full['boarding_effect']:+.0f} hours (95% interval {low:+.0f} to {high:+.0f}). "
        "Reproduce: `.venv/bin/python -m benchmarks.bench_hospital_twin`.",
    ])  # fmt: skip
    print(body)
    if not args.no_write:
        write_section("hospital-twin", body)


if __name__ == "__main__":
    main()
