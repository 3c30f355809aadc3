"""One round of local training at a site: DP-SGD (`train_dp`) or the non-private reference (`train_plain`).

Both train a private copy of the model (the caller's module is never wrapped or changed, so a model is
never privatised twice), start from the round's global weights, optionally add the FedProx proximal
term, and return plain state_dict keys ready to send. `train_dp` composes its epsilon with everything
the site spent before: the accountant is restored from the stored history and the new history returned.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from federation.contract.spec import PrivacySpec, TrainingSpec
from site_node.training.engines import make_step
from site_node.training.ghost import BINARY, Objective
from site_node.training.privacy import check_privacy_honest, restore_accountant, schedule
from site_node.training.sampling import PoissonBatches, shuffled_batches


@dataclass
class TrainResult:
    """What one round of local training produced.

    `epsilon` is cumulative: the restored history plus this round, at the round's delta. `history` is the
    accountant history to store in the site's ledger. `train_loss` (mean loss over the examples the round
    saw) is computed on patient data without noise: it is for the site's own logs, and leaves only if the
    site's policy lets it. `update_norm` is |new - start weights|, a function of the private update only.
    `seconds` is the time spent training; computing `epsilon` afterwards (a cost per round that depends
    only on the history: some 25 ms with RDP, 0.2 s with PRV on a 2-core machine) is not in it.
    """

    state_dict: dict[str, torch.Tensor]
    steps: int
    sample_rate: float
    noise_multiplier: float
    epsilon: float
    history: list[tuple[float, float, int]] = field(default_factory=list)
    train_loss: float = math.nan
    num_examples: int = 0
    update_norm: float = 0.0
    seconds: float = 0.0


def train_dp(
    model: nn.Module,
    features: np.ndarray,
    labels: np.ndarray,
    *,
    training: TrainingSpec,
    privacy: PrivacySpec,
    noise_multiplier: float,
    delta: float,
    accountant_history: Sequence[Sequence[float]] = (),
    global_state: Mapping[str, torch.Tensor] | None = None,
    seed: int | None = None,
    min_noise_multiplier: float = 0.0,
    engine: str = "auto",
    replay_seed: int | None = None,
    objective: Objective = BINARY,
) -> TrainResult:
    """One round of DP-SGD: Poisson sampling at q = batch_size / n, per-patient clipping to
    `privacy.max_grad_norm`, Gaussian noise `noise_multiplier` x C, `training.local_epochs` x ceil(n / batch)
    steps, every one counted by the accountant (empty batches too), with the twin kind's loss (`objective`;
    by default binary cross-entropy on one logit, `labels` then being 0/1). `labels` are the kind's targets,
    one row per patient (federation.twins: `targets_of`).

    `seed` only fixes randomness that reveals nothing (Dropout masks). Which patients were sampled and
    the noise always come from the operating system's entropy: a seed known to anyone (a study file's
    seed, say) would let them replay the batches and subtract the noise. `replay_seed` makes those
    replayable too, for tests and benchmarks only; it voids the guarantee for whoever knows it.
    `min_noise_multiplier` is the site policy's floor (see `check_privacy_honest`). `engine` picks the
    clipping implementation (engines.py); both compute the same DP-SGD step.
    """
    began = time.perf_counter()
    x, y = _as_tensors(features, labels, binary=objective is BINARY)
    n = len(y)
    check_privacy_honest(noise_multiplier, privacy.max_grad_norm, delta, n, min_noise_multiplier)
    sample_rate, steps, _ = schedule(n, training)
    accountant = restore_accountant(privacy.accountant, accountant_history)

    sequence = np.random.SeedSequence(replay_seed)  # None: fresh entropy from the operating system
    sampling_seed, noise_seed = sequence.spawn(2)
    noise_generator = torch.Generator().manual_seed(int(noise_seed.generate_state(1, np.uint64)[0]))
    batches = PoissonBatches(n, sample_rate, np.random.default_rng(sampling_seed))

    working, start = _start(model, global_state)
    optimizer = _optimizer(training, working)
    step = make_step(
        engine,
        working,
        optimizer,
        noise_multiplier=noise_multiplier,
        max_grad_norm=privacy.max_grad_norm,
        sample_rate=sample_rate,
        expected_batch_size=sample_rate * n,
        accountant=accountant,
        generator=noise_generator,
        objective=objective,
    )
    loss_sum, seen = torch.zeros(()), 0
    try:
        with _seeded(seed):
            for idx in batches(steps):
                loss_sum += step(x[idx], y[idx])
                seen += len(idx)
                _proximal(working, start, training.proximal_mu)
                optimizer.step()
    finally:
        step.close()
    seconds = time.perf_counter() - began
    return TrainResult(
        state_dict=_plain_state(working),
        steps=steps,
        sample_rate=sample_rate,
        noise_multiplier=noise_multiplier,
        epsilon=float(accountant.get_epsilon(delta)),
        history=[(float(s), float(q), int(k)) for s, q, k in accountant.history],
        train_loss=float(loss_sum) / seen if seen else math.nan,
        num_examples=n,
        update_norm=_distance(working, start),
        seconds=seconds,
    )


def train_plain(
    model: nn.Module,
    features: np.ndarray,
    labels: np.ndarray,
    *,
    training: TrainingSpec,
    global_state: Mapping[str, torch.Tensor] | None = None,
    seed: int | None = None,
    objective: Objective = BINARY,
) -> TrainResult:
    """The same round without privacy (epsilon = inf): shuffled batches of `batch_size`, the same number of
    steps per epoch, optimizer, loss and FedProx term. The 'no DP' baseline of utility studies and the
    reference of the DP overhead benchmark. `seed` (default: the study's) fixes shuffling and Dropout."""
    began = time.perf_counter()
    x, y = _as_tensors(features, labels, binary=objective is BINARY)
    n = len(y)
    sample_rate, steps, _ = schedule(n, training)
    seed = training.seed if seed is None else seed
    working, start = _start(model, global_state)
    optimizer = _optimizer(training, working)
    loss_sum, seen = torch.zeros(()), 0
    with _seeded(seed):
        for idx in shuffled_batches(n, training.batch_size, training.local_epochs, torch.Generator().manual_seed(seed)):
            optimizer.zero_grad(set_to_none=True)
            loss = objective.loss(working(x[idx]), y[idx]).mean()
            loss.backward()
            loss_sum += loss.detach() * len(idx)
            seen += len(idx)
            _proximal(working, start, training.proximal_mu)
            optimizer.step()
    return TrainResult(
        state_dict=_plain_state(working),
        steps=steps,
        sample_rate=sample_rate,
        noise_multiplier=0.0,
        epsilon=math.inf,
        history=[],
        train_loss=float(loss_sum) / seen if seen else math.nan,
        num_examples=n,
        update_norm=_distance(working, start),
        seconds=time.perf_counter() - began,
    )


def _as_tensors(features: np.ndarray, labels: np.ndarray, *, binary: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x = np.asarray(features, dtype=np.float32)
    y = np.asarray(labels, dtype=np.float32)
    if x.ndim != 2 or len(x) != len(y) or (binary and y.ndim != 1):
        raise ValueError(f"features must be (n, d) and labels (n,); got {x.shape} and {y.shape}")
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or infinite values; impute them before training")
    if binary and not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("labels must be 0 or 1")
    if not np.isfinite(y).all():
        raise ValueError("targets contain NaN or infinite values")
    return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))


