"""Local DP training: accounting that composes across rounds, refusal of DP-in-name-only settings, noise
calibration, clipping that matches per-example autograd and Opacus, Poisson sampling, learning, FedProx,
and evaluation metrics."""

from __future__ import annotations

import copy
import json
import math
import warnings

import numpy as np
import pytest
import torch
from opacus import PrivacyEngine
from opacus.accountants import create_accountant
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizerFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from federation.contract.spec import LogisticRegressionSpec, MlpSpec, PrivacySpec, TrainingSpec
from federation.twins import build_model
from site_node.training import (
    NEGLIGIBLE_NOISE_MULTIPLIER,
    CalibrationError,
    NotPrivateError,
    auroc,
    calibrate_noise,
    check_privacy_honest,
    epsilon_of,
    evaluate,
    restore_accountant,
    schedule,
    train_dp,
    train_plain,
)
from site_node.training.engines import SinglePassStep
from site_node.training.ghost import SinglePassGhostClipping, supports
from site_node.training.sampling import PoissonBatches

ENGINES = ["single-pass", "opacus"]
MODELS = {
    "logistic_regression": LogisticRegressionSpec(),
    "mlp": MlpSpec(hidden=[16, 8]),
    "mlp_dropout": MlpSpec(hidden=[16, 8], dropout=0.2),
}


def _separable(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    w = np.random.default_rng(99).normal(size=d)
    return x, (x @ w > 0).astype(np.float32)


# --- accounting across rounds -------------------------------------------------------------------------


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_epsilon_over_rounds_with_restored_history_equals_one_continuous_accountant(accountant):
    # 512 patients, batch 64: q = 1/8 exactly, which is also what Opacus' DataLoader-based engine uses.
    x, y = _separable(512, 6, seed=1)
    training = TrainingSpec(rounds=5, local_epochs=1, batch_size=64, learning_rate=0.1)
    privacy = PrivacySpec(target_epsilon=4.0, accountant=accountant)
    delta = 1e-4
    sample_rate, steps_per_round, total_steps = schedule(len(y), training)
    sigma = calibrate_noise(privacy.target_epsilon, delta, sample_rate, total_steps, accountant)

    stored = "[]"  # what a ledger keeps between rounds: JSON, so tuples come back as lists
    state = None
    per_round = []
    for _ in range(training.rounds):
        model = build_model(LogisticRegressionSpec(), 6, seed=0)  # fresh model, fresh accountant each round
        result = train_dp(
            model, x, y, training=training, privacy=privacy, noise_multiplier=sigma, delta=delta,
            accountant_history=json.loads(stored), global_state=state,
        )  # fmt: skip
        stored, state = json.dumps(result.history), result.state_dict
        per_round.append(result.epsilon)

    continuous = create_accountant(mechanism=accountant)
    for _ in range(total_steps):
        continuous.step(noise_multiplier=sigma, sample_rate=sample_rate)
    assert per_round[-1] == pytest.approx(continuous.get_epsilon(delta), rel=1e-9)
    assert per_round == sorted(per_round) and per_round[0] < per_round[-1]
    assert per_round[-1] <= privacy.target_epsilon

    # Opacus' own pipeline, trained continuously over the same number of steps, spends the same epsilon.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = PrivacyEngine(accountant=accountant)
        model = build_model(LogisticRegressionSpec(), 6, seed=0)
        loader = DataLoader(TensorDataset(torch.from_numpy(x), torch.from_numpy(y)), batch_size=64)
        module, optimizer, criterion, loader = engine.make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            criterion=nn.BCEWithLogitsLoss(),
            data_loader=loader,
            noise_multiplier=sigma,
            max_grad_norm=privacy.max_grad_norm,
            grad_sample_mode="ghost",
        )
    for _ in range(training.rounds * training.local_epochs):
        for xb, yb in loader:
            optimizer.zero_grad()
            criterion(module(xb).squeeze(-1), yb).backward()
            optimizer.step()
    assert sum(steps for _, _, steps in engine.accountant.history) == total_steps
    assert per_round[-1] == pytest.approx(engine.get_epsilon(delta), rel=1e-9)

    # Without the restored history each round would report only its own, much smaller, epsilon.
    assert epsilon_of([(sigma, sample_rate, steps_per_round)], delta, accountant) < per_round[-1] * 0.7


