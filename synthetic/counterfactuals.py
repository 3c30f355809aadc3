"""Counterfactual ground truth: sampled stays re-simulated from the decision time under standard scenarios.

A patient twin forecasts a patient's vitals and labs and answers "what if we start, stop or change this
drug". Real data never show the answer; here the generator can. For a seeded sample of stays alive in
hospital at the decision hour (24 h after admission, physiology.PREDICTION_HOUR), the same patient is
re-simulated from a saved copy of its state under each scenario of SCENARIOS, through the same
`inpatient.Ward.step` as the factual course, with common random numbers: every missingness draw,
measurement noise, course innovation, death and discharge draw is the one the factual stay received at
that hour for that purpose (taped while the factual batch ran). So the `factual` scenario reproduces the
factual course exactly (checked on every run) and any difference between scenarios is the treatment's
effect on this patient, not chance. Only where a scenario's course needs a draw the factual one never made
(it measured something the factual course did not) does it get a fresh one, and each trajectory says how
many it needed.

The sample: every stay gets a random priority from the plan's own seeded stream; the sample is the
`stays` stays with the lowest priority among those alive in hospital at the decision hour whose decision
hour falls before the export date, i.e. a uniform random sample of them. Stays are simulated in waves
(timeline.py), so the sample is kept as the running lowest priorities across waves; the draws are taped for
the lowest-priority eligible stays of each wave (a prefix far larger than the sample can lose to deaths in
the first day).

Nothing here reaches the FHIR export: the plan draws only from its own streams, never from the batch's
generators, and writes only to the ground-truth file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from synthetic.ground_truth import (
    ConfoundingTruth,
    CounterfactualDesign,
    CounterfactualStay,
    Dose,
    ScenarioTrajectory,
    TreatmentConfounding,
)
from synthetic.inpatient import (
    DRUG_EVENTS,
    DRUG_INDEX,
    TRAJECTORY_SIGNALS,
    Admissions,
    DrawTape,
    StayCohort,
    StayOutcomes,
    StayState,
    TapeReplay,
    TreatmentOverrides,
    Ward,
    WardRules,
    with_treatment_start,
)
from synthetic.physiology import PREDICTION_HOUR, CourseParams, outcome_probabilities

DECISION_HOUR = PREDICTION_HOUR
COUNTERFACTUAL_REPLICATES = 128
SIGNAL_UNITS = {
    "glucose": "mg/dL",
    "creatinine": "mg/dL",
    "heart_rate": "/min",
    "sbp": "mm[Hg]",
    "lactate": "mmol/L",
    "potassium": "mmol/L",
    "spo2": "%",
    "severity": "latent acute severity S (0 stable, ~1 a typical admission, > 2.5 critical)",
    "fluid_overload": "latent fluid overload F (0 none)",
}


@dataclass(frozen=True)
class Scenario:
    """One standard treatment scenario: which ward decisions it overrides, and from when."""

    name: str
    definition: str
    from_admission: bool = False
    withhold_insulin: bool = False
    scheduled_furosemide: bool = False
    withhold_norepinephrine: bool = False
    antibiotics_earlier_hours: float = 0.0

    def applies_to(self, treatment: str) -> bool:
        """Whether the scenario means anything for a stay whose disease-specific treatment is `treatment`."""
        return self.antibiotics_earlier_hours == 0 or treatment == "antibiotics"


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("factual", "no change: the ward's own rules, re-simulated from the decision hour"),
    Scenario(
        "insulin_withheld",
        "no insulin lispro from the decision hour on, whatever the measured glucose (doses given before it act on)",
        withhold_insulin=True,
    ),
    Scenario(
        "furosemide_started",
        "furosemide 40 mg at the decision hour and every 12 h after it while in hospital, whatever the fluid state "
        "and blood pressure, instead of the ward's furosemide rule; everything else by the ward's rules",
        scheduled_furosemide=True,
    ),
    Scenario(
        "norepinephrine_withheld",
        "no norepinephrine from the decision hour on: a running infusion stops at the decision hour, none starts",
        withhold_norepinephrine=True,
    ),
    Scenario(
        "antibiotic_6h_earlier",
        "only stays whose disease-specific treatment is antibiotics (sepsis, pneumonia): re-simulated from "
        "admission with the antibiotic course starting 6 h earlier than in the factual course (not before hour 0), "
        "everything else by the ward's rules",
        from_admission=True,
        antibiotics_earlier_hours=6.0,
    ),
)


@dataclass
class SampledStay:
    """A stay of the sample: where it lives, its saved states, its taped draws and its recorded factual course."""

    batch: int
    row: int
    priority: float
    cohort: StayCohort  # one row
    admission_state: StayState  # one row, before the first hour
    decision_state: StayState  # one row, at the start of the decision hour
    tape: np.ndarray  # (1, hours, draw keys)
    factual_course: dict[str, np.ndarray]  # signal -> (horizon,) noise-free values, NaN once the stay ended
    p_death: float  # the stay's true probabilities at the decision hour (as in the ground truth's stays)
    p_los_over_7_days: float

    @property
    def treatment(self) -> str:
        return str(self.cohort.treatment[0])


@dataclass
class ScenarioRun:
    """One scenario re-simulated for the sampled stays it applies to (row i is stays[i])."""

    scenario: Scenario
    stays: list[SampledStay]
    course: dict[str, np.ndarray]  # signal -> (stays, horizon)
    doses: list[list[Dose]]
    norepinephrine_hours: list[list[int]]
    treatment_start: np.ndarray
    severity_at_decision: np.ndarray
    stable_at_decision: np.ndarray
    alive_at_decision: np.ndarray
    params: CourseParams
    end_hour: np.ndarray
    died: np.ndarray
    fresh_draws: np.ndarray


@dataclass
class _DecisionRecord:
    """One batch's stays alive at the decision hour: their latent state then and the drugs they got after it."""

    severity: np.ndarray
    glucose: np.ndarray
    fluid: np.ndarray
    insulin: np.ndarray
    furosemide: np.ndarray


