"""The model's input columns, named from the study alone.

Part of the contract: the coordinator sizes the global model from these names before any site has
answered, and every site must produce exactly these columns in this order, whatever its data.
"""

from __future__ import annotations

from federation.contract.spec import CovariateSpec, StudySpec


def feature_names(spec: StudySpec | CovariateSpec) -> list[str]:
    """The static feature columns: demographics, occurrences, values (+ missing flags), categorical one-hots."""
    covariates = spec.covariates if isinstance(spec, StudySpec) else spec
    names: list[str] = []
    for item in covariates.demographics:
        names += ["age"] if item == "age" else ["gender_male", "gender_female", "gender_other"]
    names += [c.name for c in covariates.occurrences]
    for value in covariates.values:
        names += [f"{value.name}_{statistic}" for statistic in value.statistics] + [f"{value.name}_missing"]
    for categorical in covariates.categorical:
        names += [f"{categorical.name}_{concept}" for concept in categorical.value_concept_ids]
        names += [f"{categorical.name}_other", f"{categorical.name}_missing"]
    return names


def series_names(spec: StudySpec | CovariateSpec) -> list[str]:
    """The time-series channels (the C axis of a sequence input)."""
    covariates = spec.covariates if isinstance(spec, StudySpec) else spec
    return [c.name for c in covariates.time_series]
