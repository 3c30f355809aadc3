"""The risk kinds: one logit per patient for a yes/no outcome (death in hospital, readmission within 30 days).

`logistic_regression` is linear in the features; `mlp` a small ReLU network. Both are Sequentials of
Linear, ReLU and Dropout layers, which the single-pass DP-SGD engine clips exactly. The loss is binary
cross-entropy on the logit, without class weights: a weight multiplies rare-class gradients before
clipping, so they would be clipped harder rather than weighted more, and ranking (AUROC) needs none.

Evaluation: a DP release is, per outcome class, the patients per risk stratum (`positives`, `negatives`);
the coordinator pools them into AUROC, the threshold metrics, loss, Brier score and calibration
(federation.twins.risk_pooling). Exact releases carry the confusion counts at the threshold with AUROC,
loss and Brier score. The study's model is the round with the best pooled validation AUROC.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel
from torch import nn

from federation.contract.protocol import EvaluationRelease
from federation.contract.spec import StudySpec
from federation.contract.strata import Strata
from federation.contract.twin_specs import LogisticRegressionSpec, MlpSpec
from federation.twins import cards
from federation.twins.kind import ExactEvaluation, TwinKind
from federation.twins.registry import register
from federation.twins.risk_pooling import PooledEvaluation, pool_evaluations

METRIC_NAMES = {
    "auroc": "AUROC",
    "loss": "log loss (binned)",
    "brier": "Brier score (binned)",
    "accuracy": "accuracy",
    "sensitivity": "sensitivity",
    "specificity": "specificity",
    "ppv": "PPV",
    "npv": "NPV",
    "observed_to_expected": "observed / expected events",
    "calibration_intercept": "calibration intercept (slope fixed at 1; ideal 0)",
    "calibration_slope": "calibration slope (ideal 1)",
}


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Probability that a random positive scores above a random negative (ties count one half), from rank
    statistics (Mann-Whitney U with average ranks); NaN when a class is missing or a score is not finite."""
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0 or not np.isfinite(s).all():
        return math.nan
    _, group, counts = np.unique(s, return_inverse=True, return_counts=True)
    # A group of tied scores occupies ranks end - count + 1 .. end; each member gets their mean.
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0
    rank_sum = float(average_rank[group][y].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def confusion(logits: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, int]:
    """True/false positives/negatives when a risk at or above `threshold` counts as positive."""
    y = np.asarray(labels).astype(bool)
    flagged = np.asarray(logits, dtype=np.float64) >= math.log(threshold / (1 - threshold))
    return {
        "tp": int((flagged & y).sum()),
        "fn": int((~flagged & y).sum()),
        "fp": int((flagged & ~y).sum()),
        "tn": int((~flagged & ~y).sum()),
    }


class RiskKind(TwinKind):
    """What the two risk kinds share: everything but the network."""

    fit = "dp_sgd"
    pooled_type = PooledEvaluation
    selection_metric = "auroc"
    selection_label = "AUROC"
    histogram_fields = ("positives", "negatives")

    def targets_of(self, spec, labels: np.ndarray, event_days: np.ndarray | None) -> np.ndarray:
        y = np.asarray(labels, dtype=np.float32)
        if y.ndim != 1:
            raise ValueError(f"a risk model's labels are one 0/1 value per patient; got shape {y.shape}")
        if not np.isin(y, (0.0, 1.0)).all():
            raise ValueError("labels must be 0 or 1")
        return y

    def loss(self, spec, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(outputs.squeeze(-1), targets, reduction="none")

    def output_gradient(self, spec, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(outputs) - targets.unsqueeze(-1)

    def risk_logits(self, spec, outputs: np.ndarray) -> np.ndarray:
        out = np.asarray(outputs, dtype=np.float64)
        return out[:, 0] if out.ndim == 2 else out

    def histograms(self, spec, outputs: np.ndarray, targets: np.ndarray, strata: Strata) -> dict[str, np.ndarray]:
        y = np.asarray(targets).astype(bool)
        cells = strata.of(self.risk_logits(spec, outputs))
        return {
            "positives": np.bincount(cells[y], minlength=strata.count),
            "negatives": np.bincount(cells[~y], minlength=strata.count),
        }

    def histogram_sizes(self, spec, strata: int) -> list[int]:
        return [strata, strata]

    def check_histograms(self, spec, release: EvaluationRelease) -> None:
        if release.positives is None or release.negatives is None or not release.score_edges:
            raise ValueError("a risk model's DP release carries both histograms and their strata")
        if not len(release.positives) == len(release.negatives) == len(release.score_edges) + 1:
            raise ValueError("the two histograms of a DP release must have one count per stratum each")

    def exact(self, spec, outputs: np.ndarray, targets: np.ndarray, threshold: float) -> ExactEvaluation:
        logits = self.risk_logits(spec, outputs)
        labels = np.asarray(targets, dtype=np.float64)
        scores, target = torch.from_numpy(logits), torch.from_numpy(labels)
        value = auroc(labels, logits)
        cells = confusion(logits, labels, threshold)
        return ExactEvaluation(
            examples=len(labels),
            with_outcome=int(labels.sum()),
            metrics={
                "auroc": None if math.isnan(value) else value,
                "loss": float(F.binary_cross_entropy_with_logits(scores, target)),
                "brier": float((torch.sigmoid(scores) - target).square().mean()),
            },
            cells=cells,
            cell_fields={
                "tp": "true_positives",
                "fn": "false_negatives",
                "fp": "false_positives",
                "tn": "true_negatives",
            },
        )

    def pool_overall(
        self,
        study: StudySpec,
        releases: Sequence[tuple[str, EvaluationRelease]],
        *,
        seed: int = 0,
        scores: np.ndarray | None = None,
    ):
        return pool_evaluations(releases, study.evaluation, seed=seed, scores=scores)

    def selection_score(self, pooled: BaseModel) -> float | None:
        return pooled.auroc.value  # type: ignore[attr-defined]

    def headline(self, pooled: dict | None) -> str:
        return f"AUROC {cards.estimate_text((pooled or {}).get('auroc'))}"

    def calibration_text(self, pooled: dict | None) -> str:
        pooled = pooled or {}
        slope = cards.estimate_text(pooled.get("calibration_slope"), 2)
        intercept = cards.estimate_text(pooled.get("calibration_intercept"), 2)
        return f"calibration slope {slope}, intercept {intercept}"

    def card_metrics(self, pooled: BaseModel | None) -> dict[str, object]:
        test: PooledEvaluation | None = pooled  # type: ignore[assignment]
        metrics = {name: getattr(test, name).model_dump() for name in METRIC_NAMES} if test else {}
        return {
            "held_out_auroc": test.auroc.value if test else None,
            "held_out_auroc_95ci": [test.auroc.low, test.auroc.high] if test else [None, None],
            "held_out_auroc_text": test.auroc.text() if test else "not evaluated",
            **{f"held_out_{name}": value for name, value in metrics.items() if name != "auroc"},
        }

    def card_html(self, study: StudySpec, pooled: BaseModel | None, selection: str) -> str:
        esc = html.escape
        test: PooledEvaluation | None = pooled  # type: ignore[assignment]
        if test is None:
            return f"<p>Not evaluated: {esc(selection)}</p>"
        rows = cards.metric_rows(test, METRIC_NAMES)
        calibration = "".join(
            f"<tr><td>{esc(c.stratum)}</td><td>{c.risk:.3f}</td><td>{c.patients:.0f}</td>"
            f"<td>{'-' if c.observed is None else f'{c.observed:.3f}'}</td></tr>"
            for c in test.calibration
        )
        table = (
            f"<h3>Calibration by risk stratum</h3><table><tr><th>stratum</th><th>risk</th><th>patients (noisy)</th>"
            f"<th>observed rate</th></tr>{calibration}</table>"
            if calibration
            else ""
        )
        shown = [(c.risk, c.observed) for c in test.calibration if c.observed is not None]
        figure = cards.calibration_png(shown, "predicted risk (stratum's middle)", "observed rate") if shown else ""
        return f"""<p>{esc(selection)} Threshold {test.threshold:g} for the threshold metrics. {esc(test.method)}</p>
<table><tr><th>metric (pooled, test)</th><th>value (95% interval)</th></tr>{rows}</table>
<p>Intervals cover both the sampling of held-out patients and the noise the sites added.</p>
{table}{cards.image(figure, "calibration")}
{cards.subgroups_html(test.subgroups, "AUROC", "calibration slope")}
{cards.releases_html(test.sites)}"""


class LogisticRegressionKind(RiskKind):
    name = "logistic_regression"
    spec_type = LogisticRegressionSpec
    summary = "a risk score: logistic regression (one logit, linear in the features)"

    def build(self, spec, n_features: int) -> nn.Module:
        return nn.Sequential(nn.Linear(n_features, 1))


class MlpKind(RiskKind):
    name = "mlp"
    spec_type = MlpSpec
    summary = "a risk score: a ReLU network ending in one logit"

    def build(self, spec: MlpSpec, n_features: int) -> nn.Module:
        layers: list[nn.Module] = []
        width = n_features
        for hidden in spec.hidden:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            if spec.dropout:
                layers.append(nn.Dropout(spec.dropout))
            width = hidden
        layers.append(nn.Linear(width, 1))
        return nn.Sequential(*layers)


register(LogisticRegressionKind())
register(MlpKind())
