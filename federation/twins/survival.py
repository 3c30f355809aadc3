"""The survival kind: time to an event with censoring, as a discrete-time hazard (`discrete_time_survival`).

The model gives one logit per interval of the study's grid (`interval_days`): the hazard h_k, the chance of
the event in interval k for a patient who reached it, so S(t_k) = prod_{j<=k} (1 - h_j). Its likelihood is
a product over each patient's own intervals (a Bernoulli term per interval the patient was at risk in), so
a patient's loss and gradient depend on that patient alone: DP-SGD's per-patient clipping bounds every
patient's influence exactly as for a risk score (a Cox partial likelihood would not: each term's
denominator sums over the risk set). The grid's intervals are (0, t_1], (t_1, t_2], ...; a patient censored
inside an interval counts as at risk in it when they were observed for at least half of it (the rule of
Gensheimer & Narasimhan's nnet-survival, 2019), so censoring neither inflates nor hides hazard on average.

The targets a site computes per patient: the at-risk mask (k), the event indicator (k), the interval the
event or censoring fell in (0..k; k = beyond the grid), the event flag, and the exact days (kept at the
site, for its exact metrics).

Evaluation. The one risk number the strata cut is the predicted risk of the event by the horizon. A DP
release is one histogram of held-out patients by (risk stratum, interval of event or censoring, event or
not): every patient in exactly one cell, so sensitivity 1. The coordinator adds the sites' histograms and
reads off the pooled, binned Harrell's C-index, the Brier score at the horizon (inverse-probability-of-
censoring weighted), observed against predicted survival at the horizon per risk stratum, and survival
curves per risk stratum (life tables). Exact releases carry Harrell's C on exact times with its standard
error, the Brier score at the horizon and the integrated Brier score over the grid up to the horizon.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import nn

from federation.contract.protocol import EvaluationRelease, ReleaseMode
from federation.contract.spec import StudySpec
from federation.contract.strata import Strata
from federation.contract.twin_specs import DiscreteTimeSurvivalSpec
from federation.twins import cards
from federation.twins import survival_maths as maths
from federation.twins.kind import ExactEvaluation, TwinKind
from federation.twins.pooling import (
    REPLICATES,
    Z95,
    Estimate,
    SiteRelease,
    SubgroupResult,
    feasible,
    interval,
    method_sentence,
    no_value_reason,
    site_releases,
)
from federation.twins.registry import register

# A stratum's observed survival is shown only when it clearly holds patients despite the noise.
MIN_STRATUM_PATIENTS = 10


class SurvivalCalibration(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stratum: str
    predicted_survival: float  # at the horizon, the stratum's representative
    patients: float  # pooled (noisy)
    observed_survival: float | None  # life table at the horizon; None when too few patients to say


class StratumCurve(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stratum: str
    survival: list[float | None]  # life-table survival at each grid end (None past the last patient at risk)


class PooledSurvival(BaseModel):
    """A survival model's evaluation of one part after one round, pooled across sites."""

    model_config = ConfigDict(extra="forbid")

    part: str
    horizon_days: float
    interval_days: list[float]
    c_index: Estimate
    brier_at_horizon: Estimate
    observed_to_expected: Estimate  # events by the horizon: observed (life table) / predicted
    patients: Estimate
    events: Estimate
    calibration: list[SurvivalCalibration] = []
    curves: list[StratumCurve] = []
    sites: list[SiteRelease] = []
    subgroups: list[SubgroupResult] = []
    method: str = ""

    @property
    def estimable(self) -> bool:
        return self.c_index.value is not None


METRIC_NAMES = {
    "c_index": "Harrell's C-index",
    "brier_at_horizon": "Brier score at the horizon (IPCW)",
    "observed_to_expected": "observed / expected events by the horizon",
}


