"""Benchmark: how much the DP evaluation release costs in accuracy of the pooled metrics (issue 9).

On the synthetic consortium (3 hospitals x 2,000 patients, as `make demo`, each loaded into its own OMOP
database by the ETL), a logistic model of the example mortality study is fitted on the pooled training
parts (benchmark only: the model is only there to have realistic scores). Then each hospital's test
part is released the way a site releases it, many times over, and pooled the way the coordinator pools:

* exact (the oracle): the AUROC of all test patients ranked together, and sensitivity at 0.5;
* the earlier release (per-site exact AUROC pooled by inverse-variance weights, Hanley-McNeil), which
  was not private and leaked small cells;
* the DP release at evaluation epsilon 0.5, 1, 2 and 4 (one release at delta 1e-5, RDP): noisy
  histograms over the study's fixed risk strata (6), or over adaptive strata placed from a first DP
  release of the unlabelled scores (20% of the budget), as the coordinator does by default.

Two models: the fitted one as it is (risks spread from under 1% to over 50%), and the same scores
squeezed towards their mean (x 0.35 on the logit scale), as a DP-trained model's are: in `make demo`
the federated model put 90% of test patients between 1.5% and 7% risk.

For the DP release: bias and root mean square error against the oracle, the coverage of its 95%
interval (how often the oracle lies inside) and the interval's width. The same at "small hospitals":
a quarter of each test part (kept by a fixed draw), where the noise weighs more.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from benchmarks.consortium import loaded_consortium
from benchmarks.machine import write_section

OUTPUT = Path(__file__).resolve().parent / "output" / "evaluation"
PLOT = Path(__file__).resolve().parents[1] / "docs" / "img" / "evaluation-release.png"
PATIENTS = 2000
EPSILONS = (0.5, 1.0, 2.0, 4.0)
REPEATS = 200
DELTA = 1e-5


def _scores() -> tuple[object, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """(study, {site: (test logits, test labels)}) from a model fitted on the pooled training parts."""
    from sklearn.linear_model import LogisticRegression

    loaded = loaded_consortium(OUTPUT, PATIENTS)
    spec, datasets = loaded["spec"], loaded["sites"]
    train = [d.subset("train") for d in datasets.values()]
    model = LogisticRegression(max_iter=2000).fit(
        np.concatenate([t.features for t in train]), np.concatenate([t.labels for t in train])
    )
    tests = {}
    for site, dataset in datasets.items():
        test = dataset.subset("test")
        tests[site] = (model.decision_function(test.features), test.labels.astype(bool))
    return spec, tests


def _noisy(counts, sd, rng):
    return list(counts + rng.normal(0, sd, len(counts)))


def _releases(tests, evaluation, strata_kind: str, sigma: float, rng) -> list:
    """One evaluation of every site, as sites and coordinator make it (noise from `rng` for repeatability)."""
    from federation.contract.protocol import EvaluationRelease, ReleaseMode
    from federation.contract.strata import Strata, adaptive_strata
    from federation.twins.pooling import pool_scores
    from site_node.training.evaluation import score_distribution, score_histograms

    share = evaluation.strata_budget_share
    if strata_kind == "fixed":
        strata, sd = Strata.fixed(evaluation), sigma
    else:
        scores = [
            (site, EvaluationRelease(part="test", mode=ReleaseMode.DP, stage="scores", noise_sd=sigma / share**0.5,
                                     scores=_noisy(score_distribution(lg), sigma / share**0.5, rng)))
            for site, (lg, _) in tests.items()
        ]  # fmt: skip
        strata, sd = adaptive_strata(pool_scores(scores), evaluation), sigma / (1 - share) ** 0.5
    releases = []
    for site, (logits, labels) in tests.items():
        positives, negatives = score_histograms(logits, labels, strata)
        releases.append(
            (site, EvaluationRelease(part="test", mode=ReleaseMode.DP, score_edges=list(strata.edges), noise_sd=sd,
                                     positives=_noisy(positives, sd, rng), negatives=_noisy(negatives, sd, rng)))
        )  # fmt: skip
    return releases


def _earlier_release(tests) -> tuple[float, float]:
    """The pre-issue-9 pooled AUROC: inverse-variance mean of per-site exact AUROCs (value, CI width)."""
    from federation.twins.pooling import Z95
    from federation.twins.risk_pooling import hanley_mcneil_se
    from site_node.training.evaluation import auroc

    terms = []
    for logits, labels in tests.values():
        if labels.all() or not labels.any():
            continue  # a hospital without deaths (or survivors) in the part had no AUROC to release
        a = auroc(labels, logits)
        se = hanley_mcneil_se(a, labels.sum(), (~labels).sum())
        terms.append((a, 1 / se**2))
    if not terms:
        return float("nan"), float("nan")
    weight = sum(w for _, w in terms)
    return sum(a * w for a, w in terms) / weight, 2 * Z95 / np.sqrt(weight)


def _case(tests, evaluation, strata_kind: str, epsilon: float, rng) -> dict[str, float]:
    from federation.twins.risk_pooling import pool_evaluations
    from site_node.training import calibrate_noise
    from site_node.training.evaluation import auroc

    sd = calibrate_noise(epsilon, DELTA, 1.0, 1, "rdp")
    logits = np.concatenate([t[0] for t in tests.values()])
    labels = np.concatenate([t[1] for t in tests.values()])
    oracle = auroc(labels, logits)
    oracle_sensitivity = float((logits[labels] >= 0).mean())
    errors, sens_errors, covered, widths = [], [], 0, []
    for repeat in range(REPEATS):
        pooled = pool_evaluations(_releases(tests, evaluation, strata_kind, sd, rng), evaluation, seed=repeat)
        if pooled.auroc.value is None:
            continue
        errors.append(pooled.auroc.value - oracle)
        if pooled.sensitivity.value is not None:
            sens_errors.append(pooled.sensitivity.value - oracle_sensitivity)
        if pooled.auroc.low is not None:
            covered += pooled.auroc.low <= oracle <= pooled.auroc.high
            widths.append(pooled.auroc.high - pooled.auroc.low)
    errors = np.asarray(errors)
    return {
        "epsilon": epsilon,
        "noise_sd": sd,
        "oracle": oracle,
        "bias": float(errors.mean()),
        "rmse": float(np.sqrt(np.mean(errors**2))),
        "coverage": covered / max(len(widths), 1),
        "width": float(np.mean(widths)) if widths else float("nan"),
        "sensitivity_rmse": float(np.sqrt(np.mean(np.square(sens_errors)))) if sens_errors else float("nan"),
        "estimable": len(errors) / REPEATS,
    }


def _plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for (size, grid), group in _groups(rows).items():
        eps = [r["epsilon"] for r in group]
        label = f"{size}, {grid}"
        axes[0].plot(eps, [r["rmse"] for r in group], marker="o", label=label)
        axes[1].plot(eps, [r["coverage"] for r in group], marker="o", label=label)
    axes[0].set(xscale="log", xlabel="evaluation epsilon per site", ylabel="RMSE of pooled AUROC",
                title="Error against the exact pooled AUROC")  # fmt: skip
    axes[1].axhline(0.95, color="grey", linestyle=":")
    axes[1].set(xscale="log", xlabel="evaluation epsilon per site", ylabel="coverage", ylim=(0.5, 1.02),
                title="How often the 95% interval holds the exact value")  # fmt: skip
    for axis in axes:
        axis.set_xticks(EPSILONS, [f"{e:g}" for e in EPSILONS])
        axis.minorticks_off()
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    PLOT.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(PLOT, dpi=100)
    plt.close(figure)


def _groups(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((f"{row['model']}, {row['size']}", row["grid"]), []).append(row)
    return groups


def _squeezed(tests, factor: float = 0.35) -> dict:
    centre = float(np.mean(np.concatenate([lg for lg, _ in tests.values()])))
    return {site: (centre + factor * (lg - centre), lb) for site, (lg, lb) in tests.items()}


def main() -> None:
    started = time.perf_counter()
    spec, tests = _scores()
    rng = np.random.default_rng(20261201)
    keep = {site: rng.random(len(labels)) < 0.25 for site, (_, labels) in tests.items()}
    small = {site: (lg[keep[site]], lb[keep[site]]) for site, (lg, lb) in tests.items()}
    cases = [
        ("spread model", "full test parts", tests),
        ("squeezed model", "full test parts", _squeezed(tests)),
        ("spread model", "quarter test parts", small),
    ]
    rows = []
    for model, size, data in cases:
        for strata_kind in ("fixed", "adaptive"):
            for epsilon in EPSILONS:
                case = _case(data, spec.evaluation, strata_kind, epsilon, rng)
                rows.append({"model": model, "size": size, "grid": f"{strata_kind} strata", **case})
    _plot(rows)
    sizes = (("full test parts", tests), ("quarter test parts", small))
    counts = {
        size: (sum(len(lb) for _, lb in data.values()), sum(int(lb.sum()) for _, lb in data.values()))
        for size, data in sizes
    }
    earlier = {size: _earlier_release(data) for size, data in sizes}
    lines = [
        "### DP evaluation release (issue 9): pooled metrics from noisy score histograms",
        "",
        f"3 synthetic hospitals x {PATIENTS:,} patients (seed 7), the example mortality study; a logistic model "
        "fitted on the pooled training parts (benchmark only) scores each hospital's test part; the squeezed "
        "model is the same scores pulled towards their mean (x 0.35 on the logit scale), like a DP-trained "
        f"model's. Each DP release at delta {DELTA:g} (RDP), {REPEATS} releases per row, pooled as the "
        "coordinator pools them (adaptive strata: 20% of the budget places them from the unlabelled scores). "
        "Oracle: the exact AUROC of all test patients ranked together.",
        "",
    ]
    for size, (n, positives) in counts.items():
        value, width = earlier[size]
        lines.append(
            f"- {size}: {n} test patients, {positives} deaths over 3 hospitals; the earlier (non-private) release "
            f"pooled per-site AUROCs to {value:.3f} with a 95% interval {width:.3f} wide."
        )
    lines += [
        "",
        "| model | test parts | strata | eval. epsilon | exact AUROC | bias | RMSE | 95% CI coverage "
        "| mean CI width | sensitivity RMSE |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['size']} | {row['grid']} | {row['epsilon']:g} | {row['oracle']:.3f} | "
            f"{row['bias']:+.4f} | {row['rmse']:.4f} | {row['coverage']:.2f} | {row['width']:.3f} | "
            f"{row['sensitivity_rmse']:.3f} |"
        )
    lines += [
        "",
        f"![error and coverage of the DP evaluation](img/{PLOT.name})",
        "",
        f"Whole benchmark: {time.perf_counter() - started:.0f} s. Run: `python -m benchmarks.bench_evaluation`.",
    ]
    write_section("evaluation", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
