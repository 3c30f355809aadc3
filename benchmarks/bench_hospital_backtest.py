"""Benchmark: the hospital twin backtested on the synthetic hospitals (issue 13).

Each hospital of a synthetic consortium is generated, loaded by the ETL, and read by the twin as any OMOP
database; then, from the first of each of six past months, the twin learns from the history as it stood
that day and simulates the next 30 days (300 replications), and the real midnight census of each day is
compared with the bands. Targets: the 80% and 95% bands of daily census cover within 5 points of nominal;
census MAE under 5% of beds. The hospitals are generated without capacity (the generator's default; the
operational ones, with beds and boarding, are bench_hospital_operations'), so the wards are given more beds
than the history ever filled: this measures the arrivals and length-of-stay models, not boarding.
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.machine import write_section

PATIENTS = 12_000
SITES = 2
STARTS = [dt.date(2025, month, 1) for month in (3, 5, 7, 8, 10, 11)]
DAYS = 30
RUNS = 300


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-write", action="store_true", help="print the table; leave docs/benchmarks.md alone")
    parser.add_argument("--patients", type=int, default=PATIENTS)
    args = parser.parse_args(argv)
    from omop_etl.load.pipeline import EtlSettings, run_etl
    from site_node.cohort.omop_source import OmopSource
    from site_node.hospital_twin.backtest import actual_census, compare
    from site_node.hospital_twin.config import HospitalConfig
    from site_node.hospital_twin.history import DAY_S, read_ward_stays
    from site_node.hospital_twin.twin import learn, run
    from synthetic import SynthConfig, generate_consortium

    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="twinfed-backtest-"))
    rows, cover80, cover95, shares = [], [], [], []
    try:
        generate_consortium(SynthConfig(sites=SITES, patients_per_site=args.patients, seed=11), work / "consortium")
        for site_dir in sorted(p for p in (work / "consortium").iterdir() if (p / "fhir").is_dir()):
            url = f"sqlite:///{work / (site_dir.name + '.sqlite')}"
            run_etl([site_dir / "fhir"], EtlSettings(db_url=url, secret_file=work / f"{site_dir.name}.secret"))
            probe = HospitalConfig.model_validate({"wards": [{"name": "general", "beds": 5000, "care_sites": ["HU"]},
                                                             {"name": "icu", "beds": 5000, "care_sites": ["ICU"]}],
                                                   "emergency_department": ["ER"]})  # fmt: skip
            with OmopSource.open(url) as source:
                history = read_ward_stays(source, probe)
            days = np.arange(int(history.stays.start_s.min() // DAY_S), int(history.data_end_s // DAY_S))
            peak = actual_census(history, ["general", "icu"], int(days[0]) * DAY_S, len(days)).max(axis=1)
            beds = [max(4, int(np.ceil(p * 1.25))) for p in peak]  # more beds than the history ever filled
            config = HospitalConfig.model_validate({
                "wards": [{"name": "general", "beds": beds[0], "care_sites": ["HU"]},
                          {"name": "icu", "beds": beds[1], "care_sites": ["ICU"]}],
                "emergency_department": ["ER"]})  # fmt: skip
            for start in STARTS:
                at = int(dt.datetime(start.year, start.month, start.day, tzinfo=dt.UTC).timestamp())
                plan = learn(history, config, at)
                result = run(plan, DAYS, RUNS, seed=1, workers=2)
                report = compare(result.baseline, actual_census(history, ["general", "icu"], at, DAYS), beds,
                                 plan.at)  # fmt: skip
                for ward in report.wards:
                    rows.append((site_dir.name, start, ward))
                    cover80.append(ward.coverage_80)
                    cover95.append(ward.coverage_95)
                    shares.append(ward.census_mae_share_of_beds)
                print(site_dir.name, start, [(w.ward, w.coverage_80, w.coverage_95, w.census_mae_share_of_beds)
                                             for w in report.wards], flush=True)  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = "\n".join(
        f"| {site} | {start:%Y-%m-%d} | {w.ward} ({w.beds} beds) | {w.coverage_80:.0%} | {w.coverage_95:.0%} | "
        f"{w.census_mae_share_of_beds:.1%} | {np.mean(w.actual_census):.1f} |"
        for site, start, w in rows
    )
    c80, c95, mae = float(np.mean(cover80)), float(np.mean(cover95)), float(np.mean(shares))
    met80, met95, met_mae = abs(c80 - 0.80) <= 0.05, abs(c95 - 0.95) <= 0.05, mae < 0.05
    body = "\n".join([
        "### Hospital twin backtest on the synthetic hospitals (issue 13)",
        "",
        f"{SITES} synthetic hospitals x {args.patients:,} patients (seed 11), ETL-loaded; from the first of each of "
        f"{len(STARTS)} months of 2025 the twin learns from the history as it stood then and simulates {DAYS} days "
        f"({RUNS} replications); the real midnight census of days 2-{DAYS} against the bands. The hospitals are "
        "generated without capacity, so each ward has a quarter more beds than the history ever filled: this "
        "checks the arrivals and length-of-stay models, not boarding. Targets: 80% and 95% bands within 5 points "
        "of nominal, census MAE under 5% of beds.",
        "",
        "| hospital | start | ward | inside 80% band | inside 95% band | MAE, share of beds | mean census |",
        "|---|---|---|---|---|---|---|",
        table,
        "",
        f"Over every hospital, start and ward: {c80:.0%} inside the 80% band ({'met' if met80 else 'NOT met'}), "
        f"{c95:.0%} inside the 95% band ({'met' if met95 else 'NOT met'}), census MAE {mae:.1%} of beds "
        f"({'met' if met_mae else 'NOT met'}; these wards hold tens of patients, where one patient is several "
        f"percent of the beds). Total {time.perf_counter() - started:.0f} s. Reproduce: "
        "`.venv/bin/python -m benchmarks.bench_hospital_backtest`.",
    ])  # fmt: skip
    print(body)
    if not args.no_write:
        write_section("hospital-backtest", body)


if __name__ == "__main__":
    main()
