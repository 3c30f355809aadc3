"""The ceiling numbers in the ground truth are computed right."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from synthetic.ground_truth import expected_auroc, realized_auroc, realized_c_index


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


def test_realized_c_index_equals_lifelines_with_tied_times_tied_risks_and_censoring():
    from lifelines.utils import concordance_index

    rng = np.random.default_rng(2)
    time = np.round(rng.exponential(5.0, 400))  # many tied times
    event = rng.random(400) < 0.6
    risk = np.round(rng.normal(size=400), 1)  # many tied risks
    # lifelines ranks by predicted survival time: higher risk, shorter time
    assert realized_c_index(risk, time, event) == pytest.approx(concordance_index(time, -risk, event), abs=1e-12)


def test_realized_c_index_is_one_for_the_true_order_and_half_for_a_constant():
    time = np.arange(1.0, 21.0)
    event = np.ones(20, dtype=bool)
    assert realized_c_index(-time, time, event) == 1.0
    assert realized_c_index(time, time, event) == 0.0
    assert realized_c_index(np.zeros(20), time, event) == 0.5
    # a censored time equal to an event time counts as the later one; censored-only data has no pairs
    assert realized_c_index(np.array([2.0, 1.0]), np.array([5.0, 5.0]), np.array([True, False])) == 1.0
    assert np.isnan(realized_c_index(np.zeros(3), np.arange(3.0), np.zeros(3, dtype=bool)))
