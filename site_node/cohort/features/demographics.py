"""Age and sex, from the person table at the example's index."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from site_node.cohort.features.rows import stack
from site_node.cohort.scaling import scale_age

MALE, FEMALE = 8507, 8532  # OMOP gender concepts; anything else (incl. 0, unknown) is 'other'


def compute(examples: pd.DataFrame, demographics: Sequence[str]) -> np.ndarray:
    """(n, k) in the order of `federation.contract.features.feature_names`: age / 100, and gender one-hot."""
    columns: list[np.ndarray] = []
    gender = examples["gender_concept_id"].to_numpy(dtype=np.float64)
    for item in demographics:
        if item == "age":
            columns.append(scale_age(examples["age_years"].to_numpy()))
        else:
            male, female = gender == MALE, gender == FEMALE
            columns += [male, female, ~(male | female)]
    return stack(columns, len(examples))
