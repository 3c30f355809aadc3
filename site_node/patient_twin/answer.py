"""What the patient twin answers (`twinfed twin patient` shows and writes it; it stays at the site): the
patient's recorded history, and per plan (the factual one and each scenario) every signal's forecast with
its intervals, the event's risk and the change from the factual forecast.

Pydantic models only, apart from the query: the plotting process reads an answer back without importing
the database and cohort machinery (site_node.patient_twin.report).
"""

from __future__ import annotations

import datetime as dt

from pydantic import BaseModel, ConfigDict


class SignalForecast(BaseModel):
    """One signal: what was recorded in the history, and the forecast per step ahead (own unit)."""

    model_config = ConfigDict(extra="forbid")

    signal: str
    unit: str
    history_hours: list[float]  # hours relative to the decision time (negative: before it)
    history: list[float | None]  # the step's mean value, None where not measured
    last_measured_hours_ago: float | None  # None: not measured in the history
    ahead_hours: list[float]  # the end of each step ahead
    median: list[float]
    interval_80: list[tuple[float, float]]
    interval_95: list[tuple[float, float]]


class ScenarioForecast(BaseModel):
    model_config = ConfigDict(extra="forbid")

    scenario: str
    description: str
    planned: dict[str, list[float]]  # per treatment, per step ahead, in its own unit (dose) or 0/1
    signals: list[SignalForecast]
    event_risk: float
    median_change: dict[str, list[float]]  # scenario minus factual median, per signal and step ahead
    # Sentences, one per treatment whose first step ahead this plan sets against the hospitals' practice (see
    # TwinAnswer.practice): the forecast under it is an extrapolation.
    outside_practice: list[str] = []


class TwinAnswer(BaseModel):
    """What `twinfed twin patient` shows and writes (it stays at the site)."""

    model_config = ConfigDict(extra="forbid")

    study_id: str
    study_hash: str
    model_source: str
    person_key: str  # a keyed hash of the hospital's id: the same patient, the same key; never the id
    decision_time: dt.datetime
    decision_hours_after_index: float
    event: str
    # Per treatment, the probability that the hospitals' practice gives it in the first step ahead to a patient
    # in this state, as the model learned it (its propensity head, that of the inverse-propensity weights),
    # and the same averaged over this site's calibration patients. A plan whose choice the practice makes for
    # under 1% of patients in this state, or 10 times (WEIGHT_RANGE's bound) fewer than on average, is outside
    # what the data show: the positivity every observational effect estimate needs fails there, and the twin
    # says so.
    practice: dict[str, float]
    practice_overall: dict[str, float]
    factual: ScenarioForecast
    scenarios: list[ScenarioForecast]
