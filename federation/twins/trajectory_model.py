"""The trajectory twin's network and loss (issue 12): an encoder-decoder whose decoder is driven by the
planned treatments, so a what-if scenario changes the forecast through the same path the data taught.

The encoder reads each decision time's history (per step: every signal's value, observed mask and hours
since last measured, and the treatments given), with the patient's static covariates; the decoder runs
over the horizon from the encoder's state with the treatments planned for each step ahead as its only
time-varying input. Per step ahead and signal it gives the spec's quantiles, built monotone (the median
plus cumulative positive steps each way) so intervals never cross; from the encoder's state and the
decoder's last state, the logit of the study's event over the horizon.

Recurrent layers are Opacus' DPGRU: an nn.GRU that Opacus can compute per-sample gradients of, so the
patient-level clipping of DP-SGD applies (the single-pass engine in site_node/training clips Linear
layers only). The loss is returned per patient: the mean over that patient's used decision times, so a
patient with many windows counts once, as the privacy unit requires.
"""

from __future__ import annotations

import torch
from opacus.layers import DPGRU
from torch import nn
from torch.nn import functional

from federation.contract.twin_specs import TrajectorySpec


class TrajectoryNet(nn.Module):
    """Forecast quantiles of every signal over the horizon, and the event's logit, per decision time."""

    def __init__(self, spec: TrajectorySpec, static_features: int) -> None:
        super().__init__()
        self.signals, self.treatments = len(spec.signals), len(spec.treatments)
        self.history_steps, self.horizon_steps = spec.history_steps, spec.horizon_steps
        self.quantiles = list(spec.quantiles)
        self.median = self.quantiles.index(0.5)
        hidden = spec.hidden
        self.static = nn.Linear(static_features, hidden) if static_features else None
        self.encoder = DPGRU(self.signals * 3 + self.treatments + hidden, hidden, batch_first=True)
        self.decoder = DPGRU(self.treatments + hidden, hidden, batch_first=True)
        self.quantile_head = nn.Linear(hidden, self.signals * len(self.quantiles))
        self.event_head = nn.Linear(2 * hidden, 1)
        self.hidden = hidden

    def forward(
        self, history: torch.Tensor, controls: torch.Tensor, statics: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """history (B, H, S, 3), controls (B, H + F, R), statics (B, d) -> quantiles (B, F, S, Q), logit (B,)."""
        batch = history.shape[0]
        context = (
            torch.tanh(self.static(statics)) if self.static is not None else history.new_zeros(batch, self.hidden)
        )
        past = torch.cat(
            [
                history.reshape(batch, self.history_steps, -1),
                controls[:, : self.history_steps],
                context[:, None, :].expand(batch, self.history_steps, self.hidden),
            ],
            dim=-1,
        )
        _, state = self.encoder(past)
        planned = torch.cat(
            [controls[:, self.history_steps :], context[:, None, :].expand(batch, self.horizon_steps, self.hidden)],
            dim=-1,
        )
        ahead, last = self.decoder(planned, state)
        raw = self.quantile_head(ahead).reshape(batch, self.horizon_steps, self.signals, len(self.quantiles))
        quantiles = _monotone(raw, self.median)
        logit = self.event_head(torch.cat([state[-1], last[-1]], dim=-1)).squeeze(-1)
        return quantiles, logit


def _monotone(raw: torch.Tensor, median: int) -> torch.Tensor:
    """Quantiles that never cross: the median, then cumulative positive steps up and down from it."""
    centre = raw[..., median : median + 1]
    up = torch.cumsum(functional.softplus(raw[..., median + 1 :]), dim=-1)
    down = torch.flip(torch.cumsum(functional.softplus(torch.flip(raw[..., :median], dims=[-1])), dim=-1), dims=[-1])
    return torch.cat([centre - down, centre, centre + up], dim=-1)


def pinball(quantiles: torch.Tensor, target: torch.Tensor, levels: list[float]) -> torch.Tensor:
    """The quantile (pinball) loss of each forecast, (..., Q) against (...) -> (..., Q)."""
    tau = torch.tensor(levels, dtype=quantiles.dtype, device=quantiles.device)
    error = target[..., None] - quantiles
    return torch.maximum(tau * error, (tau - 1) * error)


def patient_loss(
    quantiles: torch.Tensor,
    logit: torch.Tensor,
    future: torch.Tensor,
    future_mask: torch.Tensor,
    event: torch.Tensor,
    valid: torch.Tensor,
    weights: torch.Tensor,
    levels: list[float],
    event_weight: float = 1.0,
) -> torch.Tensor:
    """Each patient's loss, (P,): over their used decision times (`valid`, (P, W)), the weighted mean of the
    pinball loss on the observed future values and the event's cross-entropy.

    quantiles (P, W, F, S, Q), logit (P, W), future and future_mask (P, W, F, S), event (P, W), weights
    (P, W): the inverse-propensity weight of each decision time (1 without adjustment).
    """
    per_value = pinball(quantiles, future, levels).mean(dim=-1) * future_mask
    observed = future_mask.sum(dim=(-1, -2)).clamp(min=1.0)
    forecast = per_value.sum(dim=(-1, -2)) / observed  # (P, W)
    risk = functional.binary_cross_entropy_with_logits(logit, event, reduction="none")
    window = (forecast + event_weight * risk) * weights * valid
    return window.sum(dim=-1) / (weights * valid).sum(dim=-1).clamp(min=1e-6)
