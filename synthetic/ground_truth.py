"""The ground-truth file of a synthetic site: what no real hospital could ever write down.

It lists every injected defect (file, line, record id, rule), every patient's consent history, each
stay's true outcome probabilities and realized outcomes, the realized missingness per measurement, the
Bayes-optimal AUROC of each outcome and the C-index of the true risk for time to death, so benchmarks
can say how close a federated twin gets to the best any model could do on these data.

Information sets: in-hospital death and length of stay > 7 days are predicted 24 hours after
admission (stays that ended before then are excluded); 30-day readmission is predicted at discharge
for patients discharged alive before the export date. Time to death within 90 days is ranked at 24
hours of each patient's first stay alive then, by the true probability of dying in that stay (the
generator's deaths all happen in hospital; a death in a later stay within the 90 days counts as the
event too, which no information at 24 hours could rank): censored at the export date.

Counterfactuals (counterfactuals.py): a seeded sample of stays alive at 24 hours, re-simulated from then
under standard treatment scenarios with common random numbers; and how strongly the factual drug
assignment is confounded by the patient's state. Older files without these fields still load.

Operations (operations.py, sites whose profile has an `operations` block): the true arrival intensities, lengths of
stay by ward and admission kind, every stay's waits for a bed, and the effect of standard capacity scenarios
re-simulated with common random numbers. Absent (not even null) for the other sites.
"""

from __future__ import annotations

import datetime as dt

import numpy as np
from pydantic import BaseModel, Field, SerializerFunctionWrapHandler, model_serializer

from synthetic.defects import DefectRecord


def expected_auroc(probabilities: np.ndarray) -> float:
    """The AUROC a perfect-knowledge model achieves in expectation when Y ~ Bernoulli(p).

    E[AUC] = sum_{i != j} p_i (1 - p_j) [p_i > p_j] / sum_{i != j} p_i (1 - p_j), ties counted half.
    Computed in O(n log n) by sorting.
    """
    p = np.asarray(probabilities, dtype=float)
    p = p[np.isfinite(p)]
    if p.size < 2:
        return float("nan")
    values, inverse = np.unique(p, return_inverse=True)
    negative_mass = np.bincount(inverse, weights=1.0 - p, minlength=values.size)
    below = np.concatenate(([0.0], np.cumsum(negative_mass)[:-1]))  # sum of (1-p_j) with p_j < value
    same = negative_mass[inverse] - (1.0 - p)  # ties, excluding the element itself
    numerator = float(np.sum(p * (below[inverse] + 0.5 * same)))
    denominator = float(p.sum() * (1.0 - p).sum() - np.sum(p * (1.0 - p)))
    return numerator / denominator if denominator > 0 else float("nan")


