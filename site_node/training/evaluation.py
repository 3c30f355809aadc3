"""Evaluate a study's model on a site's own data: the twin kind's exact metrics (kept at the site, or
released under the cell floor) and the pieces a differentially private evaluation release is made of.

The metrics themselves are the twin kind's (federation.twins: AUROC from rank statistics for the risk
kinds, Harrell's C and Brier scores for survival), in numpy, so a site node needs no scikit-learn at run
time. The exact metrics are computed on patient data without noise; `min_cell_count` withholds every
outcome-dependent value when either class is smaller than the site's small-cell threshold, because with,
say, two deaths the AUROC and the loss describe those two patients. What may actually leave is decided
for the release as a whole (site_node.evaluation_release).

The noise of a DP release comes from the operating system's entropy (`random.SystemRandom`), never from
a seeded generator: anyone who could replay the noise could subtract it.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
from torch import nn

from federation.contract.strata import SCORE_GRID, Strata, score_grid_cell
from federation.contract.twin_specs import LogisticRegressionSpec
from federation.twins import kind_of
from federation.twins.risk import auroc, confusion

__all__ = ["auroc", "confusion", "evaluate", "gaussian_noise", "model_logits", "model_outputs", "score_distribution"]

_ENTROPY = random.SystemRandom()
_RISK = LogisticRegressionSpec()


def model_outputs(model: nn.Module, features: np.ndarray) -> np.ndarray:
    """The model's outputs for each row (n, k); the model's train/eval mode is left as it was."""
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    if x.ndim != 2:
        raise ValueError(f"scoring needs (n, d) features; got {tuple(x.shape)}")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
        return out.reshape(len(x), -1).numpy().astype(np.float64)
    finally:
        model.train(was_training)


def model_logits(model: nn.Module, features: np.ndarray) -> np.ndarray:
    """A one-output (risk) model's logit for each row."""
    return model_outputs(model, features)[:, 0]


def score_histograms(logits: np.ndarray, labels: np.ndarray, strata: Strata) -> tuple[np.ndarray, np.ndarray]:
    """Per risk stratum, how many patients with the outcome and how many without it."""
    y = np.asarray(labels).astype(bool)
    cells = strata.of(logits)
    return np.bincount(cells[y], minlength=strata.count), np.bincount(cells[~y], minlength=strata.count)


def score_distribution(logits: np.ndarray) -> np.ndarray:
    """How many patients per cell of the fixed score grid (outcomes not involved)."""
    return np.bincount(score_grid_cell(logits), minlength=len(SCORE_GRID) + 1)


def gaussian_noise(count: int, sd: float) -> np.ndarray:
    """`count` draws of N(0, sd^2) from the operating system's entropy."""
    return np.array([_ENTROPY.gauss(0.0, sd) for _ in range(count)], dtype=np.float64)


def evaluate(
    model: nn.Module,
    features: np.ndarray,
    labels: np.ndarray,
    min_cell_count: int | None = None,
    *,
    model_spec=None,
    event_days: np.ndarray | None = None,
    threshold: float = 0.5,
    targets: np.ndarray | None = None,
) -> dict[str, float | int | None]:
    """The twin kind's exact metrics of `model` on the data, with `num_examples` and `num_positive` (patients
    with the outcome, or the event): for the risk kinds loss, AUROC and Brier score; for survival the C-index
    with its standard error, the Brier score at the horizon and the integrated Brier score. `model_spec` is
    the study's `model` section (default: a risk score); `event_days` the survival kinds' times.

    With `min_cell_count`, a count below it is None, and so is every outcome-dependent value whenever
    patients with or without the outcome number fewer than it. The model's train/eval mode is left as it was.
    """
    spec = model_spec if model_spec is not None else _RISK
    kind = kind_of(spec)
    y = np.asarray(labels, dtype=np.float32)
    if np.ndim(features) != 2 or y.ndim != 1 or len(features) != len(y) or len(y) == 0:
        raise ValueError(
            f"evaluation needs (n, d) features and (n,) labels with n > 0; got {np.shape(features)}, {y.shape}"
        )
    if targets is None:  # a kind whose targets the cohort builder cuts (trajectory) passes them
        targets = kind.targets_of(spec, y, event_days)
    result = kind.exact(spec, model_outputs(model, features), targets, threshold)
    n, n_pos = result.examples, result.with_outcome
    metrics: dict[str, float | int | None] = {**result.metrics, "num_examples": n, "num_positive": n_pos}
    if "auroc" in metrics and metrics["auroc"] is None:
        metrics["auroc"] = math.nan  # the risk kinds' local figure has always been NaN without both classes
    if min_cell_count is not None:
        if n < min_cell_count:
            metrics["num_examples"] = None
        if min(n_pos, n - n_pos) < min_cell_count:
            metrics.update(dict.fromkeys(result.metrics, None), num_positive=None)
    return metrics
