"""One DP-SGD step: clip each example's gradient to C, sum, add N(0, (sigma C)^2), divide by the expected
batch size q n, tell the accountant. Two interchangeable engines compute it:

* `SinglePassStep` for the registry's models (Sequential Linear/ReLU/Dropout): ghost clipping in one
  backward pass (ghost.py), noise drawn in one call for all parameters;
* `PerPatientStep` for models whose rows are whole patients with many windows each (the trajectory
  kind: `per_patient_gradients`): each row's gradient exactly, by torch.func (a vmap of the gradient over
  the batch's rows), so everything a patient's windows contribute is clipped together, once;
* `OpacusGhostStep` for any other model Opacus can clip: Opacus' own fast-gradient-clipping module,
  optimizer and loss (what `PrivacyEngine.make_private(grad_sample_mode="ghost")` assembles), built here
  directly so the accountant is told the sample rate q = batch_size / n of our own Poisson sampler
  instead of `1 / len(data_loader)`.

Both leave the privatised average gradient in `p.grad` and step the (Opacus) accountant once per step,
empty batches included. The caller then adds anything data-independent (the FedProx term) and runs the
base optimizer: post-processing of a private gradient costs no privacy.
"""

from __future__ import annotations

from typing import Protocol

import torch
from opacus.accountants.accountant import IAccountant
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizerFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from opacus.validators import ModuleValidator
from torch import func, nn

from site_node.training.ghost import BINARY, NORM_EPSILON, Objective, SinglePassGhostClipping, supports


class _KindLoss(nn.Module):
    """A twin kind's per-patient loss as the loss module Opacus' ghost clipping wraps: Opacus sets
    `reduction` to "none" to get each patient's loss, and the trainer reports their mean otherwise."""

    def __init__(self, objective: Objective) -> None:
        super().__init__()
        self.objective = objective
        self.reduction = "mean"

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        losses = self.objective.loss(outputs, targets)
        return losses if self.reduction == "none" else losses.mean()


class DPStep(Protocol):
    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Set every parameter's `.grad` to the privatised gradient of batch (x, y); return its loss sum."""
        ...

    def close(self) -> None:
        """Remove anything the engine attached to the model."""
        ...


class _NoisedSum:
    """What the two hand-written engines share: the noise on a clipped sum and the accountant's step.

    Noise on the sum has std sigma C; the sum is divided by the expected batch size q n (Opacus' mean)."""

    def __init__(self, params: list[torch.Tensor], noise_multiplier: float, max_grad_norm: float, sample_rate: float,
                 expected_batch_size: float, accountant: IAccountant, generator: torch.Generator) -> None:  # fmt: skip
        self._params = params
        self._sizes = [p.numel() for p in params]
        self._scale = 1.0 / expected_batch_size
        self._noise_std = noise_multiplier * max_grad_norm * self._scale
        self._noise_multiplier = noise_multiplier
        self._sample_rate = sample_rate
        self._accountant = accountant
        self._generator = generator

    def _release(self, scaled_sums: list[torch.Tensor]) -> None:
        """Set each parameter's `.grad` to its scaled clipped sum plus noise, and step the accountant."""
        noise = torch.randn(sum(self._sizes), generator=self._generator, dtype=scaled_sums[0].dtype)
        for p, total, chunk in zip(self._params, scaled_sums, noise.split(self._sizes), strict=True):
            p.grad = total.add_(chunk.view_as(total), alpha=self._noise_std)
        self._accountant.step(noise_multiplier=self._noise_multiplier, sample_rate=self._sample_rate)

    def close(self) -> None:
        """Nothing is attached to the model."""


class SinglePassStep(_NoisedSum):
    """The DP-SGD step for the registry's models, with per-step work kept to a few tensor operations."""

    def __init__(
        self,
        model: nn.Sequential,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        sample_rate: float,
        expected_batch_size: float,
        accountant: IAccountant,
        generator: torch.Generator,
        objective: Objective = BINARY,
    ) -> None:
        self._clipping = SinglePassGhostClipping(model, max_grad_norm, objective)
        super().__init__(self._clipping.parameters, noise_multiplier, max_grad_norm, sample_rate, expected_batch_size,
                         accountant, generator)  # fmt: skip

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # dividing the sum by q n is folded into the clip factors
        grads, loss_sum = self._clipping.clipped_sum(x, y, scale=self._scale)
        self._release(grads)
        return loss_sum


