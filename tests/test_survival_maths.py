"""The survival evaluation maths (federation/twins/survival_maths.py): small cases worked by hand, agreement
with lifelines and scikit-survival (test-only references) on simulated data with ties, the coverage of the
C-index interval, and the binned (cell histogram) versions against their exact counterparts."""

from __future__ import annotations

import numpy as np
import pytest

from federation.twins import survival_maths as sm

lifelines_utils = pytest.importorskip("lifelines.utils")
sksurv_metrics = pytest.importorskip("sksurv.metrics")
sksurv_nonparametric = pytest.importorskip("sksurv.nonparametric")
from lifelines import KaplanMeierFitter  # noqa: E402
from sksurv.util import Surv  # noqa: E402


def _weibull_sample(rng, n, *, shape=1.5, scale=100.0, censor_max=200.0, risk_noise=0.7):
    """Weibull event times whose scale falls with a covariate x; uniform censoring; risk = x + noise."""
    x = rng.normal(size=n)
    event_time = scale * np.exp(-0.8 * x) * rng.weibull(shape, n)
    censor_time = rng.uniform(0, censor_max, n)
    time = np.minimum(event_time, censor_time)
    event = event_time <= censor_time
    risk = x + rng.normal(0, risk_noise, n)
    return time, event, risk, x


def _tied_sample(rng, n=500):
    """Times rounded to whole days and risks to one decimal: ties in time (events with events, events with
    censorings) and in risk."""
    time, event, risk, x = _weibull_sample(rng, n)
    return np.ceil(time), event, np.round(risk, 1), x


def _brute_force_pairs(time, event, risk):
    """Every pair checked: comparable when i had the event and t_i < t_j, or t_i == t_j with j censored."""
    later = (time[:, None] < time[None, :]) | ((time[:, None] == time[None, :]) & ~event[None, :])
    comparable = event[:, None] & later
    concordant = comparable & (risk[:, None] > risk[None, :])
    tied = comparable & (risk[:, None] == risk[None, :])
    return int(comparable.sum()), int(concordant.sum()), int(tied.sum())


def _cells(time, event, risk, edges, strata):
    """The site-side histogram: interval k holds edges[k-1] < t <= edges[k]; strata at quantiles of risk."""
    interval = np.searchsorted(edges, time, side="left")
    cuts = np.quantile(risk, np.linspace(0, 1, strata + 1)[1:-1])
    stratum = np.searchsorted(cuts, risk)
    counts = np.zeros((strata, len(edges) + 1, 2))
    np.add.at(counts, (stratum, interval, event.astype(int)), 1.0)
    return counts, stratum, interval


# --------------------------------------------------------------------------------------------------------
# Harrell's C


def test_c_index_by_hand_with_ties_in_risk_and_time_and_early_censoring():
    #        A    B    C    D    E    F    G
    time = [1.0, 2.0, 2.0, 3.0, 4.0, 0.5, 3.0]
    event = [1, 1, 0, 1, 0, 0, 1]
    risk = [0.9, 0.5, 0.5, 0.7, 0.1, 0.2, 0.3]
    # Comparable pairs (earlier event first):
    #   A-B A-C A-D A-E A-G  all concordant (0.9 above every other risk)                    5 concordant
    #   B-C  same time, B event, C censored: comparable; risk 0.5 = 0.5                     1 tied
    #   B-D  0.5 < 0.7 discordant;  B-E  0.5 > 0.1 concordant;  B-G  0.5 > 0.3 concordant   2 concordant
    #   D-E  0.7 > 0.1 concordant;  G-E  0.3 > 0.1 concordant                               2 concordant
    #   D-G  both events at time 3: not comparable.  F censored at 0.5 before any event: in no pair.
    # 11 pairs, 9 concordant, 1 tied, 1 discordant: C = (9 + 0.5) / 11
    result = sm.harrell_c_index(time, event, risk)
    assert result.comparable_pairs == 11
    assert result.concordant == 9
    assert result.tied_risk == 1
    assert result.value == pytest.approx(9.5 / 11, abs=1e-15)
    assert 0.0 <= result.low <= result.value <= result.high <= 1.0


