"""Benchmark: the survival kind against the issue's targets.

On the synthetic consortium (3 hospitals x 5,000 patients, each loaded into its own OMOP database by the
ETL), time to death over 90 days after the 24-hour prediction time is learned by the
`discrete_time_survival` kind (grid 7/14/30/60/90 days, horizon 90) from the example study's covariates,
three ways at epsilon 3 and without DP:

* local only: each hospital alone;
* federated: FedAvg of the sites' updates (weighted by training examples), in one process here to isolate
  model quality from transport (the deployed path is the Flower coordinator, the same training code);
* pooled: every hospital's training patients in one place, **for benchmarks only** (the ceiling).

Each model is scored by Harrell's C on exact times (survival_maths, the same function an exact site
release uses) on every hospital's held-out patients; the table gives the mean over hospitals and seeds.
Targets (issue 11): federated without DP within 0.01 of pooled, at epsilon 3 within 0.03, every hospital
better off federated than alone; beside them the Bayes-optimal C-index from the generator's ground truth.

Also measured here: the DP overhead of the survival kind (one epoch of DP-SGD against the same epoch
without DP, both engines, ratio; target <= 2x). The calibration of the example mortality study is
benchmarks/bench_calibration.py.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.machine import write_section

OUTPUT = Path(__file__).resolve().parent / "output" / "survival"
PLOT = Path(__file__).resolve().parents[1] / "docs" / "img" / "survival-federated.png"
EXAMPLE_STUDY = Path(__file__).resolve().parents[1] / "configs" / "study-inpatient-mortality.yaml"
PATIENTS = 5000
SEEDS = (0, 1, 2)
EPSILONS: tuple[float | None, ...] = (3.0, None)
GRID = [7.0, 14.0, 30.0, 60.0, 90.0]


def _studies():
    from federation.contract import StudySpec, load_study

    mortality = load_study(EXAMPLE_STUDY)
    data = mortality.model_dump(mode="json")
    data["study"]["id"] = "death-within-90-days"
    data["outcome"] = {"kind": "time_to_event", "prediction_hours": 24, "window_days": 90}
    data["model"] = {"kind": "discrete_time_survival", "interval_days": GRID}
    return mortality, StudySpec.model_validate(data)


def _consortium(mortality, survival) -> dict[str, dict[str, object]]:
    """{site: {"mortality": StudyDataset, "survival": StudyDataset}} for a fresh consortium."""
    from omop_etl.load.pipeline import EtlSettings, run_etl
    from site_node.cohort import build_dataset
    from site_node.config import derive_split_key
    from synthetic import SynthConfig, generate_consortium
    from synthetic.ground_truth import SiteGroundTruth

    shutil.rmtree(OUTPUT, ignore_errors=True)
    OUTPUT.mkdir(parents=True)
    consortium = OUTPUT / "consortium"
    generate_consortium(SynthConfig(sites=3, patients_per_site=PATIENTS, seed=7), consortium)
    sites = {}
    truth = consortium / "ground-truth"
    for site_dir in sorted(p for p in consortium.iterdir() if (p / "fhir").is_dir()):
        url = f"sqlite:///{OUTPUT / (site_dir.name + '.sqlite')}"
        secret = OUTPUT / f"{site_dir.name}.secret"
        run_etl([site_dir / "fhir"], EtlSettings(db_url=url, secret_file=secret))
        key = derive_split_key(secret)
        ground = SiteGroundTruth.model_validate_json((truth / f"{site_dir.name}.json").read_text(encoding="utf-8"))
        sites[site_dir.name] = {
            "mortality": build_dataset(url, mortality, split_key=key),
            "survival": build_dataset(url, survival, split_key=key),
            "truth": ground.survival["death_within_90d"],
        }
    return sites


def _round(spec, model, features, targets, epsilon, history, global_state, seed, objective):
    from site_node.training import calibrate_noise, schedule, train_dp, train_plain

    n = len(targets)
    if epsilon is None:
        return train_plain(model, features, targets, training=spec.training, global_state=global_state, seed=seed,
                           objective=objective)  # fmt: skip
    delta = 1 / (10 * n)
    sample_rate, _, total_steps = schedule(n, spec.training)
    sigma = calibrate_noise(epsilon, delta, sample_rate, total_steps, spec.privacy.accountant)
    privacy = spec.privacy.model_copy(update={"target_epsilon": epsilon})
    return train_dp(model, features, targets, training=spec.training, privacy=privacy, noise_multiplier=sigma,
                    delta=delta, accountant_history=history, global_state=global_state, seed=seed,
                    objective=objective)  # fmt: skip


def _train(spec, datasets: dict, mode: str, epsilon: float | None, seed: int) -> dict[str, dict]:
    """Train every round in one mode; {site: state} (the same state everywhere unless local)."""
    from federation.twins import build_model, kind_of
    from site_node.training.objectives import objective_of

    kind = kind_of(spec.model)
    objective = objective_of(spec.model)
    width = next(iter(datasets.values())).features.shape[1]
    initial = build_model(spec.model, width, seed=seed).state_dict()

    def part(d):
        train = d.subset("train")
        return train.features, kind.targets_of(spec.model, train.labels, train.event_days)

    if mode == "pooled":
        parts = [part(d) for d in datasets.values()]
        groups = {"pooled": (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))}
    else:
        groups = {name: part(d) for name, d in datasets.items()}
    histories: dict[str, list] = {name: [] for name in groups}
    states = {name: initial for name in groups}
    for server_round in range(spec.training.rounds):
        results = {}
        for name, (features, targets) in groups.items():
            model = build_model(spec.model, width)
            model.load_state_dict(states[name])
            results[name] = _round(spec, model, features, targets, epsilon, histories[name], states[name],
                                   seed * 1000 + server_round, objective)  # fmt: skip
            histories[name] = results[name].history
        if mode == "federated":
            total = sum(r.num_examples for r in results.values())
            mean = {k: sum(r.state_dict[k] * (r.num_examples / total) for r in results.values()) for k in initial}
            states = {name: mean for name in groups}
        else:
            states = {name: r.state_dict for name, r in results.items()}
    if mode == "local":
        return states
    return dict.fromkeys(datasets, next(iter(states.values())))


def _outputs(spec, state, dataset) -> np.ndarray:
    from federation.twins import build_model
    from site_node.training.evaluation import model_outputs

    model = build_model(spec.model, dataset.features.shape[1])
    model.load_state_dict(state)
    return model_outputs(model, dataset.features)


def _c_index(spec, state, dataset) -> float:
    from federation.twins import kind_of
    from federation.twins import survival_maths as maths

    test = dataset.subset("test")
    risk = kind_of(spec.model).risk_logits(spec.model, _outputs(spec, state, test))
    return maths.harrell_c_index(test.event_days, test.labels.astype(bool), risk).value


def _survival_table(survival, sites) -> tuple[list[str], dict]:
    rows = [
        "| epsilon | local only | federated (FedAvg) | pooled (benchmark only) | federated - pooled | "
        "hospitals better off federated |",
        "|---|---|---|---|---|---|",
    ]
    results = {}
    datasets = {name: s["survival"] for name, s in sites.items()}
    for epsilon in EPSILONS:
        scores = {}
        for mode in ("local", "federated", "pooled"):
            per_seed = []
            for seed in SEEDS:
                states = _train(survival, datasets, mode, epsilon, seed)
                per_seed.append([_c_index(survival, states[name], d) for name, d in datasets.items()])
            scores[mode] = np.array(per_seed)  # seeds x hospitals
        better = int((scores["federated"].mean(axis=0) > scores["local"].mean(axis=0)).sum())
        gap = float(scores["federated"].mean() - scores["pooled"].mean())

        def cell(mode: str, scores: dict = scores) -> str:
            runs = scores[mode]
            per_site = runs.mean(axis=0)
            return (f"{runs.mean():.3f} ± {runs.mean(axis=1).std():.3f} (hospitals {per_site.min():.3f}-"
                    f"{per_site.max():.3f})")  # fmt: skip

        label = "no DP" if epsilon is None else f"{epsilon:g}"
        rows.append(
            f"| {label} | {cell('local')} | {cell('federated')} | {cell('pooled')} | {gap:+.3f} | "
            f"{better} of {len(datasets)} |"
        )
        print(rows[-1])
        results[label] = scores
    return rows, results


def _ceiling(sites) -> str:
    """The Bayes-optimal C-index from the generator's ground truth, per hospital and on average."""
    truths = {name: s["truth"] for name, s in sites.items()}
    per_site = ", ".join(f"{name} {t.bayes_optimal_c_index:.3f}" for name, t in truths.items())
    mean = np.mean([t.bayes_optimal_c_index for t in truths.values()])
    return (
        f"**Bayes-optimal C-index** (the generator's ground truth: Harrell's C of each patient's true probability "
        f"of dying in the stay, known at 24 hours to the generator only, on every first stay of the hospital, "
        f"not only its test part): {mean:.3f} on average ({per_site}). It ranks who dies, not when; no model of "
        "the recorded data can reach it, since the true state behind the measurements is not recorded."
    )


