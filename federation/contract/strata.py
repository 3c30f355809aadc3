"""The risk strata of a study's evaluation: where a score histogram is cut, on both sides of the wire.

A site counts its held-out patients per outcome class and stratum of predicted risk; the coordinator
reads AUROC, calibration and the threshold metrics off the sum of those counts. Both cut at the same
places, and the places never come from a site's patients directly (edges computed from a site's scores
would leak them). They come from one of two sources the study chooses (`evaluation.strata`):

* `fixed`: the study's own `score_edges`, e.g. clinical risk bands;
* `adaptive` (the default): from a first, differentially private release of the same patients' scores
  without their outcomes, over a fixed fine grid of logits (`SCORE_GRID`). The coordinator pools those
  histograms and cuts the strata at the pooled distribution's quantiles, so they fit whatever the model
  does: a DP-trained model's risks are often squeezed into a few percent, where fixed clinical bands
  would put nearly everyone into one or two strata and lose the ranking. The threshold is always an edge.

Stratum k holds the risks r with edge[k-1] <= r < edge[k] (stratum 0 everything below the first edge,
the last stratum everything from the last edge up), so "at or above the threshold" is exactly the strata
from the threshold's edge on. Scores are compared as logits, where the model computes them, so a risk
that rounds to 1.0 in floating point still lands in the right stratum.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from federation.contract.spec import EvaluationSpec

# The fine grid of the unlabelled score release (adaptive strata): a quarter logit wide from -8 to 4 (risks
# from 0.03% to 98%), open at both ends. Squeezed scores (a DP-trained model's 1.5% to 7%) span only a few
# half-logit cells; much finer cells add noise to the quantiles faster than they add resolution.
SCORE_GRID = tuple(float(x) for x in np.arange(-8.0, 4.0 + 1e-9, 0.25))
MAX_STRATA = 64


def logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def risk(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


@dataclass(frozen=True)
class Strata:
    """Increasing risk edges (probabilities strictly between 0 and 1) and the study's threshold among them."""

    edges: tuple[float, ...]
    threshold: float

    @classmethod
    def checked(cls, edges: Sequence[float], threshold: float) -> Strata:
        """Strata from edges sent over the wire; ValueError naming what is wrong with them."""
        values = tuple(float(e) for e in edges)
        if not 1 <= len(values) < MAX_STRATA:
            raise ValueError(f"a stratification has 1 to {MAX_STRATA - 1} edges, not {len(values)}")
        if any(not 0 < e < 1 for e in values) or any(b <= a for a, b in itertools.pairwise(values)):
            raise ValueError("strata edges are risks strictly between 0 and 1, in increasing order")
        if not any(math.isclose(e, threshold, abs_tol=1e-9) for e in values):
            raise ValueError(f"the threshold {threshold:g} is not one of the strata edges")
        return cls(values, float(threshold))

    @classmethod
    def fixed(cls, evaluation: EvaluationSpec) -> Strata:
        return cls.checked(evaluation.score_edges, evaluation.threshold)

    @property
    def logit_edges(self) -> np.ndarray:
        return np.array([logit(e) for e in self.edges], dtype=np.float64)

    @property
    def count(self) -> int:
        return len(self.edges) + 1

    def of(self, logits: np.ndarray) -> np.ndarray:
        """The stratum (0 .. len(edges)) of each score given as a logit."""
        return np.searchsorted(self.logit_edges, np.asarray(logits, dtype=np.float64), side="right")

    @property
    def threshold_stratum(self) -> int:
        """The first stratum whose risks are at or above the threshold."""
        return 1 + min(range(len(self.edges)), key=lambda k: abs(self.edges[k] - self.threshold))

    def representative_risks(self) -> np.ndarray:
        """One risk per stratum, for loss, Brier score and calibration computed from the histograms.

        The middle of the stratum on the logit scale; the two open-ended strata reach as far beyond their
        one edge as their neighbour is wide (one logit when there is a single edge). A binned loss or Brier
        score is therefore an approximation of the exact one, stated as such wherever it is shown.
        """
        edges = self.logit_edges
        width_low = edges[1] - edges[0] if len(edges) > 1 else 2.0
        width_high = edges[-1] - edges[-2] if len(edges) > 1 else 2.0
        bounds = np.concatenate([[edges[0] - width_low], edges, [edges[-1] + width_high]])
        middles = (bounds[:-1] + bounds[1:]) / 2.0
        return 1.0 / (1.0 + np.exp(-middles))

    def mean_risks(self, scores: Sequence[float] | np.ndarray | None, floor: float = 1.0) -> np.ndarray:
        """Each stratum's mean predicted risk, from the pooled score distribution on SCORE_GRID (the DP score
        release of the same patients, so this is post-processing: it costs nothing).

        Binned metrics and the calibration line computed at the logit middles (`representative_risks`) are
        biased where a stratum's patients crowd at one end (the open-ended strata most of all); at the
        strata's mean risks they are not. A stratum the distribution gives fewer than `floor` patients, or
        a missing or misshapen distribution, keeps its middle."""
        middles = self.representative_risks()
        if scores is None or len(scores) != len(SCORE_GRID) + 1:
            return middles
        counts = np.maximum(np.asarray(scores, dtype=np.float64), 0.0)
        grid = np.asarray(SCORE_GRID)
        half = (grid[1] - grid[0]) / 2.0
        centres = np.concatenate([[grid[0] - half], (grid[:-1] + grid[1:]) / 2.0, [grid[-1] + half]])
        stratum = self.of(centres)
        weight = np.bincount(stratum, weights=counts, minlength=self.count)
        mass = np.bincount(stratum, weights=counts / (1.0 + np.exp(-centres)), minlength=self.count)
        return np.where(weight >= floor, mass / np.maximum(weight, 1e-12), middles)

    def labels(self) -> list[str]:
        """Human-readable risk ranges, e.g. '<1%', '1-2%', '>=70%'."""

        def pct(p: float) -> str:
            return f"{100 * p:.3g}%"

        labels = [f"<{pct(self.edges[0])}"]
        labels += [f"{pct(a)}-{pct(b)}" for a, b in itertools.pairwise(self.edges)]
        labels.append(f">={pct(self.edges[-1])}")
        return labels


