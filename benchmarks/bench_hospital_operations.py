"""Benchmark: the hospital twin on operational synthetic hospitals, against what happened and against the
true effect of the standard scenarios (issue 13's backtest and what-if targets).

The three synthetic hospitals are generated with beds (synthetic/operations.py: emergency arrivals by hour,
weekday and season with surges, electives on weekday mornings, boarding in the emergency department while a
ward is full, blocked transfers, a discharge window, fewer staffed beds at night), each ward sized to about
`OCCUPANCY` of its staffed beds from the site's own demand (a small pre-run at `SIZING_PATIENTS` patients,
scaled), then loaded by the ETL and read by the twin as any OMOP database.

* Backtest: from the first of each of six months of 2025 the twin learns from the history as it stood that
  day and simulates the next 30 days; the real midnight census of days 2-30 against its 80% and 95% bands,
  and the median's error as a share of the beds. Targets: coverage within 5 points of nominal, MAE under 5%
  of beds. Beside it, the same with length of stay by case mix (site_node/hospital_twin/case_mix.py): the
  consortium's length-of-stay study trained federated at epsilon 3 on stays before the first start.
* What-if: from the start of the ground truth's scenario window, the twin's paired effect of each standard
  scenario (+4 ward beds; 15% fewer staffed beds at night; 20% more emergency arrivals over the window) on
  patients who waited for a bed, hours waited and the mean midnight census, against the true expected effect
  (the generator's re-simulation of the same hospital with common random numbers, its own replicates). Target:
  the true effect inside the twin's 95% interval.
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.machine import save_figure, write_section

PATIENTS = 12_000
SIZING_PATIENTS = 2_000
OCCUPANCY = 0.85  # occupied share of the staffed beds in the busiest PEAK_DAYS the wards are sized to
PEAK_DAYS = 90
DISCHARGE_WAITS = 1.1  # bed-days a discharge window adds to the clinical courses' (measured without capacity)
STARTS = [dt.date(2025, month, 1) for month in (3, 5, 6, 8, 9, 10)]
DAYS = 30
RUNS = 300
WHATIF_RUNS = 1000
TRUTH_REPLICATES = 200
EPSILON = 3.0
LOS_STUDY = Path(__file__).resolve().parents[1] / "configs" / "study-length-of-stay.yaml"
PLOT = Path(__file__).resolve().parents[1] / "docs" / "img" / "hospital-whatif.png"
FAN = Path(__file__).resolve().parents[1] / "docs" / "img" / "hospital-backtest.png"
# the twin's effect -> the ground truth's metric of the same thing
METRICS = {"boarded": "boarded", "boarding_hours": "boarding_hours", "mean_census": "mean_midnight_census_all"}


def _demand(site_dir: Path, history_start: dt.date, export: dt.date) -> dict[str, float]:
    """Occupied beds per ward (HU: the general ward, ICU) in a generated site's busiest PEAK_DAYS, from its FHIR
    Encounters' location periods (a site without capacity: every stay got its bed at once). The busiest period,
    not the mean: the synthetic population is closed (admissions fall year by year) and seasonal, and a
    hospital's beds are set for its busy months."""
    import orjson

    def local(instant: str) -> float:
        return dt.datetime.fromisoformat(instant[:19]).replace(tzinfo=dt.UTC).timestamp()

    def resources(name: str):
        for line in (site_dir / "fhir" / f"{name}.ndjson").read_bytes().splitlines():
            try:
                resource = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue  # an injected defect
            if isinstance(resource, dict) and resource.get("resourceType") == name:
                yield resource

    kinds = {r["id"]: r["type"][0]["coding"][0]["code"] for r in resources("Location")}
    start_s, end_s = local(f"{history_start.isoformat()}T00:00:00"), local(f"{export.isoformat()}T00:00:00")
    days = int((end_s - start_s) // 86400)
    occupied = {"ward": np.zeros(days), "icu": np.zeros(days)}  # bed-days per day
    for encounter in resources("Encounter"):
        for entry in encounter.get("location", []):
            ward = {"HU": "ward", "ICU": "icu"}.get(kinds.get(entry["location"]["reference"].split("/")[-1], ""))
            if ward:
                period = entry["period"]
                a = (local(period["start"]) - start_s) / 86400
                b = ((local(period["end"]) if "end" in period else end_s) - start_s) / 86400
                for day in range(max(0, int(a)), min(days, int(np.ceil(b)))):
                    occupied[ward][day] += min(b, day + 1) - max(a, day)
    window = np.ones(PEAK_DAYS) / PEAK_DAYS
    return {ward: float(np.convolve(series, window, mode="valid").max()) for ward, series in occupied.items()}


def _sized_profiles(work: Path):
    """The built-in profiles with an operations block whose wards hold PATIENTS at about OCCUPANCY of their
    staffed beds in their busiest months: each site's demand measured on a smaller run without capacity,
    scaled to PATIENTS, with an allowance for the discharge window's waits."""
    from synthetic import SynthConfig, generate_consortium
    from synthetic.config import BUILTIN_PROFILES, OperationsProfile, WardCapacity

    base = OperationsProfile(truth_replicates=TRUTH_REPLICATES)
    config = SynthConfig(sites=3, patients_per_site=SIZING_PATIENTS, seed=7, counterfactual_stays=0)
    generate_consortium(config, work / "sizing")
    night = set(base.night_hours())

    def staffed(ward: str, beds: int) -> float:  # the mean staffed beds, by the twin's and the generator's rule
        share = getattr(base, ward).night_staffed_share
        return float(np.mean([max(1, int(np.floor(beds * (share if h in night else 1.0) + 1e-9))) for h in range(24)]))
    profiles = []
    for profile in BUILTIN_PROFILES[:3]:
        demand = _demand(work / "sizing" / profile.site_id, config.history_start, config.export_date)
        scale = PATIENTS / SIZING_PATIENTS
        beds = {}
        for ward, load in demand.items():
            beds[ward] = 2
            while load * scale * DISCHARGE_WAITS > OCCUPANCY * staffed(ward, beds[ward]):
                beds[ward] += 1
        ops = base.model_copy(update={"ward": WardCapacity(beds=beds["ward"],
                                                            night_staffed_share=base.ward.night_staffed_share),
                                      "icu": WardCapacity(beds=beds["icu"])})  # fmt: skip
        profiles.append(profile.model_copy(update={"operations": ops}))
        print(profile.site_id, "demand at", SIZING_PATIENTS, demand, "beds", beds, flush=True)
    shutil.rmtree(work / "sizing", ignore_errors=True)
    return profiles


def _hospital_config(ops):
    from site_node.hospital_twin.config import HospitalConfig

    night = {"start_hour": ops.night_start_hour, "end_hour": ops.night_end_hour}
    wards = [{"name": "general", "beds": ops.ward.beds, "care_sites": ["HU"],
              "shifts": [{**night, "staffed_share": ops.ward.night_staffed_share}]
              if ops.ward.night_staffed_share < 1 else []},
             {"name": "icu", "beds": ops.icu.beds, "care_sites": ["ICU"],
              "shifts": [{**night, "staffed_share": ops.icu.night_staffed_share}]
              if ops.icu.night_staffed_share < 1 else []}]  # fmt: skip
    return HospitalConfig.model_validate({"wards": wards, "emergency_department": ["ER"]})


def _scenarios(general_beds: int, ops):
    from site_node.hospital_twin.scenario import HospitalScenario

    return [
        HospitalScenario.model_validate(s)
        for s in (
            {"name": "plus_4_ward_beds", "changes": [{"change": "beds", "ward": "general", "beds": general_beds + 4}]},
            {"name": "night_staffing_minus_15pct", "changes": [
                {"change": "staffing", "start_hour": ops.night_start_hour, "end_hour": ops.night_end_hour,
                 "factor": 0.85}]},
            {"name": "emergency_arrivals_plus_20pct", "changes": [
                {"change": "arrivals", "kind": "emergency", "factor": 1.2, "from_day": 0, "to_day": DAYS}]},
        )
    ]  # fmt: skip


def _midnight(day: dt.date) -> int:
    return int(dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp())


def _los_weights(sites: dict) -> dict:
    """The length-of-stay study trained federated at EPSILON on each hospital's stays indexed before the
    first backtest start (a temporal split, so no backtest month is in its training data)."""
    from benchmarks import bench_survival
    from federation.contract import StudySpec, load_study
    from site_node.cohort import build_dataset

    data = load_study(LOS_STUDY).model_dump(mode="json")
    data["evaluation"]["split"] = {"kind": "temporal", "test_from": STARTS[0].isoformat()}
    spec = StudySpec.model_validate(data)
    datasets = {name: build_dataset(s["url"], spec, split_key=s["key"]) for name, s in sites.items()}
    states = bench_survival._train(spec, datasets, "federated", EPSILON, seed=0)
    sizes = {name: int((d.split == "train").sum()) for name, d in datasets.items()}
    print("length-of-stay training patients", sizes, flush=True)
    return next(iter(states.values())), sizes


def _backtests(name: str, site: dict, weights: dict | None) -> list[dict]:
    from federation.contract import load_study
    from site_node.cohort.omop_source import OmopSource
    from site_node.hospital_twin.backtest import actual_census, compare
    from site_node.hospital_twin.case_mix import occupant_factors
    from site_node.hospital_twin.twin import learn, run

    config, history, wards = site["config"], site["history"], ["general", "icu"]
    beds = [w.beds for w in config.wards]
    spec = load_study(LOS_STUDY)
    out = []
    for start in STARTS:
        at = _midnight(start)
        real = actual_census(history, wards, at, DAYS)
        row = {"site": name, "start": start}
        for arm in ("own", "case mix"):
            factors = None
            if arm == "case mix":
                running = history.as_of(at).occupants(at)
                with OmopSource.open(site["url"]) as source:
                    factors = occupant_factors(source, site["url"], None, spec, weights,
                                               [int(v) for v in running.visit], at).factors  # fmt: skip
            plan = learn(history, config, at, stay_factors=factors)
            result = run(plan, DAYS, RUNS, seed=1, workers=2)
            report = compare(result.baseline, real, beds, plan.at)
            row[arm] = report
            if name == "aster-university" and start == STARTS[2] and arm == "own":
                row["bands"] = (result.baseline.quantiles(result.baseline.census), real)
        out.append(row)
        print(name, start, {arm: [(w.ward, w.coverage_80, w.coverage_95, round(w.census_mae_share_of_beds, 3))
                                  for w in row[arm].wards] for arm in ("own", "case mix")}, flush=True)  # fmt: skip
    return out


def _whatif(name: str, site: dict) -> tuple[list[dict], dict[str, float]]:
    from site_node.hospital_twin.twin import learn, run

    truth = site["truth"]
    start = dt.date.fromisoformat(truth.window_start[:10])
    at = _midnight(start)
    plan = learn(site["history"], site["config"], at)
    scenarios = _scenarios(site["config"].wards[0].beds, site["ops"])
    result = run(plan, DAYS, WHATIF_RUNS, scenarios, seed=1, workers=2)
    rows = []
    for scenario in scenarios:
        true = truth.scenarios[scenario.name].expected.metrics
        for effect, metric in METRICS.items():
            paired = result.effects[scenario.name][effect]
            low, high = paired.interval()
            t = true[metric]
            rows.append({"site": name, "scenario": scenario.name, "metric": effect, "twin": paired.mean,
                         "twin_low": low, "twin_high": high, "truth": t.effect,
                         "truth_low": t.ci95[0], "truth_high": t.ci95[1], "truth_baseline": t.baseline,
                         "inside": low <= t.effect <= high, "agree": _agree(paired.mean, low, high, t)})  # fmt: skip
    base = result.baseline
    print(name, "what-if from", start, [(r["scenario"], r["metric"], round(r["twin"], 2), round(r["truth"], 2),
                                         r["inside"]) for r in rows], flush=True)  # fmt: skip
    return rows, {"twin_boarded": float(base.boarded.sum() / base.runs),
                  "twin_boarding_hours": float(base.boarding_hours.sum() / base.runs),
                  "truth_boarded": true_baseline(truth, "boarded"),
                  "truth_boarding_hours": true_baseline(truth, "boarding_hours")}  # fmt: skip


def _agree(twin: float, low: float, high: float, truth) -> bool:
    """The two Monte-Carlo estimates agree: their difference within 1.96 joint standard errors."""
    joint = np.hypot((high - low) / 3.92, (truth.ci95[1] - truth.ci95[0]) / 3.92)
    return bool(abs(twin - truth.effect) <= 1.96 * joint)


def true_baseline(truth, metric: str) -> float:
    return float(next(iter(truth.scenarios.values())).expected.metrics[metric].baseline)


def _plots(whatif: list[dict], bands) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(METRICS), figsize=(14, 4.2))
    labels = sorted({(r["site"], r["scenario"]) for r in whatif})
    for axis, metric in zip(axes, METRICS, strict=True):
        for y, key in enumerate(labels):
            (r,) = [r for r in whatif if (r["site"], r["scenario"]) == key and r["metric"] == metric]
            axis.errorbar(r["twin"], y + 0.12, xerr=[[r["twin"] - r["twin_low"]], [r["twin_high"] - r["twin"]]],
                          fmt="o", color="tab:blue", label="twin" if y == 0 else None)  # fmt: skip
            axis.errorbar(r["truth"], y - 0.12, xerr=[[r["truth"] - r["truth_low"]], [r["truth_high"] - r["truth"]]],
                          fmt="s", color="tab:orange", label="truth" if y == 0 else None)  # fmt: skip
        axis.axvline(0, color="grey", linewidth=0.8)
        names = [f"{s}\n{c}" for s, c in labels] if metric == "boarded" else [""] * len(labels)
        axis.set_yticks(range(len(labels)), names, fontsize=6)
        axis.set_title(f"effect on {metric} (95% intervals)", fontsize=9)
        axis.legend(fontsize=7)
    save_figure(figure, PLOT)
    quantiles, real = bands
    figure, axes = plt.subplots(1, 2, figsize=(12, 3.6))
    for w, (axis, ward) in enumerate(zip(axes, ("general", "icu"), strict=True)):
        days = np.arange(quantiles.shape[1])
        axis.fill_between(days, quantiles[w, :, 0], quantiles[w, :, 4], color="tab:blue", alpha=0.18, label="95%")
        axis.fill_between(days, quantiles[w, :, 1], quantiles[w, :, 3], color="tab:blue", alpha=0.35, label="80%")
        axis.plot(days, quantiles[w, :, 2], color="tab:blue", label="median")
        axis.plot(days, real[w], color="black", marker=".", label="what happened")
        axis.set_title(f"{ward}: midnight census, backtest from {STARTS[2]:%Y-%m-%d}", fontsize=9)
        axis.set_xlabel("day")
        axis.legend(fontsize=7)
    save_figure(figure, FAN)