def test_c_index_pair_counts_match_every_pair_checked_on_heavily_tied_data():
    rng = np.random.default_rng(11)
    time = rng.integers(0, 15, 400).astype(float)
    event = rng.random(400) < 0.6
    risk = rng.integers(0, 6, 400).astype(float)
    result = sm.harrell_c_index(time, event, risk)
    comparable, concordant, tied = _brute_force_pairs(time, event, risk)
    assert (result.comparable_pairs, result.concordant, result.tied_risk) == (comparable, concordant, tied)


def test_c_index_matches_scikit_survival_and_lifelines_with_ties():
    rng = np.random.default_rng(2024)
    time, event, risk, _ = _tied_sample(rng, 500)
    assert len(np.unique(time)) < 300 and len(np.unique(risk)) < 100  # the ties are really there
    result = sm.harrell_c_index(time, event, risk)

    c, concordant, discordant, tied_risk, _tied_time = sksurv_metrics.concordance_index_censored(event, time, risk)
    assert result.value == pytest.approx(c, abs=1e-12)
    assert result.concordant == concordant
    assert result.tied_risk == tied_risk
    assert result.comparable_pairs == concordant + discordant + tied_risk

    # lifelines scores predicted survival times (higher = later event), so the risk goes in negated
    assert result.value == pytest.approx(lifelines_utils.concordance_index(time, -risk, event), abs=1e-12)


def test_c_index_jackknife_equals_recomputing_without_each_patient():
    rng = np.random.default_rng(5)
    time, event, risk, _ = _tied_sample(rng, 60)
    result = sm.harrell_c_index(time, event, risk)
    n = len(time)
    leave_one_out = np.array(
        [sm.harrell_c_index(np.delete(time, m), np.delete(event, m), np.delete(risk, m)).value for m in range(n)]
    )
    expected = np.sqrt((n - 1) / n * np.sum((leave_one_out - leave_one_out.mean()) ** 2))
    assert result.standard_error == pytest.approx(expected, rel=1e-12)
    assert result.low == pytest.approx(result.value - 1.959963984540054 * expected, rel=1e-12)


def test_c_index_interval_covers_the_true_value_about_95_percent_of_the_time():
    # The estimand of Harrell's C depends on the censoring, so the "true" C is Harrell's C of one very large
    # sample from the same process (its own standard error is about 0.001, against about 0.027 at n = 200).
    truth = sm.harrell_c_index(*_weibull_sample(np.random.default_rng(0), 200_000)[:3]).value
    rng = np.random.default_rng(1)
    covered = 0
    for _ in range(200):
        result = sm.harrell_c_index(*_weibull_sample(rng, 200)[:3])
        covered += result.low <= truth <= result.high
    assert 0.90 <= covered / 200 <= 0.99


def test_c_index_edge_cases():
    everyone_censored = sm.harrell_c_index([1.0, 2.0, 3.0], [0, 0, 0], [0.1, 0.2, 0.3])
    assert everyone_censored.value is None and everyone_censored.standard_error is None
    assert everyone_censored.comparable_pairs == 0
    empty = sm.harrell_c_index([], [], [])
    assert empty.value is None
    # one comparable pair: a C, but removing either patient leaves nothing, so no jackknife
    single = sm.harrell_c_index([1.0, 2.0], [1, 0], [0.9, 0.1])
    assert single.value == 1.0 and single.standard_error is None and single.low is None
    # a perfectly ordered sample: the interval is clipped at 1
    perfect = sm.harrell_c_index(np.arange(1.0, 41.0), np.ones(40), -np.arange(40.0))
    assert perfect.value == 1.0 and perfect.high == 1.0
    with pytest.raises(ValueError, match="risk contains NaN"):
        sm.harrell_c_index([1.0, 2.0], [1, 0], [0.5, np.nan])
    with pytest.raises(ValueError, match="time contains NaN"):
        sm.harrell_c_index([np.nan, 2.0], [1, 0], [0.5, 0.4])
    with pytest.raises(ValueError, match="event must be 0"):
        sm.harrell_c_index([1.0, 2.0], [2, 0], [0.5, 0.4])
    with pytest.raises(ValueError, match="3 values but there are 2"):
        sm.harrell_c_index([1.0, 2.0], [1, 0], [0.5, 0.4, 0.3])


