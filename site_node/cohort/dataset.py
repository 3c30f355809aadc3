"""The dataset a site trains and evaluates on: one row per patient, arrays ready for PyTorch."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from site_node.cohort.attrition import Attrition
from site_node.cohort.keyed_hash import SPLIT_PARTS

# The study's parts, and the training patients a kind calibrating at each site keeps out of training for it
# (the trajectory kind's split-conformal step: `conformal_fraction`, never released).
CALIBRATION = "calibration"
PARTS = (*SPLIT_PARTS, CALIBRATION)


def snapshot_hash(
    person_ids: np.ndarray,
    features: np.ndarray,
    labels: np.ndarray,
    event_days: np.ndarray | None = None,
    series: np.ndarray | None = None,
    targets: np.ndarray | None = None,
) -> str:
    """SHA-256 (hex) of the data a round used, in person-id order, so a model card can name its data.

    Covers the sorted person ids, the features and the labels, plus the event times and the series when the
    study has them (they are data the model sees too). Shapes are hashed first, so two datasets that only
    differ in how the same bytes are cut into rows and columns differ in hash. Fixed little-endian dtypes
    make the hash the same on every platform.
    """
    order = np.argsort(np.asarray(person_ids, dtype=np.int64), kind="stable")
    digest = hashlib.sha256(b"twinfed-study-dataset-v1\x00")
    parts: list[tuple[str, np.ndarray]] = [
        ("person_ids", np.asarray(person_ids, dtype="<i8")[order]),
        ("features", np.asarray(features, dtype="<f4")[order]),
        ("labels", np.asarray(labels, dtype="<f4")[order]),
    ]
    if event_days is not None:
        parts.append(("event_days", np.asarray(event_days, dtype="<f4")[order]))
    if series is not None:
        parts.append(("series", np.asarray(series, dtype="<f4")[order]))
    if targets is not None:
        parts.append(("targets", np.asarray(targets, dtype="<f4")[order]))
    for name, array in parts:
        digest.update(f"{name}:{array.shape}\x00".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


@dataclass
class StudyDataset:
    """A study's examples at one site: one row per person (the privacy unit), sorted by person id.

    `cohort_size`, `excluded_by_consent` and `attrition` describe the whole cohort and stay the same in a
    subset, so a report on the training part still says how many patients qualified, how many were
    withheld and which criterion removed whom. `attrition` defaults to an empty table only so arrays made
    by hand (tests, benchmarks) still form a dataset; every build fills it.
    """

    person_ids: np.ndarray  # int64 (n,)
    features: np.ndarray  # float32 (n, d), scaled; a missing value is 0 with its indicator column set
    feature_names: list[str]  # length d, from the study spec alone: identical at every site
    labels: np.ndarray  # float32 (n,): binary outcome (time_to_event: the event indicator)
    event_days: np.ndarray | None  # float32 (n,) days to event or censoring (time_to_event only)
    series: np.ndarray | None  # float32 (n, T, C, 3): value, observed mask, hours since last observation
    series_names: list[str]
    split: np.ndarray  # '<U10': 'train' | 'validation' | 'test'
    cohort_size: int  # qualifying persons before consent exclusion
    excluded_by_consent: int  # qualifying persons withheld for a denying or withdrawn consent
    snapshot_hash: str  # see `snapshot_hash`
    attrition: Attrition = field(default_factory=Attrition)  # see site_node.cohort.attrition
    # Who each patient is, for performance by subgroup (evaluation.subgroups): 'female', 'male' or 'other'
    # (not recorded as either), and age in years at the index. Not model inputs, and never released: only
    # the kind's histograms within each subgroup leave, noised.
    sex: np.ndarray | None = None  # '<U6' (n,)
    age_years: np.ndarray | None = None  # float64 (n,)
    # When each example's index falls (seconds since 1970, UTC as the database holds it): for the calendar period
    # the training data cover, which leaves only coarsened under the cell floor (site_node.governance.data_period).
    index_s: np.ndarray | None = None  # float64 (n,)
    # What the twin kind learns from, when the cohort builder cuts it from the patients' series (the trajectory
    # kind: each patient's windows, federation.twins.trajectory); `features` are then the packed inputs and
    # `feature_names` the static covariates. None: the kind's targets come from `labels` and `event_days`.
    targets: np.ndarray | None = None  # float32 (n, k)

    def __len__(self) -> int:
        return int(self.person_ids.shape[0])

    def subset(self, part: str) -> StudyDataset:
        """The rows of one split part, with that part's own snapshot hash.

        A part the study does not cut (or that this site has no examples for) gives an empty dataset, not
        an error: whoever needs the part decides what an empty one means (a refusal, with its reason).
        """
        if part not in PARTS:
            raise ValueError(f"'{part}' is not a split part; use one of {', '.join(PARTS)}")
        rows = self.split == part
        event_days = None if self.event_days is None else self.event_days[rows]
        series = None if self.series is None else self.series[rows]
        return StudyDataset(
            person_ids=self.person_ids[rows],
            features=self.features[rows],
            feature_names=list(self.feature_names),
            labels=self.labels[rows],
            event_days=event_days,
            series=series,
            series_names=list(self.series_names),
            split=self.split[rows],
            cohort_size=self.cohort_size,
            excluded_by_consent=self.excluded_by_consent,
            snapshot_hash=snapshot_hash(
                self.person_ids[rows],
                self.features[rows],
                self.labels[rows],
                event_days,
                series,
                None if self.targets is None else self.targets[rows],
            ),
            attrition=self.attrition,
            sex=None if self.sex is None else self.sex[rows],
            age_years=None if self.age_years is None else self.age_years[rows],
            index_s=None if self.index_s is None else self.index_s[rows],
            targets=None if self.targets is None else self.targets[rows],
        )