def main(argv: list[str] | None = None) -> None:
    global PATIENTS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-write", action="store_true", help="print the tables; leave docs/benchmarks.md alone")
    parser.add_argument("--patients", type=int, default=PATIENTS)
    args = parser.parse_args(argv)
    PATIENTS = args.patients
    from omop_etl.load.pipeline import EtlSettings, run_etl
    from site_node.cohort.omop_source import OmopSource
    from site_node.config import derive_split_key
    from site_node.hospital_twin.history import read_ward_stays
    from synthetic import SynthConfig, generate_consortium
    from synthetic.ground_truth import SiteGroundTruth

    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="twinfed-operations-"))
    try:
        profiles = _sized_profiles(work)
        consortium = work / "consortium"
        generate_consortium(SynthConfig(sites=3, patients_per_site=PATIENTS, seed=7, profiles=profiles), consortium)
        sites = {}
        for profile in profiles:
            url = f"sqlite:///{work / (profile.site_id + '.sqlite')}"
            secret = work / f"{profile.site_id}.secret"
            run_etl([consortium / profile.site_id / "fhir"], EtlSettings(db_url=url, secret_file=secret))
            truth = SiteGroundTruth.model_validate_json((consortium / "ground-truth" / f"{profile.site_id}.json")
                                                        .read_text(encoding="utf-8")).operations  # fmt: skip
            config = _hospital_config(profile.operations)
            with OmopSource.open(url) as source:
                history = read_ward_stays(source, config)
            sites[profile.site_id] = {"url": url, "key": derive_split_key(secret), "config": config,
                                      "history": history, "truth": truth, "ops": profile.operations}  # fmt: skip
            print(profile.site_id, truth.summary, flush=True)
        generated = time.perf_counter() - started
        weights, los_sizes = _los_weights(sites)
        backtests = [row for name, site in sites.items() for row in _backtests(name, site, weights)]
        whatif, baselines = [], {}
        for name, site in sites.items():
            rows, baselines[name] = _whatif(name, site)
            whatif += rows
        bands = next(r["bands"] for r in backtests if "bands" in r)
        _plots(whatif, bands)
        body = _body(sites, backtests, whatif, baselines, los_sizes, generated, time.perf_counter() - started)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(body)
    if not args.no_write:
        write_section("hospital-operations", body)


