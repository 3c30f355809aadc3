"""Numeric covariates: summary statistics of a measurement (or numeric observation) in a window.

Each statistic is scaled by the concept's fixed physiological range (see `scaling`), the same at every
site. A person without a value in the window gets 0 for every statistic and 1 in the covariate's
`<name>_missing` column, so the model can tell 'normal' from 'not measured'. 'latest' is the value with
the latest time (ties: the highest row id, i.e. the one recorded last).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from federation.contract.spec import ValueCovariate
from site_node.cohort.features.rows import row_positions, stack
from site_node.cohort.omop_source import OmopSource
from site_node.cohort.scaling import scale_count, value_scale
from site_node.cohort.windows import events_in_window, hours_window


def summarise(events: pd.DataFrame) -> pd.DataFrame:
    """Per person: latest, mean, min, max and count of `value` (events sorted by time inside)."""
    ordered = events.sort_values(["person_id", "offset_s", "row_id"])
    grouped = ordered.groupby("person_id", sort=True)["value"]
    return pd.DataFrame(
        {
            "latest": grouped.last(),
            "mean": grouped.mean(),
            "min": grouped.min(),
            "max": grouped.max(),
            "count": grouped.count(),
        }
    )


def compute(source: OmopSource, examples: pd.DataFrame, covariates: Sequence[ValueCovariate]) -> np.ndarray:
    """(n, k) in the order of `federation.contract.features.feature_names`."""
    n = len(examples)
    columns: list[np.ndarray] = []
    for covariate in covariates:
        window = hours_window("index_s", covariate.window.start_hours, covariate.window.end_hours)
        events = events_in_window(
            source, covariate.domain, covariate.concept_ids, window, value_column="value_as_number"
        )
        stats = summarise(events)
        rows = row_positions(examples, stats.index.to_numpy())
        scale = value_scale(covariate.concept_ids)
        for statistic in covariate.statistics:
            column = np.zeros(n)
            raw = stats[statistic].to_numpy(dtype=np.float64)
            column[rows] = scale_count(raw) if statistic == "count" else scale.apply(raw)
            columns.append(column)
        missing = np.ones(n)
        missing[rows] = 0.0
        columns.append(missing)
    return stack(columns, n)
