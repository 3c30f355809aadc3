"""The risk kinds' pooled evaluation: the sites' releases into one estimate per metric, with an honest interval.

By default each site releases, per outcome class, how many held-out patients its model put in each risk
stratum, with Gaussian noise (federation.contract.protocol.EvaluationRelease, mode dp). Adding the histograms gives
the consortium's histogram, and the metrics are computed from that sum, as if all held-out patients sat in
one table: the pooled AUROC is the AUROC of the pooled scores (ties within a stratum count one half), not
an average of per-site AUROCs; sensitivity, specificity, PPV, NPV and accuracy are read off the strata at
the study's threshold; calibration compares each stratum's observed rate with its risk; loss, Brier
score and the calibration line are computed at each stratum's mean risk, read from the pooled score
distribution of the same patients when the strata are adaptive (free post-processing of the score
release), else at the stratum's logit middle (binned: an approximation stated as such).

A site whose policy chooses exact releases sends exact aggregates under its cell-count floor instead;
its counts are added to the threshold counts, its loss and Brier weighted by its examples, and its AUROC
combined with the histogram AUROC by inverse-variance weights (Hanley-McNeil variances from the counts).

Intervals cover both sources of uncertainty: which patients happened to be held out, and the noise the
sites added. Each is a normal interval from the spread of replicate analyses in which every released
count is redrawn (Poisson around its value, plus fresh noise of the site's own level for DP counts) and
every exact AUROC is redrawn around its value with its standard error.

Before any metric is computed, each pooled histogram is replaced by the nearest one (in squared error)
that could be true: no negative count, and the same total as released. This is post-processing of the
releases, so it costs no privacy; it removes most of the noise's effect where counts are small (at the
price of a slight pull of AUROC towards 0.5, measured in docs/benchmarks.md, evaluation), and the
replicates go through the same step. A metric whose denominator is still zero is "not estimable",
said with its reason, never NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict

from federation.contract.protocol import EvaluationRelease, ReleaseMode
from federation.contract.spec import EvaluationSpec
from federation.contract.strata import Strata
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


class StratumCalibration(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stratum: str
    risk: float  # the stratum's representative predicted risk
    patients: float  # pooled (noisy) number of patients scored in it
    observed: float | None  # pooled observed outcome rate in it; None when too few patients to say


class PooledEvaluation(BaseModel):
    """Every metric of one evaluation (a part of every site, after one round), pooled across sites."""

    model_config = ConfigDict(extra="forbid")

    part: str
    threshold: float
    auroc: Estimate
    loss: Estimate
    brier: Estimate
    accuracy: Estimate
    sensitivity: Estimate
    specificity: Estimate
    ppv: Estimate
    npv: Estimate
    observed_to_expected: Estimate  # calibration in the large: observed events / predicted events
    # TRIPOD's calibration line, from the DP histograms: logit P(outcome) = a + b logit(risk); the slope b
    # (1 is ideal; below 1, predictions too extreme) and the intercept a with b fixed at 1 (0 is ideal)
    calibration_intercept: Estimate = Estimate(note="not estimated")
    calibration_slope: Estimate = Estimate(note="not estimated")
    patients: Estimate
    positives: Estimate
    calibration: list[StratumCalibration] = []
    sites: list[SiteRelease] = []
    subgroups: list[SubgroupResult] = []
    method: str = ""

    @property
    def estimable(self) -> bool:
        return self.auroc.value is not None


@dataclass(frozen=True)
class _Exact:
    """An exact site's released aggregates (None where withheld)."""

    examples: int | None
    tp: int | None
    fn: int | None
    fp: int | None
    tn: int | None
    auroc: float | None
    loss: float | None
    brier: float | None

    @property
    def confusion(self) -> tuple[int, int, int, int] | None:
        cells = (self.tp, self.fn, self.fp, self.tn)
        return None if any(c is None for c in cells) else cells  # type: ignore[return-value]


