"""DP-SGD at the patient unit for the trajectory twin (issue 12): one patient is one example however many
decision times are cut from their series, in the gradient that is clipped, in sampling and in accounting."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch

from federation.contract.spec import PrivacySpec, TrainingSpec
from federation.contract.twin_specs import TrajectorySpec
from federation.twins.trajectory_model import TrajectoryExamples, examples_loss
from site_node.training import calibrate_noise, schedule, train_dp, train_plain
from site_node.training.engines import PerPatientStep, make_step
from site_node.training.ghost import Objective
from site_node.training.privacy import restore_accountant

SPEC = TrajectorySpec(
    signals=[{"name": "glucose", "concept_ids": [1], "normal_range": [70, 180]},
             {"name": "sbp", "concept_ids": [2], "normal_range": [100, 140]}],
    treatments=[{"name": "insulin", "concept_ids": [3], "dose": True}],
    step_hours=4, history_steps=3, horizon_steps=2, windows_per_patient=3, hidden=6,
)  # fmt: skip
STATICS = 4


def _patients(n: int, seed: int = 0, windows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """n patients' packed rows: random histories and futures, `windows` of each used (default: a random number)."""
    rng = np.random.default_rng(seed)
    layout = TrajectoryExamples(SPEC, STATICS).layout
    w, h, f, s, r = layout.windows, layout.history, layout.horizon, layout.signals, layout.treatments
    history = rng.normal(size=(n, w, h, s, 3))
    controls = rng.uniform(size=(n, w, h + f, r))
    future = rng.normal(size=(n, w, f, s))
    mask = (rng.uniform(size=(n, w, f, s)) < 0.7).astype(float)
    used = rng.integers(1, w + 1, size=n) if windows is None else np.full(n, windows)
    valid = (np.arange(w)[None, :] < used[:, None]).astype(float)
    event = (rng.uniform(size=(n, w)) < 0.2).astype(float)
    x = layout.pack_inputs(rng.normal(size=(n, STATICS)), history, controls)
    y = layout.pack_targets(future, mask, event, valid, np.ones((n, w)))
    return x, y


def _objective(model: TrajectoryExamples) -> Objective:
    return Objective(partial(examples_loss, model.layout, SPEC.quantiles, event_weight=1.0))


def test_the_layout_round_trips_every_part_of_a_patient():
    layout = TrajectoryExamples(SPEC, STATICS).layout
    rng = np.random.default_rng(3)
    statics, history = rng.normal(size=(5, STATICS)), rng.normal(size=(5, 3, 3, 2, 3))
    controls, observed = rng.normal(size=(5, 3, 5, 1)), rng.normal(size=(5, 3, 2, 2, 2))
    x = torch.from_numpy(layout.pack_inputs(statics, history, controls, observed))
    for got, want in zip((*layout.unpack_inputs(x), layout.unpack_observed(x)), (statics, history, controls, observed),
                         strict=True):  # fmt: skip
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-6)
    future, mask = rng.normal(size=(5, 3, 2, 2)), rng.uniform(size=(5, 3, 2, 2))
    flags, ahead = rng.uniform(size=(3, 5, 3)), rng.uniform(size=(5, 3, 2, 1))
    y = torch.from_numpy(layout.pack_targets(future, mask, *flags, ahead))
    for got, want in zip((*layout.unpack_targets(y), layout.unpack_treated_ahead(y)),
                         (future, mask, *flags, ahead[:, :, 0], ahead), strict=True):  # fmt: skip
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-6)
    # no patient at all (a twin query whose patients are all outside the cohort): empty rows of the full width
    none = layout.pack_inputs(np.zeros((0, STATICS)), np.zeros((0, 3, 3, 2, 3)), np.zeros((0, 3, 5, 1)),
                              np.zeros((0, 3, 2, 2, 2)))  # fmt: skip
    assert none.shape == (0, layout.input_width)
    empty = layout.pack_targets(*(np.zeros((0, 3, 2, 2)),) * 2, *(np.zeros((0, 3)),) * 3, np.zeros((0, 3, 2, 1)))
    assert empty.shape == (0, layout.target_width)


def test_each_patients_gradient_is_clipped_as_a_whole_and_equals_autograd_of_that_patient_alone():
    torch.manual_seed(0)
    model = TrajectoryExamples(SPEC, STATICS)
    x, y = (torch.from_numpy(a) for a in _patients(7, seed=1))
    objective = _objective(model)
    clip = 0.05  # small enough that every patient is clipped
    step = PerPatientStep(model, noise_multiplier=1.0, max_grad_norm=clip, sample_rate=0.5, expected_batch_size=7,
                          accountant=restore_accountant("rdp", []), generator=torch.Generator(),
                          objective=objective)  # fmt: skip
    sums, loss_sum = step.clipped_sum(x, y)
    want = [torch.zeros_like(p) for p in model.parameters()]
    losses = 0.0
    for i in range(len(x)):  # one patient at a time, every window of theirs in one loss
        model.zero_grad()
        loss = objective.loss(model(x[i : i + 1]), y[i : i + 1]).sum()
        loss.backward()
        grads = [p.grad.detach().clone() for p in model.parameters()]
        norm = torch.sqrt(sum(g.square().sum() for g in grads))
        assert norm > clip
        for total, g in zip(want, grads, strict=True):
            total += g * min(1.0, clip / (float(norm) + 1e-6))
        losses += float(loss.detach())
    for got, expected in zip(sums, want, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-7)
    assert float(loss_sum) == pytest.approx(losses, rel=1e-5)
    # clipped per patient: the sum of 7 clipped patients is at most 7 C long
    assert float(torch.sqrt(sum(s.square().sum() for s in sums))) <= 7 * clip + 1e-6


