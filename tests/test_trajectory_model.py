"""The trajectory twin's network and loss (issue 12): quantiles that never cross, a forecast that the
planned treatments and the history both move, and a loss per patient in
which a patient counts once however many decision times they give."""

from __future__ import annotations

import torch

from federation.contract.twin_specs import TrajectorySpec
from federation.twins.trajectory_model import TrajectoryNet, patient_loss, pinball

SPEC = TrajectorySpec(
    signals=[{"name": "glucose", "concept_ids": [1], "normal_range": [70, 180]},
             {"name": "sbp", "concept_ids": [2], "normal_range": [100, 140]}],
    treatments=[{"name": "insulin", "concept_ids": [3], "dose": True}],
    step_hours=4, history_steps=5, horizon_steps=3, hidden=8,
)  # fmt: skip


def _inputs(batch: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    history = torch.randn(batch, 5, 2, 3, generator=generator)
    controls = torch.rand(batch, 8, 1, generator=generator)
    statics = torch.randn(batch, 4, generator=generator)
    return history, controls, statics


def test_quantiles_never_cross_and_the_planned_treatment_moves_the_forecast():
    torch.manual_seed(0)
    net = TrajectoryNet(SPEC, static_features=4)
    history, controls, statics = _inputs(16)
    quantiles, logit, propensity = net(history, controls, statics)
    assert propensity.shape == (16, 1)
    assert quantiles.shape == (16, 3, 2, 5) and logit.shape == (16,)
    assert (quantiles.diff(dim=-1) > 0).all()
    # a scenario: another dose on the steps ahead only
    scenario = controls.clone()
    scenario[:, 5:] += 2.0
    changed, *_ = net(history, scenario, statics)
    assert not torch.allclose(changed, quantiles)
    # the history is the patient's state: another history, another forecast; the same inputs, the same one
    other, *_ = net(history + 1.0, controls, statics)
    assert not torch.allclose(other, quantiles)
    assert torch.equal(net(history, controls.clone(), statics)[0], quantiles)


def test_pinball_loss_is_smallest_at_the_true_quantile():
    target = torch.randn(20_000)
    grid = torch.linspace(-2.5, 2.5, 101)
    losses = torch.stack([pinball(torch.full((20_000, 1), float(g)), target, [0.9]).mean() for g in grid])
    assert abs(float(grid[losses.argmin()]) - 1.2816) < 0.1  # the standard normal's 90% quantile


def test_a_patient_counts_once_however_many_decision_times_they_give():
    torch.manual_seed(1)
    net = TrajectoryNet(SPEC, static_features=4)
    history, controls, statics = _inputs(1, seed=3)
    quantiles, logit, _ = net(history, controls, statics)
    future = torch.randn(1, 3, 2)
    mask = torch.ones(1, 3, 2)
    event = torch.ones(1)
    levels = SPEC.quantiles
    one = patient_loss(quantiles[:, None], logit[:, None], future[:, None], mask[:, None], event[:, None],
                       torch.ones(1, 1), torch.ones(1, 1), levels)  # fmt: skip
    four = patient_loss(quantiles[:, None].expand(1, 4, 3, 2, 5), logit[:, None].expand(1, 4),
                        future[:, None].expand(1, 4, 3, 2), mask[:, None].expand(1, 4, 3, 2),
                        event[:, None].expand(1, 4), torch.ones(1, 4), torch.ones(1, 4), levels)  # fmt: skip
    assert one.shape == (1,) and torch.allclose(one, four)
    # unused decision times and unobserved values do not count
    padded = patient_loss(torch.cat([quantiles[:, None], torch.zeros(1, 1, 3, 2, 5)], dim=1),
                          torch.cat([logit[:, None], torch.zeros(1, 1)], dim=1),
                          torch.cat([future[:, None], torch.full((1, 1, 3, 2), 99.0)], dim=1),
                          torch.cat([mask[:, None], torch.ones(1, 1, 3, 2)], dim=1),
                          torch.cat([event[:, None], torch.zeros(1, 1)], dim=1),
                          torch.tensor([[1.0, 0.0]]), torch.ones(1, 2), levels)  # fmt: skip
    assert torch.allclose(padded, one)


def test_inverse_propensity_weights_up_weight_the_windows_whose_treatment_the_policy_rarely_gives():
    from federation.contract.twin_specs import WEIGHT_RANGE
    from federation.twins.trajectory_model import propensity_weights

    logit = torch.logit(torch.tensor(0.9))
    propensity = torch.full((2, 1, 1), float(logit))  # the policy treats 90% of patients like these
    base = torch.zeros(2, 1)  # half of all patients are treated
    treated = torch.tensor([[[1.0]], [[0.0]]])
    weights = propensity_weights(propensity, base, treated)
    assert torch.allclose(weights, torch.tensor([[0.5 / 0.9], [0.5 / 0.1]]), rtol=1e-5)
    # an almost-never-given treatment is truncated, and no treatments means weight 1
    rare = propensity_weights(torch.full((1, 1, 1), -12.0), base[:1], torch.ones(1, 1, 1))
    assert float(rare) == WEIGHT_RANGE[1]
    assert torch.equal(propensity_weights(torch.zeros(3, 2, 0), torch.zeros(3, 0), torch.zeros(3, 2, 0)),
                       torch.ones(3, 2))  # fmt: skip