class _SharedRowDraws:
    """Monte-Carlo draws shared between the scenarios of one stay: output row i gets the draws of row source[i].

    Two scenarios in the same state then get the same probability exactly, and different states are compared
    on the same continuations, so the difference between them carries little Monte-Carlo noise.
    """

    def __init__(self, rng: np.random.Generator, unique: int, source: np.ndarray) -> None:
        self.rng = rng
        self.unique = unique
        self.source = source

    def random(self, size: tuple[int, ...]) -> np.ndarray:
        return self.rng.random((self.unique, *size[1:]))[self.source]

    def exponential(self, scale: float, size: tuple[int, ...]) -> np.ndarray:
        return self.rng.exponential(scale, (self.unique, *size[1:]))[self.source]

    def standard_normal(self, size: tuple[int, ...]) -> np.ndarray:
        return self.rng.standard_normal((self.unique, *size[1:]))[self.source]


class _BatchWatch:
    """Follows one factual batch: tapes the draws of its candidate stays, picks the sample at the decision hour,
    records the sampled stays' factual course over the horizon, and gathers the confounding covariates."""

    def __init__(self, plan: CounterfactualPlan, batch: int, ward: Ward, admissions: Admissions) -> None:
        self.plan = plan
        self.batch = batch
        self.ward = ward
        n = ward.n
        self.priority = plan.priority_rng.random(n)
        self.eligible = admissions.start + DECISION_HOUR * 3600.0 < plan.export_time
        candidates = np.flatnonzero(self.eligible & (self.priority < plan.threshold()))
        candidates = candidates[np.argsort(self.priority[candidates], kind="stable")][: plan.prefix]
        self.rows = np.sort(candidates) if plan.stays > 0 else np.zeros(0, dtype=np.int64)
        horizon = plan.horizon_hours
        self.tape = DrawTape(self.rows, n, DECISION_HOUR + horizon) if self.rows.size else None
        self.admission_state = ward.state.take(self.rows) if self.tape is not None else None
        self.chosen = np.zeros(0, dtype=np.int64)
        self.decision_state: StayState | None = None
        self.course: dict[str, np.ndarray] = {}
        self.alive_rows = np.zeros(0, dtype=np.int64)
        self.covariates: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def after_hour(self, ward: Ward, hour: int) -> None:
        if hour + 1 == DECISION_HOUR:
            self._decide(ward)
        elif DECISION_HOUR <= hour < DECISION_HOUR + self.plan.horizon_hours and self.chosen.size:
            in_hospital = ward.state.end_hour[self.chosen] > hour
            for signal in TRAJECTORY_SIGNALS:
                self.course[signal][:, hour - DECISION_HOUR] = np.where(
                    in_hospital, ward.values[signal][self.chosen], np.nan
                )

    def _decide(self, ward: Ward) -> None:
        st = ward.state
        self.alive_rows = np.flatnonzero(st.active)
        self.covariates = (st.s[self.alive_rows], st.glucose[self.alive_rows], st.fluid[self.alive_rows])
        alive = st.active & self.eligible
        self.plan.eligible_stays += int(alive.sum())
        if self.tape is None:
            return
        candidates = self.rows[alive[self.rows]]
        kept = np.array([stay.priority for stay in self.plan.sampled])
        combined = np.concatenate([kept, self.priority[candidates]])
        k = self.plan.stays
        threshold = np.partition(combined, k - 1)[k - 1] if combined.size >= k else np.inf
        outside = alive.copy()
        outside[self.rows] = False
        if (outside & (self.priority <= threshold)).any():
            raise RuntimeError(
                f"counterfactual sample: fewer than {k} of the {self.rows.size} taped stays of batch {self.batch} "
                "were alive at the decision hour, so the sample cannot be drawn by its rule"
            )
        self.chosen = candidates[self.priority[candidates] <= threshold]
        self.decision_state = st.take(self.chosen)
        self.course = {s: np.full((self.chosen.size, self.plan.horizon_hours), np.nan) for s in TRAJECTORY_SIGNALS}

    def finish(self, outcomes: StayOutcomes) -> None:
        if self.covariates is not None:
            drugs = outcomes.drugs
            window = (drugs["hour"] >= DECISION_HOUR) & (drugs["hour"] < DECISION_HOUR + self.plan.horizon_hours)
            given = {
                name: np.isin(self.alive_rows, drugs["stay"][window & (drugs["drug"] == DRUG_INDEX[name])])
                for name in ("insulin_lispro", "furosemide")
            }
            severity, glucose, fluid = self.covariates
            self.plan.decisions.append(
                _DecisionRecord(severity, glucose, fluid, given["insulin_lispro"], given["furosemide"])
            )
        if self.tape is None or self.decision_state is None or self.admission_state is None:
            return
        found = []
        for j, row in enumerate(self.chosen):
            slot = int(self.tape.slot[row])
            found.append(
                SampledStay(
                    batch=self.batch,
                    row=int(row),
                    priority=float(self.priority[row]),
                    cohort=self.ward.cohort.take(np.array([row])),
                    admission_state=self.admission_state.take(np.array([slot])),
                    decision_state=self.decision_state.take(np.array([j])),
                    tape=self.tape.values[[slot]],
                    factual_course={s: values[j].copy() for s, values in self.course.items()},
                    p_death=float(outcomes.p_death[row]),
                    p_los_over_7_days=float(outcomes.p_los_over_7_days[row]),
                )
            )
        self.plan.offer(found)