# --------------------------------------------------------------------------------------------------------
# Kaplan-Meier and the censoring distribution


def test_kaplan_meier_and_censoring_survival_by_hand():
    time = [1.0, 2.0, 2.0, 3.0, 5.0]
    event = [1, 1, 0, 1, 0]
    # S: t=1 5 at risk 1 event -> 4/5; t=2 4 at risk (the one censored at 2 still counts) 1 event -> 0.6;
    #    t=3 2 at risk 1 event -> 0.3; t=5 censoring only -> 0.3
    times, survival = sm.kaplan_meier(time, event)
    np.testing.assert_allclose(times, [1, 2, 3, 5])
    np.testing.assert_allclose(survival, [0.8, 0.6, 0.3, 0.3], rtol=1e-15)
    # G: the event at 2 leaves before the censoring at 2: at risk of censoring 3, 1 censored -> 2/3;
    #    t=5 the last patient is censored -> 0
    g_times, g = sm.censoring_survival(time, event)
    np.testing.assert_allclose(g_times, [1, 2, 3, 5])
    np.testing.assert_allclose(g, [1.0, 2 / 3, 2 / 3, 0.0], rtol=1e-15)

    assert sm.survival_at(times, survival, 0.5) == 1.0
    assert sm.survival_at(times, survival, 2.0) == pytest.approx(0.6)
    assert sm.survival_at(times, survival, 2.0, left_limit=True) == pytest.approx(0.8)
    assert sm.survival_at(times, survival, 10.0) == pytest.approx(0.3)
    np.testing.assert_allclose(sm.survival_at(times, survival, [0.0, 1.0, 4.0]), [1.0, 0.8, 0.3])


def test_kaplan_meier_matches_lifelines_and_scikit_survival():
    time, event, _, _ = _tied_sample(np.random.default_rng(3), 500)
    times, survival = sm.kaplan_meier(time, event)

    ref_times, ref_survival = sksurv_nonparametric.kaplan_meier_estimator(event, time)
    np.testing.assert_allclose(times, ref_times)
    np.testing.assert_allclose(survival, ref_survival, atol=1e-12)
    fitter = KaplanMeierFitter().fit(time, event)
    np.testing.assert_allclose(survival, fitter.survival_function_at_times(times).to_numpy(), atol=1e-12)

    g_times, g = sm.censoring_survival(time, event)
    ref_times, ref_g = sksurv_nonparametric.kaplan_meier_estimator(event, time, reverse=True)
    np.testing.assert_allclose(g_times, ref_times)
    np.testing.assert_allclose(g, ref_g, atol=1e-12)


# --------------------------------------------------------------------------------------------------------
# Brier scores and calibration


def test_brier_score_by_hand():
    time = [2.0, 3.0, 4.0, 6.0, 8.0]
    event = [1, 0, 1, 1, 0]
    predicted = [0.2, 0.6, 0.5, 0.7, 0.9]
    # G: 1 until the censoring at 3 (4 at risk of censoring) -> 3/4 until the last patient is censored at 8.
    # At t = 5:  event at 2: 0.2^2 / G(2-) = 0.04 / 1;  censored at 3: 0;  event at 4: 0.5^2 / G(4-) = 0.25 / 0.75
    #            followed past 5: (1 - 0.7)^2 / G(5) = 0.09 / 0.75 and (1 - 0.9)^2 / 0.75
    expected = (0.04 + 0.25 / 0.75 + 0.09 / 0.75 + 0.01 / 0.75) / 5
    assert sm.brier_score(time, event, predicted, 5.0) == pytest.approx(expected, abs=1e-15)
    # at t = 9 nobody is followed beyond, and G(9) = 0: undefined
    assert sm.brier_score(time, event, predicted, 9.0) is None


