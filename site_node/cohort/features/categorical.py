"""Coded covariates: the latest value_as_concept_id of an observation in a window, one-hot encoded.

One column per listed value concept, then `<name>_other` (a coded value not listed) and `<name>_missing`
(no coded value in the window). The columns come from the study alone, so every site has the same ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from federation.contract.spec import CategoricalCovariate
from site_node.cohort.features.rows import row_positions, stack
from site_node.cohort.omop_source import OmopSource
from site_node.cohort.windows import events_in_window, hours_window


def compute(source: OmopSource, examples: pd.DataFrame, covariates: Sequence[CategoricalCovariate]) -> np.ndarray:
    """(n, k) in the order of `federation.contract.features.feature_names`."""
    n = len(examples)
    columns: list[np.ndarray] = []
    for covariate in covariates:
        window = hours_window("index_s", covariate.window.start_hours, covariate.window.end_hours)
        events = events_in_window(
            source, "observation", covariate.concept_ids, window, value_column="value_as_concept_id"
        )
        latest = events.sort_values(["person_id", "offset_s", "row_id"]).groupby("person_id", sort=True)["value"].last()
        rows = row_positions(examples, latest.index.to_numpy())
        values = latest.to_numpy()
        listed = np.zeros(len(values), dtype=bool)
        for concept in covariate.value_concept_ids:
            column = np.zeros(n)
            column[rows[values == concept]] = 1.0
            listed |= values == concept
            columns.append(column)
        other = np.zeros(n)
        other[rows[~listed]] = 1.0
        missing = np.ones(n)
        missing[rows] = 0.0
        columns += [other, missing]
    return stack(columns, n)