@dataclass
class CounterfactualPlan:
    """The counterfactual sample of one site: follows its factual batches, then re-simulates the sample.

    `stays` is the sample size (0: no counterfactuals, only the confounding summary); `horizon_hours` the
    length of the re-simulated window after the decision hour.
    """

    stays: int
    horizon_hours: int
    export_time: float
    seed: np.random.SeedSequence
    replicates: int = COUNTERFACTUAL_REPLICATES
    sampled: list[SampledStay] = field(default_factory=list)
    decisions: list[_DecisionRecord] = field(default_factory=list)
    eligible_stays: int = 0
    rules: WardRules | None = None
    _batches: int = 0

    def __post_init__(self) -> None:
        priority, self._fresh_seed, self._mc_seed = self.seed.spawn(3)
        self.priority_rng = np.random.default_rng(priority)
        # Taped stays per wave: more than half of them would have to die in the first day to leave fewer than
        # `stays` alive (the day's mortality is a few percent); _BatchWatch refuses if that ever happens.
        self.prefix = 2 * self.stays + 64

    # --- following the factual batches ------------------------------------------------------------------

    def watch(self, ward: Ward, admissions: Admissions) -> _BatchWatch:
        """Start following a batch that has just been admitted (inpatient.CounterfactualHook)."""
        self.rules = ward.rules
        watch = _BatchWatch(self, self._batches, ward, admissions)
        self._batches += 1
        return watch

    def threshold(self) -> float:
        """The priority a stay must beat to enter the sample (infinite while the sample is not full)."""
        return self.sampled[-1].priority if len(self.sampled) >= self.stays > 0 else np.inf

    def offer(self, stays: list[SampledStay]) -> None:
        """Merge a batch's sampled stays into the sample, keeping the lowest priorities."""
        self.sampled = sorted([*self.sampled, *stays], key=lambda s: s.priority)[: self.stays]

    # --- re-simulation -----------------------------------------------------------------------------------------

    def resimulate(self, scenarios: tuple[Scenario, ...] = SCENARIOS) -> list[ScenarioRun]:
        """Re-simulate the sample under each scenario (deterministic: the fresh draws restart on every call)."""
        fresh = np.random.default_rng(self._fresh_seed)
        runs: list[ScenarioRun] = []
        for from_admission in (False, True):
            group = [sc for sc in scenarios if sc.from_admission == from_admission]
            rows = [(stay, sc) for sc in group for stay in self.sampled if sc.applies_to(stay.treatment)]
            if rows:
                runs.extend(self._run(rows, from_admission, fresh))
        for run in runs:
            if run.scenario.name == "factual" and not run.scenario.from_admission:
                _check_common_random_numbers(run)
        return runs

    def _run(
        self, rows: list[tuple[SampledStay, Scenario]], from_admission: bool, fresh: np.random.Generator
    ) -> list[ScenarioRun]:
        """All (stay, scenario) pairs that start at the same hour, in one vectorised ward."""
        if self.rules is None:
            raise RuntimeError("the plan has not followed any batch")
        horizon, m = self.horizon_hours, len(rows)
        stays = [stay for stay, _ in rows]
        cohort = StayCohort.concat([stay.cohort for stay in stays])
        shift = np.array([sc.antibiotics_earlier_hours for _, sc in rows])
        start_tx = cohort.params.treatment_start
        earlier = (cohort.treatment == "antibiotics") & (shift > 0)
        cohort = with_treatment_start(cohort, np.where(earlier, np.maximum(0.0, start_tx - shift), start_tx))
        state = StayState.concat([stay.admission_state if from_admission else stay.decision_state for stay in stays])
        flag = lambda name: np.array([getattr(sc, name) for _, sc in rows], dtype=bool)  # noqa: E731
        overrides = TreatmentOverrides(
            from_hour=np.full(m, DECISION_HOUR),
            withhold_insulin=flag("withhold_insulin"),
            scheduled_furosemide=flag("scheduled_furosemide"),
            withhold_norepinephrine=flag("withhold_norepinephrine"),
        )
        ward = Ward(cohort, state, self.rules, overrides)
        draws = TapeReplay(np.concatenate([stay.tape for stay in stays]), fresh)
        course = {signal: np.full((m, horizon), np.nan) for signal in TRAJECTORY_SIGNALS}
        at_decision = None if from_admission else (state.s.copy(), state.stable.copy(), state.active.copy())
        for hour in range(0 if from_admission else DECISION_HOUR, DECISION_HOUR + horizon):
            if not ward.state.active.any():
                break
            ward.step(hour, draws)
            st = ward.state
            if hour + 1 == DECISION_HOUR:
                at_decision = (st.s.copy(), st.stable.copy(), st.active.copy())
            if hour >= DECISION_HOUR:
                in_hospital = st.end_hour > hour
                for signal in TRAJECTORY_SIGNALS:
                    course[signal][:, hour - DECISION_HOUR] = np.where(in_hospital, ward.values[signal], np.nan)
        if at_decision is None:  # every row ended before the decision hour
            at_decision = (ward.state.s.copy(), ward.state.stable.copy(), ward.state.active.copy())
        doses, norepinephrine = _window_treatment(ward, m, horizon)
        runs = []
        for scenario in dict.fromkeys(sc for _, sc in rows):
            idx = np.array([i for i, (_, sc) in enumerate(rows) if sc == scenario])
            runs.append(
                ScenarioRun(
                    scenario=scenario,
                    stays=[stays[i] for i in idx],
                    course={signal: values[idx] for signal, values in course.items()},
                    doses=[doses[i] for i in idx],
                    norepinephrine_hours=[norepinephrine[i] for i in idx],
                    treatment_start=cohort.params.treatment_start[idx],
                    severity_at_decision=at_decision[0][idx],
                    stable_at_decision=at_decision[1][idx],
                    alive_at_decision=at_decision[2][idx],
                    params=cohort.params.take(idx),
                    end_hour=ward.state.end_hour[idx],
                    died=ward.state.died[idx],
                    fresh_draws=draws.fresh_per_row[idx],
                )
            )
        return runs

    # --- outcome probabilities -----------------------------------------------------------------------------

    def outcome_probabilities(self, runs: list[ScenarioRun]) -> dict[tuple[str, int], tuple[float, float]]:
        """(P(in-hospital death), P(stay > 7 days)) per (scenario, sampled stay index), from the decision hour.

        Insulin, furosemide and norepinephrine do not act on the latent course, so a scenario re-simulated from
        the decision hour starts in the factual state and has exactly the stay's own true probabilities (those
        of `stays[]` in the ground truth). A scenario re-simulated from admission reaches the decision hour in
        another state: its probabilities are the stay's own plus the difference between Monte-Carlo
        continuations of the course (physiology.outcome_probabilities, death integrated exactly along each)
        from its state and from the factual state, the continuations shared between the two, so the
        difference carries little Monte-Carlo noise. A stay dead before the decision hour has (1, 0).
        """
        index = {id(stay): i for i, stay in enumerate(self.sampled)}
        out: dict[tuple[str, int], tuple[float, float]] = {}
        paired: list[tuple[ScenarioRun, int, int]] = []
        for run in runs:
            for j, stay in enumerate(run.stays):
                key = (run.scenario.name, index[id(stay)])
                if not run.scenario.from_admission:
                    out[key] = (stay.p_death, stay.p_los_over_7_days)
                elif not run.alive_at_decision[j]:
                    out[key] = (1.0, 0.0)
                else:
                    paired.append((run, j, index[id(stay)]))
        if not paired:
            return out
        unique = list(dict.fromkeys(i for _, _, i in paired))
        position = {i: u for u, i in enumerate(unique)}
        factual = [self.sampled[i] for i in unique]
        severity = [*(s.decision_state.s for s in factual), *(run.severity_at_decision[[j]] for run, j, _ in paired)]
        stable = [*(s.decision_state.stable for s in factual), *(run.stable_at_decision[[j]] for run, j, _ in paired)]
        params = [*(s.cohort.params for s in factual), *(run.params.take(np.array([j])) for run, j, _ in paired)]
        source = np.concatenate([np.arange(len(unique)), [position[i] for _, _, i in paired]]).astype(np.int64)
        rng = _SharedRowDraws(np.random.default_rng(self._mc_seed), len(unique), source)
        probs = outcome_probabilities(
            np.concatenate(severity),
            np.concatenate(stable),
            CourseParams.concat(params),
            rng,
            replicates=self.replicates,
            start_hour=DECISION_HOUR,
        )
        for k, (run, _, i) in enumerate(paired):
            row, base = len(unique) + k, position[i]
            stay = self.sampled[i]
            death = stay.p_death + probs.death[row] - probs.death[base]
            los = stay.p_los_over_7_days + probs.los_over_7_days[row] - probs.los_over_7_days[base]
            out[(run.scenario.name, i)] = (float(np.clip(death, 0.0, 1.0)), float(np.clip(los, 0.0, 1.0)))
        return out

    # --- ground truth ------------------------------------------------------------------------------------------

    def design(self) -> CounterfactualDesign:
        return CounterfactualDesign(
            requested_stays=self.stays,
            sampled_stays=len(self.sampled),
            eligible_stays=self.eligible_stays,
            decision_hour=DECISION_HOUR,
            horizon_hours=self.horizon_hours,
            sample_rule=(
                f"the {self.stays} stays with the lowest seeded random priority among stays alive in hospital "
                f"{DECISION_HOUR} h after admission whose decision hour falls before the export date (a uniform "
                "random sample of them; all of them when fewer)"
            ),
            common_random_numbers=(
                "every scenario re-runs the factual simulation step from a saved state with the factual stay's own "
                "draws for the same hour and purpose (missingness, measurement noise, course, death, discharge); "
                "fresh draws only where the factual course drew nothing (counted in fresh_draws)"
            ),
            outcome_probability=(
                "from the decision hour, given the scenario's latent state then: scenarios re-simulated from the "
                "decision hour start in the factual state and have the stay's own true probabilities (these drugs "
                "do not act on the latent course); antibiotic_6h_earlier has the stay's own plus the difference of "
                "Monte-Carlo continuations from its state and from the factual one, the continuations shared; "
                "died and end_hour are the realised course under common random numbers within the window"
            ),
            monte_carlo_replicates=self.replicates,
            scenarios={sc.name: sc.definition for sc in SCENARIOS},
            signals=SIGNAL_UNITS,
        )

    def counterfactual_stays(self, identify: Callable[[int, int], tuple[str, str]]) -> list[CounterfactualStay]:
        """The sample's ground truth; `identify(batch, row)` gives a stay's (encounter id, patient id)."""
        runs = self.resimulate()
        probabilities = self.outcome_probabilities(runs)
        per_stay: list[dict[str, ScenarioTrajectory]] = [{} for _ in self.sampled]
        index = {id(stay): i for i, stay in enumerate(self.sampled)}
        for run in runs:
            for j, stay in enumerate(run.stays):
                i = index[id(stay)]
                p_death, p_los = probabilities[(run.scenario.name, i)]
                start_tx = float(run.treatment_start[j])
                end = int(run.end_hour[j])
                per_stay[i][run.scenario.name] = ScenarioTrajectory(
                    resimulated_from_hour=0 if run.scenario.from_admission else DECISION_HOUR,
                    disease_treatment_start_hours=start_tx if np.isfinite(start_tx) else None,
                    signals={s: _rounded(values[j]) for s, values in run.course.items()},
                    doses=run.doses[j],
                    norepinephrine_hours=run.norepinephrine_hours[j],
                    in_hospital_at_decision=bool(run.alive_at_decision[j]),
                    end_hour=end if end <= DECISION_HOUR + self.horizon_hours else None,
                    died=bool(run.died[j]),
                    p_in_hospital_death=round(p_death, 6),
                    p_los_over_7_days=round(p_los, 6),
                    fresh_draws=int(run.fresh_draws[j]),
                )
        out = []
        for stay, scenarios in zip(self.sampled, per_stay, strict=True):
            encounter_id, patient_id = identify(stay.batch, stay.row)
            out.append(
                CounterfactualStay(
                    encounter_id=encounter_id,
                    patient_id=patient_id,
                    reason=str(stay.cohort.reason[0]),
                    decision_hour=DECISION_HOUR,
                    horizon_hours=self.horizon_hours,
                    scenarios=scenarios,
                )
            )
        return out

    def confounding(self) -> ConfoundingTruth:
        """How strongly the factual insulin and furosemide were given to the sicker stays (all batches)."""
        records = self.decisions
        join = lambda name: np.concatenate([getattr(r, name) for r in records]) if records else np.zeros(0)  # noqa: E731
        covariates = {"severity": join("severity"), "glucose": join("glucose"), "fluid_overload": join("fluid")}
        by_drug = {
            drug: _treatment_confounding(join(flag).astype(bool), covariates)
            for drug, flag in (("insulin_lispro", "insulin"), ("furosemide", "furosemide"))
        }
        return ConfoundingTruth(
            population=f"every stay alive in hospital {DECISION_HOUR} h after admission",
            treated_definition=(
                f"at least one dose in the {self.horizon_hours} h after the decision hour in the factual course"
            ),
            covariates={
                "severity": "latent acute severity S at the decision hour",
                "glucose": "latent blood glucose G at the decision hour (mg/dL)",
                "fluid_overload": "latent fluid overload F at the decision hour",
            },
            stays=int(covariates["severity"].size),
            by_drug=by_drug,
        )


