"""The site's conformal calibration of a twin's intervals, kept on disk so that a cold query stays fast.

Every interval the patient twin shows is widened by this site's split-conformal offsets, computed from
its calibration patients (kept out of training). Computing them means building the calibration patients'
trajectories and running the model over them: seconds to minutes on a large hospital, far too slow for
one clinician's question. The offsets depend only on the model's weights and on the data they were
computed from, so the first query after a new model computes them and saves them here
(SITE-FOLDER/twins/calibration/<study hash>.json, 0600; aggregates of the site's own patients, they never
leave it); every later query reads them back while they are provably current:

* the same study (hash) and model weights (site_node.releases.weights_digest);
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

UNREADABLE_STATE_MAX_AGE = dt.timedelta(days=1)


class SiteCalibration(BaseModel):
    """What is kept: the offsets and everything they were computed from (no patient-level value)."""

    model_config = ConfigDict(extra="forbid")

    study_hash: str
    weights_sha256: str
    data_key: str  # CohortKey.digest of the data the offsets came from
    data_state_readable: bool  # False: the OMOP state could not be read; reused for a day only
    calibration_patients: int
    offsets: list[list[list[float]]] | None  # (intervals, steps ahead, signals); None: no calibration patients
    computed_at: dt.datetime

    def current(self, study_hash: str, weights_sha256: str, data_key: str, now: dt.datetime) -> bool:
        if (self.study_hash, self.weights_sha256, self.data_key) != (study_hash, weights_sha256, data_key):
            return False
        return self.data_state_readable or now - self.computed_at < UNREADABLE_STATE_MAX_AGE

    def offsets_array(self) -> np.ndarray | None:
        return None if self.offsets is None else np.asarray(self.offsets, dtype=np.float64)


def calibration_file(base_dir: Path, study_hash: str) -> Path:
    return base_dir / "twins" / "calibration" / f"{study_hash[:32]}.json"


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
