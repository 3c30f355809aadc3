"""The risk strata of a study's evaluation: where a score histogram is cut, on both sides of the wire.

A site counts its held-out patients per outcome class and stratum of predicted risk; the coordinator
reads AUROC, calibration and the threshold metrics off the sum of those counts. Both must cut at the
same places, so the strata come from the study alone (its `evaluation.score_edges`), never from data:
edges computed from a site's scores would themselves leak them.

Stratum k holds the risks r with edge[k-1] <= r < edge[k] (stratum 0 everything below the first edge,
the last stratum everything from the last edge up), so "at or above the threshold" is exactly the strata
from the threshold's edge on. Scores are compared as logits, where the model computes them, so a risk
that rounds to 1.0 in floating point still lands in the right stratum.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from federation.study.spec import EvaluationSpec


def logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def logit_edges(evaluation: EvaluationSpec) -> np.ndarray:
    """The strata's boundaries as logits, increasing."""
    return np.array([logit(e) for e in evaluation.score_edges], dtype=np.float64)


def stratum_count(evaluation: EvaluationSpec) -> int:
    return len(evaluation.score_edges) + 1


def stratum_of(logits: np.ndarray, evaluation: EvaluationSpec) -> np.ndarray:
    """The stratum (0 .. len(edges)) of each score given as a logit."""
    return np.searchsorted(logit_edges(evaluation), np.asarray(logits, dtype=np.float64), side="right")


def threshold_stratum(evaluation: EvaluationSpec) -> int:
    """The first stratum whose risks are at or above the study's threshold."""
    edges = evaluation.score_edges
    return 1 + min(range(len(edges)), key=lambda k: abs(edges[k] - evaluation.threshold))


def representative_risks(evaluation: EvaluationSpec) -> np.ndarray:
    """One risk per stratum, for loss, Brier score and calibration computed from the histograms.

    The middle of the stratum on the logit scale; the two open-ended strata reach as far beyond their one
    edge as their neighbour is wide (one logit when there is a single edge). A binned loss or Brier score
    is therefore an approximation of the exact one, stated as such wherever it is shown.
    """
    edges = logit_edges(evaluation)
    width_low = edges[1] - edges[0] if len(edges) > 1 else 2.0
    width_high = edges[-1] - edges[-2] if len(edges) > 1 else 2.0
    bounds = np.concatenate([[edges[0] - width_low], edges, [edges[-1] + width_high]])
    middles = (bounds[:-1] + bounds[1:]) / 2.0
    return 1.0 / (1.0 + np.exp(-middles))


def stratum_labels(evaluation: EvaluationSpec) -> list[str]:
    """Human-readable risk ranges, e.g. '<1%', '1-2%', '>=70%'."""

    def pct(p: float) -> str:
        return f"{100 * p:g}%"

    edges = evaluation.score_edges
    labels = [f"<{pct(edges[0])}"]
    labels += [f"{pct(a)}-{pct(b)}" for a, b in itertools.pairwise(edges)]
    labels.append(f">={pct(edges[-1])}")
    return labels