def _weibull_survival(x, t, shape=1.5, scale=100.0):
    return np.exp(-((t / (scale * np.exp(-0.8 * x))) ** shape))


def test_brier_score_and_integrated_brier_score_match_scikit_survival():
    rng = np.random.default_rng(7)
    train_time, train_event, _, _ = _weibull_sample(rng, 500)
    time, event, _, x = _weibull_sample(rng, 500)
    x_noisy = x + rng.normal(0, 0.3, x.shape)  # a model that is good but not the truth
    survival_train, survival_test = Surv.from_arrays(train_event, train_time), Surv.from_arrays(event, time)
    grid = np.linspace(5, 120, 25)
    matrix = _weibull_survival(x_noisy[:, None], grid[None, :])

    for j in (0, 7, 24):
        _, reference = sksurv_metrics.brier_score(survival_train, survival_test, matrix[:, j], grid[j])
        ours = sm.brier_score(time, event, matrix[:, j], grid[j], train_time=train_time, train_event=train_event)
        assert ours == pytest.approx(reference[0], abs=1e-12)
        # G estimated from the evaluated data itself
        _, reference = sksurv_metrics.brier_score(survival_test, survival_test, matrix[:, j], grid[j])
        assert sm.brier_score(time, event, matrix[:, j], grid[j]) == pytest.approx(reference[0], abs=1e-12)

    reference = sksurv_metrics.integrated_brier_score(survival_train, survival_test, matrix, grid)
    ours = sm.integrated_brier_score(time, event, matrix, grid, train_time=train_time, train_event=train_event)
    assert ours == pytest.approx(reference, abs=1e-12)


def test_brier_score_on_tied_times_uses_the_left_limit_of_g():
    # scikit-survival weighs a case by G(t_i); Graf et al. use G(t_i-). They differ only where an event and a
    # censoring share a time: here we check ours against scikit-survival's own G taken just before t_i.
    rng = np.random.default_rng(8)
    time, event, _, x = _tied_sample(rng, 500)  # whole days
    survival = Surv.from_arrays(event, time)
    horizon = 60.0
    predicted = _weibull_survival(x, horizon)
    g = sksurv_nonparametric.CensoringDistributionEstimator().fit(survival)
    case = event & (time <= horizon)
    control = time > horizon
    expected = (
        np.sum(predicted[case] ** 2 / g.predict_proba(time[case] - 0.5))
        + np.sum((1 - predicted[control]) ** 2) / g.predict_proba(np.array([horizon]))[0]
    ) / len(time)
    ours = sm.brier_score(time, event, predicted, horizon)
    assert ours == pytest.approx(expected, abs=1e-12)
    _, theirs = sksurv_metrics.brier_score(survival, survival, predicted, horizon)
    assert 0 < abs(ours - theirs[0]) < 0.005  # measured 0.0006 with this seed


def test_brier_score_edge_cases():
    assert sm.brier_score([], [], [], 5.0) is None
    # everyone censored but followed past t: only the controls count, all weighted 1
    assert sm.brier_score([6.0, 7.0], [0, 0], [0.9, 0.8], 5.0) == pytest.approx((0.01 + 0.04) / 2)
    # everyone censored before t: nobody to score survival at t on
    assert sm.brier_score([1.0, 2.0], [0, 0], [0.9, 0.8], 5.0) is None
    with pytest.raises(ValueError, match="survival probabilities"):
        sm.brier_score([1.0, 2.0], [1, 0], [1.5, 0.8], 5.0)
    with pytest.raises(ValueError, match="both train_time and train_event"):
        sm.brier_score([1.0, 2.0], [1, 0], [0.5, 0.8], 5.0, train_time=[1.0])
    with pytest.raises(ValueError, match="at least two"):
        sm.integrated_brier_score([1.0, 2.0], [1, 0], [[0.5], [0.8]], [1.0])
    with pytest.raises(ValueError, match="undefined at t=9"):
        sm.integrated_brier_score([1.0, 6.0], [1, 0], [[0.5, 0.4], [0.8, 0.7]], [1.0, 9.0])