def hanley_mcneil_se(auroc: float, positives: float, negatives: float) -> float:
    """Standard error of an AUROC from its value and class counts (Hanley & McNeil, 1982)."""
    positives, negatives = max(positives, 1.0), max(negatives, 1.0)
    q1 = auroc / (2 - auroc)
    q2 = 2 * auroc * auroc / (1 + auroc)
    variance = (auroc * (1 - auroc) + (positives - 1) * (q1 - auroc**2) + (negatives - 1) * (q2 - auroc**2)) / (
        positives * negatives
    )
    return math.sqrt(max(variance, 1e-12))


def histogram_auroc(positives: np.ndarray, negatives: np.ndarray) -> float | None:
    """P(a positive scores in a higher stratum than a negative), ties one half; None when a class is empty."""
    p_total, n_total = float(positives.sum()), float(negatives.sum())
    if p_total <= 0 or n_total <= 0:
        return None
    below = np.cumsum(negatives) - negatives
    value = float(np.sum(positives * (below + 0.5 * negatives)) / (p_total * n_total))
    return min(1.0, max(0.0, value))


def _ratio(numerator: float, denominator: float) -> float | None:
    if denominator <= 0:
        return None
    return min(1.0, max(0.0, numerator / denominator))


def calibration_line(positives: np.ndarray, negatives: np.ndarray, risks: np.ndarray) -> tuple[float, float] | None:
    """(intercept with the slope fixed at 1, slope) of the logistic recalibration of the strata's outcomes on
    their risks' logits, weighted by their counts: Newton's method on the binomial likelihood (Cox 1958).
    None when the counts cannot determine a line (one class empty, all patients in one stratum)."""
    pos, neg = np.asarray(positives, dtype=np.float64), np.asarray(negatives, dtype=np.float64)
    x = np.log(risks / (1 - risks))
    n = pos + neg
    if pos.sum() <= 0 or neg.sum() <= 0 or np.count_nonzero(n > 1e-9) < 2:
        return None

    def fit(design: np.ndarray, offset: np.ndarray) -> np.ndarray | None:
        beta = np.zeros(design.shape[1])
        for _ in range(50):
            p = 1 / (1 + np.exp(-(design @ beta + offset)))
            gradient = design.T @ (pos - n * p)
            hessian = (design * (n * p * (1 - p))[:, None]).T @ design
            try:
                step = np.linalg.solve(hessian, gradient)
            except np.linalg.LinAlgError:
                return None
            beta = beta + step
            if not np.all(np.isfinite(beta)) or np.abs(beta).max() > 50:
                return None
            if np.abs(step).max() < 1e-10:
                return beta
        return beta

    line = fit(np.column_stack([np.ones_like(x), x]), np.zeros_like(x))
    in_the_large = fit(np.ones((len(x), 1)), x)
    if line is None or in_the_large is None:
        return None
    return float(in_the_large[0]), float(line[1])


