"""Ghost clipping in a single pass for the registry's models (nn.Sequential of Linear, ReLU, Dropout).

DP-SGD needs each example's gradient norm to clip it. For a Linear layer the example's weight gradient is
the outer product g_i a_i^T of the gradient at the layer's output and the layer's input, so its norm is
|g_i| |a_i| without ever forming the outer product ("ghost" norms, Goodfellow 2015; Li et al. 2022).
Opacus' ghost mode then runs a *second* backward pass over the loss re-weighted by the clip factors c_i.
For Linear layers that second pass is unnecessary: the clipped sum is sum_i c_i g_i a_i^T = (c * G)^T A,
one matrix product per layer from the tensors the first pass already produced ("book-keeping", Bu et
al. 2023). For these three layer types the backward pass itself is a few matrix products and masks, so
it is written out here rather than recorded by autograd every step.

The result is the clipped gradient sum Opacus computes (tests compare the two, and both against
per-example autograd) at a fraction of the per-step overhead, which is what dominates for models this
small. The loss comes from the study's twin kind (`Objective`): its per-patient value and its gradient at
the model's outputs in closed form (binary cross-entropy on one logit: sigmoid(z) - y; a discrete-time
hazard: the same per interval the patient was at risk in), which is all the backward pass starts from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Layers the single-pass computation understands; anything else goes through Opacus (see engines.py).
SUPPORTED_LAYERS = (nn.Linear, nn.ReLU, nn.Dropout, nn.Identity)

# Opacus' clip factor: min(1, C / (|g_i| + 1e-6)); the same constant keeps the two engines identical.
NORM_EPSILON = 1e-6


@dataclass(frozen=True)
class Objective:
    """A twin kind's loss as the trainer needs it: each patient's loss (n,) from the outputs (n, k) and the
    targets, and its gradient at the outputs (n, k) in closed form."""

    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    # None for a kind whose gradient is left to autograd (the trajectory kind: the per-patient engine)
    gradient: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None


def _bce_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(outputs.squeeze(-1), targets, reduction="none")


def _bce_gradient(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(outputs) - targets.unsqueeze(-1)


# One logit per patient with a 0/1 label: the risk kinds' objective, and the default of the trainer.
BINARY = Objective(_bce_loss, _bce_gradient)


def supports(model: nn.Module) -> bool:
    """True if `model` is a Sequential of supported layers whose parameters all live in its Linear layers and
    are trainable."""
    if not isinstance(model, nn.Sequential) or not all(type(layer) in SUPPORTED_LAYERS for layer in model):
        return False
    if any(isinstance(layer, nn.Dropout) and layer.p >= 1 for layer in model):
        return False
    linears = [layer for layer in model if isinstance(layer, nn.Linear)]
    owned = {id(p) for layer in linears for p in layer.parameters()}
    return bool(linears) and all(id(p) in owned and p.requires_grad for p in model.parameters())


class SinglePassGhostClipping:
    """Per-example clipped gradient sums of a twin kind's loss for a supported Sequential model."""

    def __init__(self, model: nn.Sequential, max_grad_norm: float, objective: Objective = BINARY) -> None:
        if not supports(model):
            raise ValueError("single-pass ghost clipping needs an nn.Sequential of Linear, ReLU and Dropout layers")
        if objective.gradient is None:
            raise ValueError("single-pass ghost clipping needs the loss's gradient at the outputs in closed form")
        self.layers = list(model)
        self.max_grad_norm = max_grad_norm
        self.objective = objective
        # Parameters in the order the gradients are returned: weight, then bias, layer by layer.
        linears = [layer for layer in self.layers if isinstance(layer, nn.Linear)]
        self.parameters = [p for layer in linears for p in (layer.weight, layer.bias) if p is not None]

    @torch.no_grad()
    def clipped_sum(
        self, x: torch.Tensor, y: torch.Tensor, scale: float = 1.0
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(`scale` times the sum over the batch of each example's gradient clipped to norm C, one tensor
        per parameter in `self.parameters` order; the sum of the examples' losses). An empty batch gives
        zeros. `scale` lets the caller fold its division by the batch size into the clip factors."""
        saved: list[torch.Tensor | None] = []  # per layer: Linear input, ReLU output or Dropout mask
        h = x
        for layer in self.layers:
            if type(layer) is nn.Linear:
                saved.append(h)
                h = F.linear(h, layer.weight, layer.bias)
            elif type(layer) is nn.ReLU:
                h = torch.relu(h)
                saved.append(h)
            elif type(layer) is nn.Dropout and layer.training and layer.p > 0:
                mask = torch.empty_like(h).bernoulli_(1 - layer.p).div_(1 - layer.p)
                h = h * mask
                saved.append(mask)
            else:
                saved.append(None)
        loss_sum = self.objective.loss(h, y).sum()

        # Backward: g is each example's gradient at the current layer's output.
        g = self.objective.gradient(h, y)
        pairs: list[tuple[nn.Linear, torch.Tensor, torch.Tensor]] = []
        first_linear = next(i for i, layer in enumerate(self.layers) if type(layer) is nn.Linear)
        for i in range(len(self.layers) - 1, first_linear - 1, -1):
            layer, kept = self.layers[i], saved[i]
            if type(layer) is nn.Linear:
                pairs.append((layer, kept, g))
                if i > first_linear:
                    g = g @ layer.weight
            elif type(layer) is nn.ReLU:
                g = g * kept.sign()  # ReLU output >= 0, so its sign is ReLU's derivative (0 at 0, as autograd)
            elif kept is not None:
                g = g * kept
        pairs.reverse()

        squared_norms = None
        for layer, a, g in pairs:
            a_sq = torch.linalg.vecdot(a, a)
            term = torch.linalg.vecdot(g, g) * (a_sq + 1.0 if layer.bias is not None else a_sq)
            squared_norms = term if squared_norms is None else squared_norms.add_(term)
        factors = (self.max_grad_norm / (squared_norms.sqrt_() + NORM_EPSILON)).clamp_(max=1.0)
        factors = factors.mul_(scale).unsqueeze(1)

        grads: list[torch.Tensor] = []
        for layer, a, g in pairs:
            clipped = g * factors
            grads.append(clipped.T @ a)
            if layer.bias is not None:
                grads.append(clipped.sum(0))
        return grads, loss_sum
