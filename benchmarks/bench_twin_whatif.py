"""Benchmark: the patient twin's what-if answers against the generator's counterfactual ground truth, and
how fast `twinfed twin patient` answers (issue 12).

3 hospitals x 3,000 synthetic patients, each loaded into its own OMOP database by the ETL. The generator
re-simulated a uniform sample of stays per hospital (alive in hospital 24 h after admission) from that
decision hour under its standard scenarios with common random numbers, and wrote the noise-free course of
every signal under each to the ground-truth file (never to the export; synthetic/counterfactuals.py). The
example patient-twin study is trained federated (FedAvg of the 3 hospitals, the sites' own training code)
three times over the same patients: as declared (confounding adjusted by per-step inverse-propensity
weights, every step ahead weighted given what the ward saw before it), with the weights of the first step
ahead only (`adjustment: inverse_propensity`, the previous method) and naive (`adjustment: none`), each at
epsilon 3 and without DP.

Each sampled stay that is the patient's stay in the study's cohort and in a hospital's held-out test part is
asked through the product path (`PatientTwin.answer`, at the decision time 24 h after admission) under the
twin's translation of each scenario:

* insulin_withheld -> insulin stopped over the horizon;
* furosemide_started (40 mg at the decision hour and every 12 h) -> furosemide only in the steps holding a
  dose (+0-4 h, +12-16 h);
* norepinephrine_withheld -> noradrenaline stopped;
* antibiotic_6h_earlier has no counterpart (the twin's treatments are insulin, furosemide and
  noradrenaline) and is left out.

The predicted effect is the scenario's median minus the factual median per signal and step ahead; the true
effect is the mean over the step's hours of the scenario's noise-free course minus the factual one. Both are
in normal-range units (1 = half the signal's normal range). A patient is *affected* on a signal when the
true effect averaged over the horizon is at least 0.05 units; the sign is right when the predicted effect
averaged over the horizon has the same sign (target: right for >= 90% of patients).

Query times, with the declared model at epsilon 3 at the first hospital, each command a fresh process (imports
included) as hospital IT would run it: the first query after a new model (it computes and keeps the site's
conformal calibration), then cold single queries (calibration read back); batch mode over its test
patients, patient-scenarios per second (each patient under the 3 scenarios; target >= 50).

`python -m benchmarks.bench_twin_whatif [--no-write]`
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from benchmarks.machine import save_figure, write_section

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = Path(__file__).resolve().parent / "output" / "twin-whatif"
STUDY = ROOT / "configs" / "study-patient-twin-example.yaml"
PLOT = ROOT / "docs" / "img" / "patient-twin-whatif.png"
PATIENTS = 3000
COUNTERFACTUAL_STAYS = 500  # per hospital; about a fifth land in the test parts
SEED = 0
EPSILON = 3.0
AFFECTED = 0.05  # normal-range units, mean true effect over the horizon
COLD_QUERIES = 5
LABELS = ("per-step IPW", "first-step IPW", "naive")  # the study as declared, then the two to compare
SMOKE_ROUNDS: int | None = None  # --smoke: train this many rounds
TWINFED = str(Path(sys.executable).parent / "twinfed")

SCENARIOS = {
    "insulin_withheld": {"name": "insulin-withheld", "changes": [{"treatment": "insulin", "action": "stop"}]},
    "furosemide_started": {"name": "furosemide-started", "changes": [
        {"treatment": "furosemide", "action": "stop"},
        {"treatment": "furosemide", "action": "start", "from_hours": 0, "to_hours": 4},
        {"treatment": "furosemide", "action": "start", "from_hours": 12, "to_hours": 16},
    ]},
    "norepinephrine_withheld": {"name": "noradrenaline-withheld",
                                "changes": [{"treatment": "noradrenaline", "action": "stop"}]},
}  # fmt: skip


def _specs():
    from federation.contract import load_study

    ipw = load_study(STUDY)
    if SMOKE_ROUNDS:
        ipw = ipw.model_copy(update={"training": ipw.training.model_copy(update={"rounds": SMOKE_ROUNDS})})
    first = ipw.model_copy(update={"model": ipw.model.model_copy(update={"adjustment": "inverse_propensity"})})
    naive = ipw.model_copy(update={"model": ipw.model.model_copy(update={"adjustment": "none"})})
    return ipw, first, naive


def _consortium(spec) -> dict[str, dict]:
    """Generate, load and cut every hospital; {site: {url, secret, dataset, truth}}."""
    from omop_etl.load.pipeline import EtlSettings, run_etl
    from site_node.cohort import build_dataset
    from site_node.config import derive_split_key
    from synthetic import SynthConfig, generate_consortium

    shutil.rmtree(OUTPUT, ignore_errors=True)
    OUTPUT.mkdir(parents=True)
    config = SynthConfig(sites=3, patients_per_site=PATIENTS, seed=13, counterfactual_stays=COUNTERFACTUAL_STAYS)
    generate_consortium(config, OUTPUT / "consortium")
    sites = {}
    for folder in sorted(p for p in (OUTPUT / "consortium").iterdir() if (p / "fhir").is_dir()):
        url, secret = f"sqlite:///{OUTPUT / (folder.name + '.sqlite')}", OUTPUT / f"{folder.name}.secret"
        run_etl([folder / "fhir"], EtlSettings(db_url=url, secret_file=secret))
        truth = json.loads((OUTPUT / "consortium" / "ground-truth" / f"{folder.name}.json").read_text())
        sites[folder.name] = {"url": url, "secret": secret, "truth": truth, "spec": spec,
                              "dataset": build_dataset(url, spec, split_key=derive_split_key(secret))}  # fmt: skip
        print(folder.name, "loaded", flush=True)
    return sites


def _site_folder(site_id: str, site: dict, specs) -> Path:
    """A site folder whose steward approved both studies and allows their twin queries."""
    from federation.contract import study_hash
    from site_node.config import load_site_config, write_site_folder
    from site_node.patient_twin import TwinSite

    policy = {"require_dp": True, "min_noise_multiplier": 0.3, "max_delta": 1e-4, "min_cohort_size": 50,
              "min_cell_count": 5, "twin_query_studies": [specs[0].study.id]}  # fmt: skip
    site_file = write_site_folder(OUTPUT / "sites" / site_id, site_id, site["url"], site["secret"], policy)
    governance = TwinSite.of(load_site_config(site_file)).governance
    for spec in specs:
        governance.approvals.approve(study_hash(spec), spec.study.id, "benchmark steward")
    return site_file


def _asked(site: dict, site_file: Path) -> list[tuple[str, dt.datetime, dict]]:
    """The sampled stays that are their patient's stay in the cohort, in the test part: (hospital id, decision
    time, the stay's counterfactual courses)."""
    from federation.twins.trajectory_model import TrajectoryLayout
    from site_node.config import load_site_config
    from site_node.patient_twin import TwinQueryError, TwinSite, resolve_person

    node = TwinSite.of(load_site_config(site_file))
    dataset = site["dataset"]
    layout = TrajectoryLayout.of(site["spec"].model, len(dataset.feature_names))
    first_used = layout.unpack_targets(torch.from_numpy(dataset.targets))[3][:, 0].numpy() > 0
    test = (dataset.split == "test") & first_used  # answered at the first decision time, 24 h after admission
    # OMOP keeps the hospital's wall-clock times; the twin reads a time without a zone as that wall clock
    admitted = {s["encounter_id"]: dt.datetime.fromisoformat(s["admitted"]).replace(tzinfo=dt.UTC)
                for s in site["truth"]["stays"]}  # fmt: skip
    asked = []
    for stay in site["truth"]["counterfactuals"]:
        try:
            person = resolve_person(node, stay["patient_id"])
        except TwinQueryError:
            continue
        rows = np.flatnonzero((dataset.person_ids == person) & test)
        start = admitted[stay["encounter_id"]]
        if len(rows) and abs(float(dataset.index_s[rows[0]]) - start.timestamp()) < 60:
            asked.append((stay["patient_id"], start + dt.timedelta(hours=stay["decision_hour"]), stay))
    return asked