def test_restore_accountant_checks_entries():
    assert restore_accountant("rdp", [[1.0, 0.5, 3]]).history == [(1.0, 0.5, 3)]
    for bad in ([1.0, 0.5], [0.0, 0.5, 3], [1.0, 1.5, 3], [1.0, 0.5, 2.5], [1.0, 0.5, -1]):
        with pytest.raises(ValueError):
            restore_accountant("rdp", [bad])
    with pytest.raises(ValueError, match="unknown accountant"):
        restore_accountant("gdp")
    assert epsilon_of([], 1e-5, "rdp") == 0.0


# --- refusing DP in name only -------------------------------------------------------------------------


HONEST = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5, "n": 1000, "min_noise_multiplier": 0.5}


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"noise_multiplier": 0.4}, "below this site's floor of 0.5"),
        ({"noise_multiplier": 0.0, "min_noise_multiplier": 0.0}, "almost no noise"),
        ({"noise_multiplier": 1e-9, "min_noise_multiplier": 0.0}, "almost no noise"),
        ({"noise_multiplier": NEGLIGIBLE_NOISE_MULTIPLIER / 2, "min_noise_multiplier": 0.0}, "almost no noise"),
        ({"noise_multiplier": math.nan}, "almost no noise"),
        ({"max_grad_norm": math.inf}, "clipping bound"),
        ({"max_grad_norm": math.nan}, "clipping bound"),
        ({"max_grad_norm": 0.0}, "clipping bound"),
        ({"max_grad_norm": -1.0}, "clipping bound"),
        ({"delta": 1e-3}, "not below 1/n"),
        ({"delta": 2e-3}, "not below 1/n"),
        ({"delta": 0.0}, "small positive probability"),
        ({"n": 0}, "no training examples"),
    ],
)
def test_dp_in_name_only_is_refused(change, reason):
    with pytest.raises(NotPrivateError, match=reason):
        check_privacy_honest(**{**HONEST, **change})


def test_honest_configuration_passes_and_train_dp_refuses_before_training():
    check_privacy_honest(**HONEST)
    x, y = _separable(100, 3, seed=0)
    model = build_model(LogisticRegressionSpec(), 3)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(NotPrivateError, match="1/n"):
        train_dp(
            model, x, y, training=TrainingSpec(), privacy=PrivacySpec(target_epsilon=1.0), noise_multiplier=1.0,
            delta=1 / 100,
        )  # fmt: skip
    with pytest.raises(NotPrivateError, match="floor"):
        train_dp(
            model, x, y, training=TrainingSpec(), privacy=PrivacySpec(target_epsilon=1.0), noise_multiplier=0.6,
            delta=1e-4, min_noise_multiplier=0.8,
        )  # fmt: skip
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# --- calibration and schedule ---------------------------------------------------------------------------


@pytest.mark.parametrize(("accountant", "target"), [("rdp", 1.0), ("rdp", 8.0), ("prv", 3.0)])
def test_calibrated_noise_reaches_the_target_within_tolerance(accountant, target):
    sample_rate, steps = 0.05, 200
    sigma = calibrate_noise(target, 1e-5, sample_rate, steps, accountant)
    spent = epsilon_of([(sigma, sample_rate, steps)], 1e-5, accountant)
    assert target - 0.01 <= spent <= target


def test_unreachable_or_invalid_calibration_is_a_clear_error():
    # RDP cannot certify epsilon below log(1/delta)/(alpha_max - 1) ~ 0.19 at delta 1e-5, whatever the noise.
    with pytest.raises(CalibrationError, match="cannot be reached"):
        calibrate_noise(0.05, 1e-5, 1.0, 10, "rdp")
    assert issubclass(CalibrationError, NotPrivateError)  # a site refuses it like any DP-in-name-only setting
    for args in [(0.0, 1e-5, 0.1, 10, "rdp"), (1.0, 1.5, 0.1, 10, "rdp"), (1.0, 1e-5, 0.0, 10, "rdp"),
                 (1.0, 1e-5, 0.1, 0, "rdp")]:  # fmt: skip
        with pytest.raises(CalibrationError):
            calibrate_noise(*args)
    with pytest.raises(ValueError, match="unknown accountant"):
        calibrate_noise(1.0, 1e-5, 0.1, 10, "gdp")


