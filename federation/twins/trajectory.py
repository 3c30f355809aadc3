"""The trajectory kind (issue 12): the patient twin's model, one more kind behind the registry.

A study names `model: {kind: trajectory, signals: [...], treatments: [...], ...}` (TrajectorySpec). At a
site, the cohort builder cuts each patient's series into decision-time windows (site_node.cohort
.trajectories) and trajectory_rows packs them into one row per patient, values scaled by each signal's normal
range (so the scale is the study's, never a site's): the trainer's Poisson sampling, clipping and
accounting then see patients, and the per-patient engine clips everything one patient's windows contribute
together (site_node.training.engines). The network is trajectory_model.TrajectoryNet; the loss its
pinball loss over the quantiles, weighted by inverse-propensity weights, plus the event's cross-entropy
and the treatment policy's.

The event is the study's outcome (e.g. death within 30 days), predicted at every decision time; the first
decision time is the study's prediction time, so its event risk is the one the evaluation strata cut, and
the event part of the evaluation is the risk kinds' (AUROC, calibration, threshold metrics). The forecast
part: per held-out patient, the share of their observed future values inside the 80% and the 95%
interval, and the mean absolute error of the median forecast (in normal-range units: 1 is half the
signal's normal range), each released as a histogram over fixed bins. A patient is then in one cell of
each of four histograms (the two outcome classes' strata count as one), so the release's L2 sensitivity is
2 and its noise is twice the stage's (`release_sensitivity`), accounted at the same noise multiplier.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

import numpy as np
import torch
from pydantic import BaseModel

from federation.contract.protocol import EvaluationRelease, ReleaseMode
from federation.contract.spec import StudySpec
from federation.contract.strata import Strata
from federation.contract.twin_specs import INTERVALS, TrajectorySpec
from federation.twins import cards
from federation.twins.kind import ExactEvaluation
from federation.twins.pooling import REPLICATES, Estimate, feasible, interval
from federation.twins.registry import register
from federation.twins.risk import RiskKind
from federation.twins.risk_pooling import PooledEvaluation
from federation.twins.trajectory_model import TrajectoryExamples, examples_loss
from federation.twins.trajectory_rows import TrajectoryLayout

# Per-patient forecast histograms: the share of values inside an interval in bins of 0.05, and the mean
# absolute error in normal-range units over these edges (the last bin open); each with a last cell for a
# patient with no observed future value (every patient is in exactly one cell of each histogram).
COVERAGE_BINS = 20
ERROR_EDGES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.25, 1.5, 2.0, 3.0)
FORECAST_METRICS = {
    "forecast_mae": "forecast error: mean absolute error of the median, in normal ranges (1 = half the range)",
    "coverage_80": "share of observed values inside the 80% interval (nominal 0.80)",
    "coverage_95": "share of observed values inside the 95% interval (nominal 0.95)",
}


class PooledTrajectoryEvaluation(PooledEvaluation):
    """The event part pooled as a risk model's, and the forecast part."""

    forecast_mae: Estimate = Estimate(note="not estimated")
    coverage_80: Estimate = Estimate(note="not estimated")
    coverage_95: Estimate = Estimate(note="not estimated")


def _layout(spec: TrajectorySpec) -> TrajectoryLayout:
    """The layout of outputs and targets (they do not depend on the static covariates)."""
    return TrajectoryLayout.of(spec, 0)


