"""Covariates computed from OMOP for the chosen examples, in an order fixed by the study spec alone.

Static features are demographics, then occurrences, then values, then categorical covariates, each group in
the spec's order; time series are separate (`series`). The column names come from the study contract
(`federation.contract.features`), so every site produces the same columns even without data for one; each
group module here has `compute` (rows = the examples, columns in the contract's order).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from federation.contract.features import feature_names, series_names
from federation.contract.spec import CovariateSpec
from site_node.cohort.features import categorical, demographics, occurrences, time_series, values
from site_node.cohort.omop_source import OmopSource


def static_features(source: OmopSource, examples: pd.DataFrame, covariates: CovariateSpec) -> np.ndarray:
    """float32 (n, d) with columns in the order of `feature_names`."""
    blocks = [
        demographics.compute(examples, covariates.demographics),
        occurrences.compute(source, examples, covariates.occurrences),
        values.compute(source, examples, covariates.values),
        categorical.compute(source, examples, covariates.categorical),
    ]
    features = np.concatenate(blocks, axis=1).astype(np.float32)
    expected = len(feature_names(covariates))
    if features.shape[1] != expected:
        raise RuntimeError(f"computed {features.shape[1]} feature columns but the spec names {expected}")
    return features


def series_features(source: OmopSource, examples: pd.DataFrame, covariates: CovariateSpec) -> np.ndarray | None:
    """float32 (n, T, C, 3), or None when the study has no time-series covariates."""
    if not covariates.time_series:
        return None
    return time_series.compute(source, examples, covariates.time_series)


__all__ = ["feature_names", "series_features", "series_names", "static_features"]
