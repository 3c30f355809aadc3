"""Every outcome kind on the hand-made database of tests/test_cohort_definitions.py, labels worked out by hand.

The visit-level cohort is each patient's first inpatient stay (prediction time: admission + 24 h):
  1  V101, admitted 2022-03-01 08:00, prediction 2022-03-02 08:00
  2  V201, admitted 2023-01-10 08:00, prediction 2023-01-11 08:00
  5  V501, admitted 2023-04-10 08:00, prediction 2023-04-11 08:00
  6  V601, admitted 2023-08-01 12:00, prediction 2023-08-02 12:00
Prognostic windows are (prediction time, + window_days]; a diagnostic window is [index + start, index + end).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime

import numpy as np
import pytest

from federation.contract import StudyError, parse_study
from federation.contract.spec import (
    CohortSpec,
    CovariateSpec,
    DiscreteTimeSurvivalSpec,
    IndexEvent,
    IndexSpec,
    LogisticRegressionSpec,
    OutcomeKind,
    OutcomeSpec,
    PrivacySpec,
    StudyInfo,
    StudySpec,
    ValueCovariate,
    ValueRange,
    Window,
)
from tests.test_cohort_definitions import (
    BACKENDS,
    CREATININE,
    DIABETES,
    EMERGENCY,
    HEART_FAILURE,
    INPATIENT,
    VENTILATION,
    WARFARIN,
    build,
    definition_rows,
    definitions_database,
    sqlite_copy,
)

DAY = 86400.0


@pytest.fixture(scope="module", params=BACKENDS)
def definitions_db(request, tmp_path_factory) -> Iterator[tuple[str, str | None]]:
    """The database of tests/test_cohort_definitions.py, on SQLite and on PostgreSQL (read only)."""
    yield from definitions_database(request, tmp_path_factory)


PREDICTION = {
    1: datetime(2022, 3, 2, 8),
    2: datetime(2023, 1, 11, 8),
    5: datetime(2023, 4, 11, 8),
    6: datetime(2023, 8, 2, 12),
}


def study(outcome: OutcomeSpec, cohort: CohortSpec | None = None, covariates: CovariateSpec | None = None) -> StudySpec:
    survival = outcome.kind == OutcomeKind.TIME_TO_EVENT
    return StudySpec(
        study=StudyInfo(id="outcomes", title="hand-made outcomes"),
        cohort=cohort or CohortSpec(visit_concept_ids=[INPATIENT], min_age=18),
        covariates=covariates or CovariateSpec(demographics=["age"]),
        outcome=outcome,
        model=DiscreteTimeSurvivalSpec(interval_days=[30, 90]) if survival else LogisticRegressionSpec(),
        privacy=PrivacySpec(target_epsilon=3.0),
    )


def labels(db, outcome: OutcomeSpec, **options) -> dict[int, float]:
    ds = build(db, study(outcome, **options))
    return dict(zip(ds.person_ids.tolist(), ds.labels.tolist(), strict=True))


def test_the_cohort_of_first_stays(definitions_db):
    ds = build(definitions_db, study(OutcomeSpec(kind=OutcomeKind.DEATH, window_days=30)))
    assert ds.person_ids.tolist() == [1, 2, 5, 6]


def test_a_procedure_outcome_counts_after_the_prediction_time_up_to_the_window_end(definitions_db):
    outcome = OutcomeSpec(kind=OutcomeKind.PROCEDURE, concept_ids=[VENTILATION], window_days=7)
    # 1: exactly at the prediction time (a feature, not the outcome); 2: exactly 7 days after (in);
    # 5: 7 days and 1 s after (out); 6: 22 h after
    assert labels(definitions_db, outcome) == {1: 0, 2: 1, 5: 0, 6: 1}


def test_a_drug_outcome(definitions_db):
    outcome = OutcomeSpec(kind=OutcomeKind.DRUG, concept_ids=[WARFARIN], window_days=30)
    # only 5 is given warfarin after a prediction time (2023-05-01, 19 days 16 h after); 1's were before
    assert labels(definitions_db, outcome) == {1: 0, 2: 0, 5: 1, 6: 0}


def test_a_visit_outcome_is_a_visit_of_the_kinds_and_never_the_index_visit(definitions_db):
    emergency = OutcomeSpec(kind=OutcomeKind.VISIT, concept_ids=[EMERGENCY], window_days=30)
    assert labels(definitions_db, emergency) == {1: 0, 2: 0, 5: 0, 6: 1}  # 6's emergency visit on 08-20
    inpatient = OutcomeSpec(kind=OutcomeKind.VISIT, concept_ids=[INPATIENT], window_days=60)
    assert labels(definitions_db, inpatient) == {1: 0, 2: 0, 5: 1, 6: 0}  # V502, 51 days after 5's prediction
    # a diagnostic window over the admission holds each example's own stay, which does not count
    same_day = OutcomeSpec(
        kind=OutcomeKind.VISIT, concept_ids=[INPATIENT], timing="diagnostic", window=Window(start_hours=0, end_hours=24)
    )
    assert labels(definitions_db, same_day) == {1: 0, 2: 0, 5: 0, 6: 0}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        # 1: 1.2; 2: 2.5 the day after the prediction time; 5: exactly 2.0 (the threshold is in);
        # 6: 3.0 one hour before the prediction time (a feature, not the outcome)
        (ValueRange(min=2.0), {1: 0, 2: 1, 5: 1, 6: 0}),
        (ValueRange(max=1.2), {1: 1, 2: 0, 5: 0, 6: 0}),
        (ValueRange(min=2.1, max=2.9), {1: 0, 2: 1, 5: 0, 6: 0}),
    ],
)
def test_a_measurement_crossing_a_threshold(definitions_db, value, expected):
    outcome = OutcomeSpec(kind=OutcomeKind.MEASUREMENT, concept_ids=[CREATININE], value=value, window_days=7)
    assert labels(definitions_db, outcome) == expected


def test_a_condition_outcome_of_a_person_level_cohort(definitions_db):
    cohort = CohortSpec(index=IndexSpec(event=IndexEvent.CONDITION, concept_ids=[HEART_FAILURE]), min_age=18)
    outcome = OutcomeSpec(kind=OutcomeKind.DRUG, concept_ids=[WARFARIN], window_days=3650)
    # 1's warfarin was before the heart failure; 2 never had any
    assert labels(definitions_db, outcome, cohort=cohort) == {1: 0, 2: 0}
    later = OutcomeSpec(kind=OutcomeKind.CONDITION, concept_ids=[HEART_FAILURE], window_days=730)
    assert labels(definitions_db, later, cohort=cohort) == {1: 1, 2: 0}  # 1's second record, 2023-06-01


def test_time_to_a_condition_censored_at_observation_end_and_at_death(definitions_db):
    outcome = OutcomeSpec(
        kind=OutcomeKind.TIME_TO_EVENT, event=OutcomeKind.CONDITION, concept_ids=[DIABETES], window_days=365
    )
    ds = build(definitions_db, study(outcome))
    assert ds.labels.tolist() == [0, 0, 1, 0]
    expected = [
        365.0,  # 1: no diabetes; observed beyond the window
        (datetime(2024, 1, 1) - PREDICTION[2]).total_seconds() / DAY,  # 2: diabetes before; observed to 2023-12-31
        (datetime(2023, 6, 15) - PREDICTION[5]).total_seconds() / DAY,  # 5: diabetes 2023-06-15 (date only)
        (datetime(2023, 10, 1, 12) - PREDICTION[6]).total_seconds() / DAY,  # 6: died first (censored at death)
    ]
    np.testing.assert_allclose(ds.event_days, expected, rtol=1e-6)
    assert expected[3] == 60.0  # 6's diabetes of 2023-11-01 came after her death: not an event


def test_time_to_death_of_a_person_level_cohort(definitions_db):
    cohort = CohortSpec(index=IndexSpec(event=IndexEvent.CONDITION, concept_ids=[HEART_FAILURE]), min_age=18)
    ds = build(definitions_db, study(OutcomeSpec(kind=OutcomeKind.TIME_TO_EVENT), cohort=cohort))
    assert ds.person_ids.tolist() == [1, 2] and ds.labels.tolist() == [1, 0]
    expected = [
        (datetime(2024, 1, 15, 12) - datetime(2022, 3, 2, 10)).total_seconds() / DAY,  # 1 died
        (datetime(2024, 1, 1) - datetime(2022, 6, 16)).total_seconds() / DAY,  # 2: censored at observation end
    ]
    np.testing.assert_allclose(ds.event_days, expected, rtol=1e-6)


def test_a_person_level_example_without_observation_is_censored_at_the_prediction_time(tmp_path):
    rows = definition_rows()
    rows.tables["observation_period"] = [r for r in rows.tables["observation_period"] if r["person_id"] != 2]
    db = sqlite_copy(tmp_path, rows)
    cohort = CohortSpec(index=IndexSpec(event=IndexEvent.CONDITION, concept_ids=[HEART_FAILURE]), min_age=18)
    ds = build(db, study(OutcomeSpec(kind=OutcomeKind.TIME_TO_EVENT, window_days=365), cohort=cohort))
    assert ds.person_ids.tolist() == [1, 2] and ds.event_days.tolist()[1] == 0.0 and ds.labels.tolist()[1] == 0


# --- diagnostic timing -------------------------------------------------------------------------------------


def _raw(outcome: dict, covariate_window: dict | None = None) -> dict:
    values = [
        {"name": "glucose", "concept_ids": [3004501], "window": covariate_window or {"start_hours": 0, "end_hours": 24}}
    ]
    return {
        "study": {"id": "x-study", "title": "x"},
        "cohort": {"index": {"event": "panel", "concept_ids": [3004501, 3004410]}},
        "covariates": {"demographics": ["age"], "values": values},
        "outcome": outcome,
        "privacy": {"target_epsilon": 3.0},
    }


DIAGNOSTIC = {
    "kind": "condition",
    "concept_ids": [201826],
    "timing": "diagnostic",
    "window": {"start_days": 0, "end_days": 1},
}


def test_a_diagnostic_outcome_may_overlap_the_covariates_and_a_prognostic_one_may_not():
    spec = parse_study(_raw(DIAGNOSTIC))
    assert spec.outcome.diagnostic and spec.outcome.prediction_hours == 0  # asked at the index
    assert spec.outcome.window == Window(start_hours=0, end_hours=24)
    prognostic = {"kind": "condition", "concept_ids": [201826], "prediction_hours": 0, "window_days": 1}
    with pytest.raises(StudyError, match=r"after the prediction time \(0.0 h\).*timing: diagnostic"):
        parse_study(_raw(prognostic))
    # a diagnostic study still may not look past its outcome window (that would be the follow-up)
    with pytest.raises(StudyError, match="after the diagnostic outcome's window ends"):
        parse_study(_raw(DIAGNOSTIC, {"start_hours": 0, "end_hours": 30}))


@pytest.mark.parametrize(
    ("outcome", "message"),
    [
        ({"kind": "condition", "concept_ids": [1], "timing": "diagnostic"}, "a diagnostic outcome needs window"),
        ({**DIAGNOSTIC, "window_days": 3}, "window_days counts after the prediction time"),
        ({"kind": "death", "timing": "diagnostic", "window": {"start_hours": 0, "end_hours": 1}}, "not 'death'"),
        (
            {"kind": "condition", "concept_ids": [1], "window_days": 3, "window": {"start_hours": 0, "end_hours": 1}},
            "window is the window of a diagnostic outcome",
        ),
        ({"kind": "measurement", "concept_ids": [1], "window_days": 3}, "needs value, the threshold it crosses"),
        ({"kind": "procedure", "window_days": 3}, "a 'procedure' outcome needs concept_ids"),
        ({"kind": "visit", "concept_ids": [9203]}, "a 'visit' outcome needs window_days"),
        ({"kind": "death", "window_days": 3, "concept_ids": [1]}, "concept_ids only apply to a condition, procedure"),
        (
            {"kind": "condition", "concept_ids": [1], "window_days": 3, "value": {"min": 1}},
            "applies to a 'measurement'",
        ),
        ({"kind": "condition", "concept_ids": [1], "window_days": 3, "event": "drug"}, "event names the event of a"),
        ({"kind": "time_to_event", "event": "long_stay"}, "a 'time_to_event' outcome's event is death"),
        ({"kind": "time_to_event", "event": "condition"}, "a 'condition' outcome needs concept_ids"),
    ],
)
def test_outcome_errors_name_the_field_and_the_rule(outcome, message):
    raw = _raw(outcome, {"start_hours": 0, "end_hours": 0})
    if outcome["kind"] == "time_to_event":
        raw["model"] = {"kind": "discrete_time_survival", "interval_days": [30]}
    with pytest.raises(StudyError, match=message):
        parse_study(raw)


def test_a_time_to_event_outcome_names_its_event_and_defaults_to_death():
    raw = _raw({"kind": "time_to_event", "window_days": 365}, {"start_hours": 0, "end_hours": 0})
    raw["model"] = {"kind": "discrete_time_survival", "interval_days": [30, 365]}
    assert parse_study(raw).outcome.event == OutcomeKind.DEATH
    raw["outcome"] = {"kind": "time_to_event", "event": "measurement", "concept_ids": [3016723], "value": {"min": 2}}
    outcome = parse_study(raw).outcome
    assert outcome.event_kind == OutcomeKind.MEASUREMENT and outcome.value == ValueRange(min=2)


def test_a_diagnostic_measurement_on_the_index_day(definitions_db):
    """Creatinine of 2.0 or more on the day of admission (a day from the admission time, [index, index + 24 h))."""
    outcome = OutcomeSpec(
        kind=OutcomeKind.MEASUREMENT,
        concept_ids=[CREATININE],
        value=ValueRange(min=2.0),
        timing="diagnostic",
        window=Window(start_hours=0, end_hours=24),
    )
    covariates = CovariateSpec(
        demographics=["age"],
        values=[
            ValueCovariate(name="creatinine", concept_ids=[CREATININE], window=Window(start_hours=0, end_hours=24))
        ],
    )
    # 6's 3.0 came 23 h after admission (in); 2's 2.5 came 47 h after (out); 5's 2.0 48 h after (out)
    assert labels(definitions_db, outcome, covariates=covariates) == {1: 0, 2: 0, 5: 0, 6: 1}


# --- length of stay: time to discharge --------------------------------------------------------------------


def _length_of_stay(window_days: float | None = None) -> OutcomeSpec:
    return OutcomeSpec(
        kind=OutcomeKind.TIME_TO_EVENT, event=OutcomeKind.DISCHARGE, prediction_hours=0, window_days=window_days
    )


def _stay_study(outcome: OutcomeSpec) -> StudySpec:
    spec = study(outcome.model_copy(update={"window_days": None}))
    return StudySpec.model_validate(
        {
            **spec.model_dump(),
            "outcome": outcome.model_dump(),
            "model": {"kind": "discrete_time_survival", "interval_days": [1, 2]},
        }
    )


def test_length_of_stay_is_the_time_to_the_index_visits_end(definitions_db):
    ds = build(definitions_db, _stay_study(_length_of_stay()))
    assert ds.person_ids.tolist() == [1, 2, 5, 6] and ds.labels.tolist() == [1, 1, 1, 1]
    np.testing.assert_allclose(ds.event_days, [3.0, 2.0, 4.0, 3.0], rtol=1e-6)  # V101, V201, V501, V601
    # a window shorter than a stay censors it at the window's end
    ds = build(definitions_db, _stay_study(_length_of_stay(window_days=2.5)))
    assert ds.labels.tolist() == [0, 1, 0, 0]
    np.testing.assert_allclose(ds.event_days, [2.5, 2.0, 2.5, 2.5], rtol=1e-6)


def test_a_stay_still_running_at_the_data_end_is_censored_there(tmp_path):
    rows = definition_rows()
    visits = rows.tables["visit_occurrence"]
    latest = max(v["visit_end_date"] for v in visits)
    open_stay = next(v for v in visits if v["person_id"] == 6 and v["visit_concept_id"] == INPATIENT)
    open_stay.update(visit_end_date=latest, visit_end_datetime=None)  # as the ETL writes an open encounter
    ds = build(sqlite_copy(tmp_path, rows), _stay_study(_length_of_stay()))
    assert ds.person_ids.tolist() == [1, 2, 5, 6] and ds.labels.tolist() == [1, 1, 1, 0]
    start = datetime(2023, 8, 1, 12)
    assert ds.event_days[3] == pytest.approx(
        (datetime.combine(latest, datetime.min.time()) - start).total_seconds() / DAY
    )


def test_a_length_of_stay_needs_a_visit_cohort_indexed_at_admission():
    outcome = {"kind": "time_to_event", "event": "discharge", "prediction_hours": 0}
    base = _raw(outcome, {"start_hours": -24, "end_hours": 0})
    base["model"] = {"kind": "discrete_time_survival", "interval_days": [1, 3, 7]}
    with pytest.raises(StudyError, match="about the index visit"):
        parse_study(base)  # a person-level cohort (a panel of measurements)
    base["cohort"] = {"visit_concept_ids": [9201], "index": "visit_end"}
    base["covariates"] = {"demographics": ["age"]}
    with pytest.raises(StudyError, match="counted from the visit's start"):
        parse_study(base)
    with pytest.raises(StudyError, match="'discharge' is the event of a time_to_event outcome"):
        parse_study({**base, "outcome": {"kind": "discharge"}})
    base["cohort"]["index"] = "visit_start"
    assert parse_study(base).outcome.summary() == "time to discharge after 0 h"
