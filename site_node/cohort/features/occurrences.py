"""Occurrence flags: did the patient have a condition, drug or procedure of a concept set in a window?

Descendants count (a 'heart failure' covariate also finds 'acute systolic heart failure') when the site's
vocabulary has concept_ancestor rows; a site with a bundled subset vocabulary matches the listed ids only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from federation.contract.spec import OccurrenceCovariate
from site_node.cohort.features.rows import row_positions, stack
from site_node.cohort.omop_source import OmopSource
from site_node.cohort.windows import events_in_window, hours_window


def compute(source: OmopSource, examples: pd.DataFrame, covariates: Sequence[OccurrenceCovariate]) -> np.ndarray:
    """(n, k): 1.0 where the window relative to the index holds one of the concepts, else 0.0."""
    columns = []
    for covariate in covariates:
        window = hours_window("index_s", covariate.window.start_hours, covariate.window.end_hours)
        events = events_in_window(source, covariate.domain, covariate.concept_ids, window, descendants=True)
        flag = np.zeros(len(examples))
        flag[row_positions(examples, events["person_id"].unique())] = 1.0
        columns.append(flag)
    return stack(columns, len(examples))
