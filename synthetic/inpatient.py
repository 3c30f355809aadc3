"""Realized inpatient stays: hourly physiology, what the ward measures, what it gives, and how it ends.

A batch of admissions is simulated together in one-hour steps (numpy over stays). On top of the latent
course (physiology.py) each stay carries fluid overload F, kidney injury K, blood glucose G and the
active amounts of the drugs it received. Clinicians act only on what they measured:

* insulin lispro (sliding scale) when a measured glucose exceeds 180 mg/dL lowers G over ~4 hours; a
  quarter of the doses due are missed (`INSULIN_MISSED`: the nurse is busy, the patient is off the ward,
  the dose is held for a meal not eaten), so patients with the same glucose are treated and untreated;
* furosemide every 12 h while the patient is fluid-overloaded lowers blood pressure and F (so SpO2
  and respiratory rate improve);
* norepinephrine runs while measured systolic pressure is below 88 mmHg and raises it;
* acetaminophen for a measured temperature above 38.3 C lowers temperature;
* metoprolol for atrial fibrillation with a measured heart rate above 110 lowers heart rate;
* steroids (prednisone, dexamethasone) raise glucose and white cells;
* the disease-specific treatment (antibiotics, PCI, steroids, diuretics) speeds recovery of S.

So the data hold learnable drug responses, and outcomes depend on the latent state the data reflect.
Missingness is informative: stable patients are measured less, deteriorating ones more often.

The simulation is split so that it can be resumed: `admit_stays` draws each stay's fixed facts
(`StayCohort`) and starting state (`StayState`), and `Ward.step` advances any set of stays by one hour.
Every random number an hour consumes goes through a `DrawSource` under a named purpose (the missingness
and noise of each measurement, the course, death, discharge). In the factual run that source is the
batch's generator, drawn in exactly the order the generator always used, and it can copy the draws of a
few stays onto a `DrawTape`; the counterfactual re-simulation (counterfactuals.py) resumes those stays
from a saved state with `TapeReplay`, so each scenario sees the same draws as the factual course (common
random numbers), and `TreatmentOverrides` change the ward's treatment decisions from a given hour on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Protocol, Self

import numpy as np

from synthetic.config import AdmissionReason, SiteProfile
from synthetic.physiology import (
    DAYTIME_DISCHARGE_RATE,
    MAX_STAY_HOURS,
    PREDICTION_HOUR,
    REASONS,
    SECOND_HIT_MEAN,
    SECOND_HIT_RATE,
    CourseParams,
    advance_severity,
    death_hazard,
    discharge_hazard,
    outcome_probabilities,
    readmission_probability,
    severity_draws,
    update_stable_hours,
)
from synthetic.population import Population

# Measurement items the ward records. "bp" is one item (a panel) carrying systolic and diastolic.
VITAL_ITEMS = ("heart_rate", "bp", "resp_rate", "temperature", "spo2")
PANEL_ITEMS = (  # the routine lab panel
    "glucose",
    "creatinine",
    "bun",
    "sodium",
    "potassium",
    "wbc",
    "hemoglobin",
    "platelets",
    "crp",
    "albumin",
)
ITEMS = (*VITAL_ITEMS, *PANEL_ITEMS, "lactate", "troponin", "glucose_poc", "weight", "height", "bmi", "hba1c")
ITEM_INDEX = {name: i for i, name in enumerate(ITEMS)}

DRUG_EVENTS = (
    "insulin_lispro",
    "furosemide",
    "acetaminophen",
    "metoprolol",
    "prednisone",
    "dexamethasone",
    "ceftriaxone",
    "piperacillin",
    "vancomycin",
    "albuterol",
    "aspirin",
    "clopidogrel",
    "heparin",
    "enoxaparin",
)
DRUG_INDEX = {name: i for i, name in enumerate(DRUG_EVENTS)}
PROCEDURE_EVENTS = ("ecg", "chest_xray", "pci", "intubation", "transfusion", "cardioversion")
PROCEDURE_INDEX = {name: i for i, name in enumerate(PROCEDURE_EVENTS)}
COMPLICATION_EVENTS = ("septic_shock", "aki", "hyperkalemia")
LOCATIONS = ("emergency", "ward", "icu")

# Drug pharmacodynamics: (absorption time constant h, effect time constant h). A dose adds one unit
# (insulin: one unit per IU) to the depot; the effect compartment drives the physiology.
_PHARMACODYNAMICS = {
    "insulin": (0.7, 2.0),
    "furosemide": (0.3, 3.0),
    "acetaminophen": (0.5, 3.0),
    "metoprolol": (1.0, 5.0),
    "steroid": (2.0, 12.0),
}

# Plausible physiological ranges the generator keeps clean values inside (canonical units).
CLEAN_RANGES = {
    "heart_rate": (30, 200),
    "sbp": (60, 240),
    "dbp": (30, 140),
    "resp_rate": (6, 50),
    "temperature": (34.0, 42.0),
    "spo2": (60, 100),
    "glucose": (40, 700),
    "glucose_poc": (40, 700),
    "creatinine": (0.2, 12.0),
    "bun": (3, 180),
    "sodium": (118, 165),
    "potassium": (2.5, 7.5),
    "wbc": (0.5, 60.0),
    "hemoglobin": (4.0, 20.0),
    "platelets": (10, 900),
    "crp": (0.3, 450),
    "albumin": (1.0, 5.5),
    "lactate": (0.3, 18.0),
    "troponin": (1, 50000),
    "weight": (8.0, 250.0),
    "height": (70, 210),
    "bmi": (10, 70),
    "hba1c": (4.0, 15.0),
}


@dataclass
class Admissions:
    """A batch of admissions to simulate (one per patient at most)."""

    patient: np.ndarray
    start: np.ndarray  # local wall-clock time, seconds since the epoch
    reason: list[AdmissionReason]
    is_readmission: np.ndarray

    def __len__(self) -> int:
        return len(self.patient)


@dataclass
class EventLog:
    """Column-wise event records gathered hour by hour, concatenated at the end."""

    columns: tuple[str, ...]
    _chunks: dict[str, list[np.ndarray]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._chunks = {c: [] for c in self.columns}

    def add(self, **values: np.ndarray | float | int) -> None:
        stay = np.asarray(values["stay"])
        if stay.size == 0:
            return
        for column in self.columns:
            self._chunks[column].append(np.broadcast_to(np.asarray(values[column]), stay.shape).copy())

    def frame(self) -> dict[str, np.ndarray]:
        return {c: (np.concatenate(chunks) if chunks else np.zeros(0)) for c, chunks in self._chunks.items()}


@dataclass
class StayOutcomes:
    """What happened in each stay of a batch, plus the latent values the ground truth reports."""

    admissions: Admissions
    age: np.ndarray
    initial_severity: np.ndarray
    treatment_start: np.ndarray
    end_hour: np.ndarray
    died: np.ndarray
    severity_at_end: np.ndarray
    max_severity: np.ndarray
    alive_at_prediction: np.ndarray
    p_death: np.ndarray  # NaN for stays not alive in hospital at the prediction hour
    p_los_over_7_days: np.ndarray
    p_readmission_30d: np.ndarray  # NaN for stays that ended in death
    disposition: list[str]
    observations: dict[str, np.ndarray]
    drugs: dict[str, np.ndarray]
    infusions: dict[str, np.ndarray]
    procedures: dict[str, np.ndarray]
    complications: dict[str, np.ndarray]
    locations: dict[str, np.ndarray]
    scheduled: np.ndarray  # (item,) scheduled measurement counts
    recorded: np.ndarray  # (item,) recorded measurement counts
    severity_paths: list[np.ndarray]


# Measurement noise: (kind, size). "abs" adds N(0, size); "rel" multiplies by exp(N(0, size)).
_NOISE = {
    "heart_rate": ("abs", 4.0),
    "sbp": ("abs", 7.0),
    "dbp": ("abs", 5.0),
    "resp_rate": ("abs", 1.5),
    "temperature": ("abs", 0.2),
    "spo2": ("abs", 1.0),
    "glucose": ("rel", 0.08),
    "glucose_poc": ("rel", 0.1),
    "creatinine": ("rel", 0.05),
    "bun": ("rel", 0.08),
    "sodium": ("abs", 1.5),
    "potassium": ("abs", 0.25),
    "wbc": ("rel", 0.12),
    "hemoglobin": ("abs", 0.35),
    "platelets": ("rel", 0.1),
    "crp": ("rel", 0.25),
    "albumin": ("abs", 0.2),
    "lactate": ("rel", 0.15),
    "troponin": ("rel", 0.2),
    "weight": ("abs", 0.4),
    "height": ("abs", 0.5),
    "bmi": ("abs", 0.2),
    "hba1c": ("abs", 0.1),
}

# Items recorded whenever due (no missingness draw): admission facts, not ward routine.
_ALWAYS_RECORDED = ("height", "bmi", "hba1c")

# The share of sliding-scale insulin doses due that the ward misses (one draw per stay and hour). In-hospital
# audits find missed or late insulin doses common; here it also gives the data the positivity a what-if on
# insulin needs: without it, every measured glucose over 180 mg/dL is treated and no data say what happens
# when it is not.
INSULIN_MISSED = 0.25

# Every purpose an hour draws random numbers for. A tape stores one value per stay, hour and purpose.
DRAW_KEYS: tuple[str, ...] = (
    *(f"missing:{item}" for item in ITEMS if item not in _ALWAYS_RECORDED),
    *(f"noise:{name}" for name in _NOISE),
    "hit",
    "hit_size",
    "severity_noise",
    "death",
    "discharge",
    "insulin_missed",
)
DRAW_INDEX = {key: i for i, key in enumerate(DRAW_KEYS)}

# The noise-free signals the counterfactual ground truth reports, in canonical units ("severity" is S,
# "fluid_overload" is F: latent, never measured).
TRAJECTORY_SIGNALS = (
    "glucose",
    "creatinine",
    "heart_rate",
    "sbp",
    "lactate",
    "potassium",
    "spo2",
    "severity",
    "fluid_overload",
)


def _exp_factor(tau: float) -> float:
    return float(np.exp(-1.0 / tau))


def _gamma_delay(rng: np.random.Generator, mean: float, n: int) -> np.ndarray:
    return rng.gamma(2.0, mean / 2.0, n)


# --- where an hour's random numbers come from ----------------------------------------------------------


class DrawSource(Protocol):
    """The random numbers one hour of the ward consumes, asked for by purpose (a key of DRAW_KEYS)."""

    def uniform(self, hour: int, key: str, needed: np.ndarray) -> np.ndarray:
        """One U(0, 1) draw per stay; only the stays in the mask `needed` use theirs."""
        ...

    def normal(self, hour: int, key: str, rows: np.ndarray, scale: float) -> np.ndarray:
        """One N(0, scale) draw for each stay in `rows`."""
        ...

    def severity(self, hour: int, needed: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The course's draws for every stay (see physiology.severity_draws); the stays in `needed` use theirs."""
        ...