def test_a_patients_windows_move_the_model_no_further_than_one_clipping_bound():
    torch.manual_seed(2)
    model = TrajectoryExamples(SPEC, STATICS)
    x, y = (torch.from_numpy(a) for a in _patients(1, seed=4, windows=3))
    step = make_step("auto", model, torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0,
                     max_grad_norm=0.01, sample_rate=1.0, expected_batch_size=1.0,
                     accountant=restore_accountant("rdp", []), generator=torch.Generator(),
                     objective=_objective(model))  # fmt: skip
    assert isinstance(step, PerPatientStep)
    sums, _ = step.clipped_sum(x, y)
    assert float(torch.sqrt(sum(s.square().sum() for s in sums))) == pytest.approx(0.01, rel=1e-3)


def test_sampling_and_accounting_count_patients_not_windows():
    torch.manual_seed(3)
    n = 60
    x, y = _patients(n, seed=5, windows=3)  # 180 windows
    training = TrainingSpec(rounds=2, local_epochs=1, batch_size=20, learning_rate=0.05, optimizer="adam")
    privacy = PrivacySpec(target_epsilon=3.0, max_grad_norm=1.0)
    sample_rate, steps, total = schedule(n, training)
    assert (sample_rate, steps) == (20 / 60, 3)
    sigma = calibrate_noise(3.0, 1e-3, sample_rate, total, "rdp")
    model = TrajectoryExamples(SPEC, STATICS)
    result = train_dp(model, x, y, training=training, privacy=privacy, noise_multiplier=sigma, delta=1e-3,
                      objective=_objective(model), replay_seed=1)  # fmt: skip
    assert result.num_examples == n and result.steps == 3 and result.sample_rate == pytest.approx(1 / 3)
    assert result.history == [(pytest.approx(sigma), pytest.approx(1 / 3), 3)]
    # half the study's steps spent half-way to the target (the same epsilon a 60-patient tabular round gives)
    second = train_dp(model, x, y, training=training, privacy=privacy, noise_multiplier=sigma, delta=1e-3,
                      accountant_history=result.history, objective=_objective(model), replay_seed=2)  # fmt: skip
    assert result.epsilon < second.epsilon == pytest.approx(3.0, rel=0.02)
    assert np.isfinite(result.train_loss) and result.update_norm > 0


def test_training_without_dp_lowers_the_loss_of_a_learnable_trajectory():
    """A signal that continues its last value: the twin learns it (the loss falls), DP or not."""
    rng = np.random.default_rng(6)
    layout = TrajectoryExamples(SPEC, STATICS).layout
    n, w, h, f, s = 300, layout.windows, layout.history, layout.horizon, layout.signals
    level = rng.normal(size=(n, w, 1, s))
    history = np.concatenate([np.repeat(level, h, axis=2)[..., None], np.ones((n, w, h, s, 2))], axis=-1)
    history[..., 2] = 0.1
    future = np.repeat(level, f, axis=2) + rng.normal(scale=0.1, size=(n, w, f, s))
    x = layout.pack_inputs(np.zeros((n, STATICS)), history, np.zeros((n, w, h + f, 1)))
    y = layout.pack_targets(future, np.ones_like(future), np.zeros((n, w)), np.ones((n, w)), np.ones((n, w)))
    training = TrainingSpec(rounds=1, local_epochs=5, batch_size=50, learning_rate=0.02, optimizer="adam")
    torch.manual_seed(0)
    model = TrajectoryExamples(SPEC, STATICS)
    objective = _objective(model)
    before = float(objective.loss(model(torch.from_numpy(x)), torch.from_numpy(y)).mean())
    plain = train_plain(model, x, y, training=training, objective=objective)
    model.load_state_dict(plain.state_dict)
    after = float(objective.loss(model(torch.from_numpy(x)), torch.from_numpy(y)).mean())
    assert after < 0.7 * before


def test_the_kinds_output_gradient_is_each_patients_own_and_autograds():
    from federation.twins import kind_of
    from federation.twins.trajectory import TrajectoryKind

    kind = kind_of("trajectory")
    assert isinstance(kind, TrajectoryKind) and not kind.closed_form_gradient
    torch.manual_seed(4)
    model = TrajectoryExamples(SPEC, STATICS)
    x, y = (torch.from_numpy(a) for a in _patients(6, seed=8))
    outputs = model(x).detach()
    gradient = kind.output_gradient(SPEC, outputs, y)
    for i in range(6):  # one patient alone gives the same gradient row: the loss couples no two patients
        alone = kind.output_gradient(SPEC, outputs[i : i + 1], y[i : i + 1])
        torch.testing.assert_close(gradient[i : i + 1], alone, rtol=1e-5, atol=1e-7)
    assert gradient.abs().sum() > 0
