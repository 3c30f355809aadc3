"""Performance by subgroup (TRIPOD): by sex, by age band, and by site, for every twin kind.

Sex and age: each site releases its kind's histograms within each subgroup as well (EvaluationRelease
`subgroups`, `subgroup_counts`), noised like the overall ones. The coordinator pools each subgroup across
sites with the kind's own pooling, as if the subgroup were the whole part. Site: each site's own release,
pooled alone (nothing more is released for it).

What is shown: the kind's selection metric (AUROC, C-index) with its interval, the (noisy) number of
patients, and the kind's calibration summary. A subgroup whose pooled count of patients, or of patients
with the outcome, is below `MIN_PATIENTS` / `MIN_EVENTS` says so instead of a value: with the noise of a
DP release, a metric of a handful of patients says more about the noise than about them, and the same
rule keeps every shown figure above the usual cell-count floor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel

from federation.contract.protocol import EvaluationRelease, ReleaseMode
from federation.twins.pooling import MIN_EVENTS, MIN_PATIENTS, Estimate, SubgroupResult

if TYPE_CHECKING:
    from federation.contract.spec import StudySpec
    from federation.twins.kind import TwinKind


def _blocks(release: EvaluationRelease, fields: Sequence[str], sizes: Sequence[int]) -> dict[str, dict[str, list]]:
    """A release's subgroup counts cut back into each subgroup's histogram fields."""
    counts = np.asarray(release.subgroup_counts or [], dtype=np.float64)
    width = sum(sizes)
    labels = release.subgroups or []
    if len(counts) != width * len(labels):
        raise ValueError(f"{len(counts)} subgroup counts do not make {len(labels)} subgroups of {width} counts")
    out: dict[str, dict[str, list]] = {}
    for index, label in enumerate(labels):
        block, start = counts[index * width : (index + 1) * width], 0
        out[label] = {}
        for name, size in zip(fields, sizes, strict=True):
            out[label][name] = block[start : start + size].tolist()
            start += size
    return out


def _summary(kind: TwinKind, group: str, label: str, pooled: BaseModel) -> SubgroupResult:
    patients: Estimate = pooled.patients  # type: ignore[attr-defined]
    with_outcome: Estimate = getattr(pooled, "positives", None) or getattr(pooled, "events")  # noqa: B009
    metric: Estimate = getattr(pooled, kind.selection_metric)
    calibration: Estimate = getattr(pooled, "calibration_slope", None) or getattr(pooled, "observed_to_expected")  # noqa: B009
    few = (patients.value or 0.0) < MIN_PATIENTS or (with_outcome.value or 0.0) < MIN_EVENTS
    if few:
        why = (
            f"too few patients to show (fewer than {MIN_PATIENTS} patients or {MIN_EVENTS} with the outcome, "
            "counted with noise)"
        )
        withheld = Estimate(note=why)
        return SubgroupResult(
            group=group, label=label, patients=withheld, with_outcome=withheld, metric=withheld,
            calibration=withheld, note=why,
        )  # fmt: skip
    return SubgroupResult(
        group=group, label=label, patients=patients, with_outcome=with_outcome, metric=metric, calibration=calibration
    )


def subgroup_results(
    kind: TwinKind,
    study: StudySpec,
    releases: Sequence[tuple[str, EvaluationRelease]],
    *,
    seed: int = 0,
    scores: np.ndarray | None = None,
) -> list[SubgroupResult]:
    """Every subgroup's pooled performance: sex and age from the sites' subgroup histograms, then each site.
    A subgroup's strata are read at the mean risks of the whole pooled score distribution (`scores`): no
    site releases a score distribution per subgroup."""
    dp = [(site, r) for site, r in releases if r.mode == ReleaseMode.DP and r.subgroups and r.subgroup_counts]
    results: list[SubgroupResult] = []
    if dp:
        fields = kind.histogram_fields
        sizes = kind.histogram_sizes(study.model, len(dp[0][1].score_edges or ()) + 1)
        edges = dp[0][1].score_edges
        per_site = {}
        for site, release in dp:
            if release.score_edges != edges:
                continue
            try:
                per_site[site] = (release, _blocks(release, fields, sizes))
            except ValueError:
                continue
        labels = [label for label in (dp[0][1].subgroups or []) if all(label in b for _, b in per_site.values())]
        for label in labels:
            parts = [
                (
                    site,
                    EvaluationRelease(
                        part=release.part,
                        mode=ReleaseMode.DP,
                        score_edges=edges,
                        noise_sd=release.subgroup_noise_sd,
                        **{name: blocks[label][name] for name in fields},
                    ),
                )
                for site, (release, blocks) in per_site.items()
            ]
            group, _, name = label.partition(":")
            results.append(_summary(kind, group, name, kind.pool_overall(study, parts, seed=seed, scores=scores)))
    for site, release in releases:
        if release.mode in (ReleaseMode.DP, ReleaseMode.EXACT):
            pooled = kind.pool_overall(study, [(site, release)], seed=seed, scores=scores)
            results.append(_summary(kind, "site", site, pooled))
    return results
