"""The hospital twin's arrivals model (issue 13): it recovers known clock, week and day-to-day variation
from a simulated history, and the simulation fed with it arrives as the history did."""

from __future__ import annotations

import numpy as np
import pytest

from site_node.hospital_twin import ArrivalStream, HospitalModel, Ward, exponential_stay, simulate
from site_node.hospital_twin.arrivals import ArrivalHistoryError, fit_arrivals, stream_rates

START = 19723  # 2024-01-01, a Monday, in days since 1970-01-01
HOUR_OF_DAY = 0.6 * np.sin((np.arange(24) - 10) / 24 * 2 * np.pi)
DAY_OF_WEEK = np.array([0.15, 0.05, 0.0, 0.0, -0.02, -0.1, -0.08])
DISPERSION = 0.04


def history(days: int, seed: int = 4) -> np.ndarray:
    """Arrival times (hours since START) from a known model: 2 an hour on average, a gamma day effect."""
    rng = np.random.default_rng(seed)
    hod, dow = HOUR_OF_DAY - HOUR_OF_DAY.mean(), DAY_OF_WEEK - DAY_OF_WEEK.mean()
    times = []
    for day in range(days):
        effect = rng.gamma(1 / DISPERSION, DISPERSION)
        rates = np.exp(np.log(2.0) + hod + dow[day % 7]) * effect
        for hour, count in enumerate(rng.poisson(rates)):
            times.extend(day * 24 + hour + rng.random(count))
    return np.asarray(times)


@pytest.fixture(scope="module")
def fitted():
    return fit_arrivals("emergency", history(180), START, 180)


def test_the_arrivals_model_recovers_the_clock_the_week_and_the_day_to_day_spread(fitted):
    truth = HOUR_OF_DAY - HOUR_OF_DAY.mean()
    standard_error = 1 / np.sqrt(180 * 2.0 * np.exp(truth))  # of a log rate from that hour's expected count
    assert (np.abs(np.array(fitted.hour_of_day) - truth) < 4 * standard_error).all()
    # a weekday's effect rests on ~26 days, each with its own day effect: standard error ~0.04
    assert np.abs(np.array(fitted.day_of_week) - (DAY_OF_WEEK - DAY_OF_WEEK.mean())).max() < 0.12
    assert fitted.intercept == pytest.approx(np.log(2.0), abs=0.05)
    assert fitted.day_dispersion == pytest.approx(DISPERSION, abs=0.02)
    assert fitted.season == [0.0] * 4 and fitted.trend_per_year == 0.0, "half a year fits neither"


def test_the_simulation_fed_by_the_model_arrives_as_the_history_did(fitted):
    days = 56
    stream = ArrivalStream("emergency", "ward", (0.0,), exponential_stay(1.0), day_dispersion=fitted.day_dispersion,
                           run_rates=stream_rates(fitted, START + 180, days))  # fmt: skip
    model = HospitalModel(wards=(Ward("ward", 500),), arrivals=(stream,))
    daily = np.concatenate([simulate(model, days, seed).arrived[:, 0] for seed in range(6)])
    observed = np.bincount((history(180) // 24).astype(int))
    assert daily.mean() == pytest.approx(observed.mean(), rel=0.03)
    assert daily.var() == pytest.approx(observed.var(), rel=0.35)  # Poisson days alone would be ~1/3 of it
    assert daily.var() > 1.5 * daily.mean()


def test_a_history_the_model_cannot_use_is_refused_with_the_reason():
    with pytest.raises(ArrivalHistoryError, match="at least 28"):
        fit_arrivals("emergency", [1.0, 2.0], START, 10)
    with pytest.raises(ArrivalHistoryError, match="outside the 30-day history"):
        fit_arrivals("emergency", [1.0, 30 * 24 + 5.0], START, 30)
    with pytest.raises(ArrivalHistoryError, match="no arrivals"):
        fit_arrivals("emergency", [], START, 30)


def test_two_years_of_history_give_the_winter_peak_and_the_growth():
    rng = np.random.default_rng(11)
    days = 730
    day = np.arange(days)
    phase = 2 * np.pi * (START + day) / 365.25
    daily_rate = 48 * np.exp(0.2 * np.cos(phase) + 0.1 * day / 365.25)  # winter peak, +10% a year
    counts = rng.poisson(daily_rate)
    times = np.concatenate([d * 24 + 24 * rng.random(n) for d, n in zip(day, counts, strict=True)])
    fitted = fit_arrivals("emergency", times, START, days)
    assert fitted.trend_per_year == pytest.approx(0.1, abs=0.03)
    assert fitted.season[0] == pytest.approx(0.2, abs=0.03) and abs(fitted.season[1]) < 0.03
    january, july = fitted.rates(START + 731, 1).sum(), fitted.rates(START + 731 + 181, 1).sum()
    assert january > 1.3 * july


def test_the_fit_is_the_maximum_likelihood_scikit_learn_finds_for_the_same_penalised_model():
    from sklearn.linear_model import PoissonRegressor

    from site_node.hospital_twin.arrivals import RIDGE, _design

    days = 60
    times = history(days, seed=9)
    fitted = fit_arrivals("emergency", times, START, days)
    day = np.repeat(np.arange(START, START + days), 24)
    design = _design(day, np.tile(np.arange(24), days), START)[:, 1:-5]  # no season or trend under a year
    counts = np.bincount(times.astype(int), minlength=days * 24)
    reference = PoissonRegressor(alpha=RIDGE, max_iter=1000, tol=1e-10).fit(design, counts)
    assert fitted.intercept == pytest.approx(reference.intercept_, abs=1e-4)
    assert np.allclose(fitted.hour_of_day[1:], reference.coef_[:23], atol=1e-4)
    assert np.allclose(fitted.day_of_week[1:], reference.coef_[23:29], atol=1e-4)