def test_schedule_counts_steps_in_integers():
    assert schedule(640, TrainingSpec(rounds=3, local_epochs=2, batch_size=64)) == (0.1, 20, 60)
    assert schedule(641, TrainingSpec(rounds=1, local_epochs=1, batch_size=64)) == (64 / 641, 11, 11)
    assert schedule(10, TrainingSpec(rounds=2, local_epochs=1, batch_size=64)) == (1.0, 1, 2)
    with pytest.raises(ValueError):
        schedule(0, TrainingSpec())


# --- the DP-SGD step -----------------------------------------------------------------------------------


def _per_example_clipped_sum(model: nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float) -> list[torch.Tensor]:
    params = list(model.parameters())
    total = [torch.zeros_like(p) for p in params]
    for i in range(len(y)):
        loss = nn.functional.binary_cross_entropy_with_logits(model(x[i : i + 1]).squeeze(-1), y[i : i + 1])
        grads = torch.autograd.grad(loss, params)
        norm = float(torch.sqrt(sum(g.square().sum() for g in grads)))
        for t, g in zip(total, grads, strict=True):
            t += min(1.0, clip / (norm + 1e-6)) * g
    return total


def _opacus_clipped_sum(model: nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float) -> list[torch.Tensor]:
    model = copy.deepcopy(model)
    module = GradSampleModuleFastGradientClipping(model, loss_reduction="sum", max_grad_norm=clip)
    optimizer = DPOptimizerFastGradientClipping(
        torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=0.0, max_grad_norm=clip,
        expected_batch_size=1, loss_reduction="sum",
    )  # fmt: skip
    criterion = DPLossFastGradientClipping(module, optimizer, nn.BCEWithLogitsLoss(reduction="sum"), "sum")
    optimizer.zero_grad()
    criterion(module(x).squeeze(-1), y).backward()
    optimizer.pre_step()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("kind", ["logistic_regression", "mlp"])
