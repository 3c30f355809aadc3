"""The survival kind by hand: its targets (the half-interval rule), its loss, its risk by the horizon, its
histogram cells, its pooling, its exact release, and the study checks that pair it with a censored outcome."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from federation.contract import StudySpec
from federation.contract.protocol import EvaluationRelease, ReleaseMode
from federation.contract.strata import Strata
from federation.contract.twin_specs import DiscreteTimeSurvivalSpec
from federation.twins import kind_of
from federation.twins import survival_maths as maths
from tests.site_helpers import study

SPEC = DiscreteTimeSurvivalSpec(interval_days=[3, 7, 14, 30], horizon_days=14)
KIND = kind_of(SPEC)


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_targets_follow_the_grid_and_the_half_interval_rule():
    # intervals (0,3] (3,7] (7,14] (14,30]; the middle of (3,7] is 5
    days = np.array([5.0, 4.0, 6.0, 30.0, 3.0, 40.0, 14.0])
    event = np.array([1, 0, 0, 0, 1, 1, 0])
    t = KIND.targets_of(SPEC, event, days)
    at_risk, happened, where, flag = t[:, :4], t[:, 4:8], t[:, 8], t[:, 9]
    assert at_risk.tolist() == [
        [1, 1, 0, 0],  # event at day 5: at risk in (0,3] and (3,7], the event in (3,7]
        [1, 0, 0, 0],  # censored at day 4, less than half of (3,7] observed: not at risk in it
        [1, 1, 0, 0],  # censored at day 6, more than half observed: survived (3,7]
        [1, 1, 1, 1],  # censored at day 30 (the window's end): free of the event through the whole grid
        [1, 0, 0, 0],  # event at day 3: in (0,3]
        [1, 1, 1, 1],  # event after the grid: survived every interval, no event within it
        [1, 1, 1, 0],  # censored at day 14, a grid end: free of the event through (7,14]
    ]
    assert happened.tolist() == [[0, 1, 0, 0], [0] * 4, [0] * 4, [0] * 4, [1, 0, 0, 0], [0] * 4, [0] * 4]
    assert where.tolist() == [1, 1, 1, 4, 0, 4, 3] and flag.tolist() == [1, 0, 0, 0, 1, 0, 0]
    assert t[:, 10].tolist() == days.tolist()  # exact days, kept at the site for its exact metrics


@pytest.mark.parametrize(
    ("labels", "days", "problem"),
    [
        (np.array([1, 2]), np.array([1.0, 2.0]), "0 or 1"),
        (np.array([1, 0]), np.array([1.0, np.nan]), "finite"),
        (np.array([1, 0]), np.array([1.0, -1.0]), "not negative"),
    ],
)
def test_bad_targets_are_refused_naming_the_rule(labels, days, problem):
    with pytest.raises(ValueError, match=problem):
        KIND.targets_of(SPEC, labels, days)
    with pytest.raises(ValueError, match="days to the event"):
        KIND.targets_of(SPEC, np.array([1, 0]), None)


def test_loss_by_hand():
    t = torch.from_numpy(KIND.targets_of(SPEC, np.array([1, 0]), np.array([5.0, 6.0])))
    z = torch.tensor([[0.2, -0.4, 1.0, 0.0], [-1.0, 0.5, 2.0, 0.3]])
    loss = KIND.loss(SPEC, z, t)
    # patient 1: survived (0,3] (z=0.2), event in (3,7] (z=-0.4); patient 2: survived both (z=-1.0, 0.5)
    first = -math.log(1 - _sigmoid(0.2)) - math.log(_sigmoid(-0.4))
    second = -math.log(1 - _sigmoid(-1.0)) - math.log(1 - _sigmoid(0.5))
    assert loss.tolist() == pytest.approx([first, second], rel=1e-6)


def test_risk_by_the_horizon_and_survival_curves():
    z = np.array([[0.2, -0.4, 1.0, 3.0]])
    hazards = [_sigmoid(v) for v in z[0]]
    survival = np.cumprod([1 - h for h in hazards])
    assert KIND.survival_curves(z)[0] == pytest.approx(survival)
    # the horizon is 14 days, the end of the third interval
    assert _sigmoid(KIND.risk_logits(SPEC, z)[0]) == pytest.approx(1 - survival[2])


def test_every_patient_falls_in_exactly_one_cell():
    strata = Strata.checked([0.3, 0.5], 0.5)
    z = np.array([[-5.0] * 4, [0.0] * 4, [2.0] * 4])  # risks by day 14: low, 1 - 0.5^3 = 0.875, high
    t = KIND.targets_of(SPEC, np.array([1, 0, 1]), np.array([2.0, 10.0, 31.0]))
    cells = KIND.histograms(SPEC, z, t, strata)["cells"].reshape(3, 5, 2)
    assert cells.sum() == 3
    assert cells[0, 0, 1] == 1  # stratum <30%, event in (0,3]
    assert cells[2, 2, 0] == 1  # stratum >=50%, censored in (7,14]
    assert cells[2, 4, 0] == 1  # stratum >=50%, event after the grid: beyond it, no event within it


def _survival_study(**model) -> StudySpec:
    data = study().model_dump(mode="json")
    data["outcome"] = {"kind": "time_to_event", "prediction_hours": 24, "window_days": 30}
    data["model"] = {"kind": "discrete_time_survival", "interval_days": [3, 7, 14, 30], **model}
    return StudySpec.model_validate(data)


def test_pooled_metrics_from_exact_counts_are_the_binned_maths():
    spec = _survival_study()
    strata = Strata.checked([0.2, 0.5], 0.5)
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 30, size=(3, 5, 2)).astype(float)
    release = EvaluationRelease(
        part="test", mode=ReleaseMode.DP, score_edges=list(strata.edges), cells=list(counts.ravel()), noise_sd=1e-9
    )
    KIND.check_histograms(spec.model, release)
    pooled = KIND.pool(spec, [("a", release)])
    assert pooled.c_index.value == pytest.approx(maths.binned_c_index(counts))
    survival = 1 - strata.representative_risks()
    assert pooled.brier_at_horizon.value == pytest.approx(maths.binned_brier_at_horizon(counts, survival, 4))
    assert pooled.patients.value == pytest.approx(counts.sum()) and pooled.events.value == counts[:, :4, 1].sum()
    assert pooled.c_index.low < pooled.c_index.value < pooled.c_index.high
    table = maths.life_table(counts[1])
    assert pooled.calibration[1].observed_survival == pytest.approx(table[3])
    misshapen = release.model_copy(update={"cells": list(counts.ravel())[:-1]})
    with pytest.raises(ValueError, match="has 30 cells, not 29"):
        KIND.check_histograms(spec.model, misshapen)


def test_an_exact_site_joins_the_pool_by_inverse_variance():
    spec = _survival_study()
    exact = EvaluationRelease(
        part="test", mode=ReleaseMode.EXACT, examples=200, with_outcome=40, c_index=0.7, c_index_se=0.03,
        brier_at_horizon=0.12, cell_floor=5,
    )  # fmt: skip
    pooled = KIND.pool(spec, [("exact-site", exact)])
    assert pooled.c_index.value == pytest.approx(0.7)
    assert pooled.c_index.high - pooled.c_index.low == pytest.approx(2 * 1.96 * 0.03, rel=0.15)
    assert pooled.brier_at_horizon.value == pytest.approx(0.12) and pooled.patients.value == 200


def test_the_study_pairs_the_survival_kind_with_a_censored_outcome_only():
    assert _survival_study().model.horizon == 30
    data = study().model_dump(mode="json")
    with pytest.raises(ValidationError, match="learns a time to an event"):
        StudySpec.model_validate({**data, "model": {"kind": "discrete_time_survival", "interval_days": [7, 30]}})
    censored = {"kind": "time_to_event", "prediction_hours": 24, "window_days": 30}
    with pytest.raises(ValidationError, match="use model kind"):
        StudySpec.model_validate({**data, "outcome": censored})
    with pytest.raises(ValidationError, match="beyond the outcome's window of 30 days"):
        _survival_study(interval_days=[7, 60])
    with pytest.raises(ValidationError, match="must be one of interval_days"):
        _survival_study(horizon_days=10)
    with pytest.raises(ValidationError, match="strictly increasing"):
        _survival_study(interval_days=[7, 7, 30])


def test_an_exact_release_carries_the_c_index_under_the_floor_and_withholds_below_it(tmp_path):
    from torch import nn

    from federation.contract import study_hash
    from site_node.cohort.dataset import StudyDataset
    from site_node.evaluation_release import exact_release
    from site_node.governance import Governance, SitePolicy

    spec = _survival_study()
    rng = np.random.default_rng(2)
    n = 120
    risk = rng.normal(size=n)
    days = np.minimum(rng.exponential(20 * np.exp(-risk)), 30.0)
    event = (days < 30) & (rng.random(n) < 0.8)
    model = nn.Sequential(nn.Linear(1, 4))
    with torch.no_grad():  # every interval's hazard logit is the patient's one feature
        model[0].weight.fill_(1.0)
        model[0].bias.fill_(-2.0)

    def dataset(rows: slice, first: int = 1) -> StudyDataset:
        count = len(risk[rows])
        return StudyDataset(
            person_ids=np.arange(first, first + count, dtype=np.int64),
            features=risk[rows, None].astype(np.float32),
            feature_names=["risk"],
            labels=event[rows].astype(np.float32),
            event_days=days[rows].astype(np.float32),
            series=None,
            series_names=[],
            split=np.full(count, "test", dtype="<U10"),
            cohort_size=count,
            excluded_by_consent=0,
            snapshot_hash="0" * 64,
        )

    governance = Governance(f"sqlite:///{tmp_path / 'g.sqlite'}", SitePolicy(min_cell_count=10))
    settings = {"register": governance.disclosures, "study_hash": study_hash(spec)}
    release = exact_release(model, dataset(slice(None)), spec, "test", floor=10, release_key="r:1", **settings)
    assert release.mode == ReleaseMode.EXACT and release.examples == n and release.with_outcome == int(event.sum())
    expected = maths.harrell_c_index(days, event, risk)
    assert release.c_index == pytest.approx(expected.value) and release.c_index_se == pytest.approx(
        expected.standard_error
    )
    assert 0 < release.brier_at_horizon < 1 and 0 < release.integrated_brier < 1
    small = exact_release(model, dataset(slice(0, 12), 1000), spec, "test", floor=10, release_key="r:2", **settings)
    assert small.c_index is None and "c_index" in small.withheld and "cell-count floor" in small.withheld_reason
    governance.close()