def _body(sites, backtests, whatif, baselines, los_sizes, generated: float, total: float) -> str:
    lines = [
        "### Hospital twin on operational synthetic hospitals: backtest and what-if against the truth (issue 13)",
        "",
        f"3 synthetic hospitals x {PATIENTS:,} patients with beds (synthetic/operations.py), wards sized to about "
        f"{OCCUPANCY:.0%} of their staffed beds in each site's busiest {PEAK_DAYS} days (measured without capacity, "
        f"x{DISCHARGE_WAITS:g} for the discharge window's waits); ETL-loaded and read by the twin as any OMOP "
        f"database (generation and loading {generated:.0f} s).",
        "",
        "| hospital | ward beds / ICU beds | emergency admissions boarded | mean boarding, h (when boarded) |",
        "|---|---|---|---|",
    ]
    for name, site in sites.items():
        s = site["truth"].summary
        lines.append(f"| {name} | {site['ops'].ward.beds} / {site['ops'].icu.beds} | "
                     f"{s['share_emergency_boarded']:.0%} | {s['mean_boarding_hours_emergency']:.1f} "
                     f"({s['mean_boarding_hours_when_boarded']:.1f}) |")  # fmt: skip
    lines += [
        "",
        f"**Backtest** ({len(STARTS)} starts in 2025, {DAYS} days, {RUNS} replications; days 2-{DAYS}). \"own\": the "
        "twin's own curves; \"case mix\": plus the occupants' stay factors from the length-of-stay study trained "
        f"federated at epsilon {EPSILON:g} on stays before {STARTS[0]:%Y-%m-%d} "
        f"({', '.join(f'{k} {v:,}' for k, v in los_sizes.items())} training patients).",
        "",
        "| hospital | ward | inside 80% band (own / case mix) | inside 95% band | census MAE, share of beds |",
        "|---|---|---|---|---|",
    ]
    summary = {}
    for arm in ("own", "case mix"):
        wards = [w for row in backtests for w in row[arm].wards]
        summary[arm] = (np.mean([w.coverage_80 for w in wards]), np.mean([w.coverage_95 for w in wards]),
                        np.mean([w.census_mae_share_of_beds for w in wards]))  # fmt: skip
    for name in sites:
        for ward in ("general", "icu"):
            cells = {}
            for arm in ("own", "case mix"):
                ws = [w for row in backtests if row["site"] == name for w in row[arm].wards if w.ward == ward]
                cells[arm] = (np.mean([w.coverage_80 for w in ws]), np.mean([w.coverage_95 for w in ws]),
                              np.mean([w.census_mae_share_of_beds for w in ws]), ws[0].beds)  # fmt: skip
            o, c = cells["own"], cells["case mix"]
            lines.append(f"| {name} | {ward} ({o[3]} beds) | {o[0]:.0%} / {c[0]:.0%} | {o[1]:.0%} / {c[1]:.0%} | "
                         f"{o[2]:.1%} / {c[2]:.1%} |")  # fmt: skip
    o, c = summary["own"], summary["case mix"]
    verdict = {arm: (abs(v[0] - 0.8) <= 0.05, abs(v[1] - 0.95) <= 0.05, v[2] < 0.05) for arm, v in summary.items()}

    def said(ok: bool) -> str:
        return "met" if ok else "NOT met"

    lines += [
        "",
        f"Over every hospital, start and ward, own curves: {o[0]:.0%} inside the 80% band ({said(verdict['own'][0])}), "
        f"{o[1]:.0%} inside the 95% band ({said(verdict['own'][1])}), census MAE {o[2]:.1%} of beds "
        f"({said(verdict['own'][2])}); with case mix: {c[0]:.0%}, {c[1]:.0%}, {c[2]:.1%}.",
        "",
        "![backtest fan chart](img/hospital-backtest.png)",
        "",
        f"**What-if** (from each ground truth's window start, {DAYS} days, {WHATIF_RUNS} paired replications; truth: "
        f"the generator's re-simulation with common random numbers, {TRUTH_REPLICATES} replicates; effect = scenario "
        "minus baseline over the window).",
        "",
        "| hospital | scenario | effect on | twin (95% interval) | truth (95% interval) | inside twin's | agree |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in whatif:
        lines.append(f"| {r['site']} | {r['scenario']} | {r['metric']} | {r['twin']:.2f} ({r['twin_low']:.2f} to "
                     f"{r['twin_high']:.2f}) | {r['truth']:.2f} ({r['truth_low']:.2f} to {r['truth_high']:.2f}) | "
                     f"{'yes' if r['inside'] else 'no'} | {'yes' if r['agree'] else 'no'} |")  # fmt: skip
    inside, agree = sum(r["inside"] for r in whatif), sum(r["agree"] for r in whatif)
    lines += [
        "",
        f"The true effect lies inside the twin's 95% interval in {inside} of {len(whatif)} cases "
        f"({said(inside == len(whatif))}: every one); the two estimates agree within their joint Monte-Carlo error "
        f"(\"agree\": the difference within 1.96 joint standard errors, the truth's own replicates being finite) in "
        f"{agree} of {len(whatif)}. Baselines over the window, patients who waited and hours "
        "waited, twin / truth: "
        + "; ".join(
            f"{n} {b['twin_boarded']:.1f} / {b['truth_boarded']:.1f} and {b['twin_boarding_hours']:.0f} / "
            f"{b['truth_boarding_hours']:.0f} h"
            for n, b in baselines.items()
        )
        + ".",
        "",
        "![twin and true effects](img/hospital-whatif.png)",
        "",
        f"Total {total:.0f} s. Reproduce: `.venv/bin/python -m benchmarks.bench_hospital_operations`.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
