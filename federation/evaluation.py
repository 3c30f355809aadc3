"""Pooling the sites' held-out evaluation into one estimate with an honest interval.

Sites send aggregates only: AUROC, loss and Brier score on their test patients, and the numbers of
examples and positive cases when those are at or above the site's cell-count floor. The pooled AUROC is
the inverse-variance weighted mean of the sites' AUROCs, each with the Hanley-McNeil standard error from
its counts; a site that withheld its counts cannot be weighted and is reported beside the pooled figure,
not folded in with a guessed weight. Loss and Brier are example-weighted means over the sites with counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Z95 = 1.959963984540054


@dataclass(frozen=True)
class SiteEvaluation:
    site_id: str
    auroc: float | None
    loss: float | None
    brier: float | None
    num_examples: int | None
    num_positive: int | None


@dataclass(frozen=True)
class PooledEstimate:
    value: float
    low: float
    high: float
    sites: int  # how many sites' counts entered the estimate


def hanley_mcneil_se(auroc: float, positives: int, negatives: int) -> float:
    """Standard error of an AUROC from its value and class counts (Hanley & McNeil, 1982)."""
    q1 = auroc / (2 - auroc)
    q2 = 2 * auroc * auroc / (1 + auroc)
    variance = (auroc * (1 - auroc) + (positives - 1) * (q1 - auroc**2) + (negatives - 1) * (q2 - auroc**2)) / (
        positives * negatives
    )
    return math.sqrt(max(variance, 1e-12))


def pooled_auroc(sites: list[SiteEvaluation]) -> PooledEstimate | None:
    """Inverse-variance pooled AUROC with a 95% interval over the sites that shared their counts."""
    terms = []
    for site in sites:
        if site.auroc is None or site.num_examples is None or site.num_positive is None:
            continue
        negatives = site.num_examples - site.num_positive
        if site.num_positive < 1 or negatives < 1:
            continue
        se = hanley_mcneil_se(site.auroc, site.num_positive, negatives)
        terms.append((site.auroc, 1 / se**2))
    if not terms:
        return None
    weight = sum(w for _, w in terms)
    value = sum(a * w for a, w in terms) / weight
    half = Z95 / math.sqrt(weight)
    return PooledEstimate(value, max(0.0, value - half), min(1.0, value + half), len(terms))


def pooled_mean(sites: list[SiteEvaluation], field: str) -> float | None:
    """Example-weighted mean of `field` over the sites that shared their example count."""
    pairs = [(getattr(s, field), s.num_examples) for s in sites if getattr(s, field) is not None and s.num_examples]
    total = sum(n for _, n in pairs)
    return sum(v * n for v, n in pairs) / total if total else None
