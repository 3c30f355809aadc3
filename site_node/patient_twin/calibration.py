"""The site's conformal calibration of a twin's intervals, kept on disk so that a cold query stays fast.

Every interval the patient twin shows is widened by this site's split-conformal offsets, computed from
its calibration patients (kept out of training). Computing them means building the calibration patients'
trajectories and running the model over them: seconds to minutes on a large hospital, far too slow for
one clinician's question. The offsets depend only on the model's weights and on the data they were
computed from, so the first query after a new model computes them and saves them here
(SITE-FOLDER/twins/calibration/<study hash>.json, 0600; aggregates of the site's own patients, they never
leave it); every later query reads them back while they are provably current:

* the same study (hash) and model weights (site_node.releases.weights_digest);
* the same model file, by the SHA-256 of its bytes: a cold query then reads the weights from a numpy copy
  kept beside the offsets (<study hash>.weights.npz, 0600, checked against the weights' digest) and
  answers through federation.twins.trajectory_inference, never importing torch; a new file whose weights
  are the same keeps the offsets and only refreshes the copy;
* the same data: the cohort key of site_node.cohort.cache (database, split key, the OMOP database's
  state, and who is withheld by consent or a withdrawal, re-read at every query). A consent withdrawal
  or a new load therefore recomputes the offsets without that patient's data;
* where the database's state cannot be read (PostgreSQL, see site_node.cohort.cache), offsets are reused
  for `UNREADABLE_STATE_MAX_AGE` (one day) and then recomputed: new data shifts the model's errors
  slowly, and a day-old calibration is what a site that loads nightly would have anyway. Who is withheld
  is still checked at every query.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from site_node.releases import weights_digest

UNREADABLE_STATE_MAX_AGE = dt.timedelta(days=1)


class SiteCalibration(BaseModel):
    """What is kept: the offsets and everything they were computed from (no patient-level value)."""

    model_config = ConfigDict(extra="forbid")

    study_hash: str
    weights_sha256: str
    model_file_sha256: str  # the bytes of the file the weights were read from
    model_round: str | None  # the round of a kept global model (None: a model file given by hand)
    data_key: str  # CohortKey.digest of the data the offsets came from
    data_state_readable: bool  # False: the OMOP state could not be read; reused for a day only
    calibration_patients: int
    offsets: list[list[list[float]]] | None  # (intervals, steps ahead, signals); None: no calibration patients
    # Per treatment, the model's mean probability that the practice gives it in the first step ahead, over the
    # calibration patients' decision times: what a plan for one patient is compared with (TwinAnswer.practice).
    practice_overall: list[float]
    computed_at: dt.datetime

    def current(self, study_hash: str, weights_sha256: str | None, data_key: str, now: dt.datetime,
                model_file_sha256: str | None = None) -> bool:  # fmt: skip
        """Whether these offsets hold for this study, data, and either these weights or this model file."""
        if (self.study_hash, self.data_key) != (study_hash, data_key):
            return False
        if weights_sha256 is not None and weights_sha256 != self.weights_sha256:
            return False
        if model_file_sha256 is not None and model_file_sha256 != self.model_file_sha256:
            return False
        return self.data_state_readable or now - self.computed_at < UNREADABLE_STATE_MAX_AGE

    def offsets_array(self) -> np.ndarray | None:
        return None if self.offsets is None else np.asarray(self.offsets, dtype=np.float64)


def calibration_file(base_dir: Path, study_hash: str) -> Path:
    return base_dir / "twins" / "calibration" / f"{study_hash[:32]}.json"


def weights_file(calibration: Path) -> Path:
    """The numpy copy of the calibrated weights, beside the calibration."""
    return calibration.with_suffix(".weights.npz")


def load_calibration(path: Path) -> SiteCalibration | None:
    """The kept calibration, or None when there is none or it cannot be read (it is then recomputed)."""
    try:
        return SiteCalibration.model_validate_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, ValidationError):
        return None


def save_calibration(path: Path, calibration: SiteCalibration) -> None:
    """Written whole or not at all (a reader never sees half a file), readable by the site's account only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(f".{os.getpid()}.tmp")
    temporary.write_text(calibration.model_dump_json(), encoding="utf-8")
    temporary.chmod(0o600)
    temporary.replace(path)


def save_weights(path: Path, weights: dict[str, np.ndarray]) -> None:
    """The numpy copy of a model's weights (float32, as trained), written whole, readable by the site only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with temporary.open("wb") as handle:
        np.savez(handle, **{name: np.asarray(value, dtype=np.float32) for name, value in weights.items()})
    temporary.chmod(0o600)
    temporary.replace(path)


def load_weights(path: Path, weights_sha256: str) -> dict[str, np.ndarray] | None:
    """The kept numpy weights when they are exactly the calibrated ones (their digest), else None (they are
    then read from the model file again)."""
    try:
        with np.load(path, allow_pickle=False) as kept:
            weights = {name: kept[name] for name in kept.files}
    except (OSError, ValueError):
        return None
    return weights if weights_digest(weights) == weights_sha256 else None
