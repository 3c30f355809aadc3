"""Benchmark: the patient twin's forecasts and event risk (issue 12), on the synthetic consortium.

The example patient-twin study (configs/study-patient-twin-example.yaml: 6 signals every 4 h, 24 h ahead
from the last 24 h, up to 4 decision times per stay, insulin/furosemide/noradrenaline as controls) on 3
hospitals x 3,000 patients, each loaded into its own OMOP database by the ETL, its cohort and windows cut
by the cohort builder as at a site. Trained four ways, 2 seeds each:

* federated (FedAvg of the 3 hospitals' updates, the training code sites run, in one process) at epsilon 3
  with DP-SGD at the patient unit, and without DP;
* pooled (every hospital's training patients in one place, benchmark only), without DP;
* each hospital alone at epsilon 3.

Scored on every hospital's held-out test patients, with each hospital's own conformal step (from its
calibration patients, as a site evaluates): mean absolute error of the median per step ahead (in
normal-range units, 1 = half the signal's normal range, over every observed future value), beside
last-value-carried-forward (the last recorded value in the history; a signal never recorded takes the
population mean) and the population mean (each hospital's training mean per signal and step ahead);
80% and 95% interval coverage per hospital; CRPS (from the quantiles: twice the mean pinball loss over the
5 levels, an approximation of the integral); and the event's AUROC at the first decision time beside the
example 24-hour study (logistic regression, federated at epsilon 3) on the same test patients.

The what-if error against the generator's counterfactual ground truth, and the query times, are
benchmarks/bench_twin_whatif.py.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.machine import save_figure, write_section

OUTPUT = Path(__file__).resolve().parent / "output" / "patient-twin"
STUDY = Path(__file__).resolve().parents[1] / "configs" / "study-patient-twin-example.yaml"
MORTALITY = Path(__file__).resolve().parents[1] / "configs" / "study-inpatient-mortality.yaml"
PLOT = Path(__file__).resolve().parents[1] / "docs" / "img" / "patient-twin-forecast.png"
PATIENTS = 3000
SEEDS = (0, 1)
EPSILON = 3.0


def _consortium():
    from federation.contract import load_study
    from omop_etl.load.pipeline import EtlSettings, run_etl
    from site_node.cohort import build_dataset
    from site_node.config import derive_split_key
    from synthetic import SynthConfig, generate_consortium

    shutil.rmtree(OUTPUT, ignore_errors=True)
    OUTPUT.mkdir(parents=True)
    twin, mortality = load_study(STUDY), load_study(MORTALITY)
    generate_consortium(SynthConfig(sites=3, patients_per_site=PATIENTS, seed=13), OUTPUT / "consortium")
    sites = {}
    for folder in sorted(p for p in (OUTPUT / "consortium").iterdir() if (p / "fhir").is_dir()):
        url, secret = f"sqlite:///{OUTPUT / (folder.name + '.sqlite')}", OUTPUT / f"{folder.name}.secret"
        run_etl([folder / "fhir"], EtlSettings(db_url=url, secret_file=secret))
        key = derive_split_key(secret)
        sites[folder.name] = {"twin": build_dataset(url, twin, split_key=key),
                              "mortality": build_dataset(url, mortality, split_key=key)}  # fmt: skip
    return twin, mortality, sites


def _train(spec, parts: dict, epsilon: float | None, seed: int) -> dict:
    """FedAvg over `parts` ({name: (features, targets)}), or one part alone; the final weights."""
    from benchmarks.bench_survival import _round
    from federation.twins import build_model
    from site_node.training.objectives import objective_of

    objective = objective_of(spec.model)
    statics = len(spec_features(spec))
    state = build_model(spec.model, statics, seed=seed).state_dict()
    histories = {name: [] for name in parts}
    for server_round in range(spec.training.rounds):
        results = {}
        for name, (features, targets) in parts.items():
            model = build_model(spec.model, statics)
            model.load_state_dict(state)
            results[name] = _round(spec, model, features, targets, epsilon, histories[name], state,
                                   seed * 1000 + server_round, objective)  # fmt: skip
            histories[name] = results[name].history
        total = sum(r.num_examples for r in results.values())
        state = {k: sum(r.state_dict[k] * (r.num_examples / total) for r in results.values()) for k in state}
    return state


def spec_features(spec) -> list[str]:
    from federation.contract.features import feature_names

    return feature_names(spec)


def _at_site(spec, state, dataset):
    """The model as the hospital evaluates it: its own conformal step from its calibration patients."""
    from federation.twins import build_model, kind_of

    model = build_model(spec.model, len(dataset.feature_names))
    model.load_state_dict(state)
    calibration = dataset.subset("calibration")
    model = kind_of(spec.model).at_site(spec.model, model, (calibration.features, calibration.targets))
    return model.eval()


def _scores(spec, model, test) -> dict[str, np.ndarray]:
    """Per step ahead: absolute errors of the twin, LOCF and the population mean; coverage; CRPS; AUROC."""
    from federation.twins.trajectory import forecast_scores
    from federation.twins.trajectory_model import TrajectoryLayout, pinball

    layout = TrajectoryLayout.of(spec.model, len(test.feature_names))
    with torch.no_grad():
        outputs = model(torch.from_numpy(test.features))
    quantiles, logit, _, _ = layout.unpack_outputs(outputs)
    future, mask, event, valid, _, _ = layout.unpack_targets(torch.from_numpy(test.targets))
    _, history, _ = layout.unpack_inputs(torch.from_numpy(test.features))
    seen = (mask > 0) & (valid > 0)[:, :, None, None]  # (n, W, F, S)
    levels = list(spec.model.quantiles)
    median = quantiles[..., levels.index(0.5)]
    observed = history[..., 1] > 0  # (n, W, H, S)
    last_step = torch.where(observed, torch.arange(layout.history)[None, None, :, None], -1).amax(dim=2)
    last_value = torch.gather(history[..., 0], 2, last_step.clamp(min=0)[:, :, None, :]).squeeze(2)  # (n, W, S)
    return {
        "seen": seen.numpy(),
        "twin": (median - future).abs().numpy(),
        "locf_value": last_value.numpy(),
        "locf_known": (last_step >= 0).numpy(),
        "future": future.numpy(),
        "crps": (2 * pinball(quantiles, future, levels).mean(dim=-1)).numpy(),
        **{k: v for k, v in forecast_scores(spec.model, outputs.numpy(), test.targets).items()},
        "logit": logit[:, 0].numpy(),
        "event": event[:, 0].numpy(),
    }


def _mae_by_step(errors: np.ndarray, seen: np.ndarray) -> np.ndarray:
    """Mean absolute error per step ahead over every observed value (all signals)."""
    return (errors * seen).sum(axis=(0, 1, 3)) / np.maximum(seen.sum(axis=(0, 1, 3)), 1)


def main() -> None:
    from sklearn.metrics import roc_auc_score

    torch.set_num_threads(2)
    began = time.perf_counter()
    twin, mortality, sites = _consortium()
    names = list(sites)
    parts = {n: (s["twin"].subset("train").features, s["twin"].subset("train").targets) for n, s in sites.items()}
    pooled = {"pooled": tuple(np.concatenate([p[i] for p in parts.values()]) for i in range(2))}
    modes = {"federated, epsilon 3": (parts, EPSILON), "federated, no DP": (parts, None),
             "pooled, no DP": (pooled, None)}  # fmt: skip
    results: dict[str, list[dict]] = {}
    for label, (groups, epsilon) in modes.items():
        runs = []
        for seed in SEEDS:
            state = _train(twin, groups, epsilon, seed)
            runs.append({n: _scores(twin, _at_site(twin, state, sites[n]["twin"]), sites[n]["twin"].subset("test"))
                         for n in names})  # fmt: skip
        results[label] = runs
        print(label, "done", flush=True)
    local = []
    for seed in SEEDS:
        local.append({n: _scores(twin, _at_site(twin, _train(twin, {n: parts[n]}, EPSILON, seed), sites[n]["twin"]),
                                 sites[n]["twin"].subset("test")) for n in names})  # fmt: skip
    results["each hospital alone, epsilon 3"] = local
    # the 24-hour study on the same test patients: logistic regression, federated at epsilon 3
    from benchmarks import bench_survival

    risk_datasets = {n: s["mortality"] for n, s in sites.items()}
    risk_auroc = []
    for seed in SEEDS:
        states = bench_survival._train(mortality, risk_datasets, "federated", EPSILON, seed)
        logits = [bench_survival._outputs(mortality, states[n], risk_datasets[n].subset("test"))[:, 0] for n in names]
        labels = [risk_datasets[n].subset("test").labels for n in names]
        risk_auroc.append(roc_auc_score(np.concatenate(labels), np.concatenate(logits)))
    body = _report(twin, results, names, float(np.mean(risk_auroc)), began)
    print(body)
    write_section("patient-twin", body)
    shutil.rmtree(OUTPUT, ignore_errors=True)


def _report(twin, results: dict, names: list[str], risk_auroc: float, began: float) -> str:
    from sklearn.metrics import roc_auc_score

    steps = twin.model.horizon_steps
    hours = [f"+{(k + 1) * twin.model.step_hours:g} h" for k in range(steps)]
    rows = ["| forecast (MAE, normal-range units) | " + " | ".join(hours) + " |", "|---" * (steps + 1) + "|"]
    first = results["federated, epsilon 3"][0]
    seen = np.concatenate([first[n]["seen"] for n in names])
    future = np.concatenate([first[n]["future"] for n in names])
    locf_value = np.concatenate([first[n]["locf_value"] for n in names])
    known = np.concatenate([first[n]["locf_known"] for n in names])
    population = (future * seen).sum(axis=(0, 1)) / np.maximum(seen.sum(axis=(0, 1)), 1)  # (F, S)
    locf = np.where(known[:, :, None, :], locf_value[:, :, None, :], population[None, None])
    baselines = {"last value carried forward": np.abs(locf - future), "population mean": np.abs(population - future)}
    for label, errors in baselines.items():
        rows.append(f"| {label} | " + " | ".join(f"{v:.3f}" for v in _mae_by_step(errors, seen)) + " |")
    mae = {}
    for label, runs in results.items():
        per_run = [_mae_by_step(np.concatenate([r[n]["twin"] for n in names]),
                                np.concatenate([r[n]["seen"] for n in names])) for r in runs]  # fmt: skip
        mae[label] = np.mean(per_run, axis=0)
        rows.append(f"| twin, {label} | " + " | ".join(f"{v:.3f}" for v in mae[label]) + " |")
    beats = all(mae["federated, epsilon 3"][k] < _mae_by_step(baselines["last value carried forward"], seen)[k]
                for k in range(1, steps))  # fmt: skip
    coverage = ["| hospital | 80% coverage | 95% coverage | CRPS | event AUROC |", "|---|---|---|---|---|"]
    for n in names:
        c80 = np.mean([np.nanmean(r[n]["coverage_80"]) for r in results["federated, epsilon 3"]])
        c95 = np.mean([np.nanmean(r[n]["coverage_95"]) for r in results["federated, epsilon 3"]])
        runs = results["federated, epsilon 3"]
        crps = np.mean([(r[n]["crps"] * r[n]["seen"]).sum() / r[n]["seen"].sum() for r in runs])
        auc = np.mean([roc_auc_score(r[n]["event"], r[n]["logit"]) for r in results["federated, epsilon 3"]])
        coverage.append(f"| {n} | {c80:.3f} | {c95:.3f} | {crps:.3f} | {auc:.3f} |")
    twin_auroc = np.mean([roc_auc_score(np.concatenate([r[n]["event"] for n in names]),
                                        np.concatenate([r[n]["logit"] for n in names]))
                          for r in results["federated, epsilon 3"]])  # fmt: skip
    _plot(hours, mae, baselines, seen)
    return (
        "### The patient twin: forecasts and event risk (issue 12)\n\n"
        f"The example patient-twin study on 3 hospitals x {PATIENTS:,} patients (ETL-loaded, cohort and windows cut "
        f"as at a site), mean over {len(SEEDS)} seeds; every hospital's test patients, with its own conformal step. "
        "Target: the twin beats last-value-carried-forward at every step ahead beyond the first.\n\n"
        + "\n".join(rows)
        + f"\n\nThe federated twin at epsilon 3 {'beats' if beats else 'does NOT beat'} last-value-carried-forward "
        "at every step beyond the first.\n\n![forecast error by step ahead](img/patient-twin-forecast.png)\n\n"
        "Per hospital, federated at epsilon 3 (intervals after the hospital's conformal step; targets: within 3 "
        "points of 0.80 and 0.95):\n\n" + "\n".join(coverage)
        + f"\n\n**Event risk** (death within 30 days) at the first decision time, pooled test AUROC: the twin "
        f"{twin_auroc:.3f}, the 24-hour study (logistic regression, federated at epsilon 3, same test patients) "
        f"{risk_auroc:.3f}: {twin_auroc - risk_auroc:+.3f} (target +0.03). The what-if error against the "
        f"counterfactual ground truth is in the twin-whatif section. Total {time.perf_counter() - began:.0f} s. "
        "Reproduce: `.venv/bin/python -m benchmarks.bench_patient_twin`."
    )


def _plot(hours: list[str], mae: dict, baselines: dict, seen: np.ndarray) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    x = np.arange(len(hours))
    for label, errors in baselines.items():
        axis.plot(x, _mae_by_step(errors, seen), "--", label=label)
    for label, values in mae.items():
        axis.plot(x, values, marker="o", label=f"twin, {label}")
    axis.set_xticks(x, hours)
    axis.set(xlabel="step ahead", ylabel="MAE (normal-range units)", title="Patient twin: forecast error")
    axis.legend(fontsize=7)
    save_figure(figure, PLOT, dpi=120)


if __name__ == "__main__":
    main()
