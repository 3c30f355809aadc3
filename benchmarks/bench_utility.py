"""Benchmark: what differential privacy costs in model quality (the epsilon-utility curve).

On the synthetic consortium (3 hospitals x 5,000 patients, each loaded into its own OMOP database by
the ETL) the example mortality study is trained at epsilon 1, 3, 8 and without DP, three ways:

* local only: each hospital alone (what a site can do without a consortium);
* federated (FedAvg of the sites' DP updates, weighted by training examples), run in one process here
  to isolate model quality from transport; the deployed path is the Flower coordinator;
* pooled: all hospitals' training patients in one place. **For benchmarks only**: it is exactly what
  twinfed exists to avoid, and serves as the ceiling a federation is compared with.

Every model is evaluated on each hospital's held-out test patients; the table gives the mean AUROC over
hospitals (and the range), and a plot is written next to docs/benchmarks.md.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.consortium import loaded_consortium
from benchmarks.machine import write_section

OUTPUT = Path(__file__).resolve().parent / "output" / "utility"
PLOT = Path(__file__).resolve().parents[1] / "docs" / "img" / "epsilon-utility.png"
EPSILONS: tuple[float | None, ...] = (1.0, 3.0, 8.0, None)  # None: no DP
SEEDS = (0, 1, 2)
# About a quarter of patients have a qualifying first stay; 5,000 per hospital leave ~250 test patients each.
PATIENTS = 5000


def _datasets() -> dict[str, object]:
    """Generate and load the consortium; one StudyDataset per hospital."""
    return loaded_consortium(OUTPUT, PATIENTS)


def _train(spec, model, features, labels, epsilon, rounds_done, history, global_state, seed):
    """One round of local training at the study's settings (DP unless epsilon is None)."""
    from site_node.training import calibrate_noise, schedule, train_dp, train_plain

    n = len(labels)
    if epsilon is None:
        return train_plain(model, features, labels, training=spec.training, global_state=global_state, seed=seed)
    delta = 1 / (10 * n)
    sample_rate, _, total_steps = schedule(n, spec.training)
    sigma = calibrate_noise(epsilon, delta, sample_rate, total_steps, spec.privacy.accountant)
    privacy = spec.privacy.model_copy(update={"target_epsilon": epsilon})
    return train_dp(model, features, labels, training=spec.training, privacy=privacy, noise_multiplier=sigma,
                    delta=delta, accountant_history=history, global_state=global_state, seed=seed)  # fmt: skip


def _auroc_per_site(spec, state, sites) -> list[float]:
    from federation.twins import build_model
    from site_node.training import evaluate

    scores = []
    for dataset in sites.values():
        test = dataset.subset("test")
        model = build_model(spec.model, test.features.shape[1])
        model.load_state_dict(state)
        scores.append(evaluate(model, test.features, test.labels)["auroc"])
    return scores


def _run(spec, sites, mode: str, epsilon: float | None, seed: int) -> list[float]:
    """Train `spec.training.rounds` rounds in one mode; returns test AUROC per hospital."""
    from federation.twins import build_model

    width = next(iter(sites.values())).features.shape[1]
    initial = build_model(spec.model, width, seed=seed).state_dict()
    if mode == "pooled":
        parts = [d.subset("train") for d in sites.values()]
        groups = {"pooled": (np.concatenate([p.features for p in parts]), np.concatenate([p.labels for p in parts]))}
    else:
        groups = {name: (d.subset("train").features, d.subset("train").labels) for name, d in sites.items()}
    histories: dict[str, list] = {name: [] for name in groups}
    states = {name: initial for name in groups}
    for server_round in range(spec.training.rounds):
        results = {}
        for name, (features, labels) in groups.items():
            model = build_model(spec.model, width)
            model.load_state_dict(states[name])
            results[name] = _train(spec, model, features, labels, epsilon, server_round, histories[name],
                                   states[name], seed * 1000 + server_round)  # fmt: skip
            histories[name] = results[name].history
        if mode == "federated":
            total = sum(r.num_examples for r in results.values())
            averaged = {
                key: sum(r.state_dict[key] * (r.num_examples / total) for r in results.values())
                for key in initial
            }
            states = {name: averaged for name in groups}
        else:
            states = {name: r.state_dict for name, r in results.items()}
    if mode == "local":
        # each hospital's own model on its own test patients
        return [_auroc_per_site(spec, states[name], {name: sites[name]})[0] for name in sites]
    return _auroc_per_site(spec, next(iter(states.values())), sites)