class PerPatientStep(_NoisedSum):
    """The DP-SGD step for a model whose every input row is one patient, however many windows of their series
    it holds: the gradient of each row's loss, taken with torch.func over the batch's rows (vmap of grad,
    `chunk` rows at a time), clipped to C as a whole, summed, noised once for all parameters.

    Sampling, clipping and the accountant therefore all count patients: a patient with eight decision times
    is one example with one clipping bound, not eight (a per-window clip would let one patient move the
    model eight times as far as the accountant assumes)."""

    def __init__(
        self,
        model: nn.Module,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        sample_rate: float,
        expected_batch_size: float,
        accountant: IAccountant,
        generator: torch.Generator,
        objective: Objective = BINARY,
        chunk: int = 256,
    ) -> None:
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self._names = [name for name, _ in named]
        super().__init__([p for _, p in named], noise_multiplier, max_grad_norm, sample_rate, expected_batch_size,
                         accountant, generator)  # fmt: skip
        buffers = dict(model.named_buffers())

        def row_loss(params: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            outputs = func.functional_call(model, (dict(zip(self._names, params, strict=True)), buffers), (x[None],))
            loss = objective.loss(outputs, y[None]).sum()
            return loss, loss.detach()

        self._row_gradients = func.vmap(func.grad(row_loss, has_aux=True), in_dims=(None, 0, 0), chunk_size=chunk)
        self._max_grad_norm = max_grad_norm

    def clipped_sum(self, x: torch.Tensor, y: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The sum of the rows' gradients, each clipped to C (before any scaling), and the rows' loss sum."""
        if len(x) == 0:
            return [torch.zeros_like(p) for p in self._params], torch.zeros(())
        grads, losses = self._row_gradients([p.detach() for p in self._params], x, y)
        norms = torch.sqrt(sum(g.reshape(len(x), -1).square().sum(dim=1) for g in grads))
        factors = (self._max_grad_norm / (norms + NORM_EPSILON)).clamp(max=1.0)
        return [torch.tensordot(factors, g, dims=1) for g in grads], losses.sum()

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        sums, loss_sum = self.clipped_sum(x, y)
        self._release([total * self._scale for total in sums])
        return loss_sum


class OpacusGhostStep:
    """The DP-SGD step through Opacus' ghost clipping, for models the single-pass engine does not cover."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        sample_rate: float,
        expected_batch_size: float,
        accountant: IAccountant,
        generator: torch.Generator,
        objective: Objective = BINARY,
    ) -> None:
        ModuleValidator.validate(model, strict=True)
        self._module = GradSampleModuleFastGradientClipping(
            model, batch_first=True, loss_reduction="mean", max_grad_norm=max_grad_norm, use_ghost_clipping=True
        )
        self._optimizer = DPOptimizerFastGradientClipping(
            optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,
            loss_reduction="mean",
            generator=generator,
        )
        self._optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
        self._criterion = DPLossFastGradientClipping(
            self._module, self._optimizer, _KindLoss(objective), loss_reduction="mean"
        )

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self._optimizer.zero_grad(set_to_none=True)
        loss = self._criterion(self._module(x), y)
        loss.backward()
        if not self._optimizer.pre_step():
            raise RuntimeError("Opacus skipped a DP step; every sampled step must be taken and accounted")
        return loss.loss_per_sample.detach().sum()

    def close(self) -> None:
        self._module.to_standard_module()


def make_step(
    engine: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    sample_rate: float,
    expected_batch_size: float,
    accountant: IAccountant,
    generator: torch.Generator,
    objective: Objective = BINARY,
) -> DPStep:
    """The engine named (`"single-pass"`, `"per-patient"`, `"opacus"`), or with `"auto"` the one that fits
    `model`: per-patient for models whose rows are patients with windows, else the fastest that clips it."""
    settings = {
        "noise_multiplier": noise_multiplier,
        "max_grad_norm": max_grad_norm,
        "sample_rate": sample_rate,
        "expected_batch_size": expected_batch_size,
        "accountant": accountant,
        "generator": generator,
        "objective": objective,
    }
    if engine == "auto":
        if getattr(model, "per_patient_gradients", False):
            engine = "per-patient"
        else:
            engine = "single-pass" if supports(model) else "opacus"
    if engine == "per-patient":
        return PerPatientStep(model, **settings)
    if engine == "single-pass":
        if not isinstance(model, nn.Sequential) or not supports(model):
            raise ValueError("the single-pass engine needs an nn.Sequential of Linear, ReLU and Dropout layers")
        return SinglePassStep(model, **settings)
    if engine == "opacus":
        return OpacusGhostStep(model, optimizer, **settings)
    raise ValueError(f"unknown DP engine '{engine}'; use 'auto', 'single-pass', 'per-patient' or 'opacus'")
