"""The patient twin's split-conformal step (issue 12): whatever the model's own quantiles, the intervals a site
shows cover their nominal share of new patients' values, from the site's own calibration patients."""

from __future__ import annotations

import numpy as np
import torch

from federation.contract.twin_specs import TrajectorySpec
from federation.twins.trajectory import ConformalTrajectory, conformal_offsets, forecast_scores
from federation.twins.trajectory_model import TrajectoryExamples

SPEC = TrajectorySpec(
    signals=[{"name": "glucose", "concept_ids": [1], "normal_range": [70, 180]},
             {"name": "lactate", "concept_ids": [2], "normal_range": [0.5, 2.0], "transform": "log"}],
    step_hours=4, history_steps=3, horizon_steps=2, windows_per_patient=1, hidden=4,
)  # fmt: skip


def _patients(n: int, rng: np.random.Generator, noise: float) -> tuple[np.ndarray, np.ndarray]:
    """The future is the last observed value plus N(0, noise^2): a known noise the intervals must cover."""
    layout = TrajectoryExamples(SPEC, 2).layout
    level = rng.normal(size=(n, 1, 1, 2))
    history = np.concatenate([np.repeat(level, 3, axis=2)[..., None], np.ones((n, 1, 3, 2, 2))], axis=-1)
    future = np.repeat(level, 2, axis=2) + rng.normal(scale=noise, size=(n, 1, 2, 2))
    x = layout.pack_inputs(rng.normal(size=(n, 2)), history, np.zeros((n, 1, 5, 0)))
    y = layout.pack_targets(future, np.ones_like(future), np.zeros((n, 1)), np.ones((n, 1)), np.ones((n, 1)))
    return x, y


def test_conformal_intervals_cover_their_nominal_share_of_new_patients_whatever_the_model():
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    model = TrajectoryExamples(SPEC, 2)  # untrained: its own intervals mean nothing
    calibration, test = _patients(3000, rng, noise=0.7), _patients(3000, rng, noise=0.7)
    with torch.no_grad():
        raw = model(torch.from_numpy(test[0])).numpy()
        offsets = conformal_offsets(SPEC, model(torch.from_numpy(calibration[0])).numpy(), calibration[1])
        conformal = ConformalTrajectory(model, offsets)
        calibrated = conformal(torch.from_numpy(test[0])).numpy()
    before, after = forecast_scores(SPEC, raw, test[1]), forecast_scores(SPEC, calibrated, test[1])
    assert abs(np.mean(before["coverage_80"]) - 0.80) > 0.10  # the raw intervals are far off
    assert abs(np.mean(after["coverage_80"]) - 0.80) < 0.025
    assert abs(np.mean(after["coverage_95"]) - 0.95) < 0.015
    assert offsets.shape == (2, 2, 2)
    # quantiles stay ordered, the median and the event are untouched
    quantiles = calibrated[:, : 2 * 2 * 5].reshape(-1, 2, 2, 5)
    assert (np.diff(quantiles, axis=-1) >= 0).all()
    np.testing.assert_allclose(quantiles[..., 2], raw[:, : 2 * 2 * 5].reshape(-1, 2, 2, 5)[..., 2], rtol=1e-6)
    np.testing.assert_allclose(calibrated[:, 20:], raw[:, 20:], rtol=1e-6)


def test_too_few_calibration_values_widen_by_the_largest_score():
    rng = np.random.default_rng(1)
    torch.manual_seed(1)
    model = TrajectoryExamples(SPEC, 2)
    x, y = _patients(5, rng, noise=0.5)
    with torch.no_grad():
        outputs = model(torch.from_numpy(x)).numpy()
    offsets = conformal_offsets(SPEC, outputs, y)
    with torch.no_grad():
        widened = ConformalTrajectory(model, offsets)(torch.from_numpy(x)).numpy()
    assert (forecast_scores(SPEC, widened, y)["coverage_95"] == 1.0).all()  # every calibration value inside