def score_grid_cell(logits: np.ndarray) -> np.ndarray:
    """The cell of `SCORE_GRID` (0 .. len(SCORE_GRID)) of each logit, for the unlabelled score release."""
    return np.searchsorted(np.asarray(SCORE_GRID), np.asarray(logits, dtype=np.float64), side="right")


def adaptive_strata(pooled_scores: np.ndarray, evaluation: EvaluationSpec) -> Strata:
    """Strata at the quantiles of the pooled (noisy, then projected to feasible) score histogram over the
    grid: `evaluation.adaptive_strata` strata of about equal numbers of patients, edges on grid lines,
    plus the threshold. Post-processing of DP releases: it costs nothing more."""
    counts = np.maximum(np.asarray(pooled_scores, dtype=np.float64), 0.0)
    total = counts.sum()
    edges: set[float] = {evaluation.threshold}
    if total > 0:
        cumulative = np.cumsum(counts)[:-1] / total  # share of patients below each grid line
        for k in range(1, evaluation.adaptive_strata):
            line = int(np.searchsorted(cumulative, k / evaluation.adaptive_strata))
            if line < len(SCORE_GRID):
                edges.add(round(risk(SCORE_GRID[line]), 12))
    ordered = sorted(edges)
    # Grid lines are a quarter logit apart; a threshold right next to one would make a sliver stratum.
    kept = [e for e in ordered if e == evaluation.threshold or abs(logit(e) - logit(evaluation.threshold)) > 0.1]
    return Strata.checked(kept, evaluation.threshold)


def study_strata(evaluation: EvaluationSpec) -> Strata | None:
    """The strata fixed by the study, or None when they are adaptive (chosen per release)."""
    return Strata.fixed(evaluation) if evaluation.strata == "fixed" else None