def test_calibration_at_by_hand():
    time = [1.0, 3.0, 5.0, 6.0, 2.0, 4.0, 1.0, 2.0]
    event = [1, 0, 1, 0, 1, 1, 0, 0]
    predicted = [0.5, 0.6, 0.7, 0.8, 0.2, 0.4, 0.9, 0.9]
    groups = [0, 0, 0, 0, 1, 1, 2, 2]
    rows = sm.calibration_at(time, event, predicted, 4.0, groups)
    # group 0: KM at 4: event at 1 of 4 at risk -> 3/4, censoring at 3 -> 3/4
    # group 1: events at 2 and 4 -> 1/2 then 0
    # group 2: both censored by 2, nobody followed to 4: undefined
    assert rows == [
        sm.CalibrationRow(0, 4, pytest.approx(0.65), pytest.approx(0.75)),
        sm.CalibrationRow(1, 2, pytest.approx(0.3), 0.0),
        sm.CalibrationRow(2, 2, pytest.approx(0.9), None),
    ]


# --------------------------------------------------------------------------------------------------------
# Binned versions, from cells counts[stratum, interval, censored/event]


def _binned_c_brute_force(interval, stratum, event):
    """Every pair: i an event in interval k, j in an interval after k; ties in stratum 1/2."""
    comparable = event[:, None] & (interval[:, None] < interval[None, :])
    score = (comparable & (stratum[:, None] > stratum[None, :])).sum() + 0.5 * (
        comparable & (stratum[:, None] == stratum[None, :])
    ).sum()
    return score / comparable.sum()


def test_binned_c_index_equals_harrell_on_binned_times_when_no_pair_shares_an_interval():
    rng = np.random.default_rng(12)
    k_edges = 30
    interval = rng.permutation(k_edges + 1)  # one patient per interval
    event = rng.random(k_edges + 1) < 0.6
    risk = rng.integers(0, 8, k_edges + 1).astype(float)  # ties in risk: they share a stratum
    stratum = np.unique(risk, return_inverse=True)[1]
    counts = np.zeros((stratum.max() + 1, k_edges + 1, 2))
    np.add.at(counts, (stratum, interval, event.astype(int)), 1.0)
    expected = sm.harrell_c_index(interval.astype(float), event, risk).value
    assert sm.binned_c_index(counts) == pytest.approx(expected, abs=1e-12)


def test_binned_c_index_matches_every_pair_checked_and_ignores_scale_and_empty_strata():
    rng = np.random.default_rng(13)
    time, event, risk, _ = _weibull_sample(rng, 600)
    counts, stratum, interval = _cells(time, event, risk, np.array([7.0, 30.0, 90.0]), 4)
    value = sm.binned_c_index(counts)
    assert value == pytest.approx(_binned_c_brute_force(interval, stratum, event), abs=1e-12)
    # within one interval, an event and a censoring are not comparable, unlike Harrell's C on binned times
    harrell_binned = sm.harrell_c_index(interval.astype(float), event, stratum.astype(float)).value
    assert value != pytest.approx(harrell_binned, abs=1e-6)
    # fractional (noisy) counts weigh pairs by products: a common factor changes nothing
    assert sm.binned_c_index(counts * 0.37) == pytest.approx(value, abs=1e-12)
    # an empty stratum changes nothing
    with_empty = np.insert(counts, 2, 0.0, axis=0)
    assert sm.binned_c_index(with_empty) == pytest.approx(value, abs=1e-12)