def _start(model: nn.Module, global_state: Mapping[str, torch.Tensor] | None) -> tuple[nn.Module, list[torch.Tensor]]:
    """A trainable copy at the round's starting weights, and those weights (the FedProx anchor)."""
    working = copy.deepcopy(model)
    if global_state is not None:
        working.load_state_dict(dict(global_state))
    working.train()
    return working, [p.detach().clone() for p in working.parameters()]


def _optimizer(training: TrainingSpec, model: nn.Module) -> torch.optim.Optimizer:
    if training.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=training.learning_rate)
    return torch.optim.SGD(model.parameters(), lr=training.learning_rate)


def _proximal(model: nn.Module, start: list[torch.Tensor], mu: float) -> None:
    """Add FedProx's mu (w - w_global) to the gradients. It depends on no patient, so adding it after the
    noise is post-processing and spends no privacy."""
    if mu <= 0:
        return
    with torch.no_grad():
        for p, anchor in zip(model.parameters(), start, strict=True):
            p.grad.add_(p - anchor, alpha=mu)


def _distance(model: nn.Module, start: list[torch.Tensor]) -> float:
    with torch.no_grad():
        return math.sqrt(sum(float((p - s).square().sum()) for p, s in zip(model.parameters(), start, strict=True)))


def _plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """Seed torch's global generator (Dropout) for the block and restore it afterwards."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
