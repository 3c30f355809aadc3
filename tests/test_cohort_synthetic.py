"""The example mortality study on a synthetic hospital loaded through the real ETL gives a sane cohort."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import text

from federation.contract import load_study
from omop_etl.database import open_engine
from site_node.cohort import build_dataset, feature_names
from tests.etl_helpers import load
from tests.fhir_export import sites

STUDY = Path(__file__).resolve().parents[1] / "configs" / "study-inpatient-mortality.yaml"


@pytest.fixture(scope="module")
def hospital(medium_consortium, tmp_path_factory) -> tuple[str, str, dict]:
    """(site id, SQLite URL, ground truth) of the first hospital of the medium consortium (700 patients:
    enough adult stays for a cohort of hundreds; a hospital of the small consortium has about 50)."""
    site_id, export_dir, truth = sites(medium_consortium)[0]
    folder = tmp_path_factory.mktemp(f"cohort-{site_id}")
    url = f"sqlite:///{folder / 'omop.sqlite'}"
    load([export_dir], url, folder / "secret")
    return site_id, url, truth


def _active_denials(url: str) -> set[int]:
    engine = open_engine(url)
    with engine.connect() as connection:
        rows = connection.execute(
            text("SELECT person_id FROM twinfed_consent WHERE status = 'active' AND provision = 'deny'")
        ).all()
    engine.dispose()
    return {int(r[0]) for r in rows if r[0] is not None}


def test_mortality_study_gives_a_sane_cohort(hospital):
    site_id, url, truth = hospital
    spec = load_study(STUDY)
    ds = build_dataset(url, spec, split_key=site_id.encode())
    assert len(ds) >= 200, len(ds)  # hundreds of stays
    assert ds.feature_names == feature_names(spec)
    assert len(set(ds.person_ids.tolist())) == len(ds) == ds.cohort_size - ds.excluded_by_consent
    assert np.isfinite(ds.features).all() and np.isfinite(ds.labels).all()
    assert 0.02 <= float(ds.labels.mean()) <= 0.40, float(ds.labels.mean())
    assert (np.abs(ds.features) <= 1.5).all()  # every transform is bounded and site-independent
    age = ds.features[:, ds.feature_names.index("age")]
    assert (age >= 0.18).all() and (age < 1.21).all()
    gender = ds.features[:, [ds.feature_names.index(f"gender_{g}") for g in ("male", "female", "other")]]
    assert (gender.sum(axis=1) == 1).all()
    assert ds.features[:, ds.feature_names.index("heart_rate_missing")].mean() < 0.1  # vitals on day one
    # the example study's default split: train and test by the keyed hash, about 80/20, no validation part
    assert {"train", "test"} == set(ds.split.tolist())
    assert 0.7 <= float((ds.split == "train").mean()) <= 0.9
    assert ds.attrition.persons == len(ds) and ds.attrition.step("consent").removed_persons == ds.excluded_by_consent
    # consent: the synthetic hospital records opt-outs and withdrawals; none of them is in the data
    assert 0 < ds.excluded_by_consent <= truth["consent"]["denying_research"]
    assert set(ds.person_ids.tolist()).isdisjoint(_active_denials(url))
    # against what the generator knows: patients alive in hospital 24 h after an adult admission
    eligible = {s["patient_id"] for s in truth["stays"] if s["alive_at_prediction_time"] and s["age"] >= 18}
    assert 0.8 * len(eligible) <= ds.cohort_size <= len(eligible), (ds.cohort_size, len(eligible))
