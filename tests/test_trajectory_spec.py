"""The trajectory kind's spec (the patient twin's model section): what a consortium can write, and the
refusals that name the rule, for the two settings the kind must serve (an inpatient ward at 4-hour steps,
an oncology follow-up at daily steps)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from federation.contract import StudySpec
from federation.contract.twin_specs import INTERVALS, TRAJECTORY, TrajectorySpec

GLUCOSE = {"name": "glucose", "concept_ids": [3004501], "normal_range": [70, 180], "unit": "mg/dL"}
CREATININE = {"name": "creatinine", "concept_ids": [3016723], "transform": "log", "normal_range": [0.6, 1.3]}
INSULIN = {"name": "insulin", "domain": "drug", "concept_ids": [1550023], "dose": True}


def test_a_ward_twin_and_an_oncology_twin_are_both_one_spec():
    ward = TrajectorySpec(signals=[GLUCOSE, CREATININE], treatments=[INSULIN], step_hours=4, history_steps=6,
                          horizon_steps=12)  # fmt: skip
    assert ward.targets == TRAJECTORY and ward.history_hours == 24 and ward.horizon_hours == 48
    oncology = TrajectorySpec(
        signals=[{"name": "tumour_volume", "concept_ids": [36768255], "transform": "log", "normal_range": [1, 50]}],
        treatments=[{"name": "chemotherapy", "domain": "procedure", "concept_ids": [4273629]}],
        step_hours=24,
        history_steps=30,
        horizon_steps=28,
    )
    assert oncology.horizon_hours == 28 * 24 and oncology.adjustment == "per_step_inverse_propensity"
    # the defaults carry the median and both intervals' ends
    assert {0.5, *(q for pair in INTERVALS.values() for q in pair)} <= set(ward.quantiles)


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"treatments": [{**INSULIN, "name": "glucose"}]}, "glucose repeated"),
        ({"quantiles": [0.1, 0.5, 0.9]}, "0.025/0.975 missing"),
        ({"quantiles": [0.025, 0.1, 0.9, 0.975, 0.6]}, "strictly increasing"),
        ({"quantiles": [0.025, 0.1, 0.4, 0.9, 0.975]}, "include 0.5"),
        ({"signals": [{"name": "Glucose!", "concept_ids": [1], "normal_range": [1, 2]}]}, "should match pattern"),
        ({"signals": [{**GLUCOSE, "normal_range": [180, 70]}]}, "low < high"),
        ({"signals": [{**CREATININE, "normal_range": [0, 1.3]}]}, "above 0"),
        ({"signals": []}, "at least 1 item"),
        ({"horizon_steps": 500}, "less than or equal to 168"),
        ({"conformal_fraction": 0.8}, "less than or equal to 0.5"),
        ({"unknown": 1}, "unknown"),
    ],
)
def test_a_spec_that_breaks_a_rule_is_refused_naming_it(change, says):
    with pytest.raises(ValidationError, match=says):
        TrajectorySpec.model_validate({"signals": [GLUCOSE], **change})


def test_the_example_patient_twin_study_reads_and_says_what_it_computes():
    from pathlib import Path

    from federation.contract import load_study
    from federation.twins import kind_of

    spec = load_study(Path(__file__).resolve().parents[1] / "configs" / "study-patient-twin-example.yaml")
    assert isinstance(spec.model, TrajectorySpec) and spec.model.history_hours == spec.model.horizon_hours == 24
    words = kind_of(spec.model).describe(spec.model, spec.evaluation)
    assert "glucose, creatinine, potassium, lactate, heart_rate, sbp every 4 h" in words
    assert "insulin (dose)" in words and "inverse-propensity" in words and "20% of its training patients" in words
    with pytest.raises(ValidationError, match="time_to_event"):  # the event is yes/no: not a survival outcome
        StudySpec.model_validate({**spec.model_dump(mode="json"),
                                  "outcome": {"kind": "time_to_event", "prediction_hours": 24, "window_days": 30}})
