"""Length of stay as a federated study (issue 13: the length-of-stay sub-model learned across hospitals).

configs/study-length-of-stay.yaml asks for the time from 4 hours after admission to the end of the stay
(`time_to_event` with `event: discharge`) and fits the discrete-time survival kind with DP-SGD. On an
ETL-loaded synthetic hospital every example's time is its own stay's length read back from
visit_occurrence, and the study runs federated through the real apps (`twinfed study simulate`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import create_engine, text

from federation.contract import load_study
from federation.contract.receipts import Participation, read_receipts
from site_node.cohort import build_dataset
from site_node.config import load_site_config
from tests.process_helpers import simulate_on_site
from tests.site_helpers import ROOT

STUDY = ROOT / "configs" / "study-length-of-stay.yaml"
DAY = 86400.0


def test_each_examples_time_is_its_stay_from_the_prediction_time(prepared_site: Path):
    config = load_site_config(prepared_site / "site.yaml")
    spec = load_study(STUDY)
    ds = build_dataset(config.omop.url, spec, split_key=config.split_key())
    assert len(ds) > 100 and ds.event_days is not None
    engine = create_engine(config.omop.url)
    with engine.connect() as connection:
        rows = connection.execute(
            text(
                "SELECT person_id, visit_start_datetime, visit_end_datetime, visit_end_date FROM visit_occurrence "
                "WHERE visit_concept_id = 9201 ORDER BY person_id, visit_start_datetime, visit_occurrence_id"
            )
        ).all()
        latest = connection.execute(text("SELECT max(visit_end_date) FROM visit_occurrence")).scalar()
    first: dict[int, tuple] = {}
    for person, start, end, end_date in rows:
        first.setdefault(person, (start, end, end_date))
    events = censored = 0
    for person, label, days in zip(ds.person_ids.tolist(), ds.labels.tolist(), ds.event_days.tolist(), strict=True):
        start, end, end_date = first[person]
        if end is None and str(end_date) >= str(latest):  # still in hospital when the data end
            assert label == 0, f"person {person}: a running stay counted as discharged"
            censored += 1
            continue
        stay_days = (np.datetime64(end) - np.datetime64(start)) / np.timedelta64(1, "s") / DAY
        expected = min(stay_days - 4 / 24, spec.outcome.window_days)
        assert days == pytest.approx(expected, abs=1e-4), f"person {person}"
        assert label == float(stay_days - 4 / 24 <= spec.outcome.window_days)
        events += int(label)
    assert events > 0.9 * len(ds), "nearly every first stay of a finished history ends inside 30 days"


@pytest.mark.timeout(300)
def test_the_length_of_stay_study_runs_federated_end_to_end(prepared_site: Path, tmp_path: Path):
    """3 simulated sites, SecAgg+, 2 rounds: a C-index from the pooled DP releases in the model card."""
    out = tmp_path / "simulation"
    done = simulate_on_site(STUDY, prepared_site, out, 3, 2)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = out / "studies" / "inpatient-length-of-stay" / "simulation"
    receipts = read_receipts(run / "receipts.jsonl")
    trained = [r for r in receipts if r.phase == "train"]
    assert len(trained) == 2 and all(s.status == Participation.TRAINED for r in trained for s in r.sites)
    card = json.loads((run / "model-card.json").read_text())
    assert card["run"]["status"] == "completed" and card["model"]["kind"] == "discrete_time_survival"
    assert "time to discharge" in (run / "model-card.html").read_text(encoding="utf-8")
    c_index = card["metrics"]["held_out_c_index"]
    assert c_index is not None and 0 <= c_index <= 1