def _overhead(survival, sites) -> list[str]:
    """One epoch of DP-SGD against the same epoch without DP, on the pooled training patients."""
    from federation.twins import build_model, kind_of
    from site_node.training import train_dp, train_plain
    from site_node.training.objectives import objective_of

    kind = kind_of(survival.model)
    parts = [s["survival"].subset("train") for s in sites.values()]
    features = np.concatenate([p.features for p in parts])
    targets = np.concatenate([kind.targets_of(survival.model, p.labels, p.event_days) for p in parts])
    training = survival.training.model_copy(update={"local_epochs": 1})
    objective = objective_of(survival.model)
    model = build_model(survival.model, features.shape[1], seed=0)
    timings: dict[str, list[float]] = {"plain": [], "single-pass": [], "opacus": []}
    for _ in range(5):
        timings["plain"].append(
            train_plain(model, features, targets, training=training, seed=0, objective=objective).seconds
        )
        for engine in ("single-pass", "opacus"):
            result = train_dp(model, features, targets, training=training, privacy=survival.privacy,
                              noise_multiplier=1.0, delta=1e-5, engine=engine, objective=objective)  # fmt: skip
            timings[engine].append(result.seconds)
    plain = float(np.median(timings["plain"]))
    rows = [
        f"One epoch over {len(features):,} training patients, batch {training.batch_size}, median of 5:",
        "",
        "| training | seconds | ratio to no DP |",
        "|---|---|---|",
        f"| without DP | {plain:.3f} | 1.00 |",
    ]
    for engine in ("single-pass", "opacus"):
        seconds = float(np.median(timings[engine]))
        rows.append(f"| DP-SGD, {engine} engine | {seconds:.3f} | {seconds / plain:.2f} |")
    print("\n".join(rows))
    return rows