def _true_effect(spec, stay: dict, scenario: str) -> np.ndarray:
    """(F, S) true effect per step ahead and signal, normal-range units; NaN where the stay had ended."""
    model = spec.model
    out = np.full((model.horizon_steps, len(model.signals)), np.nan)
    factual, other = stay["scenarios"]["factual"]["signals"], stay["scenarios"][scenario]["signals"]
    for s, signal in enumerate(model.signals):
        low, high = signal.normal_range
        for k in range(model.horizon_steps):
            hours = range(int(k * model.step_hours), int((k + 1) * model.step_hours))
            diffs = [other[signal.name][h] - factual[signal.name][h] for h in hours
                     if h < len(factual[signal.name]) and factual[signal.name][h] is not None
                     and other[signal.name][h] is not None]  # fmt: skip
            if diffs:
                out[k, s] = float(np.mean(diffs)) / ((high - low) / 2)
    return out


def _predicted(spec, twin, asked) -> tuple[dict[str, list[np.ndarray]], dict[str, list[bool]]]:
    """{scenario: [(F, S) predicted effect per asked stay]} through PatientTwin.answer, and {scenario: [whether
    the twin flagged the plan as outside the hospitals' practice]}."""
    from site_node.patient_twin import Scenario

    scenarios = [Scenario.model_validate(SCENARIOS[name]) for name in SCENARIOS]
    halves = np.array([(s.normal_range[1] - s.normal_range[0]) / 2 for s in spec.model.signals])
    out: dict[str, list[np.ndarray]] = {name: [] for name in SCENARIOS}
    flagged: dict[str, list[bool]] = {name: [] for name in SCENARIOS}
    for hospital_id, decision, _ in asked:
        answer = twin.answer(hospital_id, scenarios, at=decision + dt.timedelta(minutes=1), by="benchmark")
        for name, forecast in zip(SCENARIOS, answer.scenarios, strict=True):
            change = np.array([forecast.median_change[s.name] for s in spec.model.signals]).T  # (F, S)
            out[name].append(change / halves)
            flagged[name].append(bool(forecast.outside_practice))
    return out, flagged