def test_binned_c_index_against_exact_c_with_many_and_few_intervals():
    # The sizes documented in binned_c_index's docstring.
    rng = np.random.default_rng(5)
    time, event, risk, _ = _weibull_sample(rng, 4000)
    exact = sm.harrell_c_index(time, event, risk).value

    def binned(k_edges, strata):
        edges = np.quantile(time, np.linspace(0, 1, k_edges + 2)[1:-1])
        return sm.binned_c_index(_cells(time, event, risk, edges, strata)[0]) - exact

    assert abs(binned(200, 4000)) < 0.002  # fine grid, strata = distinct risks: Harrell's C
    assert abs(binned(40, 40)) < 0.005
    assert 0.015 < binned(3, 4000) < 0.04  # few intervals: the hard, close-in-time pairs are dropped
    assert -0.04 < binned(200, 3) < -0.015  # few strata: many pairs tied at 1/2


def test_life_table_without_censoring_equals_kaplan_meier_at_the_edges():
    rng = np.random.default_rng(14)
    time = 100 * rng.weibull(1.3, 800)
    event = np.ones(800, dtype=bool)
    edges = np.array([7.0, 30.0, 90.0, 180.0])
    counts, stratum, _ = _cells(time, event, rng.random(800), edges, 3)
    km_times, km = sm.kaplan_meier(time, event)
    np.testing.assert_allclose(sm.pooled_life_table(counts), sm.survival_at(km_times, km, edges), atol=1e-12)
    for s in range(3):
        km_times, km = sm.kaplan_meier(time[stratum == s], event[stratum == s])
        np.testing.assert_allclose(sm.life_table(counts[s]), sm.survival_at(km_times, km, edges), atol=1e-12)


def test_life_table_by_hand_with_censoring_empty_intervals_and_empty_strata():
    # interval:        0        1        2       3 (beyond the last edge)
    one = np.array([[2.0, 2.0], [0.0, 0.0], [1.0, 1.0], [4.0, 0.0]])  # [censored, events]
    # n0 = 10: q0 = 2 / (10 - 1) ; n1 = 6, nobody leaves: q1 = 0 ; n2 = 6: q2 = 1 / (6 - 0.5)
    s0 = 1 - 2 / 9
    np.testing.assert_allclose(sm.life_table(one), [s0, s0, s0 * (1 - 1 / 5.5)], rtol=1e-15)
    # censoring: q^c0 = 2 / (10 - 1), q^c1 = 0, q^c2 = 1 / (6 - 0.5)
    np.testing.assert_allclose(sm.censoring_life_table(one), [s0, s0, s0 * (1 - 1 / 5.5)], rtol=1e-15)
    np.testing.assert_allclose(sm.life_table(np.zeros((4, 2))), [1.0, 1.0, 1.0])
    # nobody left after interval 0: the survival is carried forward
    np.testing.assert_allclose(sm.life_table([[0.0, 1.0], [0.0, 0.0], [0.0, 0.0]]), [0.0, 0.0])
    np.testing.assert_allclose(sm.life_table([[0.0, 1.0], [1.0, 0.0], [0.0, 0.0]]), [0.5, 0.5])
    with pytest.raises(ValueError, match="non-negative"):
        sm.life_table([[0.0, -1.0], [0.0, 0.0]])
    with pytest.raises(ValueError, match="NaN"):
        sm.pooled_life_table(np.full((2, 3, 2), np.nan))


def test_binned_brier_without_censoring_is_the_mean_squared_error_at_the_horizon():
    rng = np.random.default_rng(15)
    time = 60 * rng.weibull(1.2, 700)
    event = np.ones(700, dtype=bool)
    edges = np.array([7.0, 30.0, 90.0])
    counts, stratum, _ = _cells(time, event, rng.random(700), edges, 4)
    p = np.array([0.9, 0.7, 0.5, 0.2])
    for horizon_interval in (1, 2, 3):
        alive = time > edges[horizon_interval - 1]
        expected = np.mean((alive - p[stratum]) ** 2)
        assert sm.binned_brier_at_horizon(counts, p, horizon_interval) == pytest.approx(expected, abs=1e-12)


