"""Evaluate a risk model on a site's own data: exact metrics (kept at the site, or released under the cell
floor) and the per-class risk-stratum histograms a differentially private evaluation release is made of.

AUROC is computed from rank statistics (Mann-Whitney U with average ranks for tied scores) in numpy, so
a site node needs no scikit-learn at run time. The exact metrics are computed on patient data without
noise; `min_cell_count` withholds every outcome-dependent value when either class is smaller than the
site's small-cell threshold, because with, say, two deaths the AUROC and the loss describe those two
patients. What may actually leave is decided for the release as a whole (site_node.evaluation_release).

The noise of a DP release comes from the operating system's entropy (`random.SystemRandom`), never from
a seeded generator: anyone who could replay the noise could subtract it.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from federation.contract.strata import SCORE_GRID, Strata, score_grid_cell

_ENTROPY = random.SystemRandom()


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Probability that a random positive scores above a random negative (ties count one half);
    NaN when a class is missing or a score is not finite."""
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0 or not np.isfinite(s).all():
        return math.nan
    _, group, counts = np.unique(s, return_inverse=True, return_counts=True)
    # A group of tied scores occupies ranks end - count + 1 .. end; each member gets their mean.
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0
    rank_sum = float(average_rank[group][y].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def model_logits(model: nn.Module, features: np.ndarray) -> np.ndarray:
    """The model's score (a logit) for each row; the model's train/eval mode is left as it was."""
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    if x.ndim != 2:
        raise ValueError(f"scoring needs (n, d) features; got {tuple(x.shape)}")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(x).squeeze(-1).numpy().astype(np.float64)
    finally:
        model.train(was_training)


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


def confusion(logits: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, int]:
    """True/false positives/negatives when a risk at or above `threshold` counts as positive."""
    y = np.asarray(labels).astype(bool)
    flagged = np.asarray(logits, dtype=np.float64) >= math.log(threshold / (1 - threshold))
    return {
        "tp": int((flagged & y).sum()),
        "fn": int((~flagged & y).sum()),
        "fp": int((flagged & ~y).sum()),
        "tn": int((~flagged & ~y).sum()),
    }


def evaluate(
    model: nn.Module, features: np.ndarray, labels: np.ndarray, min_cell_count: int | None = None
) -> dict[str, float | int | None]:
    """{loss, auroc, brier, num_examples, num_positive} of `model` (one logit per example) on the data.

    With `min_cell_count`, a count below it is None, and so are loss, AUROC and Brier score whenever
    positives or negatives number fewer than it. The model's train/eval mode is left as it was.
    """
    y = np.asarray(labels, dtype=np.float32)
    if np.ndim(features) != 2 or y.ndim != 1 or len(features) != len(y) or len(y) == 0:
        raise ValueError(
            f"evaluation needs (n, d) features and (n,) labels with n > 0; got {np.shape(features)}, {y.shape}"
        )
    logits = torch.from_numpy(model_logits(model, features).astype(np.float32))
    target = torch.from_numpy(y)
    probabilities = torch.sigmoid(logits)
    n, n_pos = len(y), int(y.sum())
    metrics: dict[str, float | int | None] = {
        "loss": float(F.binary_cross_entropy_with_logits(logits, target)),
        "auroc": auroc(y, logits.numpy()),
        "brier": float((probabilities - target).square().mean()),
        "num_examples": n,
        "num_positive": n_pos,
    }
    if min_cell_count is not None:
        if n < min_cell_count:
            metrics["num_examples"] = None
        if min(n_pos, n - n_pos) < min_cell_count:
            metrics.update(loss=None, auroc=None, brier=None, num_positive=None)
    return metrics