def _metrics(
    positives: np.ndarray | None,
    negatives: np.ndarray | None,
    exact: Sequence[_Exact],
    exact_auroc: Sequence[float | None],
    strata: Strata | None,
    risks: np.ndarray | None,
    auroc_weights: tuple[float, list[float]],
) -> dict[str, float | None]:
    """Every pooled metric from one set of released values (the observed ones or a replicate)."""
    tp = fn = fp = tn = 0.0
    loss_sum = brier_sum = weight_sum = 0.0
    predicted = observed_events = 0.0
    out: dict[str, float | None] = {}
    components: list[tuple[float, float]] = []
    if positives is not None and negatives is not None and strata is not None:
        cut = strata.threshold_stratum
        tp += float(positives[cut:].sum())
        fn += float(positives[:cut].sum())
        fp += float(negatives[cut:].sum())
        tn += float(negatives[:cut].sum())
        n_dp = float(positives.sum() + negatives.sum())
        if n_dp > 0:
            loss_sum += float(np.sum(-positives * np.log(risks) - negatives * np.log1p(-risks)))
            brier_sum += float(np.sum(positives * (1 - risks) ** 2 + negatives * risks**2))
            weight_sum += n_dp
            predicted += float(np.sum((positives + negatives) * risks))
            observed_events += float(positives.sum())
        dp_auroc = histogram_auroc(positives, negatives)
        if dp_auroc is not None:
            components.append((dp_auroc, auroc_weights[0]))
    for site, auroc, weight in zip(exact, exact_auroc, auroc_weights[1], strict=True):
        cells = site.confusion
        if cells is not None:
            tp, fn, fp, tn = tp + cells[0], fn + cells[1], fp + cells[2], tn + cells[3]
        if site.examples and site.loss is not None and site.brier is not None:
            loss_sum += site.loss * site.examples
            brier_sum += site.brier * site.examples
            weight_sum += site.examples
        if auroc is not None and weight > 0:
            components.append((auroc, weight))
    total_weight = sum(w for _, w in components)
    out["auroc"] = min(1.0, max(0.0, sum(a * w for a, w in components) / total_weight)) if total_weight > 0 else None
    out["loss"] = loss_sum / weight_sum if weight_sum > 0 else None
    out["brier"] = brier_sum / weight_sum if weight_sum > 0 else None
    out["sensitivity"] = _ratio(tp, tp + fn)
    out["specificity"] = _ratio(tn, tn + fp)
    out["ppv"] = _ratio(tp, tp + fp)
    out["npv"] = _ratio(tn, tn + fn)
    out["accuracy"] = _ratio(tp + tn, tp + tn + fp + fn)
    out["observed_to_expected"] = observed_events / predicted if predicted > 0 and observed_events > 0 else None
    line = None
    if positives is not None and negatives is not None and strata is not None:
        line = calibration_line(positives, negatives, risks)
    out["calibration_intercept"], out["calibration_slope"] = line if line is not None else (None, None)
    out["patients"] = tp + fn + fp + tn
    out["positives"] = tp + fn
    return out


def _exact(release: EvaluationRelease) -> _Exact:
    return _Exact(
        release.examples,
        release.true_positives,
        release.false_negatives,
        release.false_positives,
        release.true_negatives,
        release.auroc,
        release.loss,
        release.brier,
    )