def _plot(curves: dict[str, list[tuple[float, float]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    PLOT.parent.mkdir(parents=True, exist_ok=True)
    figure, axis = plt.subplots(figsize=(6, 4))
    for mode, points in curves.items():
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=mode)
    axis.set_xscale("log")
    axis.set_xticks([1, 3, 8, 20], ["1", "3", "8", "no DP"])
    axis.set_xlabel("epsilon per hospital (whole study)")
    axis.set_ylabel("test AUROC, mean over hospitals")
    axis.set_title("In-hospital death at 24 h: privacy vs model quality")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(PLOT, dpi=120)
    plt.close(figure)


def main() -> None:
    torch.set_num_threads(2)
    began = time.perf_counter()
    loaded = _datasets()
    spec, sites = loaded["spec"], loaded["sites"]
    rows = [
        "| epsilon | local only | federated (FedAvg) | pooled (benchmark only) |",
        "|---|---|---|---|",
    ]
    curves: dict[str, list[tuple[float, float]]] = {"local only": [], "federated (FedAvg)": [], "pooled": []}
    for epsilon in EPSILONS:
        cells = []
        for mode, label in (("local", "local only"), ("federated", "federated (FedAvg)"), ("pooled", "pooled")):
            runs = np.array([_run(spec, sites, mode, epsilon, seed) for seed in SEEDS])  # seeds x hospitals
            per_seed_mean = runs.mean(axis=1)
            mean, spread = float(per_seed_mean.mean()), float(per_seed_mean.std())
            cells.append(f"{mean:.3f} ± {spread:.3f} (hospitals {runs.mean(axis=0).min():.3f}-"
                         f"{runs.mean(axis=0).max():.3f})")  # fmt: skip
            curves[label].append((epsilon if epsilon is not None else 20.0, mean))
        rows.append(f"| {'no DP' if epsilon is None else f'{epsilon:g}'} | " + " | ".join(cells) + " |")
        print(rows[-1])
    _plot(curves)
    sizes = ", ".join(
        f"{name} {len(d.subset('train').labels)} train / {len(d.subset('test').labels)} test"
        for name, d in sites.items()
    )
    rates = ", ".join(f"{name} {d.labels.mean():.1%}" for name, d in sites.items())
    body = (
        "### Epsilon-utility curve (issue 4): the example mortality study on the synthetic consortium\n\n"
        f"Study `configs/study-inpatient-mortality.yaml` ({spec.model.kind}, {spec.training.rounds} rounds x "
        f"{spec.training.local_epochs} local epoch, batch {spec.training.batch_size}, RDP accountant, "
        "delta = 1/(10 n)); "
        f"3 hospitals x {PATIENTS:,} patients (seed 7): {sizes}; 30-day death rate {rates}. Test AUROC, mean over the "
        f"hospitals' held-out patients, ± the standard deviation over {len(SEEDS)} training seeds (range over "
        "hospitals in brackets). 'Pooled' puts every hospital's patients in one place and exists only as the "
        "ceiling to compare with.\n\n"
        + "\n".join(rows)
        + f"\n\n![epsilon-utility](img/{PLOT.name})\n\nTotal {time.perf_counter() - began:.0f} s. "
        "Reproduce: `.venv/bin/python -m benchmarks.bench_utility`."
    )
    write_section("utility", body)
    shutil.rmtree(OUTPUT, ignore_errors=True)


if __name__ == "__main__":
    main()
