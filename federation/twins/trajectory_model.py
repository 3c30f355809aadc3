"""The trajectory twin's network and loss (issue 12): an encoder-decoder whose decoder is driven by the
planned treatments, so a what-if scenario changes the forecast through the same path the data taught.

The encoder reads each decision time's history (per step: every signal's value, observed mask and hours
since last measured, and the treatments given), with the patient's static covariates; the decoder runs
over the horizon from the encoder's state with the treatments planned for each step ahead as its only
time-varying input. Per step ahead and signal it gives the spec's quantiles as a change from the signal's
last recorded value, built monotone (the median plus cumulative positive steps each way) so intervals
never cross; from the encoder's state and the
decoder's last state, the logit of the study's event over the horizon.

The recurrent layers are a plain GRU written out over Linear layers (`GRU`): the same equations as
torch.nn.GRU, in operations torch.func can take a per-patient gradient of. DP-SGD here clips each *patient's*
gradient, summed over every decision time cut from their series, so the network is trained through
`TrajectoryExamples`, which takes one flat row per patient (all their windows, `TrajectoryLayout`) and
returns one flat row of outputs: the trainer's sampling, clipping and accounting then see patients, never
windows (site_node.training.engines, the per-patient engine). The loss is returned per patient: the mean
over that patient's used decision times, so a patient with many windows counts once.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional

from federation.contract.twin_specs import WEIGHT_RANGE, TrajectorySpec
from federation.twins.trajectory_rows import TrajectoryLayout


class GRU(nn.Module):
    """One GRU layer, batch first, with torch.nn.GRU's equations (reset gate applied to the hidden part of the
    candidate): r = s(W_ir x + W_hr h), z = s(W_iz x + W_hz h), n = tanh(W_in x + r (W_hn h)),
    h' = (1 - z) n + z h. Two Linear layers hold every weight; the input projection runs once over all steps."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.input_map = nn.Linear(input_size, 3 * hidden_size)
        self.hidden_map = nn.Linear(hidden_size, 3 * hidden_size)

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, input) and the initial state (B, hidden) -> every step's state (B, T, hidden), the last."""
        h = x.new_zeros(x.shape[0], self.hidden_size) if state is None else state
        projected = self.input_map(x)  # (B, T, 3 hidden)
        outputs = []
        for t in range(x.shape[1]):
            ir, iz, inew = projected[:, t].chunk(3, dim=-1)
            hr, hz, hnew = self.hidden_map(h).chunk(3, dim=-1)
            reset, update = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
            candidate = torch.tanh(inew + reset * hnew)
            h = (1 - update) * candidate + update * h
            outputs.append(h)
        return torch.stack(outputs, dim=1), h


