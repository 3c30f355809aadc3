"""The trajectory twin's series at a real site (issue 12): on an ETL-loaded synthetic hospital, every
patient's windows hold exactly the measurements and drug doses the OMOP database records on each step,
the decision times of one patient stay that patient's (n, W, ...), and a decision time after the stay's
end is not used."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import create_engine, text

from federation.contract.twin_specs import TrajectorySpec
from site_node.cohort.omop_source import OmopSource
from site_node.cohort.selection import select_cohort
from site_node.cohort.trajectories import build_trajectories
from site_node.config import derive_split_key, load_site_config
from tests.site_helpers import study

GLUCOSE, CREATININE, HEART_RATE = 3004501, 3016723, 3027018


@pytest.fixture(scope="module")
def site(prepared_site: Path):
    config = load_site_config(prepared_site / "site.yaml")
    url = config.omop.url
    with create_engine(url).connect() as connection:  # the drug given most often with a recorded quantity
        drug = connection.execute(text(
            "SELECT drug_concept_id FROM drug_exposure WHERE quantity IS NOT NULL GROUP BY drug_concept_id "
            "ORDER BY COUNT(*) DESC LIMIT 1"
        )).scalar_one()  # fmt: skip
    return url, derive_split_key(config.secret_file), int(drug)


def _windows(url: str, key: bytes, spec: TrajectorySpec):
    mortality = study()
    with OmopSource.open(url) as source:
        examples = select_cohort(source, mortality.cohort, mortality.outcome, key).examples
        source.write_index(examples)
        built = build_trajectories(source, examples, spec, mortality.outcome.prediction_hours, visit_level=True)
    return examples, built, mortality.outcome.prediction_hours


def _raw(url: str, table: str, concept_column: str, concept: int, when: str, value: str, people) -> pd.DataFrame:
    ids = ",".join(str(int(p)) for p in people)
    with create_engine(url).connect() as connection:
        frame = pd.read_sql(
            text(f"SELECT person_id, {when} AS at, {value} AS value FROM {table} "
                 f"WHERE {concept_column} = {concept} AND person_id IN ({ids})"),
            connection,
        )  # fmt: skip
    frame["at_s"] = pd.to_datetime(frame["at"]).astype("int64") / 1e9
    return frame


def test_each_step_holds_what_the_database_records_and_windows_stay_per_patient(site):
    url, key, drug = site
    spec = TrajectorySpec(
        signals=[{"name": "glucose", "concept_ids": [GLUCOSE], "normal_range": [70, 180]},
                 {"name": "creatinine", "concept_ids": [CREATININE], "transform": "log",
                  "normal_range": [0.6, 1.3]},
                 {"name": "heart_rate", "concept_ids": [HEART_RATE], "normal_range": [60, 100]}],
        treatments=[{"name": "drug", "concept_ids": [drug], "dose": True}],
        step_hours=4, history_steps=6, horizon_steps=6, windows_per_patient=3,
    )  # fmt: skip
    examples, built, prediction_hours = _windows(url, key, spec)
    n = len(examples)
    assert built.history.shape == (n, 3, 6, 3, 3) and built.future.shape == (n, 3, 6, 3)
    assert built.controls.shape == (n, 3, 12, 1) and list(built.decision_hours) == [24.0, 48.0, 72.0]
    assert built.valid[:, 0].all() and (built.windows >= 1).all() and (built.windows <= 3).all()
    # a decision time after the end of the stay is never used
    stay_hours = (examples["visit_end_s"] - examples["index_s"]).to_numpy() / 3600
    assert not built.valid[stay_hours <= 48.0, 1].any()
    assert built.valid[:, 1].any(), "some stays last beyond 48 h in a 700-patient hospital"

    # every step of a sample of patients, recomputed from the raw rows
    sample = np.random.default_rng(0).choice(n, size=min(25, n), replace=False)
    people = examples["person_id"].to_numpy()[sample]
    origin = examples["index_s"].to_numpy()[sample] + (prediction_hours - 6 * 4) * 3600
    raw = _raw(url, "measurement", "measurement_concept_id", GLUCOSE, "measurement_datetime", "value_as_number",
               people)  # fmt: skip
    doses = _raw(url, "drug_exposure", "drug_concept_id", drug, "drug_exposure_start_datetime", "quantity", people)
    for row, person, start in zip(sample, people, origin, strict=True):
        grid_steps = 6 + 3 * 6
        mine = raw[(raw.person_id == person) & raw.value.notna()]
        since = mine.at_s.to_numpy() - start
        step = np.floor(since / (4 * 3600)).astype(int)
        inside = (since >= 0) & (since <= grid_steps * 4 * 3600)  # the grid's end is in its last step
        step = np.minimum(step[inside], grid_steps - 1)
        expected = np.zeros(grid_steps)
        observed = np.zeros(grid_steps, dtype=bool)
        observed[step] = True
        for s in np.flatnonzero(observed):
            expected[s] = mine.value.to_numpy()[inside][step == s].mean()
        for k in range(3):
            history = slice(k * 6, k * 6 + 6)
            future = slice(k * 6 + 6, k * 6 + 12)
            assert np.array_equal(built.history[row, k, :, 0, 1] == 1, observed[history]), (person, k)
            assert np.allclose(built.history[row, k, :, 0, 0], expected[history], rtol=1e-5)
            assert np.array_equal(built.future_mask[row, k, :, 0] == 1, observed[future]), (person, k)
            assert np.allclose(built.future[row, k, :, 0], expected[future], rtol=1e-5)
        given = doses[doses.person_id == person]
        dose_since = given.at_s.to_numpy() - start
        dose_step = np.floor(dose_since / (4 * 3600)).astype(int)
        dose_inside = (dose_since >= 0) & (dose_since <= grid_steps * 4 * 3600)
        total = np.zeros(grid_steps)
        np.add.at(total, np.minimum(dose_step[dose_inside], grid_steps - 1),
                  given.value.fillna(1.0).to_numpy()[dose_inside])  # fmt: skip
        for k in range(3):
            assert np.allclose(built.controls[row, k, :, 0], total[k * 6 : k * 6 + 12]), (person, k)
    # a log signal is in log units; hours since last measured are scaled into [0, 1]
    creatinine = built.history[..., 1, 0][built.history[..., 1, 1] == 1]
    assert creatinine.size and np.all(creatinine < np.log(30.0))
    assert built.history[..., 2].min() >= 0 and built.history[..., 2].max() <= 1
    assert built.dropped_values == {"glucose": 0, "creatinine": 0, "heart_rate": 0}