def realized_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """AUROC of scores against observed 0/1 labels (Mann-Whitney, ties counted half)."""
    scores = np.asarray(scores, dtype=float)
    labels = np.asarray(labels, dtype=bool)
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(scores.size)
    sorted_scores = scores[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    average = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(average, counts)
    return float((ranks[labels].sum() - positives * (positives + 1) / 2.0) / (positives * negatives))


def realized_c_index(risk: np.ndarray, time: np.ndarray, event: np.ndarray) -> float:
    """Harrell's C of `risk` against right-censored times: over the pairs where the earlier time is an event
    (a censored time equal to an event time counts as the later one), the share in which the earlier one has
    the higher risk, ties in risk counted half. Sorted by risk, so O(n log n) per distinct time."""
    risk = np.asarray(risk, dtype=float)
    time = np.asarray(time, dtype=float)
    event = np.asarray(event, dtype=bool)
    keep = np.isfinite(risk) & np.isfinite(time)
    risk, time, event = risk[keep], time[keep], event[keep]
    concordant = comparable = 0.0
    for t in np.unique(time[event]):
        cases = risk[event & (time == t)]
        later = np.sort(risk[(time > t) | (~event & (time == t))])
        if later.size == 0:
            continue
        below = np.searchsorted(later, cases, side="left")
        tied = np.searchsorted(later, cases, side="right") - below
        concordant += float(np.sum(below + 0.5 * tied))
        comparable += float(cases.size * later.size)
    return concordant / comparable if comparable else float("nan")


class SurvivalTruth(BaseModel):
    """How well time to an event can be ranked at best: the generator's true probability of the event by
    the horizon is the ranking only perfect knowledge of each patient's state gives."""

    information_set: str
    evaluable_stays: int
    events: int
    horizon_days: float
    bayes_optimal_c_index: float = Field(
        description="Harrell's C of the true probability of the event by the horizon on these times"
    )


class OutcomeTruth(BaseModel):
    """How often an outcome happened and how well it can be predicted at best."""

    information_set: str
    evaluable_stays: int
    events: int
    observed_rate: float
    mean_true_probability: float
    bayes_optimal_auroc: float = Field(description="expected AUROC of the true probabilities")
    realized_auroc_of_true_probability: float = Field(description="AUROC of the true probabilities on these labels")

    @classmethod
    def from_arrays(cls, information_set: str, probability: np.ndarray, label: np.ndarray) -> OutcomeTruth:
        return cls(
            information_set=information_set,
            evaluable_stays=int(probability.size),
            events=int(np.sum(label)),
            observed_rate=float(np.mean(label)) if label.size else float("nan"),
            mean_true_probability=float(np.mean(probability)) if probability.size else float("nan"),
            bayes_optimal_auroc=expected_auroc(probability),
            realized_auroc_of_true_probability=realized_auroc(probability, label),
        )


class StayTruth(BaseModel):
    encounter_id: str
    patient_id: str
    reason: str
    admitted: str
    is_readmission: bool
    age: float
    frailty: float
    initial_severity: float
    treatment_start_hours: float | None
    censored: bool = Field(description="still in hospital at the export date: no outcome in the export")
    alive_at_prediction_time: bool
    p_in_hospital_death: float | None
    p_los_over_7_days: float | None
    p_readmission_30d: float | None
    died_in_hospital: bool | None
    length_of_stay_hours: int | None
    readmitted_within_30d: bool | None


class PatientTruth(BaseModel):
    patient_id: str
    birth_date: dt.date
    female: bool
    frailty: float
    conditions: list[str]
    deceased: bool
    died_in_hospital: bool
    consent: str = Field(description="none | permit | opt_out | withdrawn")
    denies_research_from: str | None


class MissingnessTruth(BaseModel):
    scheduled: int
    recorded: int
    missing_rate: float


class DefectSummary(BaseModel):
    total: int
    records_written: int
    rate_per_record: float
    by_kind: dict[str, int]
    by_resource_type: dict[str, int]
    records: list[DefectRecord]


class ConsentSummary(BaseModel):
    patients: int
    denying_research: int
    denying_rate: float
    withdrawn_later: int
    explicit_permit: int


class Dose(BaseModel):
    """One dose a scenario's course received (hour after admission, drug as in the export, dose in its unit)."""

    hour: int
    drug: str
    dose: float


class ScenarioTrajectory(BaseModel):
    """One sampled stay's course under one scenario, over the horizon after the decision hour.

    Values are the noise-free (latent) values the ward would have measured with noise, in canonical units;
    `signals[name][i]` is the value at hour `decision_hour + i` after admission, None once the stay has ended.
    """

    resimulated_from_hour: int = Field(description="the scenario's course is re-simulated from this hour")
    disease_treatment_start_hours: float | None = Field(
        description="hour of the first dose of the disease-specific treatment under the scenario"
    )
    signals: dict[str, list[float | None]]
    doses: list[Dose] = Field(description="doses given in [decision_hour, decision_hour + horizon_hours)")
    norepinephrine_hours: list[int] = Field(description="hours of that window with norepinephrine running")
    in_hospital_at_decision: bool
    end_hour: int | None = Field(description="when the stay ended within the window; None: in hospital at its end")
    died: bool = Field(description="died in hospital by the end of the window (common random numbers)")
    p_in_hospital_death: float = Field(description="P(in-hospital death) given the scenario's state at the decision")
    p_los_over_7_days: float
    fresh_draws: int = Field(
        description="random numbers this course needed that the factual course never drew (0: fully common)"
    )


class CounterfactualStay(BaseModel):
    """A sampled stay re-simulated from the decision hour under each scenario that applies to it."""

    encounter_id: str
    patient_id: str
    reason: str
    decision_hour: int
    horizon_hours: int
    scenarios: dict[str, ScenarioTrajectory]


class CounterfactualDesign(BaseModel):
    """How the counterfactual sample was drawn and re-simulated: the rules behind `counterfactuals`."""

    requested_stays: int
    sampled_stays: int
    eligible_stays: int = Field(description="stays alive in hospital at the decision hour, decision before export")
    decision_hour: int
    horizon_hours: int
    sample_rule: str
    common_random_numbers: str
    outcome_probability: str
    monte_carlo_replicates: int
    scenarios: dict[str, str] = Field(description="scenario -> its exact definition")
    signals: dict[str, str] = Field(description="signal -> unit")


class TreatmentConfounding(BaseModel):
    """How much sicker the stays that got a drug were, at the decision hour, than those that did not."""

    treated: int
    untreated: int
    mean_treated: dict[str, float]
    mean_untreated: dict[str, float]
    standardized_difference: dict[str, float] = Field(description="(mean treated - mean untreated) / pooled SD")
    odds_ratio_per_sd: dict[str, float | None] = Field(
        description="odds ratio of treatment per SD of the covariate (univariate logistic regression)"
    )


class ConfoundingTruth(BaseModel):
    """The strength of confounding by indication in the factual data, measured on the latent state."""

    population: str
    treated_definition: str
    covariates: dict[str, str]
    stays: int
    by_drug: dict[str, TreatmentConfounding]


class SiteGroundTruth(BaseModel):
    """The whole ground-truth file of one site."""

    site_id: str
    site_name: str
    seed: int
    export_date: dt.date
    history_start: dt.date
    prediction_hour: int
    profile: dict
    export_files: dict[str, int]
    outcomes: dict[str, OutcomeTruth]
    survival: dict[str, SurvivalTruth] = {}
    missingness: dict[str, MissingnessTruth]
    consent: ConsentSummary
    defects: DefectSummary
    patients: list[PatientTruth]
    stays: list[StayTruth]
    counterfactual_design: CounterfactualDesign | None = None
    counterfactuals: list[CounterfactualStay] = []
    confounding: ConfoundingTruth | None = None
    operations: OperationsTruth | None = None  # sites with an operations profile block only

    @model_serializer(mode="wrap")
    def _omit_absent_operations(self, handler: SerializerFunctionWrapHandler) -> dict:
        """A site without operations writes (and round-trips to) the file it wrote before the field existed."""
        data = handler(self)
        if isinstance(data, dict) and data.get("operations") is None:
            data.pop("operations", None)
        return data


class OperationsWardTruth(BaseModel):
    beds: int
    staffed_by_hour: list[int] = Field(description="staffed beds in each hour of the day, 0 h first")


class ArrivalStreamTruth(BaseModel):
    """The true arrival intensity of one stream (emergency or elective first admissions, or readmissions)."""

    arrivals: int = Field(description="admissions of the stream in the history")
    mean_per_hour: float
    expected_arrivals: float | None = None
    per_hour_first: str | None = Field(None, description="local time of per_hour[0]")
    per_hour: list[float] | None = Field(None, description="expected arrivals in each hour of the history")
    hour_of_week: list[float] | None = Field(None, description="168 relative factors, Monday 00 h first")
    hour_of_day_share: list[float] | None = Field(None, description="share of the stream's arrivals by hour of day")
    day_factor_first_date: str | None = None
    day_factor: list[float] | None = Field(None, description="relative factor of each day (season x surges)")
    definition: str


class SurgeTruth(BaseModel):
    start: str
    days: int
    factor: float


class LengthOfStayTruth(BaseModel):
    """Time in one ward's bed by ward and admission kind (hours): realized and as the clinical course wanted."""

    ward: str
    kind: str
    stays: int
    realized_hours: dict[str, float] = Field(description="mean and quantiles q10..q90, blocking and discharge waits in")
    desired_hours: dict[str, float] = Field(description="the clinical course's own time there")


class EffectTruth(BaseModel):
    baseline: float
    scenario: float
    effect: float = Field(description="scenario minus baseline")
    standard_error: float | None = None
    ci95: list[float] | None = None


class ExpectedEffectTruth(BaseModel):
    replicates: int
    metrics: dict[str, EffectTruth]


class ScenarioEffectTruth(BaseModel):
    """A standard scenario's effect over the window: on the factual patients, and in expectation over replicates."""

    definition: str
    factual: dict[str, EffectTruth] = Field(description="the same patients as the export, scenario vs history")
    expected: ExpectedEffectTruth


class StayOperationsTruth(BaseModel):
    """One exported stay's passage through the beds (waits the export shows only as longer segments, or not)."""

    encounter_id: str
    kind: str = Field(description="emergency | elective")
    arrival: str = Field(description="ED arrival (emergency) or planned admission (elective)")
    first_bed_request: str | None
    first_bed: str | None
    boarding_hours: float = Field(description="waited for the first bed (electives: postponed)")
    blocked_hours: float = Field(description="waited in a bed for a transfer")
    discharge_wait_hours: float = Field(description="ready to leave until discharge (the discharge window)")


class OperationsTruth(BaseModel):
    """The operational ground truth of a site with an `operations` profile block (synthetic/operations.py)."""

    design: dict[str, str]
    wards: dict[str, OperationsWardTruth]
    arrivals: dict[str, ArrivalStreamTruth]
    surges: list[SurgeTruth]
    length_of_stay: list[LengthOfStayTruth]
    transfers: dict[str, dict[str, float]] = Field(description="P(next | location) over the clinical paths")
    summary: dict[str, float]
    dropped_stays: list[dict[str, str | int]] = Field(
        description="stays the timeline drew that begin after the export once earlier stays are delayed"
    )
    window_start: str
    window_end: str
    baseline_window: dict[str, float]
    scenarios: dict[str, ScenarioEffectTruth]
    stays: list[StayOperationsTruth]


SiteGroundTruth.model_rebuild()
