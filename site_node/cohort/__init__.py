"""Cohort and feature extraction a site node runs on its own OMOP CDM v5.4 database for a study.

Front door: `build_dataset(db_url, spec, split_key=...)` -> `StudyDataset` (one example per patient, the
privacy unit; static features, optional time series, labels, the study's split — random by a stable keyed
hash, or temporal by index date — a snapshot hash, and the attrition table of every inclusion criterion).
The column names depend on the study spec alone (`feature_names`), so every site's model has the same
inputs. Works on SQLite and PostgreSQL (optional schema); the database does the selecting and windowing.
What of the attrition may leave the site under a cell-count floor: `site_node.cohort.attrition`.
"""

from site_node.cohort.attrition import Attrition, AttritionStep, attrition_sentence, most_removed, render_attrition
from site_node.cohort.build import build_dataset
from site_node.cohort.dataset import StudyDataset, snapshot_hash
from site_node.cohort.errors import CohortError
from site_node.cohort.features import feature_names, series_names

__all__ = [
    "Attrition",
    "AttritionStep",
    "CohortError",
    "StudyDataset",
    "attrition_sentence",
    "build_dataset",
    "feature_names",
    "most_removed",
    "render_attrition",
    "series_names",
    "snapshot_hash",
]