def _train_all(specs, sites) -> dict[str, dict]:
    from benchmarks.bench_patient_twin import _train

    parts = {n: (s["dataset"].subset("train").features, s["dataset"].subset("train").targets)
             for n, s in sites.items()}  # fmt: skip
    models = {}
    for label, spec in zip(LABELS, specs, strict=True):
        for epsilon in (EPSILON, None):
            key = f"{label}, {'epsilon 3' if epsilon else 'no DP'}"
            started = time.perf_counter()
            models[key] = _train(spec, parts, epsilon, SEED)
            print(key, f"trained in {time.perf_counter() - started:.0f} s", flush=True)
    return models


def _query_times(spec_file: Path, site_file: Path, model: Path, ids: list[str], scenario_file: Path) -> dict:
    """Wall seconds of `twinfed twin patient` as fresh processes."""

    def run(args: list[str]) -> float:
        started = time.perf_counter()
        done = subprocess.run([TWINFED, "twin", "patient", "-s", str(site_file), "--study", str(spec_file),
                               "--model", str(model), "--scenario", str(scenario_file), "--out",
                               str(OUTPUT / "answers"), *args], capture_output=True, text=True)  # fmt: skip
        if done.returncode not in (0, 1):
            raise RuntimeError(done.stdout + done.stderr)
        return time.perf_counter() - started

    first = run(["--person", ids[0]])
    cold = [run(["--person", hospital_id]) for hospital_id in ids[1 : 1 + COLD_QUERIES]]
    batch_file = OUTPUT / "batch.txt"
    batch_file.write_text("\n".join(ids) + "\n", encoding="utf-8")
    batch = run(["--batch", str(batch_file)])
    answered = sum("error" not in line for line in (OUTPUT / "answers" / "batch.jsonl").read_text().splitlines())
    return {"first": first, "cold": cold, "batch": batch, "batch_patients": answered}


def main(write: bool = True) -> None:
    from site_node.config import load_site_config
    from site_node.patient_twin import PatientTwin, TwinSite

    torch.set_num_threads(2)
    began = time.perf_counter()
    specs = _specs()
    sites = _consortium(specs[0])
    site_files = {n: _site_folder(n, s, specs) for n, s in sites.items()}
    asked = {n: _asked(s, site_files[n]) for n, s in sites.items()}
    print({n: len(a) for n, a in asked.items()}, "stays asked", flush=True)
    truth = {name: [_true_effect(specs[0], stay, name) for n in sites for _, _, stay in asked[n]] for name in SCENARIOS}
    models = _train_all(specs, sites)
    predicted, flagged = {}, {}
    for key, state in models.items():
        spec = specs[[key.startswith(label + ",") for label in LABELS].index(True)]
        path = OUTPUT / f"{key.replace(', ', '-').replace(' ', '')}.pt"
        torch.save(state, path)
        per_scenario: dict[str, list[np.ndarray]] = {name: [] for name in SCENARIOS}
        per_flag: dict[str, list[bool]] = {name: [] for name in SCENARIOS}
        for n in sites:
            twin = PatientTwin.open(TwinSite.of(load_site_config(site_files[n])), spec, model_file=path)
            values, flags = _predicted(spec, twin, asked[n])
            for name in SCENARIOS:
                per_scenario[name] += values[name]
                per_flag[name] += flags[name]
        predicted[key], flagged[key] = per_scenario, per_flag
        print(key, "asked", flush=True)
    first_site = next(iter(sites))
    spec_file = OUTPUT / "study.yaml"
    spec_file.write_text(yaml.safe_dump(specs[0].model_dump(mode="json")), encoding="utf-8")
    scenario_file = OUTPUT / "scenarios.yaml"
    scenario_file.write_text(yaml.safe_dump({"scenarios": list(SCENARIOS.values())}), encoding="utf-8")
    test_ids = _test_ids(sites[first_site], site_files[first_site])
    times = _query_times(spec_file, site_files[first_site], OUTPUT / "per-stepIPW-epsilon3.pt", test_ids,
                         scenario_file)  # fmt: skip
    body = _report(specs[0], truth, predicted, flagged, times, {n: len(a) for n, a in asked.items()}, began)
    print(body)
    if write:
        write_section("twin-whatif", body)
    shutil.rmtree(OUTPUT, ignore_errors=True)