def forecast_scores(spec: TrajectorySpec, outputs: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
    """Per patient (n,): the share of their observed future values inside the 80% and 95% intervals and the
    mean absolute error of the median (normal-range units), over their used windows; NaN with no value."""
    layout = _layout(spec)
    quantiles, *_ = layout.unpack_outputs(torch.as_tensor(outputs))
    future, mask, _, valid, _, _ = layout.unpack_targets(torch.as_tensor(targets))
    q, future = quantiles.numpy().astype(np.float64), future.numpy().astype(np.float64)
    seen = (mask.numpy() > 0) & (valid.numpy() > 0)[:, :, None, None]
    count = seen.sum(axis=(1, 2, 3))
    levels = list(spec.quantiles)
    out: dict[str, np.ndarray] = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        for name, nominal in (("coverage_80", 0.8), ("coverage_95", 0.95)):
            low, high = (levels.index(v) for v in INTERVALS[nominal])
            inside = (q[..., low] <= future) & (future <= q[..., high]) & seen
            out[name] = np.where(count > 0, inside.sum(axis=(1, 2, 3)) / count, np.nan)
        error = np.abs(q[..., levels.index(0.5)] - future) * seen
        out["forecast_mae"] = np.where(count > 0, error.sum(axis=(1, 2, 3)) / count, np.nan)
    return out


def _bin(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Histogram over the bins between `edges`, plus a last cell for NaN (no value): len(edges) cells."""
    cells = np.full(len(values), len(edges) - 1, dtype=np.int64)
    known = np.isfinite(values)
    cells[known] = np.clip(np.searchsorted(edges, values[known], side="right") - 1, 0, len(edges) - 2)
    return np.bincount(cells, minlength=len(edges))


# Coverage: exactly 0, then bins of 0.05 up to 1, then exactly 1 (a patient with few values is often at 0 or
# 1, which a bin's middle would misstate); each bin read at its middle.
_TINY = 1e-9
_COVERAGE_EDGES = np.concatenate([[0.0, _TINY], np.linspace(0.0, 1.0, COVERAGE_BINS + 1)[1:-1], [1.0, 1.0 + _TINY]])
_COVERAGE_MIDS = np.concatenate([[0.0], (_COVERAGE_EDGES[1:-2] + _COVERAGE_EDGES[2:-1]) / 2, [1.0]])
_ERROR_EDGES = np.append(np.asarray(ERROR_EDGES), np.inf)
_ERROR_MIDS = np.append((_ERROR_EDGES[:-2] + _ERROR_EDGES[1:-1]) / 2, ERROR_EDGES[-1] + 0.5)
HISTOGRAMS = (
    ("coverage_80", _COVERAGE_EDGES, _COVERAGE_MIDS),
    ("coverage_95", _COVERAGE_EDGES, _COVERAGE_MIDS),
    ("forecast_mae", _ERROR_EDGES, _ERROR_MIDS),
)


def _cell_sizes() -> list[int]:
    return [len(edges) for _, edges, _ in HISTOGRAMS]


class TrajectoryKind(RiskKind):
    name = "trajectory"
    spec_type = TrajectorySpec
    summary = (
        "a patient twin: forecasts of each signal with 80% and 95% intervals over the horizon, driven by the "
        "planned treatments, and the risk of the study's outcome"
    )
    pooled_type = PooledTrajectoryEvaluation
    histogram_fields = ("positives", "negatives", "cells")
    release_sensitivity = 2.0
    closed_form_gradient = False

    def describe(self, spec: TrajectorySpec, evaluation) -> str:
        treatments = ", ".join(t.name + (" (dose)" if t.dose else "") for t in spec.treatments) or "none"
        adjustment = {
            "per_step_inverse_propensity": "per-step inverse-propensity weights for confounding",
            "inverse_propensity": "inverse-propensity weights of the first step ahead for confounding",
        }.get(spec.adjustment, "no adjustment for confounding (the naive model)")
        return (
            f"a patient twin forecasting {', '.join(s.name for s in spec.signals)} every "
            f"{spec.step_hours:g} h, {spec.horizon_hours:g} h ahead from the last {spec.history_hours:g} h, at up "
            f"to {spec.windows_per_patient} decision times per patient (one DP example each patient), under the "
            f"planned treatments ({treatments}); {adjustment}; 80% and 95% intervals calibrated at each site on "
            f"{spec.conformal_fraction:.0%} of its training patients (kept out of training); and the risk of "
            "the study's outcome"
        )

    def build(self, spec: TrajectorySpec, n_features: int) -> torch.nn.Module:
        return TrajectoryExamples(spec, n_features)

    def targets_of(self, spec, labels: np.ndarray, event_days: np.ndarray | None) -> np.ndarray:
        raise ValueError(
            "the trajectory kind learns from each patient's series after every decision time, which the cohort "
            "builder cuts from the OMOP database (StudyDataset.targets), not from a label alone"
        )

    def loss(self, spec: TrajectorySpec, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return examples_loss(_layout(spec), list(spec.quantiles), outputs, targets, adjustment=spec.adjustment,
                             lagged=spec.lagged)  # fmt: skip

    def output_gradient(self, spec, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """d loss_i / d outputs_i by autograd (the loss is too involved to write out; each patient's loss
        depends on their own outputs only, so the gradient of the sum is every patient's own)."""
        with torch.enable_grad():
            out = outputs.detach().requires_grad_(True)
            (gradient,) = torch.autograd.grad(self.loss(spec, out, targets).sum(), out)
        return gradient

    def risk_logits(self, spec: TrajectorySpec, outputs: np.ndarray) -> np.ndarray:
        """The event's logit at the first decision time (the study's prediction time)."""
        _, logit, _, _ = _layout(spec).unpack_outputs(torch.as_tensor(np.asarray(outputs)))
        return logit[:, 0].numpy().astype(np.float64)

    def event_labels(self, spec: TrajectorySpec, targets: np.ndarray) -> np.ndarray:
        _, _, event, _, _, _ = _layout(spec).unpack_targets(torch.as_tensor(np.asarray(targets)))
        return event[:, 0].numpy().astype(np.float64)

    # --- evaluation at a site -----------------------------------------------------------------------

    def at_site(self, spec: TrajectorySpec, model: torch.nn.Module, calibration) -> torch.nn.Module:
        """The model with this site's split-conformal widening of every interval (`ConformalTrajectory`),
        from its calibration patients; without any, the model as it is."""
        if calibration is None or not len(calibration[0]):
            return model
        features, targets = calibration
        with torch.no_grad():
            outputs = model(torch.as_tensor(np.asarray(features, dtype=np.float32))).numpy()
        return ConformalTrajectory(model, conformal_offsets(spec, outputs, targets))

    def histograms(self, spec, outputs: np.ndarray, targets: np.ndarray, strata: Strata) -> dict[str, np.ndarray]:
        risk = super().histograms(spec, outputs, self.event_labels(spec, targets), strata)
        scores = forecast_scores(spec, outputs, targets)
        cells = np.concatenate([_bin(scores[name], edges) for name, edges, _ in HISTOGRAMS])
        return {**risk, "cells": cells}

    def histogram_sizes(self, spec, strata: int) -> list[int]:
        return [strata, strata, sum(_cell_sizes())]

    def check_histograms(self, spec, release: EvaluationRelease) -> None:
        super().check_histograms(spec, release)
        if release.cells is None or len(release.cells) != sum(_cell_sizes()):
            raise ValueError(f"a trajectory model's DP release carries {sum(_cell_sizes())} forecast cells")

    def exact(self, spec, outputs: np.ndarray, targets: np.ndarray, threshold: float) -> ExactEvaluation:
        risk = super().exact(spec, outputs, self.event_labels(spec, targets), threshold)
        scores = forecast_scores(spec, outputs, targets)
        forecast = {name: float(np.nanmean(v)) if np.isfinite(v).any() else None for name, v in scores.items()}
        return ExactEvaluation(risk.examples, risk.with_outcome, {**risk.metrics, **forecast}, risk.cells,
                               risk.cell_fields)  # fmt: skip

    # --- at the coordinator -------------------------------------------------------------------------

    def pool_overall(
        self,
        study: StudySpec,
        releases: Sequence[tuple[str, EvaluationRelease]],
        *,
        seed: int = 0,
        scores: np.ndarray | None = None,
    ) -> PooledTrajectoryEvaluation:
        risk = super().pool_overall(study, releases, seed=seed, scores=scores)
        pooled = PooledTrajectoryEvaluation(**risk.model_dump())
        pooled.subgroups = []
        for name, value in _pool_forecast(releases, seed).items():
            setattr(pooled, name, value)
        return pooled

    def headline(self, pooled: dict | None) -> str:
        pooled = pooled or {}
        mae = cards.estimate_text(pooled.get("forecast_mae"), 2)
        c80 = cards.estimate_text(pooled.get("coverage_80"), 2)
        return f"forecast MAE {mae} normal ranges, 80% interval coverage {c80}, event AUROC " + cards.estimate_text(
            pooled.get("auroc")
        )

    def calibration_text(self, pooled: dict | None) -> str:
        pooled = pooled or {}
        c80 = cards.estimate_text(pooled.get("coverage_80"), 2)
        c95 = cards.estimate_text(pooled.get("coverage_95"), 2)
        return f"interval coverage 80%: {c80}, 95%: {c95}; event {super().calibration_text(pooled)}"

    def card_metrics(self, pooled: BaseModel | None) -> dict[str, object]:
        metrics = super().card_metrics(pooled)
        for name in FORECAST_METRICS:
            metrics[f"held_out_{name}"] = getattr(pooled, name).model_dump() if pooled is not None else None
        return metrics

    def card_html(self, study: StudySpec, pooled: BaseModel | None, selection: str) -> str:
        if pooled is None:
            return super().card_html(study, pooled, selection)
        rows = cards.metric_rows(pooled, FORECAST_METRICS)
        forecast = (
            "<h3>Forecasts (pooled, test)</h3><table><tr><th>metric</th><th>value (95% interval)</th></tr>"
            f"{rows}</table><p>Per signal, 1 normal-range unit is half the study's normal range of it "
            f"({html.escape(_ranges(study.model))}).</p><h3>Event risk at the prediction time</h3>"
        )
        return forecast + super().card_html(study, pooled, selection)


# Fewer calibration values than this for a (step ahead, signal): the interval is widened by the largest score
# seen instead of a quantile of them (the conformal quantile needs at least 1/alpha - 1 values to exist).
MIN_CONFORMAL_VALUES = 20
CONFORMAL_MARGIN = 1e-5


def conformal_offsets(spec: TrajectorySpec, outputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """(intervals, F, S): how far to move each interval's ends outwards (negative: inwards) so that, on the
    calibration patients, the conformalised quantile regression (Romano, Patterson and Candes 2019) covers
    its nominal share. Per step ahead and signal, the score of an observed value y is max(lo - y, y - hi)
    and the offset its ceil((n + 1)(1 - alpha))-th smallest of n (windows of one patient are not
    exchangeable with each other, so the guarantee is approximate; the benchmark measures it per site)."""
    layout = _layout(spec)
    quantiles, *_ = layout.unpack_outputs(torch.as_tensor(np.asarray(outputs)))
    future, mask, _, valid, _, _ = layout.unpack_targets(torch.as_tensor(np.asarray(targets)))
    q, y = quantiles.numpy().astype(np.float64), future.numpy().astype(np.float64)
    seen = (mask.numpy() > 0) & (valid.numpy() > 0)[:, :, None, None]
    levels = list(spec.quantiles)
    offsets = np.zeros((len(INTERVALS), layout.horizon, layout.signals))
    for index, (nominal, (low, high)) in enumerate(INTERVALS.items()):
        score = np.maximum(q[..., levels.index(low)] - y, y - q[..., levels.index(high)])
        for step in range(layout.horizon):
            for signal in range(layout.signals):
                values = np.sort(score[:, :, step, signal][seen[:, :, step, signal]])
                if not len(values):
                    continue
                rank = int(np.ceil((len(values) + 1) * nominal))
                offsets[index, step, signal] = values[-1] if len(values) < MIN_CONFORMAL_VALUES else values[
                    min(rank, len(values)) - 1]  # fmt: skip
    # a hair's margin (normal-range units) so that a value exactly at its conformal quantile stays inside once
    # the model adds the offset in float32
    return offsets + CONFORMAL_MARGIN


class ConformalTrajectory(torch.nn.Module):
    """A trajectory model with one site's conformal offsets on its intervals: each interval's lower quantile
    moved down and upper moved up by the offset of its step ahead and signal, the quantiles then sorted
    (rearrangement never makes a set of quantiles worse, Chernozhukov et al. 2010)."""

    def __init__(self, model: torch.nn.Module, offsets: np.ndarray) -> None:
        super().__init__()
        self.model = model
        self.layout: TrajectoryLayout = model.layout
        self.register_buffer("offsets", torch.as_tensor(offsets, dtype=torch.float32))
        levels = [float(v) for v in model.net.quantiles]
        self.ends = [(levels.index(low), levels.index(high)) for low, high in INTERVALS.values()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        layout = self.layout
        quantiles, logit, propensity, base = layout.unpack_outputs(out)
        moved = quantiles.clone()
        for index, (low, high) in enumerate(self.ends):
            moved[..., low] = moved[..., low] - self.offsets[index]
            moved[..., high] = moved[..., high] + self.offsets[index]
        moved = torch.sort(moved, dim=-1).values
        p = out.shape[0]
        return torch.cat([moved.reshape(p, -1), logit, propensity.reshape(p, -1), base,
                          layout.unpack_policy(out).reshape(p, -1)], dim=1)  # fmt: skip


def _ranges(spec: TrajectorySpec) -> str:
    return "; ".join(f"{s.name} {s.normal_range[0]:g}-{s.normal_range[1]:g} {s.unit}".strip() for s in spec.signals)


def _pool_forecast(releases: Sequence[tuple[str, EvaluationRelease]], seed: int) -> dict[str, Estimate]:
    """Each forecast metric from the sites' histograms (DP: added, projected to feasible counts, read at the
    bins' middles) and exact means (weighted by their patients), with replicate intervals (Poisson redraws of
    the counts plus fresh noise of each site's level)."""
    dp = [r for _, r in releases if r.mode == ReleaseMode.DP and r.cells and len(r.cells) == sum(_cell_sizes())]
    exact = [r for _, r in releases if r.mode == ReleaseMode.EXACT and r.examples]
    noise = float(np.sqrt(sum((r.noise_sd or 0.0) ** 2 for r in dp)))
    offsets = np.cumsum([0, *_cell_sizes()])
    rng = np.random.default_rng(seed)
    out: dict[str, Estimate] = {}
    for index, (name, _, mids) in enumerate(HISTOGRAMS):
        summed = np.sum([np.asarray(r.cells[offsets[index] : offsets[index + 1]]) for r in dp], axis=0) if dp else None
        means = [(float(getattr(r, name)), float(r.examples)) for r in exact if getattr(r, name) is not None]

        def estimate(counts: np.ndarray | None, means: list[tuple[float, float]] = means, mids=mids) -> float | None:
            total, weight = 0.0, 0.0
            if counts is not None:
                known = feasible(counts)[:-1]  # the last cell: patients without an observed future value
                total, weight = float(known @ mids), float(known.sum())
            total += sum(m * n for m, n in means)
            weight += sum(n for _, n in means)
            return total / weight if weight >= 1.0 else None

        value = estimate(summed)
        replicates = []
        for _ in range(REPLICATES if value is not None else 0):
            counts = None
            if summed is not None:
                counts = rng.poisson(np.maximum(summed, 0.0)) + rng.normal(0.0, noise, len(summed))
            again = estimate(counts)
            if again is not None:
                replicates.append(again)
        bounded = name != "forecast_mae"
        out[name] = interval(value, replicates, "not estimable: no site released a forecast", bounded=bounded)
    return out


register(TrajectoryKind())