def _window_treatment(ward: Ward, m: int, horizon: int) -> tuple[list[list[Dose]], list[list[int]]]:
    """Doses and norepinephrine hours of each re-simulated row within [decision hour, decision hour + horizon)."""
    end = DECISION_HOUR + horizon
    frame = ward.log.drugs.frame()
    doses: list[list[Dose]] = [[] for _ in range(m)]
    for stay, hour, drug, dose in zip(frame["stay"], frame["hour"], frame["drug"], frame["dose"], strict=True):
        if DECISION_HOUR <= hour < end:
            doses[int(stay)].append(Dose(hour=int(hour), drug=DRUG_EVENTS[int(drug)], dose=float(dose)))
    running: list[set[int]] = [set() for _ in range(m)]
    infusions = ward.log.infusions.frame()
    st = ward.state
    spans = [
        (int(row), int(first), int(last))
        for row, first, last in zip(infusions["stay"], infusions["start"], infusions["end"], strict=True)
    ]
    spans += [(int(i), int(st.norepi_started[i]), end) for i in np.flatnonzero(st.norepi_on)]
    for stay, first, last in spans:
        running[stay].update(range(max(first, DECISION_HOUR), min(last, end)))
    return doses, [sorted(hours) for hours in running]


def _check_common_random_numbers(run: ScenarioRun) -> None:
    """The factual scenario must reproduce the factual course exactly, or the ground truth would mislead."""
    for j, stay in enumerate(run.stays):
        for signal, values in stay.factual_course.items():
            if not np.array_equal(values, run.course[signal][j], equal_nan=True):
                raise RuntimeError(
                    f"counterfactual re-simulation of batch {stay.batch} row {stay.row} does not reproduce its "
                    f"factual {signal}: the common random numbers are broken"
                )