def pool_evaluations(
    releases: Sequence[tuple[str, EvaluationRelease]],
    evaluation: EvaluationSpec,
    *,
    seed: int = 0,
    scores: np.ndarray | None = None,
) -> PooledEvaluation:
    """Pool the releases (site label, release) of one part after one round into every metric.

    DP histograms are added only when they share their strata (the first DP release's); a release over
    other strata (a site that answered an earlier placement) is listed and left out, never mixed in."""
    part = releases[0][1].part if releases else "test"
    dp = [(site, r) for site, r in releases if r.mode == ReleaseMode.DP]
    exact = [(site, r) for site, r in releases if r.mode == ReleaseMode.EXACT]
    strata = Strata.checked(dp[0][1].score_edges, evaluation.threshold) if dp else None
    risks = strata.mean_risks(scores) if strata is not None else None
    mismatched = {site for site, r in dp if strata is not None and tuple(r.score_edges or ()) != strata.edges}
    dp = [(site, r) for site, r in dp if site not in mismatched]
    positives = negatives = variance = None
    if dp:
        bins = strata.count
        positives = feasible(np.sum([np.asarray(r.positives, dtype=np.float64) for _, r in dp], axis=0))
        negatives = feasible(np.sum([np.asarray(r.negatives, dtype=np.float64) for _, r in dp], axis=0))
        variance = np.full(bins, sum(float(r.noise_sd) ** 2 for _, r in dp))
    exact_values = [_exact(r) for _, r in exact]
    # Inverse-variance weights of the AUROC components, fixed from the observed values (Hanley-McNeil).
    weights_dp = 0.0
    if positives is not None:
        dp_auroc = histogram_auroc(positives, negatives)
        if dp_auroc is not None:
            weights_dp = 1 / hanley_mcneil_se(dp_auroc, positives.sum(), negatives.sum()) ** 2
    exact_se = []
    for site, (_, release) in zip(exact_values, exact, strict=True):
        if site.auroc is None or release.examples is None or release.with_outcome is None:
            exact_se.append(None)
            continue
        exact_se.append(hanley_mcneil_se(site.auroc, release.with_outcome, release.examples - release.with_outcome))
    weights = (weights_dp, [0.0 if se is None else 1 / se**2 for se in exact_se])
    observed = _metrics(positives, negatives, exact_values, [s.auroc for s in exact_values], strata, risks, weights)

    rng = np.random.default_rng(seed)
    replicates: dict[str, list[float]] = {name: [] for name in observed}
    for _ in range(REPLICATES):
        rep_pos = rep_neg = None
        if positives is not None:
            noise_sd = np.sqrt(variance)
            rep_pos = feasible(rng.poisson(positives) + rng.normal(0, noise_sd))
            rep_neg = feasible(rng.poisson(negatives) + rng.normal(0, noise_sd))
        rep_exact = []
        rep_auroc = []
        for site, se in zip(exact_values, exact_se, strict=True):
            cells = site.confusion
            drawn = tuple(int(rng.poisson(c)) for c in cells) if cells is not None else (None,) * 4
            rep_exact.append(_Exact(site.examples, *drawn, site.auroc, site.loss, site.brier))
            rep_auroc.append(None if se is None else float(np.clip(rng.normal(site.auroc, se), 0, 1)))
        values = _metrics(rep_pos, rep_neg, rep_exact, rep_auroc, strata, risks, weights)
        for name, value in values.items():
            if value is not None and math.isfinite(value):
                replicates[name].append(value)

    def estimate(name: str, bounded: bool = True, why: str | None = None, signed: bool = False) -> Estimate:
        note = why or no_value_reason(releases)
        return interval(observed[name], replicates[name], note, bounded=bounded, signed=signed)

    calibration = []
    if positives is not None:
        for label, risk, pos, neg in zip(strata.labels(), risks, positives, negatives, strict=True):
            patients = float(pos + neg)
            # A stratum's observed rate says something only when it clearly holds patients despite the noise.
            enough = patients > 2 * Z95 * math.sqrt(2 * float(variance[0]))
            calibration.append(
                StratumCalibration(
                    stratum=label,
                    risk=float(risk),
                    patients=round(patients, 2),
                    observed=_ratio(float(pos), patients) if enough else None,
                )
            )
    return PooledEvaluation(
        part=part,
        threshold=evaluation.threshold,
        auroc=estimate("auroc"),
        loss=estimate("loss", bounded=False),
        brier=estimate("brier"),
        accuracy=estimate("accuracy"),
        sensitivity=estimate("sensitivity"),
        specificity=estimate("specificity"),
        ppv=estimate("ppv"),
        npv=estimate("npv"),
        observed_to_expected=estimate("observed_to_expected", bounded=False),
        calibration_intercept=estimate("calibration_intercept", bounded=False, signed=True),
        calibration_slope=estimate("calibration_slope", bounded=False, signed=True),
        patients=estimate("patients", bounded=False),
        positives=estimate("positives", bounded=False),
        calibration=calibration,
        sites=site_releases(releases, mismatched),
        method=_method(len(dp), len(exact), len(releases) - len(dp) - len(exact)),
    )


DP_RELEASED = (
    "differentially private score histograms, pooled into one histogram from which "
    "every metric is computed (loss, Brier score and the calibration line at each stratum's mean risk)"
)


def _method(dp: int, exact: int, withheld: int) -> str:
    return method_sentence(DP_RELEASED, dp, exact, withheld)
