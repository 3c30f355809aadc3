"""Measurement sequences on the study's grid, for sequence models: shape (n, T, C, 3).

Per covariate the window is cut into bins of `bin_hours` ([start, start + bin) ..., the last bin also
holds an observation exactly at the window end). Per bin there are three channels:

0. the mean of the bin's values, scaled by the concept's fixed range (0 when nothing was observed);
1. the observed mask (1 if the bin holds a value);
2. hours from the last observation (in this bin or an earlier one of the window) to the bin's end, capped
   at the window length and divided by it: 1 means 'not seen yet in this window'.

Covariates with fewer bins than the longest one are aligned on their last bin (the prediction end) and
padded at the start with value 0, mask 0 and hours-since 1, so position T-1 is always the latest bin.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from federation.contract.spec import TimeSeriesCovariate
from site_node.cohort.features.rows import row_positions
from site_node.cohort.omop_source import OmopSource
from site_node.cohort.scaling import scale_hours_since, value_scale
from site_node.cohort.windows import events_in_window, hours_window

CHANNELS = ("value", "mask", "hours_since_last")


def bin_count(covariate: TimeSeriesCovariate) -> int:
    return round((covariate.window.end_hours - covariate.window.start_hours) / covariate.bin_hours)


def length(covariates: Sequence[TimeSeriesCovariate]) -> int:
    """T: the number of bins of the longest covariate."""
    return max((bin_count(c) for c in covariates), default=0)


def compute(source: OmopSource, examples: pd.DataFrame, covariates: Sequence[TimeSeriesCovariate]) -> np.ndarray:
    n, steps = len(examples), length(covariates)
    series = np.zeros((n, steps, len(covariates), len(CHANNELS)), dtype=np.float32)
    series[..., 2] = 1.0
    for channel, covariate in enumerate(covariates):
        bins = bin_count(covariate)
        window = hours_window("index_s", covariate.window.start_hours, covariate.window.end_hours)
        events = events_in_window(source, "measurement", covariate.concept_ids, window, value_column="value_as_number")
        series[:, steps - bins :, channel, :] = _binned(events, examples, covariate, bins)
    return series


def _binned(events: pd.DataFrame, examples: pd.DataFrame, covariate: TimeSeriesCovariate, bins: int) -> np.ndarray:
    """(n, bins, 3) for one covariate."""
    n = len(examples)
    out = np.zeros((n, bins, 3), dtype=np.float64)
    bin_s = covariate.bin_hours * 3600.0
    span_hours = covariate.window.end_hours - covariate.window.start_hours
    since_start = events["offset_s"].to_numpy(dtype=np.float64) - window_start_s(covariate)
    rows = row_positions(examples, events["person_id"].to_numpy())
    which = np.minimum((since_start // bin_s).astype(np.int64), bins - 1)
    per_bin = (
        pd.DataFrame({"row": rows, "bin": which, "value": events["value"].to_numpy(), "at": since_start})
        .groupby(["row", "bin"], sort=False)
        .agg(value=("value", "mean"), at=("at", "max"))
    )
    row_index = per_bin.index.get_level_values("row").to_numpy()
    bin_index = per_bin.index.get_level_values("bin").to_numpy()
    out[row_index, bin_index, 0] = value_scale(covariate.concept_ids).apply(per_bin["value"].to_numpy())
    out[row_index, bin_index, 1] = 1.0
    last_seen = np.full((n, bins), -np.inf)
    last_seen[row_index, bin_index] = per_bin["at"].to_numpy()
    last_seen = np.maximum.accumulate(last_seen, axis=1)
    bin_end = (np.arange(bins) + 1) * bin_s
    hours = np.where(np.isfinite(last_seen), (bin_end[None, :] - last_seen) / 3600.0, np.inf)
    out[:, :, 2] = scale_hours_since(hours, span_hours)
    return out


def window_start_s(covariate: TimeSeriesCovariate) -> int:
    return round(covariate.window.start_hours * 3600)