def _plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    PLOT.parent.mkdir(parents=True, exist_ok=True)
    figure, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.8), sharey=True)
    for axis, (label, scores) in zip(np.atleast_1d(axes), results.items(), strict=True):
        hospitals = scores["local"].shape[1]
        x = np.arange(hospitals)
        for offset, mode in zip((-0.25, 0.0, 0.25), ("local", "federated", "pooled"), strict=True):
            axis.bar(x + offset, scores[mode].mean(axis=0), width=0.25, label=mode)
        axis.set(title=f"epsilon {label}", xlabel="hospital (its held-out patients)", ylabel="Harrell's C",
                 ylim=(0.5, 0.9))  # fmt: skip
        axis.set_xticks(x, [f"#{i + 1}" for i in x])
        axis.legend(fontsize=7)
    figure.suptitle("Death within 90 days: local, federated and pooled survival models")
    figure.tight_layout()
    figure.savefig(PLOT, dpi=120)
    plt.close(figure)


def main() -> None:
    torch.set_num_threads(2)
    began = time.perf_counter()
    mortality, survival = _studies()
    sites = _consortium(mortality, survival)
    sizes = ", ".join(
        f"{name} {int((s['survival'].split == 'train').sum())} train / {int((s['survival'].split == 'test').sum())} "
        f"test, {s['survival'].labels.mean():.1%} deaths within 90 days"
        for name, s in sites.items()
    )
    table, results = _survival_table(survival, sites)
    _plot(results)
    overhead = _overhead(survival, sites)
    body = (
        "### Survival kind (issue 11)\n\n"
        f"3 hospitals x {PATIENTS:,} patients (seed 7): {sizes}. The example study's covariates, outcome "
        "`time_to_event` (death within 90 days of the prediction time, censored at the end of observation), "
        f"model `discrete_time_survival` on the grid {', '.join(f'{d:g}' for d in GRID)} days, training as the "
        f"example study ({survival.training.rounds} rounds x {survival.training.local_epochs} local epochs, batch "
        f"{survival.training.batch_size}, adam, delta 1/(10 n)). Harrell's C on exact times, mean over the "
        f"hospitals' held-out patients ± the standard deviation over {len(SEEDS)} seeds (range over hospitals).\n\n"
        + "\n".join(table)
        + f"\n\n![survival](img/{PLOT.name})\n\n"
        + _ceiling(sites)
        + "\n\n"
        "#### DP overhead of the survival kind\n\n"
        + "\n".join(overhead)
        + f"\n\nTotal {time.perf_counter() - began:.0f} s. Reproduce: `.venv/bin/python -m benchmarks.bench_survival`."
    )
    write_section("survival", body)
    shutil.rmtree(OUTPUT, ignore_errors=True)


if __name__ == "__main__":
    main()