def _rounded(values: np.ndarray) -> list[float | None]:
    return [None if np.isnan(v) else round(float(v), 4) for v in values]


def _treatment_confounding(treated: np.ndarray, covariates: dict[str, np.ndarray]) -> TreatmentConfounding:
    def mean(x: np.ndarray) -> float:
        return round(float(x.mean()), 4) if x.size else float("nan")

    standardized: dict[str, float] = {}
    odds: dict[str, float | None] = {}
    for name, x in covariates.items():
        a, b = x[treated], x[~treated]
        pooled = np.sqrt((a.var() + b.var()) / 2.0) if a.size and b.size else 0.0
        standardized[name] = round(float((a.mean() - b.mean()) / pooled), 4) if pooled > 0 else float("nan")
        ratio = odds_ratio_per_sd(x, treated)
        odds[name] = None if ratio is None else round(ratio, 4)
    return TreatmentConfounding(
        treated=int(treated.sum()),
        untreated=int((~treated).sum()),
        mean_treated={name: mean(x[treated]) for name, x in covariates.items()},
        mean_untreated={name: mean(x[~treated]) for name, x in covariates.items()},
        standardized_difference=standardized,
        odds_ratio_per_sd=odds,
    )


def odds_ratio_per_sd(x: np.ndarray, y: np.ndarray) -> float | None:
    """exp(beta) of logit P(y) = a + beta * (x - mean) / sd, by Newton-Raphson; None when it has no finite MLE
    (no variation in x or y, or separation)."""
    y = np.asarray(y, dtype=float)
    sd = float(np.std(x))
    if x.size < 3 or sd == 0 or y.min() == y.max():
        return None
    design = np.column_stack([np.ones(x.size), (x - x.mean()) / sd])
    beta = np.array([np.log(y.mean() / (1 - y.mean())), 0.0])
    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(-design @ beta))
        gradient = design.T @ (y - p)
        hessian = design.T @ (design * (p * (1 - p))[:, None])
        try:
            step = np.linalg.solve(hessian, gradient)
        except np.linalg.LinAlgError:
            return None
        beta = beta + step
        if not np.all(np.isfinite(beta)) or abs(beta[1]) > 30:
            return None
        if np.max(np.abs(step)) < 1e-10:
            return float(np.exp(beta[1]))
    return None
