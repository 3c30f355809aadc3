"""The trajectory twin's network and loss (issue 12): quantiles that never cross, a forecast that the
planned treatments and the history both move, and a loss per patient in
which a patient counts once however many decision times they give."""

from __future__ import annotations

import torch
from torch.nn import functional

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
    quantiles, logit, propensity, policy = net(history, controls, statics)
    assert propensity.shape == (16, 1) and policy.shape == (16, 3, 1, 2)
    assert quantiles.shape == (16, 3, 2, 5) and logit.shape == (16,)
    assert (quantiles.diff(dim=-1) > 0).all()
    # a scenario: another dose on the steps ahead only
    scenario = controls.clone()
    scenario[:, 5:] += 2.0  # doses from the first step ahead on (the decoder reads them a step later)
    changed, *_ = net(history, scenario, statics)
    assert not torch.allclose(changed, quantiles)
    # the history is the patient's state: another history, another forecast; the same inputs, the same one
    other, *_ = net(history + 1.0, controls, statics)
    assert not torch.allclose(other, quantiles)
    assert torch.equal(net(history, controls.clone(), statics)[0], quantiles)


def test_what_is_observed_over_the_horizon_reaches_the_policy_and_never_the_forecast():
    """The per-step weights need what the ward saw before each dose, the future of the forecast: the
    forecast and the event's risk must not read it, or the twin would be trained on what it cannot know."""
    torch.manual_seed(2)
    net = TrajectoryNet(SPEC, static_features=4)
    history, controls, statics = _inputs(8, seed=5)
    observed = torch.randn(8, 3, 2, 2)
    blind = net(history, controls, statics)
    seeing = net(history, controls, statics, observed)
    for a, b in zip(blind[:3], seeing[:3], strict=True):
        assert torch.equal(a, b)
    assert not torch.allclose(blind[3], seeing[3])


def test_pinball_loss_is_smallest_at_the_true_quantile():
    target = torch.randn(20_000)
    grid = torch.linspace(-2.5, 2.5, 101)
    losses = torch.stack([pinball(torch.full((20_000, 1), float(g)), target, [0.9]).mean() for g in grid])
    assert abs(float(grid[losses.argmin()]) - 1.2816) < 0.1  # the standard normal's 90% quantile


def test_a_patient_counts_once_however_many_decision_times_they_give():
    torch.manual_seed(1)
    net = TrajectoryNet(SPEC, static_features=4)
    history, controls, statics = _inputs(1, seed=3)
    quantiles, logit, *_ = net(history, controls, statics)
    future = torch.randn(1, 3, 2)
    mask = torch.ones(1, 3, 2)
    event = torch.ones(1)
    levels = SPEC.quantiles
    one = patient_loss(quantiles[:, None], logit[:, None], future[:, None], mask[:, None], event[:, None],
                       torch.ones(1, 1), torch.ones(1, 1, 3), levels)  # fmt: skip
    four = patient_loss(quantiles[:, None].expand(1, 4, 3, 2, 5), logit[:, None].expand(1, 4),
                        future[:, None].expand(1, 4, 3, 2), mask[:, None].expand(1, 4, 3, 2),
                        event[:, None].expand(1, 4), torch.ones(1, 4), torch.ones(1, 4, 3), levels)  # fmt: skip
    assert one.shape == (1,) and torch.allclose(one, four)
    # unused decision times and unobserved values do not count
    padded = patient_loss(torch.cat([quantiles[:, None], torch.zeros(1, 1, 3, 2, 5)], dim=1),
                          torch.cat([logit[:, None], torch.zeros(1, 1)], dim=1),
                          torch.cat([future[:, None], torch.full((1, 1, 3, 2), 99.0)], dim=1),
                          torch.cat([mask[:, None], torch.ones(1, 1, 3, 2)], dim=1),
                          torch.cat([event[:, None], torch.zeros(1, 1)], dim=1),
                          torch.tensor([[1.0, 0.0]]), torch.ones(1, 2, 3), levels)  # fmt: skip
    assert torch.allclose(padded, one)
    # weights are not normalised away: a one-window patient weighted 3 counts three times in the forecast
    heavy = patient_loss(quantiles[:, None], logit[:, None], future[:, None], mask[:, None], event[:, None],
                         torch.ones(1, 1), torch.full((1, 1, 3), 3.0), levels)  # fmt: skip
    risk = functional.binary_cross_entropy_with_logits(logit, event)
    assert torch.allclose(heavy - risk, 3 * (one - risk))


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


def test_per_step_weights_multiply_over_the_steps_up_to_each():
    """A dose the ward usually gives on what it sees (0.8) but that the history alone makes 40% likely, missed at
    the second step ahead, weighs that step and every later one by 0.6 / 0.2, on top of the first's 0.4 / 0.8;
    for a drug dosed on a measurement of its own step (read by the decoder a step later) each ratio counts
    from the next step on."""
    from federation.twins.trajectory_model import step_propensity_weights

    seen = torch.full((1, 1, 3, 1), float(torch.logit(torch.tensor(0.8))))
    baseline = torch.full((1, 1, 3, 1), float(torch.logit(torch.tensor(0.4))))
    treated = torch.tensor([1.0, 0.0, 1.0]).reshape(1, 1, 3, 1)
    policy = torch.stack([seen, baseline], dim=-1)
    first, missed = 0.4 / 0.8, 0.6 / 0.2
    same_step = torch.tensor([first, first * missed, first * missed * first]).reshape(1, 1, 3)
    assert torch.allclose(step_propensity_weights(policy, treated), same_step, rtol=1e-5)
    next_step = torch.tensor([1.0, first, first * missed]).reshape(1, 1, 3)
    assert torch.allclose(step_propensity_weights(policy, treated, [True]), next_step, rtol=1e-5)


def test_a_drug_dosed_on_a_measurement_of_its_step_moves_the_forecast_from_the_next_step_on():
    """Sliding-scale insulin is given on the glucose measured in the same step: the decoder reads its dose one
    step later, so changing the last step's dose moves nothing, and the first step's dose moves step two on."""
    insulin = SPEC.treatments[0].model_copy(update={"dosed_on_measurement": True})
    lagged = SPEC.model_copy(update={"treatments": [insulin]})
    torch.manual_seed(4)
    net = TrajectoryNet(lagged, static_features=4)
    history, controls, statics = _inputs(4, seed=6)
    base = net(history, controls, statics)[0]
    last = controls.clone()
    last[:, -1] += 3.0
    assert torch.equal(net(history, last, statics)[0], base)
    first = controls.clone()
    first[:, 5] += 3.0  # the first step ahead (history of 5 steps)
    moved = net(history, first, statics)[0]
    assert torch.equal(moved[:, 0], base[:, 0]) and not torch.allclose(moved[:, 1:], base[:, 1:])