def _test_ids(site: dict, site_file: Path) -> list[str]:
    """The hospital ids (FHIR Patient ids) of the first hospital's test patients, from its export, resolved
    as a query resolves them."""
    from site_node.config import load_site_config
    from site_node.patient_twin import TwinQueryError, TwinSite, resolve_person

    node = TwinSite.of(load_site_config(site_file))
    dataset = site["dataset"]
    test = set(dataset.person_ids[dataset.split == "test"].tolist())
    export = OUTPUT / "consortium" / Path(site["url"].removeprefix("sqlite:///")).stem / "fhir" / "Patient.ndjson"
    ids = []
    for line in export.read_text(encoding="utf-8").splitlines():
        hospital_id = json.loads(line)["id"]
        try:
            if resolve_person(node, hospital_id) in test:
                ids.append(hospital_id)
        except TwinQueryError:
            continue
    return ids


def _report(spec, truth: dict, predicted: dict, flagged: dict, times: dict, asked: dict, began: float) -> str:
    signals = [s.name for s in spec.model.signals]
    header = "| scenario | signal | affected | true effect | " + " | ".join(
        f"{k}: effect, error, sign right" for k in predicted) + " |"  # fmt: skip
    rows = [header, "|---" * (4 + len(predicted)) + "|"]
    overall = {k: [0, 0] for k in predicted}
    for name in SCENARIOS:
        true = np.array(truth[name])  # (n, F, S)
        mean_true = np.nanmean(true, axis=1)  # (n, S)
        for s, signal in enumerate(signals):
            affected = np.abs(np.nan_to_num(mean_true[:, s])) >= AFFECTED
            if affected.sum() < 3:
                continue
            cells = []
            for key, per_scenario in predicted.items():
                pred = np.array(per_scenario[name])
                seen = np.isfinite(true[affected, :, s])
                error = np.abs(pred[affected, :, s] - true[affected, :, s])[seen].mean()
                mean_pred = np.array([pred[i, np.isfinite(true[i, :, s]), s].mean() for i in np.flatnonzero(affected)])
                right = np.sign(mean_pred) == np.sign(mean_true[affected, s])
                overall[key][0] += int(right.sum())
                overall[key][1] += int(affected.sum())
                cells.append(f"{mean_pred.mean():+.3f}, {error:.3f}, {right.mean():.0%}")
            rows.append(f"| {name} | {signal} | {int(affected.sum())} | {mean_true[affected, s].mean():+.3f} | "
                        + " | ".join(cells) + " |")  # fmt: skip
    rates = {k: (v[0] / v[1] if v[1] else float("nan")) for k, v in overall.items()}
    supported = _supported(spec, truth, predicted, flagged)
    _plot(spec, truth, predicted)
    cold = times["cold"]
    rate = times["batch_patients"] * len(SCENARIOS) / times["batch"]
    return (
        "### The patient twin: what-if against the counterfactual ground truth, and query times (issue 12)\n\n"
        f"3 hospitals x {PATIENTS:,} patients; {COUNTERFACTUAL_STAYS} stays per hospital re-simulated by the generator "
        "under each scenario with common random numbers; asked: the sampled stays that are their patient's stay in "
        f"the cohort and in a held-out test part ({', '.join(f'{n} {v}' for n, v in asked.items())}). The example "
        "study trained federated (seed 0) with its per-step inverse-propensity weights (per-step IPW), with the "
        "first step's weights only (first-step IPW) and naive (`adjustment: none`). "
        "Effects in normal-range units (1 = half the normal range), scenario minus factual; *affected*: true effect "
        f"averaged over the 24 h horizon at least {AFFECTED} in size; *error*: mean absolute error of the effect per "
        "step ahead; *sign right*: the predicted effect averaged over the horizon has the true one's sign. "
        "antibiotic_6h_earlier has no counterpart among the twin's treatments.\n\n"
        + "\n".join(rows)
        + "\n\nSign right over every affected patient and signal (target >= 90%): "
        + ", ".join(f"{k} {v:.0%}" for k, v in rates.items())
        + ".\n\n" + supported
        + "\n\n![predicted against true effect](img/patient-twin-whatif.png)\n\n"
        "**Query times** (`twinfed twin patient`, each a fresh process, imports included; per-step IPW model at "
        "epsilon 3, "
        f"first hospital): the first query after a new model {times['first']:.1f} s (it computes and keeps the "
        f"site's conformal calibration); then a cold single query with a scenario file of 3 scenarios, median "
        f"{statistics.median(cold):.2f} s over {len(cold)} (range {min(cold):.2f}-{max(cold):.2f} s; target < 3 s); "
        f"batch mode over {times['batch_patients']} test patients x {len(SCENARIOS)} scenarios in "
        f"{times['batch']:.1f} s, start-up included: {rate:.0f} patient-scenarios per second (target >= 50). "
        f"Total {time.perf_counter() - began:.0f} s. Reproduce: `.venv/bin/python -m benchmarks.bench_twin_whatif`."
    )


