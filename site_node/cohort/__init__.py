"""Cohort and feature extraction a site node runs on its own OMOP CDM v5.4 database for a study.

Front door: `build_dataset(db_url, spec, split_key=...)` -> `StudyDataset` (one example per patient, the
privacy unit; static features, optional time series, labels, a stable keyed split and a snapshot hash).
The column names depend on the study spec alone (`feature_names`), so every site's model has the same
inputs. Works on SQLite and PostgreSQL (optional schema); the database does the selecting and windowing.
"""

from site_node.cohort.build import build_dataset
from site_node.cohort.dataset import StudyDataset, snapshot_hash
from site_node.cohort.errors import CohortError
from site_node.cohort.features import feature_names, series_names

__all__ = ["CohortError", "StudyDataset", "build_dataset", "feature_names", "series_names", "snapshot_hash"]
