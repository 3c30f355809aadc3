"""The ceiling numbers in the ground truth are computed right."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from synthetic.ground_truth import expected_auroc, realized_auroc


def test_expected_auroc_of_uninformative_and_perfect_probabilities():
    assert expected_auroc(np.full(100, 0.3)) == pytest.approx(0.5)
    assert expected_auroc(np.array([0.0] * 50 + [1.0] * 50)) == 1.0


def test_expected_auroc_matches_the_average_over_simulated_labels():
    rng = np.random.default_rng(0)
    p = rng.beta(0.6, 4.0, 400)
    simulated = [roc_auc_score(y, p) for y in (rng.random((300, p.size)) < p) if 0 < y.sum() < y.size]
    assert abs(expected_auroc(p) - np.mean(simulated)) < 0.01


def test_realized_auroc_equals_sklearn_with_ties():
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 5, 300).astype(float)
    labels = rng.random(300) < 0.3
    assert abs(realized_auroc(scores, labels) - roc_auc_score(labels, scores)) < 1e-12
