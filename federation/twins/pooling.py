"""What every twin kind's pooling shares: an estimate with its interval, a site's part in a pooled release,
the projection of noisy counts onto counts that could be true, and the pooled score distribution from which
the coordinator places adaptive risk strata (kind-independent: the score is each kind's one risk number).

Noisy histograms are pooled by adding the sites' counts and replacing the sum by the nearest non-negative
histogram with the same total. That is post-processing of the releases, so it costs no privacy; the
intervals come from replicate analyses in which every released count is redrawn (Poisson around its value,
plus fresh noise of the site's own level), pushed through the same projection.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict

from federation.contract.protocol import EvaluationRelease, ReleaseMode
from federation.contract.strata import SCORE_GRID

Z95 = 1.959963984540054
REPLICATES = 400
WITHHELD = "withheld (cell floor)"


class Estimate(BaseModel):
    """A pooled value with its 95% interval, or the reason there is none."""

    model_config = ConfigDict(extra="forbid")

    value: float | None = None
    low: float | None = None
    high: float | None = None
    note: str | None = None  # why there is no value, or how it was computed when that matters

    def text(self, digits: int = 3) -> str:
        if self.value is None:
            return self.note or "not estimable"
        interval = f" (95% CI {self.low:.{digits}f}-{self.high:.{digits}f})" if self.low is not None else ""
        return f"{self.value:.{digits}f}{interval}"


class SiteRelease(BaseModel):
    """One site's part in a pooled evaluation, for the model card."""

    model_config = ConfigDict(extra="forbid")

    site: str
    mode: ReleaseMode
    epsilon: float | None = None
    noise_sd: float | None = None
    cell_floor: int | None = None
    withheld: str | None = None
    withheld_reason: str | None = None


# A subgroup's metrics are shown only above these pooled (noisy) counts (federation.twins.subgroups).
MIN_PATIENTS = 20
MIN_EVENTS = 5


class SubgroupResult(BaseModel):
    """One subgroup's pooled performance (by sex, age band or site), or why it is not shown."""

    model_config = ConfigDict(extra="forbid")

    group: str  # 'sex', 'age' or 'site'
    label: str  # 'female', '50-69', the site's name
    patients: Estimate
    with_outcome: Estimate
    metric: Estimate  # the kind's selection metric (AUROC, C-index)
    calibration: Estimate  # risk kinds: the calibration slope; survival: observed / expected by the horizon
    note: str | None = None


def feasible(counts: np.ndarray) -> np.ndarray:
    """The non-negative histogram nearest to `counts` (Euclidean) with the same total (at least 1): the
    projection onto a scaled simplex (Duchi et al., 2008)."""
    counts = np.asarray(counts, dtype=np.float64)
    total = max(float(counts.sum()), 1.0)
    ordered = np.sort(counts)[::-1]
    running = np.cumsum(ordered) - total
    index = np.arange(1, len(counts) + 1)
    last = index[ordered - running / index > 0][-1]
    shift = running[last - 1] / last
    return np.maximum(counts - shift, 0.0)


def pool_scores(releases: Sequence[tuple[str, EvaluationRelease]]) -> np.ndarray | None:
    """The sites' score distributions (stage scores) added and projected to feasible counts; None without any."""
    grids = [np.asarray(r.scores, dtype=np.float64) for _, r in releases if r.mode == ReleaseMode.DP and r.scores]
    grids = [g for g in grids if len(g) == len(SCORE_GRID) + 1]
    return feasible(np.sum(grids, axis=0)) if grids else None


def no_value_reason(releases: Sequence[tuple[str, EvaluationRelease]]) -> str:
    if releases and all(r.mode == ReleaseMode.WITHHELD or r.withheld for _, r in releases):
        return WITHHELD
    if not releases:
        return "not evaluated: no site released an evaluation"
    return "not estimable: a class is empty or the noise exceeds the counts"


def site_releases(
    releases: Sequence[tuple[str, EvaluationRelease]], left_out: set[str] = frozenset()
) -> list[SiteRelease]:
    """Each site's part for the model card; `left_out` sites released over other strata than the pooled ones."""
    return [
        SiteRelease(
            site=site,
            mode=r.mode,
            epsilon=r.epsilon,
            noise_sd=r.noise_sd,
            cell_floor=r.cell_floor,
            withheld="histograms" if site in left_out else r.withheld,
            withheld_reason="released over other strata than the pooled ones; left out"
            if site in left_out
            else r.withheld_reason,
        )
        for site, r in releases
    ]


def interval(
    value: float | None, replicates: list[float], note: str, *, bounded: bool = True, signed: bool = False
) -> Estimate:
    """`value` with a normal 95% interval from the spread of its replicates (`note` when there is no value).
    `bounded`: a proportion, the interval kept within [0, 1]; otherwise a non-negative quantity (a count, a
    ratio, a loss), kept at or above 0, unless `signed` (a calibration intercept)."""
    if value is None:
        return Estimate(note=note)
    if len(replicates) < REPLICATES // 2:
        return Estimate(value=value, note="interval not estimable: the noise often leaves no data")
    half = Z95 * float(np.std(replicates, ddof=1))
    low, high = value - half, value + half
    if bounded:
        low, high = max(0.0, low), min(1.0, high)
    elif not signed:
        low = max(0.0, low)
    return Estimate(value=value, low=low, high=high)


def method_sentence(dp_released: str, dp: int, exact: int, withheld: int) -> str:
    """How the sites' evaluations were pooled, in a sentence; `dp_released` says what a DP site released and
    how it was pooled (the kind's words)."""
    parts = []
    if dp:
        parts.append(f"{dp} site(s) released {dp_released}")
    if exact:
        parts.append(f"{exact} site(s) released exact aggregates under their cell-count floor")
    if withheld:
        parts.append(f"{withheld} site(s) withheld their evaluation (cell floor)")
    return "; ".join(parts) + "." if parts else "No site released an evaluation."