def _interval_of(days: np.ndarray, event: np.ndarray, edges: Sequence[float]) -> np.ndarray:
    """The grid interval (0..k-1, or k beyond the grid) each time falls in. Intervals are (t_{k-1}, t_k]: an
    event at t_k is in the interval ending there; a patient censored at t_k was known to be free of the event
    through t_k (censoring at a window's end says so), so they count from the next interval on."""
    grid, t = np.asarray(edges, dtype=np.float64), np.asarray(days, dtype=np.float64)
    return np.where(
        np.asarray(event, dtype=bool), np.searchsorted(grid, t, side="left"), np.searchsorted(grid, t, side="right")
    )


class DiscreteTimeSurvivalKind(TwinKind):
    name = "discrete_time_survival"
    spec_type = DiscreteTimeSurvivalSpec
    fit = "dp_sgd"
    summary = "a survival model: a discrete-time hazard on the study's grid of intervals"
    pooled_type = PooledSurvival
    selection_metric = "c_index"
    selection_label = "C-index"
    histogram_fields = ("cells",)

    def describe(self, spec: DiscreteTimeSurvivalSpec, evaluation) -> str:
        grid = ", ".join(f"{d:g}" for d in spec.interval_days)
        network = "linear" if not spec.hidden else "ReLU network " + "-".join(map(str, spec.hidden))
        return f"{self.summary} (ends at {grid} days, horizon {spec.horizon:g} days, {network} hazard)"

    def build(self, spec: DiscreteTimeSurvivalSpec, n_features: int) -> nn.Module:
        layers: list[nn.Module] = []
        width = n_features
        for hidden in spec.hidden:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            if spec.dropout:
                layers.append(nn.Dropout(spec.dropout))
            width = hidden
        layers.append(nn.Linear(width, len(spec.interval_days)))
        return nn.Sequential(*layers)

    # --- targets and loss ---------------------------------------------------------------------------

    def targets_of(
        self, spec: DiscreteTimeSurvivalSpec, labels: np.ndarray, event_days: np.ndarray | None
    ) -> np.ndarray:
        if event_days is None:
            raise ValueError("a survival model needs each patient's days to the event or to censoring")
        event = np.asarray(labels, dtype=np.float64)
        days = np.asarray(event_days, dtype=np.float64)
        if event.shape != days.shape or event.ndim != 1:
            raise ValueError(f"events and days must be one value per patient; got {event.shape} and {days.shape}")
        if not np.isin(event, (0.0, 1.0)).all():
            raise ValueError("event indicators must be 0 or 1")
        if not np.isfinite(days).all() or (days < 0).any():
            raise ValueError("days to the event or censoring must be finite and not negative")
        edges = np.asarray(spec.interval_days, dtype=np.float64)
        k = len(edges)
        j = _interval_of(days, event, edges)
        starts = np.concatenate([[0.0], edges[:-1]])
        intervals = np.arange(k)
        at_risk = intervals[None, :] < j[:, None]
        inside = j < k
        # the interval the event or censoring fell in: at risk when it is an event, or observed >= half of it
        middle = (starts[np.minimum(j, k - 1)] + edges[np.minimum(j, k - 1)]) / 2
        current = inside & ((event == 1) | (days >= middle))
        at_risk |= (intervals[None, :] == j[:, None]) & current[:, None]
        happened = (intervals[None, :] == j[:, None]) & ((event == 1) & inside)[:, None]
        columns = [at_risk, happened, j[:, None], ((event == 1) & inside)[:, None], days[:, None]]
        return np.concatenate([np.asarray(c, dtype=np.float32).reshape(len(days), -1) for c in columns], axis=1)

    def loss(self, spec: DiscreteTimeSurvivalSpec, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        k = len(spec.interval_days)
        at_risk, happened = targets[:, :k], targets[:, k : 2 * k]
        terms = F.binary_cross_entropy_with_logits(outputs, happened, reduction="none")
        return (terms * at_risk).sum(dim=1)

    def output_gradient(
        self, spec: DiscreteTimeSurvivalSpec, outputs: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        k = len(spec.interval_days)
        return (torch.sigmoid(outputs) - targets[:, k : 2 * k]) * targets[:, :k]

    # --- predictions ----------------------------------------------------------------------------------

    @staticmethod
    def survival_curves(outputs: np.ndarray) -> np.ndarray:
        """Predicted survival at each grid end (n, k)."""
        z = np.asarray(outputs, dtype=np.float64)
        return np.exp(-np.cumsum(np.logaddexp(0.0, z), axis=1))  # log(1 - sigmoid(z)) = -softplus(z)

    def risk_logits(self, spec: DiscreteTimeSurvivalSpec, outputs: np.ndarray) -> np.ndarray:
        z = np.asarray(outputs, dtype=np.float64)[:, : spec.horizon_interval]
        log_survival = -np.logaddexp(0.0, z).sum(axis=1)
        log_survival = np.minimum(log_survival, -1e-12)  # a risk of exactly 0 has no logit
        return np.log(-np.expm1(log_survival)) - log_survival

    # --- evaluation at a site -----------------------------------------------------------------------------

    def cell_shape(self, spec: DiscreteTimeSurvivalSpec, strata: int) -> tuple[int, int, int]:
        return (strata, len(spec.interval_days) + 1, 2)

    def histograms(
        self, spec: DiscreteTimeSurvivalSpec, outputs: np.ndarray, targets: np.ndarray, strata: Strata
    ) -> dict[str, np.ndarray]:
        k = len(spec.interval_days)
        t = np.asarray(targets)
        stratum = strata.of(self.risk_logits(spec, outputs))
        where, event = t[:, 2 * k].astype(np.int64), t[:, 2 * k + 1].astype(np.int64)
        shape = self.cell_shape(spec, strata.count)
        flat = np.ravel_multi_index((stratum, where, event), shape)
        return {"cells": np.bincount(flat, minlength=int(np.prod(shape)))}

    def histogram_sizes(self, spec: DiscreteTimeSurvivalSpec, strata: int) -> list[int]:
        return [int(np.prod(self.cell_shape(spec, strata)))]

    def check_histograms(self, spec: DiscreteTimeSurvivalSpec, release: EvaluationRelease) -> None:
        if release.cells is None or not release.score_edges:
            raise ValueError("a survival model's DP release carries its cells and their strata")
        expected = int(np.prod(self.cell_shape(spec, len(release.score_edges) + 1)))
        if len(release.cells) != expected:
            raise ValueError(
                f"a survival release over {len(release.score_edges) + 1} strata and {len(spec.interval_days)} "
                f"intervals has {expected} cells, not {len(release.cells)}"
            )

    def exact(
        self, spec: DiscreteTimeSurvivalSpec, outputs: np.ndarray, targets: np.ndarray, threshold: float
    ) -> ExactEvaluation:
        k = len(spec.interval_days)
        t = np.asarray(targets, dtype=np.float64)
        days, event = t[:, 2 * k + 2], t[:, 2 * k + 1].astype(bool)
        # Harrell's C on exact times, with the event as recorded (not only within the grid)
        concordance = maths.harrell_c_index(days, event, self.risk_logits(spec, outputs))
        curves = self.survival_curves(outputs)
        h = spec.horizon_interval
        # Censored at a grid end means free of the event through it (as for the histograms): the Brier
        # scores, which count as controls at t only times beyond t, see them an instant later.
        seen = np.where(~event & np.isin(days, spec.interval_days), np.nextafter(days, np.inf), days)
        try:
            brier = maths.brier_score(seen, event, curves[:, h - 1], spec.horizon)
        except ValueError:
            brier = None
        try:
            times = np.asarray(spec.interval_days[:h], dtype=np.float64)
            integrated = maths.integrated_brier_score(seen, event, curves[:, :h], times) if h >= 2 else None
        except ValueError:
            integrated = None
        with torch.no_grad():
            loss = self.loss(
                spec, torch.from_numpy(np.asarray(outputs, np.float32)), torch.from_numpy(t.astype(np.float32))
            )
        return ExactEvaluation(
            examples=len(days),
            with_outcome=int(event.sum()),
            metrics={
                "c_index": concordance.value,
                "c_index_se": concordance.standard_error,
                "brier_at_horizon": _finite(brier),
                "integrated_brier": _finite(integrated),
                "loss": float(loss.mean()),
            },
            cells={},
            cell_fields={},
        )

    # --- at the coordinator ---------------------------------------------------------------------------

    def pool_overall(
        self,
        study: StudySpec,
        releases: Sequence[tuple[str, EvaluationRelease]],
        *,
        seed: int = 0,
        scores: np.ndarray | None = None,
    ) -> PooledSurvival:
        return pool_survival(self, study, releases, seed=seed, scores=scores)

    def selection_score(self, pooled: BaseModel) -> float | None:
        return pooled.c_index.value  # type: ignore[attr-defined]

    def headline(self, pooled: dict | None) -> str:
        return f"C-index {cards.estimate_text((pooled or {}).get('c_index'))}"

    def calibration_text(self, pooled: dict | None) -> str:
        ratio = cards.estimate_text((pooled or {}).get("observed_to_expected"), 2)
        return f"observed / expected events by the horizon {ratio}"

    def card_metrics(self, pooled: BaseModel | None) -> dict[str, object]:
        test: PooledSurvival | None = pooled  # type: ignore[assignment]
        return {
            "held_out_c_index": test.c_index.value if test else None,
            "held_out_c_index_95ci": [test.c_index.low, test.c_index.high] if test else [None, None],
            "held_out_c_index_text": test.c_index.text() if test else "not evaluated",
            **(
                {f"held_out_{n}": getattr(test, n).model_dump() for n in METRIC_NAMES if n != "c_index"} if test else {}
            ),
        }

    def card_html(self, study: StudySpec, pooled: BaseModel | None, selection: str) -> str:
        esc = html.escape
        test: PooledSurvival | None = pooled  # type: ignore[assignment]
        if test is None:
            return f"<p>Not evaluated: {esc(selection)}</p>"
        rows = cards.metric_rows(test, METRIC_NAMES)
        calibration = "".join(
            f"<tr><td>{esc(c.stratum)}</td><td>{c.predicted_survival:.3f}</td><td>{c.patients:.0f}</td>"
            f"<td>{'-' if c.observed_survival is None else f'{c.observed_survival:.3f}'}</td></tr>"
            for c in test.calibration
        )
        shown = [
            (1 - c.predicted_survival, 1 - c.observed_survival)
            for c in test.calibration
            if c.observed_survival is not None
        ]
        figures = cards.image(_curves_png(test), "survival curves per risk stratum")
        if shown:
            figures += cards.image(
                cards.calibration_png(
                    shown,
                    f"predicted risk by {test.horizon_days:g} days",
                    "observed (life table)",
                    "Calibration at the horizon",
                ),
                "calibration at the horizon",
            )
        return f"""<p>{esc(selection)} Horizon {test.horizon_days:g} days; grid ends at
{esc(", ".join(f"{d:g}" for d in test.interval_days))} days. {esc(test.method)}</p>
<table><tr><th>metric (pooled, test)</th><th>value (95% interval)</th></tr>{rows}</table>
<p>Intervals cover both the sampling of held-out patients and the noise the sites added. The C-index pooled from
histograms compares patients by risk stratum and interval (pairs within one interval are not compared).</p>
<h3>Observed against predicted survival at {test.horizon_days:g} days, by risk stratum</h3>
<table><tr><th>stratum (risk by the horizon)</th><th>predicted survival</th><th>patients (noisy)</th>
<th>observed survival (life table)</th></tr>{calibration}</table>
{figures}
{cards.subgroups_html(test.subgroups, "C-index", "observed / expected")}
{cards.releases_html(test.sites)}"""


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _curves_png(test: PooledSurvival) -> str:
    def draw(figure) -> None:
        axis = figure.add_subplot(1, 1, 1)
        for curve in test.curves:
            points = [(0.0, 1.0)] + [
                (d, s) for d, s in zip(test.interval_days, curve.survival, strict=True) if s is not None
            ]
            axis.step([p for p, _ in points], [s for _, s in points], where="post", label=curve.stratum)
        axis.axvline(test.horizon_days, color="grey", linestyle=":", linewidth=1)
        axis.set(
            title="Survival by risk stratum (pooled test, life table)", xlabel="days", ylabel="survival", ylim=(0, 1.02)
        )
        axis.legend(fontsize=7, title="risk by the horizon", title_fontsize=7)

    return cards.png(draw) if test.curves else ""


def _binned(cells: np.ndarray, stratum_survival: np.ndarray, h: int) -> dict[str, float | None]:
    """The pooled metrics of one (observed or replicate) histogram of shape (strata, intervals + 1, 2)."""
    c = maths.binned_c_index(cells)
    brier = maths.binned_brier_at_horizon(cells, stratum_survival, h)
    patients = float(cells.sum())
    pooled = maths.life_table(cells.sum(axis=0))
    observed_risk = 1.0 - float(pooled[h - 1]) if patients > 0 else None
    per_stratum = cells.sum(axis=(1, 2))
    predicted_risk = float(np.sum(per_stratum * (1 - stratum_survival)) / patients) if patients > 0 else None
    ratio = observed_risk / predicted_risk if observed_risk and predicted_risk else None
    return {
        "c_index": c,
        "brier_at_horizon": brier,
        "observed_to_expected": ratio,
        "patients": patients,
        "events": float(cells[:, :-1, 1].sum()),
    }


def pool_survival(
    kind: DiscreteTimeSurvivalKind,
    study: StudySpec,
    releases: Sequence[tuple[str, EvaluationRelease]],
    *,
    seed: int = 0,
    scores: np.ndarray | None = None,
) -> PooledSurvival:
    """Pool the survival releases of one part after one round. DP cells are added when they share the first
    DP release's strata; exact sites' C-indexes join by inverse-variance weights, their Brier scores by
    their examples."""
    spec: DiscreteTimeSurvivalSpec = study.model  # type: ignore[assignment]
    part = releases[0][1].part if releases else "test"
    h = spec.horizon_interval
    dp = [(site, r) for site, r in releases if r.mode == ReleaseMode.DP and r.cells is not None]
    exact = [(site, r) for site, r in releases if r.mode == ReleaseMode.EXACT]
    strata = Strata.checked(dp[0][1].score_edges, study.evaluation.threshold) if dp else None
    left_out = {site for site, r in dp if strata is not None and tuple(r.score_edges or ()) != strata.edges}
    dp = [(site, r) for site, r in dp if site not in left_out]
    observed: dict[str, float | None] = {}
    replicates: dict[str, list[float]] = {
        name: [] for name in ("c_index", "brier_at_horizon", "observed_to_expected", "patients", "events")
    }
    calibration: list[SurvivalCalibration] = []
    curves: list[StratumCurve] = []
    if dp:
        shape = kind.cell_shape(spec, strata.count)
        total = np.sum([np.asarray(r.cells, dtype=np.float64) for _, r in dp], axis=0)
        cells = feasible(total).reshape(shape)
        noise_sd = math.sqrt(sum(float(r.noise_sd) ** 2 for _, r in dp))
        stratum_survival = 1.0 - strata.mean_risks(scores)
        observed = _binned(cells, stratum_survival, h)
        rng = np.random.default_rng(seed)
        for _ in range(REPLICATES):
            drawn = feasible(rng.poisson(cells.ravel()) + rng.normal(0.0, noise_sd, cells.size)).reshape(shape)
            for name, value in _binned(drawn, stratum_survival, h).items():
                if value is not None and math.isfinite(value):
                    replicates[name].append(value)
        enough = max(MIN_STRATUM_PATIENTS, 2 * Z95 * math.sqrt(2) * noise_sd)
        for label, survival, stratum_cells in zip(strata.labels(), stratum_survival, cells, strict=True):
            patients = float(stratum_cells.sum())
            table = maths.life_table(stratum_cells) if patients >= enough else None
            calibration.append(
                SurvivalCalibration(
                    stratum=label,
                    predicted_survival=float(survival),
                    patients=round(patients, 2),
                    observed_survival=None if table is None else float(table[h - 1]),
                )
            )
            if table is not None:
                curves.append(StratumCurve(stratum=label, survival=[float(v) for v in table]))
    observed, replicates = _with_exact(observed, replicates, exact)
    why = no_value_reason(releases)
    return PooledSurvival(
        part=part,
        horizon_days=spec.horizon,
        interval_days=list(spec.interval_days),
        c_index=interval(observed.get("c_index"), replicates["c_index"], why),
        brier_at_horizon=interval(observed.get("brier_at_horizon"), replicates["brier_at_horizon"], why),
        observed_to_expected=interval(
            observed.get("observed_to_expected"), replicates["observed_to_expected"], why, bounded=False
        ),
        patients=interval(observed.get("patients"), replicates["patients"], why, bounded=False),
        events=interval(observed.get("events"), replicates["events"], why, bounded=False),
        calibration=calibration,
        curves=curves,
        sites=site_releases(releases, left_out),
        method=_method(len(dp), len(exact), len(releases) - len(dp) - len(exact)),
    )


def _with_exact(
    observed: dict[str, float | None],
    replicates: dict[str, list[float]],
    exact: Sequence[tuple[str, EvaluationRelease]],
) -> tuple[dict[str, float | None], dict[str, list[float]]]:
    """Exact sites' C-indexes and Brier scores joined with the histograms' (whose replicates give their
    variance): C by inverse-variance weights, the Brier score by examples; counts added."""
    usable = [r for _, r in exact if r.c_index is not None and r.c_index_se]
    if not usable and not any(r.examples for _, r in exact):
        return observed, replicates
    out = dict(observed)
    components = [(r.c_index, r.c_index_se**2) for r in usable]
    if observed.get("c_index") is not None and len(replicates["c_index"]) >= REPLICATES // 2:
        components.append((observed["c_index"], float(np.var(replicates["c_index"], ddof=1)) or 1e-12))
    if components:
        weights = [1 / v for _, v in components]
        value = sum(c * w for (c, _), w in zip(components, weights, strict=True)) / sum(weights)
        se = math.sqrt(1 / sum(weights))
        out["c_index"] = value
        replicates["c_index"] = list(np.random.default_rng(0).normal(value, se, REPLICATES))
    n_dp = observed.get("patients") or 0.0
    brier_parts = [(r.brier_at_horizon, r.examples) for _, r in exact if r.brier_at_horizon is not None and r.examples]
    if observed.get("brier_at_horizon") is not None:
        brier_parts.append((observed["brier_at_horizon"], n_dp))
    if brier_parts:
        out["brier_at_horizon"] = sum(b * n for b, n in brier_parts) / sum(n for _, n in brier_parts)
    out["patients"] = n_dp + sum(r.examples or 0 for _, r in exact)
    out["events"] = (observed.get("events") or 0.0) + sum(r.with_outcome or 0 for _, r in exact)
    return out, replicates


DP_RELEASED = (
    "differentially private histograms of their held-out patients by risk stratum, "
    "interval and event, pooled into one histogram from which every metric is computed"
)


def _method(dp: int, exact: int, withheld: int) -> str:
    return method_sentence(DP_RELEASED, dp, exact, withheld)


register(DiscreteTimeSurvivalKind())
