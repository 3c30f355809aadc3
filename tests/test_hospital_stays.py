"""The hospital twin's length-of-stay model (issue 13): censored stays, draws, and the warm start's
remaining stays."""

from __future__ import annotations

import numpy as np
import pytest

from site_node.hospital_twin.stays import StayHistoryError, fit_stays


def censored_lognormal(n: int, seed: int = 0):
    """Stays of median 72 h; the history is read at a random time, so long stays are more often still running."""
    rng = np.random.default_rng(seed)
    true = rng.lognormal(np.log(72.0), 0.8, n)
    read_at = rng.uniform(0, 400, n)  # hours after each admission when the history was read
    return np.minimum(true, read_at), true <= read_at


def test_the_stays_still_running_are_counted_and_the_curve_recovers_the_true_median():
    hours, ended = censored_lognormal(4000)
    model = fit_stays("general", "emergency", hours, ended)
    draws = model.sample(np.random.default_rng(1), 20000)
    assert model.censored == int((~ended).sum()) > 400
    assert np.median(draws) == pytest.approx(72.0, rel=0.05)
    assert np.median(hours[ended]) < 0.85 * 72.0, "only the finished stays would have biased it down"
    assert np.quantile(draws, 0.9) == pytest.approx(72.0 * np.exp(0.8 * 1.2816), rel=0.08)


def test_a_patient_already_in_is_given_a_stay_that_continues_past_now():
    rng = np.random.default_rng(2)
    hours = rng.exponential(50.0, 5000)
    model = fit_stays("icu", "emergency", hours, np.ones_like(hours, dtype=bool))
    for elapsed in (0.0, 20.0, 60.0):
        remaining = model.sample_remaining(rng, np.full(20000, elapsed))
        assert (remaining >= 0).all()
        assert remaining.mean() == pytest.approx(50.0, rel=0.06), "memoryless stays: 50 h left whatever the elapsed"
    beyond = model.sample_remaining(rng, np.full(5000, 2000.0))  # longer than anyone observed: the tail
    assert (beyond > 0).all() and 20 < beyond.mean() < 100


def test_a_scenario_scales_the_stays_of_its_case_mix():
    hours, ended = censored_lognormal(2000, seed=3)
    model = fit_stays("general", "elective", hours, ended)
    base, shorter = model.sampler()(np.random.default_rng(4), 1000), model.sampler(0.9)(np.random.default_rng(4), 1000)
    assert np.allclose(shorter, 0.9 * base), "the same draws, 10% shorter: common random numbers"


def test_stays_the_model_cannot_use_are_refused_with_the_reason():
    with pytest.raises(StayHistoryError, match="at least 20"):
        fit_stays("icu", "elective", [5.0] * 10, [True] * 10)
    with pytest.raises(StayHistoryError, match="negative"):
        fit_stays("icu", "elective", [-1.0] + [5.0] * 30, [True] * 31)
    with pytest.raises(StayHistoryError, match="ended flags"):
        fit_stays("icu", "elective", [5.0] * 30, [True] * 29)