class TrajectoryNet(nn.Module):
    """Forecast quantiles of every signal over the horizon, and the event's logit, per decision time."""

    def __init__(self, spec: TrajectorySpec, static_features: int) -> None:
        super().__init__()
        self.signals, self.treatments = len(spec.signals), len(spec.treatments)
        self.lagged = spec.lagged
        self.history_steps, self.horizon_steps = spec.history_steps, spec.horizon_steps
        self.quantiles = list(spec.quantiles)
        self.median = self.quantiles.index(0.5)
        hidden = spec.hidden
        self.static = nn.Linear(static_features, hidden) if static_features else None
        self.encoder = GRU(self.signals * 3 + self.treatments + hidden, hidden)
        self.decoder = GRU(self.treatments + hidden, hidden)
        self.quantile_head = nn.Linear(hidden, self.signals * len(self.quantiles))
        self.event_head = nn.Linear(2 * hidden, 1)
        # The treatment policy, for inverse-propensity weighting: the logit that each treatment is given in the
        # first step ahead, from what was known at the decision time (the encoder's state), and without it (a
        # learnt base rate per treatment: the numerator of the stabilised weight).
        self.propensity_head = nn.Linear(hidden, self.treatments) if self.treatments else None
        self.base_rate = nn.Parameter(torch.zeros(self.treatments))
        # The per-step policy, for weighting every step of the horizon (`per_step_inverse_propensity`): the logit
        # of each treatment at step k ahead from the history (the encoder's state), what was observed at steps k
        # and k - 1, and what was given at k - 1. It reads the horizon's observed values, which nothing else does.
        policy_inputs = hidden + 4 * self.signals + self.treatments
        self.policy = nn.Sequential(nn.Linear(policy_inputs, hidden), nn.Tanh(), nn.Linear(hidden, self.treatments))
        # ... and the same from the history alone: the numerator of the stabilised per-step weights, so that what
        # the history already tells (a patient wet at the decision time gets furosemide) cancels and the weights
        # carry only the ward's response to what it saw during the horizon.
        self.policy_at_decision = nn.Linear(hidden, self.horizon_steps * self.treatments)
        self.hidden = hidden

    def forward(
        self, history: torch.Tensor, controls: torch.Tensor, statics: torch.Tensor, observed: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """history (B, H, S, 3), controls (B, H + F, R), statics (B, d), the horizon's observed values and mask
        (B, F, S, 2; zeros when not given) -> quantiles (B, F, S, Q), the event's logit (B,), each treatment's
        propensity logit at the first step ahead (B, R), and the policy's logits at every step ahead given what was
        observed up to it and given the history only (B, F, R, 2)."""
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
        h, f = self.history_steps, self.horizon_steps
        doses = decoder_doses(controls, h, f, self.lagged)
        planned = torch.cat([doses, context[:, None, :].expand(batch, f, self.hidden)], dim=-1)
        ahead, last = self.decoder(planned, state)
        raw = self.quantile_head(ahead).reshape(batch, self.horizon_steps, self.signals, len(self.quantiles))
        # The forecast is a change from each signal's last recorded value (persistence is the baseline a
        # forecast must beat; a signal never recorded starts from the middle of its normal range, 0).
        quantiles = _monotone(raw, self.median) + last_recorded(history)[:, None, :, None]
        logit = self.event_head(torch.cat([state, last], dim=-1)).squeeze(-1)
        propensity = self.propensity_head(state) if self.propensity_head is not None else state[:, :0]
        at_decision = self.policy_at_decision(state).reshape(batch, self.horizon_steps, self.treatments)
        policy = torch.stack([self._policy(state, history, controls, observed), at_decision], dim=-1)
        return quantiles, logit, propensity, policy

    def _policy(self, state: torch.Tensor, history: torch.Tensor, controls: torch.Tensor,
                observed: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
        """(B, F, R): per step ahead k, from the state, the values observed at k and k - 1 (the history's last
        step before the first) and the treatments given at k - 1."""
        batch, f = history.shape[0], self.horizon_steps
        if observed is None:
            observed = history.new_zeros(batch, f, self.signals, 2)
        now = observed.reshape(batch, f, 2 * self.signals)
        last = history[:, -1, :, :2].reshape(batch, 1, 2 * self.signals)
        before = torch.cat([last, now[:, :-1]], dim=1)
        given = controls[:, self.history_steps - 1 : self.history_steps - 1 + f]
        inputs = torch.cat([state[:, None, :].expand(batch, f, self.hidden), now, before, given], dim=-1)
        return self.policy(inputs)


def decoder_doses(controls: torch.Tensor, history: int, horizon: int, lagged: list[bool]) -> torch.Tensor:
    """(B, H + F, R) -> the doses the decoder reads at each step ahead (B, F, R): each treatment's own step's,
    or the step before's for one dosed on a measurement of the same step (Treatment.dosed_on_measurement:
    its dose of step k acts from step k + 1 on)."""
    same = controls[:, history : history + horizon]
    if not any(lagged):
        return same
    before = controls[:, history - 1 : history - 1 + horizon]
    columns = [before[..., r : r + 1] if lag else same[..., r : r + 1] for r, lag in enumerate(lagged)]
    return torch.cat(columns, dim=-1)


def last_recorded(history: torch.Tensor) -> torch.Tensor:
    """(B, H, S, 3) -> (B, S): each signal's last recorded value in the history (0 where never recorded)."""
    last = history.new_zeros(history.shape[0], history.shape[2])
    for t in range(history.shape[1]):
        last = torch.where(history[:, t, :, 1] > 0, history[:, t, :, 0], last)
    return last


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
    """Each patient's loss, (P,): the mean over their used decision times (`valid`, (P, W)) of the pinball
    loss on the observed future values, each step ahead's weighted by `weights`, and the event's
    cross-entropy (unweighted: the risk is the factual one).

    quantiles (P, W, F, S, Q), logit (P, W), future and future_mask (P, W, F, S), event (P, W), weights
    (P, W, F): the inverse-propensity weight of each step ahead (1 without adjustment). The weights are not
    normalised within a patient: a patient whose treatment the practice rarely gives counts more, as IPW's
    pseudo-population has more of them (normalising them per patient would cancel a one-window patient's).
    """
    per_value = pinball(quantiles, future, levels).mean(dim=-1) * future_mask  # (P, W, F, S)
    observed = future_mask.sum(dim=(-1, -2)).clamp(min=1.0)
    forecast = (per_value.sum(dim=-1) * weights).sum(dim=-1) / observed  # (P, W)
    risk = functional.binary_cross_entropy_with_logits(logit, event, reduction="none")
    window = (forecast + event_weight * risk) * valid
    return window.sum(dim=-1) / valid.sum(dim=-1).clamp(min=1.0)


class TrajectoryExamples(nn.Module):
    """The trajectory network over patients: one flat row of inputs per patient (every window of theirs,
    TrajectoryLayout) to one flat row of outputs, the windows run through TrajectoryNet together.

    `per_patient_gradients` tells the trainer to clip each row's gradient as a whole (engines.py): a
    patient's windows share one clipping bound and one sampling chance, however many they are."""

    per_patient_gradients = True

    def __init__(self, spec: TrajectorySpec, static_features: int) -> None:
        super().__init__()
        self.layout = TrajectoryLayout.of(spec, static_features)
        self.net = TrajectoryNet(spec, static_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layout, p = self.layout, x.shape[0]
        statics, history, controls = layout.unpack_inputs(x)
        w = layout.windows
        repeated = statics[:, None, :].expand(p, w, layout.statics).reshape(p * w, layout.statics)
        quantiles, logit, propensity, policy = self.net(
            history.reshape(p * w, layout.history, layout.signals, 3),
            controls.reshape(p * w, layout.history + layout.horizon, layout.treatments),
            repeated,
            layout.unpack_observed(x).reshape(p * w, layout.horizon, layout.signals, 2),
        )
        base = self.net.base_rate[None, :].expand(p, layout.treatments)
        return torch.cat([quantiles.reshape(p, -1), logit.reshape(p, w), propensity.reshape(p, -1), base,
                          policy.reshape(p, -1)], dim=1)  # fmt: skip




def _log_ratio(logits: torch.Tensor, reference: torch.Tensor, treated: torch.Tensor) -> torch.Tensor:
    """Per treatment, log P(a | reference) - log P(a | logits) of the treatments received (0/1 in `treated`);
    `reference` (the numerator's logits) broadcasts to `logits`."""
    given = treated > 0
    log = functional.logsigmoid
    reference = reference.expand_as(logits)
    return torch.where(given, log(reference), log(-reference)) - torch.where(given, log(logits), log(-logits))


def propensity_weights(propensity: torch.Tensor, base: torch.Tensor, treated: torch.Tensor) -> torch.Tensor:
    """(P, W): the stabilised weight P(a) / P(a | history) of the treatments received in each window's first
    step ahead, product over treatments, truncated, and detached (it weights the forecast loss; the policy is
    learnt by its own cross-entropy). Both probabilities come from the model's parameters and the patient's
    own data, so one patient's loss still depends on that patient alone."""
    if propensity.shape[-1] == 0:
        return propensity.new_ones(propensity.shape[:-1])
    log_ratio = _log_ratio(propensity, base[:, None, :], treated).sum(dim=-1)
    return torch.exp(log_ratio).clamp(*WEIGHT_RANGE).detach()


def step_propensity_weights(policy: torch.Tensor, treated_ahead: torch.Tensor, lagged: list[bool] | None = None
                            ) -> torch.Tensor:  # fmt: skip
    """(P, W, F): per step ahead k, the stabilised weight of the treatments received up to it (up to the step
    before it for a treatment dosed on a measurement of the step, `lagged`: the decoder reads those from the
    next step on, and the step's values came before the dose): each one's probability given the history
    alone over its probability given what was known just before it (the history, the values observed up to
    that step, the treatments before it), product over treatments and steps (the marginal structural
    model's weights of Robins et al. 2000, with the numerator conditional on the baseline the forecast
    conditions on too), truncated and detached. policy (P, W, F, R, 2)."""
    if policy.shape[-2] == 0:
        return policy.new_ones(policy.shape[:-2])
    log_ratio = _log_ratio(policy[..., 0], policy[..., 1], treated_ahead)  # (P, W, F, R)
    upto = torch.cumsum(log_ratio, dim=-2)
    if lagged is not None and any(lagged):
        upto = upto - log_ratio * torch.tensor(lagged, dtype=log_ratio.dtype, device=log_ratio.device)
    return torch.exp(upto.sum(dim=-1)).clamp(*WEIGHT_RANGE).detach()


def examples_loss(
    layout: TrajectoryLayout,
    levels: list[float],
    outputs: torch.Tensor,
    targets: torch.Tensor,
    event_weight: float = 1.0,
    adjustment: str = "per_step_inverse_propensity",
    lagged: list[bool] | None = None,
) -> torch.Tensor:
    """Each patient's loss (P,) from TrajectoryExamples' outputs and the packed targets: patient_loss with each
    step ahead's forecast weighted by the inverse-propensity weights of the adjustment (per step over the
    horizon, of the first step only, or none), plus the cross-entropy of the treatment policies (at the first
    step from the history, at every step ahead) and of the base rate, averaged over the patient's used windows."""
    quantiles, logit, propensity, base = layout.unpack_outputs(outputs)
    future, mask, event, valid, weights, treated = layout.unpack_targets(targets)
    policy, treated_ahead = layout.unpack_policy(outputs), layout.unpack_treated_ahead(targets)
    steps = weights[..., None].expand(*mask.shape[:3])  # (P, W, F)
    if adjustment == "per_step_inverse_propensity":
        steps = steps * step_propensity_weights(policy, treated_ahead, lagged)
    elif adjustment == "inverse_propensity":
        steps = steps * propensity_weights(propensity, base, treated)[..., None]
    loss = patient_loss(quantiles, logit, future, mask, event, valid, steps, levels, event_weight)
    if layout.treatments:
        given = (treated > 0).to(propensity.dtype)
        first = functional.binary_cross_entropy_with_logits(propensity, given, reduction="none").sum(dim=-1)
        rate = functional.binary_cross_entropy_with_logits(base[:, None, :].expand_as(propensity), given,
                                                           reduction="none").sum(dim=-1)  # fmt: skip
        both = (treated_ahead > 0).to(policy.dtype)[..., None].expand_as(policy)
        # Averaged over the steps ahead and the two heads, so the per-step policy weighs as much as the
        # first-step one: summed, its 2 x horizon terms per treatment took most of each patient's clipped
        # gradient under DP-SGD and starved the forecast and event heads.
        ahead = functional.binary_cross_entropy_with_logits(policy, both, reduction="none")
        ahead = ahead.mean(dim=(-1, -3)).sum(dim=-1)
        used = valid.sum(dim=-1).clamp(min=1.0)
        loss = loss + ((first + rate + ahead) * valid).sum(dim=-1) / used
    return loss
