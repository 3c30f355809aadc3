"""Covariates computed from OMOP for the chosen examples, in an order fixed by the study spec alone.

Static features are demographics, then occurrences, then values, then categorical covariates, each group in
the spec's order; time series are separate (`series`). Each group module has `names` (from the spec only,
so every site produces the same columns even without data for one) and `compute` (rows = the examples).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from federation.study.spec import CovariateSpec, StudySpec
from site_node.cohort.features import categorical, demographics, occurrences, time_series, values
from site_node.cohort.omop_source import OmopSource


def feature_names(spec: StudySpec | CovariateSpec) -> list[str]:
    """The static feature columns of a study, identical at every site."""
    covariates = spec.covariates if isinstance(spec, StudySpec) else spec
    return (
        demographics.names(covariates.demographics)
        + occurrences.names(covariates.occurrences)
        + values.names(covariates.values)
        + categorical.names(covariates.categorical)
    )


def series_names(spec: StudySpec | CovariateSpec) -> list[str]:
    """The time-series channels (C axis) of a study."""
    covariates = spec.covariates if isinstance(spec, StudySpec) else spec
    return time_series.names(covariates.time_series)


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
