"""Site-independent feature scaling: the same value becomes the same feature at every hospital.

Scaling by a site's own mean and spread would make one number mean different things at different sites
(and would leak site statistics into the model). Instead every transform is fixed by the study alone:
a measurement is centred and divided by the half-width of its concept's physiological range (from the
ETL's unit table, in the canonical unit the ETL converted to), which puts every plausible value in
[-1, 1]. Values outside the range are impossible and are clipped to its edge. A concept without a known
range gets a signed log transform, which is equally site-independent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from omop_etl.units import plausible_range

LOG_SCALE = float(np.log1p(1e4))  # a value of 10,000 (any unit) maps to 1 under the fallback
COUNT_SCALE = float(np.log1p(100))  # 100 measurements in a window map to 1


@dataclass(frozen=True)
class ValueScale:
    """(value - center) / half_width clipped to [-1, 1]; without a range, sign(v) * log1p(|v|) / LOG_SCALE."""

    center: float | None
    half_width: float | None

    def apply(self, values: np.ndarray) -> np.ndarray:
        values = np.asarray(values, dtype=np.float64)
        if self.center is None or not self.half_width:
            return np.sign(values) * np.log1p(np.abs(values)) / LOG_SCALE
        return np.clip((values - self.center) / self.half_width, -1.0, 1.0)


def value_scale(concept_ids: Sequence[int]) -> ValueScale:
    """The scale of a covariate: the union of its concepts' plausible ranges (they share a canonical unit)."""
    ranges = [r for r in (plausible_range(int(c)) for c in concept_ids) if r is not None]
    if not ranges:
        return ValueScale(None, None)
    low = min(r[0] for r in ranges)
    high = max(r[1] for r in ranges)
    return ValueScale((low + high) / 2.0, (high - low) / 2.0)


def scale_count(counts: np.ndarray) -> np.ndarray:
    """How many values a window holds, on a log scale that does not depend on the site."""
    return np.log1p(np.asarray(counts, dtype=np.float64)) / COUNT_SCALE


def scale_age(age_years: np.ndarray) -> np.ndarray:
    """Age in years / 100."""
    return np.asarray(age_years, dtype=np.float64) / 100.0


def scale_hours_since(hours: np.ndarray, cap_hours: float) -> np.ndarray:
    """Hours since the last observation, capped at the window length, as a fraction of it (1: none seen)."""
    return np.minimum(np.asarray(hours, dtype=np.float64), cap_hours) / cap_hours