class DrawTape:
    """The draws a few stays of a batch received, per hour and purpose, kept for a later replay.

    `values[slot, hour, key]` is NaN where the factual course drew nothing for that stay (a measurement that
    was not due or not recorded, an hour after the whole batch had ended).
    """

    def __init__(self, rows: np.ndarray, n: int, hours: int) -> None:
        self.rows = rows
        self.hours = hours
        self.slot = np.full(n, -1, dtype=np.int64)
        self.slot[rows] = np.arange(rows.size)
        self.values = np.full((rows.size, hours, len(DRAW_KEYS)), np.nan)

    def keep_all(self, hour: int, key: str, values: np.ndarray) -> None:
        if hour < self.hours:
            self.values[:, hour, DRAW_INDEX[key]] = values[self.rows]

    def keep_rows(self, hour: int, key: str, rows: np.ndarray, values: np.ndarray) -> None:
        if hour >= self.hours:
            return
        slots = self.slot[rows]
        mine = slots >= 0
        if mine.any():
            self.values[slots[mine], hour, DRAW_INDEX[key]] = values[mine]


class GeneratorDraws:
    """The factual run's draws: straight from the batch generator, in the order the generator always used.

    The order is what keeps every export byte-identical: one uniform per stay for the missingness of each due
    item, a normal per recorded value, one uniform per stay for a missed insulin dose, the course's three
    draws, then death and discharge. With a tape, the
    values of the taped stays are copied as they are drawn; the generator is consumed the same either way.
    """

    def __init__(self, rng: np.random.Generator, n: int, tape: DrawTape | None = None) -> None:
        self.rng = rng
        self.n = n
        self.tape = tape

    def uniform(self, hour: int, key: str, needed: np.ndarray) -> np.ndarray:
        values = self.rng.random(self.n)
        if self.tape is not None:
            self.tape.keep_all(hour, key, values)
        return values

    def normal(self, hour: int, key: str, rows: np.ndarray, scale: float) -> np.ndarray:
        values = self.rng.normal(0.0, scale, rows.shape)
        if self.tape is not None:
            self.tape.keep_rows(hour, key, rows, values)
        return values

    def severity(self, hour: int, needed: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        draws = severity_draws(self.rng, (self.n,))
        if self.tape is not None:
            for key, values in zip(("hit", "hit_size", "severity_noise"), draws, strict=True):
                self.tape.keep_all(hour, key, values)
        return draws


class TapeReplay:
    """Draws for re-simulated stays: row i gets what its factual stay drew at the same hour for the same purpose
    (common random numbers), and a fresh draw from `fresh` only where the factual course drew nothing (the
    re-simulated course measured something the factual one did not, or outlived it).

    `fresh_per_row` counts the fresh draws a stay actually used (a due measurement, an hour in hospital), so the
    ground truth can say how common the random numbers were.
    """

    def __init__(self, tape: np.ndarray, fresh: np.random.Generator) -> None:
        self.tape = tape  # (rows, hours, keys)
        self.fresh = fresh
        self.all_rows = np.arange(tape.shape[0])
        self.fresh_per_row = np.zeros(tape.shape[0], dtype=np.int64)

    def _take(
        self, hour: int, key: str, rows: np.ndarray, used: np.ndarray | None, draw: Callable[[int], np.ndarray]
    ) -> np.ndarray:
        out = self.tape[rows, hour, DRAW_INDEX[key]] if hour < self.tape.shape[1] else np.full(rows.size, np.nan)
        missing = np.isnan(out)
        if missing.any():
            out[missing] = draw(int(missing.sum()))
            counted = missing if used is None else missing & used
            np.add.at(self.fresh_per_row, rows[counted], 1)
        return out

    def uniform(self, hour: int, key: str, needed: np.ndarray) -> np.ndarray:
        return self._take(hour, key, self.all_rows, needed, self.fresh.random)

    def normal(self, hour: int, key: str, rows: np.ndarray, scale: float) -> np.ndarray:
        return self._take(hour, key, rows, None, lambda k: self.fresh.normal(0.0, scale, k))

    def severity(self, hour: int, needed: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rows = self.all_rows
        return (
            self._take(hour, "hit", rows, needed, self.fresh.random),
            self._take(hour, "hit_size", rows, needed, lambda k: self.fresh.exponential(SECOND_HIT_MEAN, k)),
            self._take(hour, "severity_noise", rows, needed, self.fresh.standard_normal),
        )


# --- the stays, their state and the ward's rules --------------------------------------------------------------


def _select(value: object, index: np.ndarray) -> object:
    """Rows `index` of one field of a per-stay dataclass (an array, a dict of arrays, or course parameters)."""
    if isinstance(value, np.ndarray):
        return value[index]
    if isinstance(value, dict):
        return {k: _select(v, index) for k, v in value.items()}
    if isinstance(value, CourseParams):
        return value.take(index)
    raise TypeError(f"cannot take rows of {type(value).__name__}")


def _join(values: list) -> object:
    """One field of several per-stay dataclasses, stacked (see _select)."""
    first = values[0]
    if isinstance(first, np.ndarray):
        return np.concatenate(values)
    if isinstance(first, dict):
        return {k: _join([v[k] for v in values]) for k in first}
    if isinstance(first, CourseParams):
        return CourseParams.concat(values)
    raise TypeError(f"cannot join {type(first).__name__}")


class _Rows:
    """Per-stay arrays that can be subset (a saved state of a few stays) and stacked (stays of several batches)."""

    def take(self, index: np.ndarray) -> Self:
        """A copy holding the rows `index` only."""
        return type(self)(**{f.name: _select(getattr(self, f.name), index) for f in fields(self)})  # type: ignore[arg-type]

    @classmethod
    def concat(cls, parts: list[Self]) -> Self:
        """The rows of `parts`, one after another."""
        return cls(**{f.name: _join([getattr(p, f.name) for p in parts]) for f in fields(cls)})  # type: ignore[arg-type]


@dataclass
class StayCohort(_Rows):
    """What is fixed for each stay once it is admitted: its reason, baseline, course parameters, schedules."""

    reason: np.ndarray  # AdmissionReason values
    treatment: np.ndarray  # the disease-specific treatment (physiology.ReasonDynamics.treatment)
    base: dict[str, np.ndarray]
    atrial_fibrillation: np.ndarray
    resp: np.ndarray
    card: np.ndarray
    renal: np.ndarray
    infl: np.ndarray
    params: CourseParams
    s0: np.ndarray
    on_steroid_course: np.ndarray
    ed_hours: np.ndarray
    vital_offset: np.ndarray
    wants_lactate: np.ndarray
    cardiac: np.ndarray
    poc_glucose: np.ndarray
    hba1c_due: np.ndarray
    height_due: np.ndarray

    def __len__(self) -> int:
        return len(self.reason)


@dataclass
class StayState(_Rows):
    """Everything about each stay that changes hour by hour; a copy of it is a point to resume from."""

    s: np.ndarray
    stable: np.ndarray
    fluid: np.ndarray
    kidney: np.ndarray
    glucose: np.ndarray
    depot: dict[str, np.ndarray]
    effect: dict[str, np.ndarray]
    norepi_on: np.ndarray
    norepi_effect: np.ndarray
    norepi_started: np.ndarray
    hb_offset: np.ndarray
    active: np.ndarray
    died: np.ndarray
    end_hour: np.ndarray
    max_sev: np.ndarray
    last_given: dict[str, np.ndarray]
    intubated: np.ndarray
    cardioverted: np.ndarray
    complication_seen: dict[str, np.ndarray]
    location: np.ndarray
    icu_stable_hours: np.ndarray
    paths: np.ndarray  # (stays, MAX_STAY_HOURS + 1) severity path, NaN after the stay ended


@dataclass(frozen=True)
class WardRules:
    """How the hospital measures and what prophylaxis it gives: the same for every stay of a site."""

    vital_every: int
    lab_stride_days: int
    twice_daily_labs: bool
    missing_base_rate: float
    missing_informativeness: float
    prophylaxis_drug: str
    prophylaxis_every: int
    prophylaxis_dose: float

    @classmethod
    def of(cls, profile: SiteProfile) -> WardRules:
        enoxaparin = profile.kind == "academic"
        return cls(
            vital_every=max(1, round(profile.vitals_every_hours)),
            lab_stride_days=max(1, round(profile.labs_every_hours / 24)),
            twice_daily_labs=profile.labs_every_hours <= 12,
            missing_base_rate=profile.missingness.base_rate,
            missing_informativeness=profile.missingness.informativeness,
            prophylaxis_drug="enoxaparin" if enoxaparin else "heparin",
            prophylaxis_every=24 if enoxaparin else 12,
            prophylaxis_dose=40 if enoxaparin else 5000,
        )


@dataclass
class TreatmentOverrides:
    """Treatment decisions a scenario takes away from the ward's rules, per stay, from `from_hour` on.

    * withhold_insulin: no insulin lispro, whatever the measured glucose;
    * scheduled_furosemide: furosemide 40 mg at `from_hour` and every 12 h after it while in hospital, whatever
      the fluid state and blood pressure, instead of the ward's furosemide rule;
    * withhold_norepinephrine: no norepinephrine; a running infusion stops at `from_hour`.
    """

    from_hour: np.ndarray
    withhold_insulin: np.ndarray
    scheduled_furosemide: np.ndarray
    withhold_norepinephrine: np.ndarray

    def at(self, flag: np.ndarray, hour: int) -> np.ndarray:
        """The stays for which `flag` is in force at `hour`."""
        return flag & (hour >= self.from_hour)


@dataclass
class WardLog:
    """What the ward recorded and did, as column-wise event logs (one batch, or one re-simulation)."""

    obs: EventLog = field(default_factory=lambda: EventLog(("stay", "hour", "item", "value", "value2")))
    drugs: EventLog = field(default_factory=lambda: EventLog(("stay", "hour", "drug", "dose")))
    infusions: EventLog = field(default_factory=lambda: EventLog(("stay", "start", "end")))
    procedures: EventLog = field(default_factory=lambda: EventLog(("stay", "hour", "procedure")))
    complications: EventLog = field(default_factory=lambda: EventLog(("stay", "hour", "complication")))
    locations: EventLog = field(default_factory=lambda: EventLog(("stay", "hour", "location")))
    scheduled: np.ndarray = field(default_factory=lambda: np.zeros(len(ITEMS), dtype=np.int64))
    recorded: np.ndarray = field(default_factory=lambda: np.zeros(len(ITEMS), dtype=np.int64))


def admit_stays(
    admissions: Admissions,
    population: Population,
    profile: SiteProfile,
    age_at_admission: np.ndarray,
    rng: np.random.Generator,
) -> tuple[StayCohort, StayState]:
    """Draw each stay's fixed facts and its state at admission (the draws in the generator's historical order)."""
    n = len(admissions)
    pid = admissions.patient
    dyn = [REASONS[r] for r in admissions.reason]
    col = lambda name: np.array([getattr(d, name) for d in dyn], dtype=float)  # noqa: E731
    resp, card, renal, infl, fluid_w = (
        col(k) for k in ("respiratory", "cardiovascular", "renal", "inflammatory", "fluid")
    )
    treatment = np.array([d.treatment for d in dyn])
    reason = np.array([r.value for r in admissions.reason])
    age = age_at_admission
    frailty = population.frailty[pid]
    cond = {k: v[pid] for k, v in population.conditions.items()}
    base = {k: v[pid] for k, v in population.baseline.items()}

    # --- latent course parameters ---------------------------------------------------------------
    s0 = np.maximum(
        0.0,
        rng.normal(
            col("initial_severity")
            + profile.severity_offset
            + 0.25 * frailty
            + 0.1 * (age - 65) / 10
            + 0.2 * admissions.is_readmission,
            0.3,
        ),
    )
    treatment_start = np.zeros(n)
    antibiotics = treatment == "antibiotics"
    treatment_start[antibiotics] = _gamma_delay(rng, profile.antibiotic_delay_hours, int(antibiotics.sum()))
    pci = treatment == "pci"
    treatment_start[pci] = (1.0 + _gamma_delay(rng, 1.5, int(pci.sum()))) if profile.has_cath_lab else np.inf
    for kind, offset, mean in (("steroid", 1.5, 2.0), ("dexamethasone", 2.0, 4.0), ("diuretic", 0.5, 1.5)):
        mask = treatment == kind
        treatment_start[mask] = offset + rng.exponential(mean, int(mask.sum()))
    treatment_start = np.where(np.isfinite(treatment_start), np.minimum(np.ceil(treatment_start), 23.0), np.inf)

    params = CourseParams(
        age=age,
        frailty=frailty,
        drive0=col("drive") * np.exp(rng.normal(0, 0.35, n)),
        drive_tau=col("drive_decay_hours"),
        recovery=col("recovery_per_hour") * np.exp(-0.25 * frailty - 0.08 * (age - 65) / 10 + rng.normal(0, 0.2, n)),
        treatment_start=treatment_start,
        treated_mult=col("treated_multiplier"),
        untreated_mult=col("untreated_multiplier"),
        hit_rate=SECOND_HIT_RATE * np.exp(0.4 * frailty),
        discharge_rate=DAYTIME_DISCHARGE_RATE * profile.discharge_speed * np.exp(-0.15 * frailty),
        admit_hour=((admissions.start // 3600) % 24).astype(int),
    )

    # --- physiology state -------------------------------------------------------------------------
    fluid = fluid_w * (0.7 + 0.4 * s0) * np.exp(rng.normal(0, 0.2, n))
    kidney = np.where(
        reason == AdmissionReason.ACUTE_KIDNEY_INJURY.value, 0.9 + 0.3 * rng.standard_normal(n), renal * 0.2 * s0
    )
    kidney = np.maximum(kidney, 0.0)
    on_steroid_course = np.isin(treatment, ("steroid", "dexamethasone"))
    diabetic = cond["type2_diabetes"]
    paths = np.full((n, MAX_STAY_HOURS + 1), np.nan, dtype=np.float32)
    paths[:, 0] = s0
    state = StayState(
        s=s0.copy(),
        stable=np.where(s0 < 0.6, 1, 0),
        fluid=fluid,
        kidney=kidney,
        glucose=base["glucose"] + 25 * s0,
        depot={k: np.zeros(n) for k in _PHARMACODYNAMICS},
        effect={k: np.zeros(n) for k in _PHARMACODYNAMICS},
        norepi_on=np.zeros(n, dtype=bool),
        norepi_effect=np.zeros(n),
        norepi_started=np.full(n, -1),
        hb_offset=np.zeros(n),
        active=np.ones(n, dtype=bool),
        died=np.zeros(n, dtype=bool),
        end_hour=np.full(n, MAX_STAY_HOURS),
        max_sev=s0.copy(),
        last_given={k: np.full(n, -1000) for k in ("acetaminophen", "metoprolol", "furosemide")},
        intubated=np.zeros(n, dtype=bool),
        cardioverted=np.zeros(n, dtype=bool),
        complication_seen={k: np.zeros(n, dtype=bool) for k in COMPLICATION_EVENTS},
        location=np.zeros(n, dtype=int),
        icu_stable_hours=np.zeros(n, dtype=int),
        paths=paths,
    )
    ed_hours = rng.integers(2, 7, n)
    vital_offset = rng.integers(0, max(1, round(profile.vitals_every_hours)), n)
    cohort = StayCohort(
        reason=reason,
        treatment=treatment,
        base=base,
        atrial_fibrillation=cond["atrial_fibrillation"],
        resp=resp,
        card=card,
        renal=renal,
        infl=infl,
        params=params,
        s0=s0,
        on_steroid_course=on_steroid_course,
        ed_hours=ed_hours,
        vital_offset=vital_offset,
        wants_lactate=np.isin(reason, ("sepsis", "pneumonia", "covid19", "acute_mi")) | (s0 > 1.0),
        cardiac=np.isin(reason, ("acute_mi", "heart_failure")),
        poc_glucose=diabetic | on_steroid_course,
        hba1c_due=diabetic & (rng.random(n) < 0.6),
        height_due=rng.random(n) < 0.35,
    )
    return cohort, state


class Ward:
    """A set of stays under the ward's rules, advanced one hour at a time by `step`.

    The factual batch and every counterfactual re-simulation run through this one `step`, so a scenario differs
    from the factual course only by its starting state, its draws and its `overrides`.
    """

    def __init__(
        self,
        cohort: StayCohort,
        state: StayState,
        rules: WardRules,
        overrides: TreatmentOverrides | None = None,
    ) -> None:
        self.cohort = cohort
        self.state = state
        self.rules = rules
        self.overrides = overrides
        self.n = len(cohort)
        self.log = WardLog()
        self.values: dict[str, np.ndarray] = {}  # the noise-free values at the start of the hour last stepped

    def give(self, mask: np.ndarray, drug: str, hour: int, dose: float) -> None:
        idx = np.flatnonzero(mask)
        self.log.drugs.add(stay=idx, hour=hour, drug=DRUG_INDEX[drug], dose=dose)

    def procedure(self, mask: np.ndarray, name: str, hour: int) -> None:
        self.log.procedures.add(stay=np.flatnonzero(mask), hour=hour, procedure=PROCEDURE_INDEX[name])

    def complication(self, mask: np.ndarray, name: str, hour: int) -> None:
        seen = self.state.complication_seen
        new = mask & ~seen[name]
        seen[name] |= new
        self.log.complications.add(stay=np.flatnonzero(new), hour=hour, complication=COMPLICATION_EVENTS.index(name))

    def step(self, hour: int, draws: DrawSource) -> None:
        """Advance every stay from the start of `hour` to the start of `hour + 1`."""
        c, st, rules, log, ov = self.cohort, self.state, self.rules, self.log, self.overrides
        n = self.n
        params, base, reason = c.params, c.base, c.reason
        active = st.active
        s = st.s
        fluid = st.fluid
        kidney = st.kidney
        hod = (params.admit_hour + hour) % 24
        day = hour // 24
        e = st.effect
        ne = st.norepi_effect

        # --- what the patient looks like now (canonical units) ---------------------------------
        temp = base["temperature"] + 1.1 * s * c.infl - 0.9 * e["acetaminophen"]
        values = {
            "temperature": temp,
            "heart_rate": base["heart_rate"]
            + 12 * s * (0.4 + c.card)
            + 6 * np.maximum(temp - 37.2, 0)
            - 14 * e["metoprolol"],
            "sbp": base["sbp"] - 15 * s * c.card + 6 * fluid - 9 * e["furosemide"] + 24 * ne,
            "resp_rate": base["resp_rate"] + 3.5 * s * (0.3 + c.resp) + 2.0 * fluid,
            "spo2": base["spo2"] - 3.2 * s * c.resp - 2.5 * fluid,
            "glucose": st.glucose,
            "glucose_poc": st.glucose,
            "creatinine": base["creatinine"] * (1 + kidney),
            "bun": 14 * (1 + 1.3 * kidney) * np.sqrt(base["creatinine"] / 0.9) + 3 * s,
            "sodium": base["sodium"] - 2.0 * fluid,
            "potassium": base["potassium"] + 0.7 * kidney - 0.1 * e["insulin"],
            "wbc": base["wbc"] + 5.0 * s * c.infl + 3.0 * e["steroid"],
            "hemoglobin": base["hemoglobin"] - 0.12 * day - 0.3 * s + st.hb_offset,
            "platelets": base["platelets"] * (1 - 0.22 * np.minimum(s, 3) * c.infl),
            "crp": 3 + 70 * s * c.infl,
            "albumin": base["albumin"] - 0.25 * s - 0.04 * day,
            "lactate": 0.9 + 1.1 * np.maximum(s - 0.7, 0) * (0.3 + c.card + 0.5 * c.infl),
            "troponin": np.where(
                reason == "acute_mi", 2500 * np.exp(-(((hour - 14) / 12.0) ** 2)) + 40, 6 + 12 * s * c.card
            ),
            "weight": base["weight"] + 2.5 * fluid,
            "height": base["height"],
            "hba1c": base["hba1c"],
        }
        values["dbp"] = 0.5 * values["sbp"] + 14
        values["bmi"] = values["weight"] / (base["height"] / 100.0) ** 2
        values["severity"] = s
        values["fluid_overload"] = fluid
        self.values = values

        # --- what is due, and what actually gets recorded -----------------------------------------
        tilt = np.where(s < 0.5, 0.8, np.where(s > 1.5, -0.6, 0.0))
        p_miss = np.clip(rules.missing_base_rate * (1 + rules.missing_informativeness * tilt), 0.0, 0.95)
        if hour == 0:
            p_miss = p_miss * 0.3
        vital_every, vital_offset = rules.vital_every, c.vital_offset
        vitals_due = active & (
            (hour == 0)
            | ((hour - vital_offset) % vital_every == 0)
            | ((s > 1.5) & ((hour - vital_offset) % max(1, vital_every // 2) == 0))
        )
        lab_time = (hour >= 4) & (
            ((hod == 6) & (day % rules.lab_stride_days == 0)) | (rules.twice_daily_labs & (hod == 18))
        )
        labs_due = active & ((hour == 0) | lab_time)
        due: dict[str, np.ndarray] = {item: vitals_due for item in VITAL_ITEMS}
        due.update({item: labs_due for item in PANEL_ITEMS})
        due["lactate"] = active & (
            ((hour == 0) & c.wants_lactate)
            | (lab_time & (s > 1.0))
            | ((reason == "sepsis") & (s > 1.5) & (hour % 6 == 0))
        )
        due["troponin"] = (
            active & c.cardiac & (np.isin(hour, (0, 3, 6)) | ((reason == "acute_mi") & lab_time & (hour < 72)))
        )
        due["glucose_poc"] = active & c.poc_glucose & np.isin(hod, (7, 11, 16, 21))
        due["weight"] = active & ((hour == 0) | ((reason == "heart_failure") & (hod == 6)))
        due["height"] = active & (hour == 0) & c.height_due
        due["bmi"] = due["height"]
        due["hba1c"] = active & (hour == 0) & c.hba1c_due

        measured: dict[str, np.ndarray] = {}
        for item in ITEMS:
            mask = due[item]
            if not mask.any():
                continue
            keep = mask if item in _ALWAYS_RECORDED else mask & (draws.uniform(hour, f"missing:{item}", mask) >= p_miss)
            log.scheduled[ITEM_INDEX[item]] += int(mask.sum())
            log.recorded[ITEM_INDEX[item]] += int(keep.sum())
            idx = np.flatnonzero(keep)
            if idx.size == 0:
                continue
            if item == "bp":
                sbp = _noisy("sbp", values["sbp"][idx], draws.normal(hour, "noise:sbp", idx, _NOISE["sbp"][1]))
                dbp_noise = draws.normal(hour, "noise:dbp", idx, _NOISE["dbp"][1])
                dbp = np.minimum(_noisy("dbp", values["dbp"][idx], dbp_noise), sbp - 10)
                log.obs.add(stay=idx, hour=hour, item=ITEM_INDEX[item], value=sbp, value2=dbp)
                measured["sbp"] = _scatter(n, idx, sbp)
                continue
            v = _noisy(item, values[item][idx], draws.normal(hour, f"noise:{item}", idx, _NOISE[item][1]))
            log.obs.add(stay=idx, hour=hour, item=ITEM_INDEX[item], value=v, value2=np.nan)
            measured[item] = _scatter(n, idx, v)

        # --- what the clinicians do about it --------------------------------------------------------
        depot, last_given = st.depot, st.last_given
        glucose_seen = np.fmax(
            measured.get("glucose", np.full(n, np.nan)), measured.get("glucose_poc", np.full(n, np.nan))
        )
        needs_insulin = glucose_seen > 180
        needs_insulin &= draws.uniform(hour, "insulin_missed", needs_insulin) >= INSULIN_MISSED
        if ov is not None:
            needs_insulin &= ~ov.at(ov.withhold_insulin, hour)
        if needs_insulin.any():
            units = np.clip(2 + 2 * np.floor((np.nan_to_num(glucose_seen) - 180) / 40), 2, 12)
            idx = np.flatnonzero(needs_insulin)
            log.drugs.add(stay=idx, hour=hour, drug=DRUG_INDEX["insulin_lispro"], dose=units[idx])
            depot["insulin"][idx] += units[idx]

        norepi_on = st.norepi_on
        sbp_seen = measured.get("sbp", np.full(n, np.nan))
        start_ne = active & ~norepi_on & (sbp_seen < 88)
        stop_ne = norepi_on & (sbp_seen > 110)
        if ov is not None:
            withheld = ov.at(ov.withhold_norepinephrine, hour)
            start_ne &= ~withheld
            stop_ne |= norepi_on & withheld
        st.norepi_started[start_ne] = hour
        norepi_on |= start_ne
        if stop_ne.any():
            idx = np.flatnonzero(stop_ne)
            log.infusions.add(stay=idx, start=st.norepi_started[idx], end=hour)
            norepi_on &= ~stop_ne
        self.complication(start_ne & (reason == "sepsis"), "septic_shock", hour)

        furo = active & (fluid > 0.35) & (hour - last_given["furosemide"] >= 12) & ~(sbp_seen < 95)
        furo &= (reason == "heart_failure") | (fluid > 0.6)
        if ov is not None:
            scheduled = ov.at(ov.scheduled_furosemide, hour)
            furo = np.where(scheduled, active & ((hour - ov.from_hour) % 12 == 0), furo)
        self.give(furo, "furosemide", hour, 40)
        depot["furosemide"][furo] += 1.0
        last_given["furosemide"][furo] = hour

        fever = active & (measured.get("temperature", np.full(n, np.nan)) > 38.3)
        fever &= hour - last_given["acetaminophen"] >= 6
        self.give(fever, "acetaminophen", hour, 1000)
        depot["acetaminophen"][fever] += 1.0
        last_given["acetaminophen"][fever] = hour

        hr_seen = measured.get("heart_rate", np.full(n, np.nan))
        af = c.atrial_fibrillation
        rate_control = active & af & (hr_seen > 110) & (hour - last_given["metoprolol"] >= 12)
        self.give(rate_control, "metoprolol", hour, 25)
        depot["metoprolol"][rate_control] += 1.0
        last_given["metoprolol"][rate_control] = hour
        shock_rhythm = active & af & (hr_seen > 140) & ~st.cardioverted
        self.procedure(shock_rhythm, "cardioversion", hour)
        st.cardioverted |= shock_rhythm

        treatment_start = params.treatment_start
        since_tx = hour - np.where(np.isfinite(treatment_start), treatment_start, 1e6)
        on_tx = active & (since_tx >= 0) & (since_tx < 7 * 24)
        self.give(on_tx & (reason == "pneumonia") & (since_tx % 24 == 0), "ceftriaxone", hour, 2000)
        self.give(on_tx & (reason == "sepsis") & (since_tx % 8 == 0), "piperacillin", hour, 4000)
        vanco = on_tx & (reason == "sepsis") & (since_tx % 12 == 0)
        self.give(vanco, "vancomycin", hour, 1000)
        steroid_now = on_tx & (since_tx % 24 == 0) & (since_tx < 5 * 24)
        self.give(steroid_now & (reason == "copd_exacerbation"), "prednisone", hour, 40)
        self.give(steroid_now & (reason == "covid19"), "dexamethasone", hour, 6)
        depot["steroid"][steroid_now & c.on_steroid_course] += 1.0
        self.give(active & (reason == "copd_exacerbation") & (hour % 6 == 0), "albuterol", hour, 2.5)
        self.give(active & (reason == "acute_mi") & (hour % 24 == 0), "aspirin", hour, 81)
        self.give(active & (reason == "acute_mi") & (hour % 24 == 0), "clopidogrel", hour, 75)
        self.give(active & (reason == "stroke") & (hour % 24 == 0), "aspirin", hour, 81)
        self.give(
            active & (hour >= 6) & ((hour - 6) % rules.prophylaxis_every == 0) & (reason != "stroke"),
            rules.prophylaxis_drug,
            hour,
            rules.prophylaxis_dose,
        )
        self.procedure(active & (reason == "acute_mi") & (treatment_start == hour), "pci", hour)

        spo2_seen = measured.get("spo2", np.full(n, np.nan))
        intubate = active & ~st.intubated & (spo2_seen < 88) & (s > 2.3)
        self.procedure(intubate, "intubation", hour)
        st.intubated |= intubate
        transfuse = active & (measured.get("hemoglobin", np.full(n, np.nan)) < 7.0)
        self.procedure(transfuse, "transfusion", hour)
        st.hb_offset[transfuse] += 1.0
        self.complication(active & (kidney > 0.5) & (reason != "aki"), "aki", hour)
        self.complication(active & (measured.get("potassium", np.full(n, np.nan)) > 5.5), "hyperkalemia", hour)

        # --- where the patient is -------------------------------------------------------------------
        location = st.location
        leave_ed = active & (location == 0) & (hour >= c.ed_hours)
        to_icu = (leave_ed & (s > 2.0)) | (active & (location == 1) & ((s > 2.4) | intubate))
        to_ward = (leave_ed & (s <= 2.0)) | (active & (location == 2) & (st.icu_stable_hours >= 12) & ~st.intubated)
        st.icu_stable_hours = np.where((location == 2) & (s < 1.2), st.icu_stable_hours + 1, 0)
        location[to_icu] = 2
        location[to_ward] = 1
        log.locations.add(stay=np.flatnonzero(to_icu), hour=hour, location=2)
        log.locations.add(stay=np.flatnonzero(to_ward), hour=hour, location=1)
        st.intubated &= ~((location == 2) & (s < 1.0))

        # --- one hour passes ---------------------------------------------------------------------------
        effect = st.effect
        for drug, (tau_a, tau_e) in _PHARMACODYNAMICS.items():
            absorbed = depot[drug] * (1 - _exp_factor(tau_a))
            depot[drug] = depot[drug] - absorbed
            effect[drug] = effect[drug] * _exp_factor(tau_e) + absorbed
        st.norepi_effect = st.norepi_effect + (norepi_on.astype(float) - st.norepi_effect) * (1 - np.exp(-2.0))
        target = base["glucose"] + 30 * s + 40 * effect["steroid"]
        st.glucose = np.maximum(
            40.0, st.glucose + (target - st.glucose) * (1 - _exp_factor(5.0)) - 5.0 * effect["insulin"]
        )
        st.fluid = np.maximum(0.0, fluid * _exp_factor(96.0) - 0.08 * effect["furosemide"] * fluid)
        vanco_active = (reason == "sepsis") & (hour >= treatment_start)
        st.kidney = kidney * _exp_factor(60.0) + 0.012 * np.maximum(s - 0.4, 0) * c.renal + 0.003 * vanco_active

        s_next = advance_severity(s, hour, params, *draws.severity(hour, active))
        s = st.s = np.where(active, s_next, s)
        st.stable = np.where(active, update_stable_hours(st.stable, s), st.stable)
        st.max_sev = np.where(active, np.maximum(st.max_sev, s), st.max_sev)
        st.paths[active, hour + 1] = s[active]

        next_hour = hour + 1
        dies = active & (draws.uniform(hour, "death", active) < -np.expm1(-death_hazard(s, params)))
        if next_hour >= MAX_STAY_HOURS:
            leaves = active & ~dies
        else:
            staying = active & ~dies
            leaves = staying & (
                draws.uniform(hour, "discharge", staying) < -np.expm1(-discharge_hazard(st.stable, next_hour, params))
            )
        ended = dies | leaves
        st.died |= dies
        st.end_hour[ended] = next_hour
        closing = ended & norepi_on
        if closing.any():
            idx = np.flatnonzero(closing)
            log.infusions.add(stay=idx, start=st.norepi_started[idx], end=next_hour)
            norepi_on &= ~closing
        active &= ~ended


class BatchWatch(Protocol):
    """Follows one factual batch for the counterfactual ground truth (see counterfactuals.CounterfactualPlan)."""

    tape: DrawTape | None

    def after_hour(self, ward: Ward, hour: int) -> None:
        """Called after every factual hour."""
        ...

    def finish(self, outcomes: StayOutcomes) -> None:
        """Called once the batch is complete."""
        ...


class CounterfactualHook(Protocol):
    """What simulate_stays needs from a counterfactual plan: a watcher for each batch it simulates."""

    def watch(self, ward: Ward, admissions: Admissions) -> BatchWatch:
        """Start following a batch that has just been admitted (before its first hour)."""
        ...


def simulate_stays(
    admissions: Admissions,
    population: Population,
    profile: SiteProfile,
    age_at_admission: np.ndarray,
    rng: np.random.Generator,
    mc_rng: np.random.Generator,
    replicates: int = 64,
    counterfactuals: CounterfactualHook | None = None,
) -> StayOutcomes:
    """Simulate a batch of stays hour by hour; return their events, outcomes and true probabilities.

    `counterfactuals` may watch the batch (tape the draws of a sample of stays, save their state): it never
    draws from `rng` or `mc_rng`, so the batch's course and everything exported from it are unchanged.
    """
    n = len(admissions)
    pid = admissions.patient
    age = age_at_admission
    frailty = population.frailty[pid]
    cohort, state = admit_stays(admissions, population, profile, age, rng)
    ward = Ward(cohort, state, WardRules.of(profile))
    reason = cohort.reason
    ward.log.locations.add(stay=np.arange(n), hour=0, location=0)
    ward.procedure(cohort.cardiac | (reason == "sepsis") | (rng.random(n) < 0.4), "ecg", 0)
    ward.procedure(
        np.isin(reason, ("pneumonia", "covid19", "heart_failure", "sepsis", "copd_exacerbation")), "chest_xray", 0
    )
    watch = counterfactuals.watch(ward, admissions) if counterfactuals is not None else None
    draws = GeneratorDraws(rng, n, watch.tape if watch is not None else None)

    sev_at_pred = np.full(n, np.nan)
    stable_at_pred = np.zeros(n, dtype=int)
    alive_at_pred = np.zeros(n, dtype=bool)
    for hour in range(MAX_STAY_HOURS):
        if not state.active.any():
            break
        ward.step(hour, draws)
        if hour + 1 == PREDICTION_HOUR:
            alive_at_pred = state.active.copy()
            sev_at_pred = np.where(state.active, state.s, np.nan)
            stable_at_pred = state.stable.copy()
        if watch is not None:
            watch.after_hour(ward, hour)

    # --- true probabilities ---------------------------------------------------------------------------
    params = cohort.params
    s, died, end_hour = state.s, state.died, state.end_hour
    p_death = np.full(n, np.nan)
    p_los = np.full(n, np.nan)
    at_pred = np.flatnonzero(alive_at_pred)
    probs = outcome_probabilities(
        sev_at_pred[at_pred], stable_at_pred[at_pred], params.take(at_pred), mc_rng, replicates=replicates
    )
    p_death[at_pred] = probs.death
    p_los[at_pred] = probs.los_over_7_days

    cond = {k: v[pid] for k, v in population.conditions.items()}
    burden = population.chronic_burden()[pid]
    p_readmit = readmission_probability(
        s, frailty, age, burden, cond["heart_failure"], cond["copd"], end_hour, profile.readmission_offset
    )
    p_readmit = np.where(died, np.nan, p_readmit)
    disposition = [
        "exp" if d else ("long" if h >= MAX_STAY_HOURS else ("snf" if (a > 80 and f > 0.8) else "home"))
        for d, h, a, f in zip(died, end_hour, age, frailty, strict=True)
    ]

    log = ward.log
    outcomes = StayOutcomes(
        admissions=admissions,
        age=age,
        initial_severity=cohort.s0,
        treatment_start=params.treatment_start,
        end_hour=end_hour,
        died=died,
        severity_at_end=s,
        max_severity=state.max_sev,
        alive_at_prediction=alive_at_pred,
        p_death=p_death,
        p_los_over_7_days=p_los,
        p_readmission_30d=p_readmit,
        disposition=disposition,
        observations=log.obs.frame(),
        drugs=log.drugs.frame(),
        infusions=log.infusions.frame(),
        procedures=log.procedures.frame(),
        complications=log.complications.frame(),
        locations=log.locations.frame(),
        scheduled=log.scheduled,
        recorded=log.recorded,
        severity_paths=[state.paths[i, : end_hour[i] + 1] for i in range(n)],
    )
    if watch is not None:
        watch.finish(outcomes)
    return outcomes


def with_treatment_start(cohort: StayCohort, treatment_start: np.ndarray) -> StayCohort:
    """The same stays with another start of the disease-specific treatment (a scenario's antibiotic timing)."""
    return replace(cohort, params=replace(cohort.params, treatment_start=treatment_start))


def _noisy(item: str, clean: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """A recorded value: the clean value with its measurement noise (drawn N(0, size), see _NOISE)."""
    kind, _ = _NOISE[item]
    noisy = clean + noise if kind == "abs" else clean * np.exp(noise)
    low, high = CLEAN_RANGES[item]
    return np.clip(noisy, low, high)


def _scatter(n: int, idx: np.ndarray, values: np.ndarray) -> np.ndarray:
    out = np.full(n, np.nan)
    out[idx] = values
    return out
