"""The hospital twin asks the consortium's length-of-stay model about the patients in the beds (issue 13:
length of stay learnt across hospitals, each hospital's own adjustment kept at the site).

The model here is made by hand (a linear hazard of discharge that falls with age: older patients stay
longer), so what the twin does with it can be checked without training one: a patient the model expects
to stay longer than the hospital's usual patient gets a factor above 1 on their remaining stay, and that
factor multiplies the remaining stay the replication draws, nothing else.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from federation.contract import load_study
from federation.contract.hashing import study_hash
from federation.twins import build_model
from site_node.cohort import build_dataset, feature_names
from site_node.cohort.omop_source import OmopSource
from site_node.cohort.visit_features import visit_features
from site_node.config import load_site_config
from site_node.governance import Governance
from site_node.hospital_twin.case_mix import expected_remaining, occupant_factors
from site_node.hospital_twin.config import HospitalConfig
from site_node.hospital_twin.history import DAY_S, read_ward_stays
from site_node.hospital_twin.service import run_hospital_twin
from site_node.hospital_twin.twin import HospitalTwinError, learn, replication_model
from tests.site_helpers import ROOT, fresh_site
from tests.test_hospital_twin import HOSPITAL

STUDY = ROOT / "configs" / "study-length-of-stay.yaml"


def test_the_expected_remaining_stay_of_a_constant_hazard_does_not_depend_on_the_time_in():
    edges = np.array([1.0, 2.0, 5.0, 10.0, 30.0])
    rate = 0.2  # per day
    curves = np.exp(-rate * edges)[None, :].repeat(3, axis=0)
    elapsed = np.array([0.0, 4.0, 12.5])
    expected = (1 - np.exp(-rate * (30.0 - elapsed))) / rate  # restricted to the grid's 30 days
    np.testing.assert_allclose(expected_remaining(curves, edges, elapsed), expected, rtol=2e-3)


def _first_stays(url: str, person_ids: np.ndarray) -> list[int]:
    from sqlalchemy import create_engine, text

    with create_engine(url).connect() as connection:
        rows = connection.execute(
            text("SELECT person_id, visit_occurrence_id FROM visit_occurrence WHERE visit_concept_id = 9201 "
                 "ORDER BY person_id, visit_start_datetime, visit_occurrence_id")
        ).all()  # fmt: skip
    first: dict[int, int] = {}
    for person, visit in rows:
        first.setdefault(int(person), int(visit))
    return [first[int(p)] for p in person_ids]


def test_a_visits_features_are_the_studys_row_for_that_visit(prepared_site):
    config = load_site_config(prepared_site / "site.yaml")
    spec = load_study(STUDY)
    ds = build_dataset(config.omop.url, spec, split_key=config.split_key())
    visits = _first_stays(config.omop.url, ds.person_ids[:60])
    rows = visit_features(config.omop.url, spec, visits)
    ids, features = rows.visit_ids, rows.features
    assert sorted(ids.tolist()) == sorted(visits) and features.shape == (60, len(feature_names(spec)))
    order = {v: i for i, v in enumerate(ids.tolist())}
    np.testing.assert_allclose(features[[order[v] for v in visits]], ds.features[:60], atol=1e-6)


def _older_stay_longer(spec) -> dict[str, torch.Tensor]:
    """A linear hazard of discharge: about a third a day at age 0, falling steeply with age."""
    names = feature_names(spec)
    model = build_model(spec.model, len(names))
    state = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    weight = sorted(k for k in state if k.endswith("weight"))[-1]
    bias = sorted(k for k in state if k.endswith("bias"))[-1]
    state[bias][:] = -0.5
    state[weight][:, names.index("age")] = -3.0  # age enters as years / 100
    return state


@pytest.fixture(scope="module")
def history_at(prepared_site):
    """The site's history and the past midnight (a month or more before the data's end) with most patients in
    beds."""
    config = load_site_config(prepared_site / "site.yaml")
    with OmopSource.open(config.omop.url) as source:
        history = read_ward_stays(source, HospitalConfig.model_validate(HOSPITAL))
    last = int(history.data_end_s // DAY_S) - 30
    at = max((day * DAY_S for day in range(last - 365, last)), key=lambda s: len(history.occupants(s)))
    return config, history, at, history.as_of(at).occupants(at)


def test_an_occupant_the_model_expects_to_stay_longer_gets_a_larger_factor(history_at):
    config, _, at, running = history_at
    spec = load_study(STUDY)
    with OmopSource.open(config.omop.url) as source:
        result = occupant_factors(source, config.omop.url, None, spec, _older_stay_longer(spec),
                                  [int(v) for v in running.visit], at)  # fmt: skip
    assert result.factors and "read against" in result.note
    rows = visit_features(config.omop.url, spec, list(result.factors))
    ids, features = rows.visit_ids, rows.features
    age = features[:, feature_names(spec).index("age")]
    factors = np.array([result.factors[int(v)] for v in ids])
    assert all(0.25 <= f <= 4.0 for f in factors)
    assert len(factors) >= 5 and np.ptp(age) > 0
    order_age, order_factor = np.argsort(np.argsort(age)), np.argsort(np.argsort(factors))
    assert np.corrcoef(order_age, order_factor)[0, 1] > 0.5, "older patients (expected to stay longer) get more"


def test_the_factor_multiplies_the_occupants_remaining_stay_and_nothing_else(history_at):
    _, history, at, running = history_at
    config = HospitalConfig.model_validate(HOSPITAL)
    plain = learn(history, config, at)
    doubled = learn(history, config, at, stay_factors={int(v): 2.0 for v in running.visit})
    assert doubled.occupant_factors == (2.0,) * len(plain.occupants)
    a, b = replication_model(plain, 10, seed=3), replication_model(doubled, 10, seed=3)
    np.testing.assert_allclose([o.remaining_hours for o in b.occupants], [2 * o.remaining_hours for o in a.occupants])
    def arrivals(m):
        return [(s.name, s.ward, s.rate_per_hour, s.run_rates) for s in m.arrivals]

    assert arrivals(a) == arrivals(b) and [(t.source, t.target, t.probability) for t in a.transfers] == [
        (t.source, t.target, t.probability) for t in b.transfers
    ]


def test_the_site_runs_its_twin_with_the_approved_length_of_stay_study(prepared_site, tmp_path, history_at):
    _, _, at, _ = history_at
    site_file = fresh_site(prepared_site, tmp_path / "site")
    spec = load_study(STUDY)
    weights = tmp_path / "site" / "final-model.pt"
    torch.save(_older_stay_longer(spec), weights)
    hospital = {**HOSPITAL, "length_of_stay": {"study": str(STUDY), "model": "final-model.pt"}}
    site_file.write_text(yaml.safe_dump({**yaml.safe_load(site_file.read_text()), "hospital": hospital}))
    config = load_site_config(site_file)
    governance = Governance.of_site(config)
    start = (np.datetime64(int(at), "s")).astype("datetime64[D]").item()
    with pytest.raises(HospitalTwinError, match="not approved at"):
        run_hospital_twin(config, governance, days=3, runs=5, start=start)
    governance.approvals.approve(study_hash(spec), spec.study.id, "test steward")
    report = run_hospital_twin(config, governance, days=3, runs=5, start=start, by="bed manager")
    assert any("length of stay by case mix" in note for note in report.notes)
    entry = [e for e in governance.audit.entries() if e.kind == "hospital-twin-run"][-1]
    assert entry.payload["length_of_stay_study"] == STUDY.name
    governance.close()
    assert at % DAY_S == 0