def _supported(spec, truth: dict, predicted: dict, flagged: dict) -> str:
    """How often the twin flags each scenario as outside the hospitals' practice, and the sign right over the
    affected patients and signals it does not flag (the answers it presents as forecasts)."""
    signals = [s.name for s in spec.model.signals]
    parts, signs = [], []
    for key in predicted:
        shares = ", ".join(f"{name} {np.mean(flagged[key][name]):.0%}" for name in SCENARIOS)
        right = total = 0
        for name in SCENARIOS:
            mean_true = np.nanmean(np.array(truth[name]), axis=1)  # (n, S)
            pred = np.array(predicted[key][name])
            kept = ~np.array(flagged[key][name])
            for s in range(len(signals)):
                affected = np.abs(np.nan_to_num(mean_true[:, s])) >= AFFECTED
                if affected.sum() < 3:
                    continue
                for i in np.flatnonzero(affected & kept):
                    seen = np.isfinite(np.array(truth[name])[i, :, s])
                    right += int(np.sign(pred[i, seen, s].mean()) == np.sign(mean_true[i, s]))
                    total += 1
        parts.append(f"{key}: {shares}")
        signs.append(f"{key} {right / total:.0%} of {total}" if total else f"{key} none")
    return ("**Outside practice.** Share of asked stays whose scenario the twin flags as outside the hospitals' "
            "practice (the plan's first step at least 10 times rarer for this patient than on average at the site, "
            "by the model's propensity head; docs/twins.md): " + "; ".join(parts) + ". Sign right over the affected "
            "patients and signals it does not flag: " + ", ".join(signs) + ".")


def _plot(spec, truth: dict, predicted: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    signals = [s.name for s in spec.model.signals]
    figure, axes = plt.subplots(1, len(SCENARIOS), figsize=(4.2 * len(SCENARIOS), 4))
    for axis, name in zip(axes, SCENARIOS, strict=True):
        mean_true = np.nanmean(np.array(truth[name]), axis=1)  # (n, S)
        main = int(np.argmax(np.nanmean(np.abs(mean_true), axis=0)))
        for key in ("per-step IPW, epsilon 3", "first-step IPW, epsilon 3", "naive, epsilon 3"):
            pred = np.nanmean(np.array(predicted[key][name]), axis=1)
            axis.scatter(mean_true[:, main], pred[:, main], s=10, alpha=0.6, label=key)
        low = np.nanmin(mean_true[:, main])
        high = np.nanmax(mean_true[:, main])
        axis.plot([low, high], [low, high], color="grey", linewidth=0.8)
        axis.axhline(0, color="grey", linewidth=0.5)
        axis.axvline(0, color="grey", linewidth=0.5)
        axis.set(title=f"{name}: {signals[main]}", xlabel="true effect (normal-range units)",
                 ylabel="predicted effect")  # fmt: skip
        axis.legend(fontsize=7)
    save_figure(figure, PLOT, dpi=110)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    parser.add_argument("--smoke", action="store_true", help="a small run to check the benchmark itself (no write)")
    arguments = parser.parse_args()
    if arguments.smoke:
        PATIENTS, COUNTERFACTUAL_STAYS, SMOKE_ROUNDS = 400, 200, 1
    main(write=not (arguments.no_write or arguments.smoke))