def test_single_pass_clipping_equals_per_example_autograd_and_opacus(kind):
    torch.manual_seed(0)
    model = build_model(MODELS[kind], 7, seed=3)
    x, y = torch.randn(40, 7) * 2, (torch.rand(40) < 0.4).float()
    clip = 0.5  # small enough that most examples are clipped
    ours, loss_sum = SinglePassGhostClipping(model, clip).clipped_sum(x, y)
    for reference in (_per_example_clipped_sum(model, x, y, clip), _opacus_clipped_sum(model, x, y, clip)):
        for a, b in zip(ours, reference, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    expected_loss = nn.functional.binary_cross_entropy_with_logits(model(x).squeeze(-1), y, reduction="sum")
    torch.testing.assert_close(loss_sum, expected_loss)


def test_single_pass_clipping_with_dropout_equals_opacus_under_the_same_masks():
    model = build_model(MODELS["mlp_dropout"], 5, seed=1).train()
    x, y = torch.randn(32, 5), (torch.rand(32) < 0.5).float()
    torch.manual_seed(7)
    ours, _ = SinglePassGhostClipping(model, 0.5).clipped_sum(x, y)
    torch.manual_seed(7)  # nn.Dropout draws its mask the same way, so both see the same masks
    for a, b in zip(ours, _opacus_clipped_sum(model, x, y, 0.5), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["logistic_regression", "mlp"])
def test_one_patient_moves_the_clipped_sum_by_at_most_the_clipping_bound(kind):
    model = build_model(MODELS[kind], 4, seed=0)
    x, y = torch.randn(10, 4), (torch.rand(10) < 0.5).float()
    extreme = torch.randn(1, 4) * 1e4
    with torch.no_grad():
        wrong = (model(extreme).squeeze(-1) < 0).float()  # the label the model gets most wrong: a huge gradient
    clip = 0.3
    without, _ = SinglePassGhostClipping(model, clip).clipped_sum(x, y)
    with_it, _ = SinglePassGhostClipping(model, clip).clipped_sum(torch.cat([x, extreme]), torch.cat([y, wrong]))
    difference = math.sqrt(sum(float((a - b).square().sum()) for a, b in zip(with_it, without, strict=True)))
    assert clip * 0.99 <= difference <= clip * (1 + 1e-5)  # float32 rounding only


def test_noise_has_the_calibrated_scale():
    # On an empty batch the privatised gradient is pure noise: sigma * C / (q n) per coordinate.
    model = nn.Sequential(nn.Linear(400, 1))
    sigma, clip, expected_batch = 1.3, 0.7, 20.0
    accountant = create_accountant("rdp")
    step = SinglePassStep(
        model, noise_multiplier=sigma, max_grad_norm=clip, sample_rate=0.1, expected_batch_size=expected_batch,
        accountant=accountant, generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    draws = []
    for _ in range(25):
        step(torch.zeros(0, 400), torch.zeros(0))
        draws.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert float(torch.cat(draws).std()) == pytest.approx(sigma * clip / expected_batch, rel=0.05)
    assert accountant.history == [(sigma, 0.1, 25)]


class _TwoLayer(nn.Module):
    """Not a Sequential, with a Tanh: outside the single-pass engine, inside Opacus' ghost clipping."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden, self.out = nn.Linear(3, 5), nn.Linear(5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(x)))


def test_other_models_train_through_opacus_with_the_same_accounting():
    x, y = _separable(300, 3, seed=4)
    training = TrainingSpec(rounds=1, local_epochs=2, batch_size=50)
    result = train_dp(
        _TwoLayer(), x, y, training=training, privacy=PrivacySpec(target_epsilon=3.0), noise_multiplier=1.1,
        delta=1e-4,
    )  # fmt: skip
    assert result.history == [(1.1, 50 / 300, 12)]
    assert set(result.state_dict) == {"hidden.weight", "hidden.bias", "out.weight", "out.bias"}
    with pytest.raises(ValueError, match="single-pass engine"):
        train_dp(
            _TwoLayer(), x, y, training=training, privacy=PrivacySpec(target_epsilon=3.0), noise_multiplier=1.1,
            delta=1e-4, engine="single-pass",
        )  # fmt: skip


def test_only_the_registry_models_take_the_single_pass_engine():
    assert supports(build_model(MODELS["mlp_dropout"], 3))
    assert not supports(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)))
    assert supports(nn.Sequential(nn.Linear(3, 2)))  # several outputs: the survival kind's hazards per interval
    assert not supports(nn.Linear(3, 1))  # not a Sequential


# --- Poisson sampling ----------------------------------------------------------------------------------


def test_poisson_batches_have_the_independent_inclusion_distribution():
    n, q, steps = 40, 0.2, 20_000
    masks = np.zeros((steps, n), dtype=bool)
    for i, idx in enumerate(PoissonBatches(n, q, np.random.default_rng(5))(steps)):
        assert len(set(idx.tolist())) == len(idx)
        masks[i, idx.numpy()] = True
    inclusion = masks.mean(0)
    assert np.abs(inclusion - q).max() < 0.015  # each patient joins with probability q
    sizes = masks.sum(1)
    assert sizes.mean() == pytest.approx(n * q, rel=0.02)
    assert sizes.var() == pytest.approx(n * q * (1 - q), rel=0.06)  # Binomial, not a fixed batch size
    joint = (masks[:, :, None] & masks[:, None, :]).mean(0)[~np.eye(n, dtype=bool)]
    assert abs(joint.mean() - q * q) < 0.002  # pairs join independently
    assert (sizes == 0).sum() == pytest.approx(steps * (1 - q) ** n, abs=5)


@pytest.mark.parametrize("engine", ENGINES)
def test_empty_poisson_batches_are_trained_and_counted_not_skipped(engine):
    x, y = _separable(10, 3, seed=2)
    training = TrainingSpec(rounds=1, local_epochs=5, batch_size=1, learning_rate=0.1)  # q = 0.1
    empty = sum(len(idx) == 0 for idx in PoissonBatches(10, 0.1, np.random.default_rng(0))(50))
    assert empty > 5  # P(empty) = 0.9^10, about a third of the steps
    result = train_dp(
        build_model(MODELS["mlp"], 3), x, y, training=training, privacy=PrivacySpec(target_epsilon=5.0),
        noise_multiplier=1.0, delta=1e-3, engine=engine, replay_seed=0,
    )  # fmt: skip
    assert result.steps == 50 and result.history == [(1.0, 0.1, 50)]
    assert all(torch.isfinite(t).all() for t in result.state_dict.values())


# --- training -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["logistic_regression", "mlp"])
def test_dp_training_learns_a_separable_problem(kind):
    x, y = _separable(3000, 8, seed=0)
    x_test, y_test = _separable(1000, 8, seed=1)
    training = TrainingSpec(rounds=3, local_epochs=2, batch_size=128, learning_rate=0.5)
    privacy = PrivacySpec(target_epsilon=2.0)
    delta = 1 / (10 * len(y))
    sample_rate, _, total = schedule(len(y), training)
    sigma = calibrate_noise(privacy.target_epsilon, delta, sample_rate, total, privacy.accountant)
    model = build_model(MODELS[kind], 8, seed=0)
    history, state = [], None
    for r in range(training.rounds):
        result = train_dp(
            model, x, y, training=training, privacy=privacy, noise_multiplier=sigma, delta=delta,
            accountant_history=history, global_state=state, replay_seed=r,
        )  # fmt: skip
        history, state = result.history, result.state_dict
    assert result.epsilon <= privacy.target_epsilon
    model.load_state_dict(state)
    assert evaluate(model, x_test, y_test)["auroc"] > 0.9


def test_plain_training_learns_and_reports_no_privacy():
    x, y = _separable(1000, 5, seed=0)
    model = build_model(LogisticRegressionSpec(), 5)
    result = train_plain(model, x, y, training=TrainingSpec(rounds=1, local_epochs=3, batch_size=32))
    assert result.epsilon == math.inf and result.history == [] and result.noise_multiplier == 0.0
    assert result.steps == 3 * 32
    model.load_state_dict(result.state_dict)
    assert evaluate(model, x, y)["auroc"] > 0.97


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("kind", list(MODELS))
def test_returned_weights_load_into_a_fresh_registry_model(engine, kind):
    x, y = _separable(200, 4, seed=0)
    original = build_model(MODELS[kind], 4, seed=0)
    before = copy.deepcopy(original.state_dict())
    result = train_dp(
        original, x, y, training=TrainingSpec(batch_size=32), privacy=PrivacySpec(target_epsilon=3.0),
        noise_multiplier=1.0, delta=1e-4, engine=engine,
    )  # fmt: skip
    fresh = build_model(MODELS[kind], 4, seed=5)
    assert list(result.state_dict) == list(fresh.state_dict())
    fresh.load_state_dict(result.state_dict)  # strict: plain keys, no '_module.' prefix
    assert all(torch.equal(before[k], v) for k, v in original.state_dict().items())  # caller's model untouched
    assert not any(hasattr(p, "_forward_counter") for p in original.parameters())


@pytest.mark.parametrize("engine", ENGINES)
def test_fedprox_term_pulls_towards_the_global_weights(engine):
    x, y = _separable(400, 5, seed=3)
    model = build_model(MODELS["mlp"], 5, seed=0)
    global_state = {k: v + 0.5 for k, v in model.state_dict().items()}  # the round starts from these
    norms = {}
    for mu in (0.0, 2.0):
        training = TrainingSpec(local_epochs=3, batch_size=32, learning_rate=0.2, proximal_mu=mu)
        result = train_dp(
            model, x, y, training=training, privacy=PrivacySpec(target_epsilon=3.0), noise_multiplier=1.0,
            delta=1e-4, global_state=global_state, engine=engine, replay_seed=11,
        )  # fmt: skip
        distance = math.sqrt(sum(float((result.state_dict[k] - global_state[k]).square().sum()) for k in global_state))
        assert distance == pytest.approx(result.update_norm, rel=1e-4)
        norms[mu] = distance
        plain = train_plain(model, x, y, training=training, global_state=global_state, seed=1)
        norms[f"plain-{mu}"] = plain.update_norm
    assert norms[2.0] < 0.6 * norms[0.0]
    assert norms["plain-2.0"] < 0.6 * norms["plain-0.0"]


def test_a_known_seed_does_not_replay_the_sampling_or_the_noise():
    # The study file's seed is public: with it alone, two runs must still draw different batches and noise.
    x, y = _separable(300, 4, seed=0)
    model = build_model(LogisticRegressionSpec(), 4)
    runs = [
        train_dp(
            model, x, y, training=TrainingSpec(batch_size=32), privacy=PrivacySpec(target_epsilon=3.0),
            noise_multiplier=1.0, delta=1e-4, seed=7,
        ).state_dict["0.weight"]
        for _ in range(2)
    ]  # fmt: skip
    assert not torch.equal(runs[0], runs[1])
    replayed = [
        train_dp(
            model, x, y, training=TrainingSpec(batch_size=32), privacy=PrivacySpec(target_epsilon=3.0),
            noise_multiplier=1.0, delta=1e-4, replay_seed=7,
        ).state_dict["0.weight"]
        for _ in range(2)
    ]  # fmt: skip
    assert torch.equal(replayed[0], replayed[1])


def test_bad_training_data_is_rejected_with_a_reason():
    model = build_model(LogisticRegressionSpec(), 2)
    kwargs = {"training": TrainingSpec(), "privacy": PrivacySpec(target_epsilon=1.0), "noise_multiplier": 1.0}
    with pytest.raises(ValueError, match="NaN"):
        train_dp(model, np.array([[0.0, np.nan]] * 20), np.zeros(20), delta=1e-3, **kwargs)
    with pytest.raises(ValueError, match="0 or 1"):
        train_dp(model, np.zeros((20, 2)), np.full(20, 2.0), delta=1e-3, **kwargs)
    with pytest.raises(ValueError, match=r"\(n, d\)"):
        train_dp(model, np.zeros((20, 2)), np.zeros(19), delta=1e-3, **kwargs)


# --- evaluation ----------------------------------------------------------------------------------------


def _identity_model() -> nn.Module:
    model = nn.Sequential(nn.Linear(1, 1))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[0].bias.zero_()
    return model


def test_auroc_with_ties_matches_the_hand_computed_value():
    labels = np.array([0, 0, 1, 1, 0, 1])
    scores = np.array([0.1, 0.4, 0.4, 0.8, 0.8, 0.2])
    # Positives 0.4, 0.8, 0.2 against negatives 0.1, 0.4, 0.8 (a tie counts 1/2): 1.5 + 2.5 + 1 = 5 of 9 pairs.
    assert auroc(labels, scores) == pytest.approx(5 / 9)
    metrics = evaluate(_identity_model(), scores[:, None], labels)
    assert metrics["auroc"] == pytest.approx(5 / 9)
    p = 1 / (1 + np.exp(-scores))
    assert metrics["brier"] == pytest.approx(np.mean((p - labels) ** 2), rel=1e-6)
    assert metrics["loss"] == pytest.approx(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)), rel=1e-6)
    assert metrics["num_examples"] == 6 and metrics["num_positive"] == 3

    rng = np.random.default_rng(0)
    many_labels, many_scores = rng.random(500) < 0.3, np.round(rng.random(500), 1)  # heavy ties
    assert auroc(many_labels, many_scores) == pytest.approx(roc_auc_score(many_labels, many_scores), abs=1e-12)
    assert math.isnan(auroc(np.ones(4), np.arange(4)))


def test_evaluate_withholds_small_cells_and_restores_the_model_mode():
    model = _identity_model().train()
    scores, labels = np.arange(30, dtype=np.float32)[:, None], np.r_[np.zeros(27), np.ones(3)]
    metrics = evaluate(model, scores, labels, min_cell_count=5)
    assert metrics == {"loss": None, "auroc": None, "brier": None, "num_examples": 30, "num_positive": None}
    assert model.training
    assert evaluate(model, scores, labels, min_cell_count=3)["auroc"] == pytest.approx(1.0)
    assert evaluate(model, scores, labels, min_cell_count=40)["num_examples"] is None