def test_binned_brier_with_censoring_approaches_the_exact_ipcw_brier_on_fine_grids():
    rng = np.random.default_rng(3)
    event_time = 60 * rng.weibull(1.2, 20_000)
    censor_time = rng.exponential(80, 20_000)
    time, event = np.minimum(event_time, censor_time), event_time <= censor_time
    risk = rng.random(20_000)
    p = np.linspace(0.8, 0.3, 5)
    for k_edges, tolerance in ((3, 0.015), (30, 0.001)):  # measured 0.0075 and 0.00008
        edges = np.linspace(90 / k_edges, 90, k_edges)
        counts, stratum, _ = _cells(time, event, risk, edges, 5)
        exact = sm.brier_score(time, event, p[stratum], 90.0)
        assert sm.binned_brier_at_horizon(counts, p, k_edges) == pytest.approx(exact, abs=tolerance)
        # noisy counts are floats: a common factor changes nothing
        assert sm.binned_brier_at_horizon(counts * 1.7, p, k_edges) == pytest.approx(
            sm.binned_brier_at_horizon(counts, p, k_edges), abs=1e-12
        )


def test_binned_brier_edge_cases():
    p = np.array([0.5, 0.5])
    assert sm.binned_brier_at_horizon(np.zeros((2, 3, 2)), p, 1) is None
    # everyone censored, some beyond the horizon: the controls alone, weighted by 1 / G(h)
    censored = np.zeros((2, 3, 2))
    censored[0, 0, 0], censored[1, 2, 0] = 2.0, 2.0
    # G: interval 0 q^c = 2 / 4 -> G(h) = 0.5; the 2 controls weigh 0.25 / 0.5 each; 4 patients
    assert sm.binned_brier_at_horizon(censored, p, 1) == pytest.approx(2 * 0.25 / 0.5 / 4)
    # everyone censored before the horizon: undefined
    early = np.zeros((2, 3, 2))
    early[:, 0, 0] = 3.0
    assert sm.binned_brier_at_horizon(early, p, 2) is None
    with pytest.raises(ValueError, match=r"horizon_interval must be in 1\.\.2"):
        sm.binned_brier_at_horizon(censored, p, 3)
    with pytest.raises(ValueError, match="1 values but there are 2 strata"):
        sm.binned_brier_at_horizon(censored, [0.5], 1)


def test_binned_c_index_edge_cases():
    assert sm.binned_c_index(np.zeros((3, 4, 2))) is None
    all_censored = np.zeros((2, 3, 2))
    all_censored[:, :, 0] = 5.0
    assert sm.binned_c_index(all_censored) is None
    # events only in the last interval: no one is followed past them
    last = np.zeros((2, 3, 2))
    last[:, 2, 1] = 4.0
    assert sm.binned_c_index(last) is None
    with pytest.raises(ValueError, match="shape"):
        sm.binned_c_index(np.zeros((3, 4)))


def test_binned_calibration_per_stratum():
    counts = np.zeros((3, 4, 2))
    counts[0] = [[2.0, 2.0], [0.0, 0.0], [1.0, 1.0], [4.0, 0.0]]  # the life table worked by hand above
    counts[1] = [[3.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]  # all censored in interval 0
    # stratum 2 empty
    rows = sm.binned_calibration(counts, [0.9, 0.5, 0.1], 3, min_patients=5)
    s0 = 1 - 2 / 9
    assert rows[0] == sm.BinnedCalibrationRow(0, 10.0, 0.9, pytest.approx(s0 * (1 - 1 / 5.5)))
    assert rows[1] == sm.BinnedCalibrationRow(1, 3.0, 0.5, None)  # under the floor
    assert rows[2] == sm.BinnedCalibrationRow(2, 0.0, 0.1, None)  # empty
    # above the floor, but nobody of stratum 1 is left in the horizon's interval: not carried forward
    assert sm.binned_calibration(counts, [0.9, 0.5, 0.1], 3, min_patients=1)[1].observed_survival is None
    assert sm.binned_calibration(counts, [0.9, 0.5, 0.1], 1, min_patients=1)[1].observed_survival == 1.0
