"""Realized inpatient stays: hourly physiology, what the ward measures, what it gives, and how it ends.

A batch of admissions is simulated together in one-hour steps (numpy over stays). On top of the latent
course (physiology.py) each stay carries fluid overload F, kidney injury K, blood glucose G and the
active amounts of the drugs it received. Clinicians act only on what they measured:

* insulin lispro (sliding scale) when a measured glucose exceeds 180 mg/dL lowers G over ~4 hours;
* furosemide every 12 h while the patient is fluid-overloaded lowers blood pressure and F (so SpO2
  and respiratory rate improve);
* norepinephrine runs while measured systolic pressure is below 88 mmHg and raises it;
* acetaminophen for a measured temperature above 38.3 C lowers temperature;
* metoprolol for atrial fibrillation with a measured heart rate above 110 lowers heart rate;
* steroids (prednisone, dexamethasone) raise glucose and white cells;
* the disease-specific treatment (antibiotics, PCI, steroids, diuretics) speeds recovery of S.

So the data hold learnable drug responses, and outcomes depend on the latent state the data reflect.
Missingness is informative: stable patients are measured less, deteriorating ones more often.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from synthetic.config import AdmissionReason, SiteProfile
from synthetic.physiology import (
    DAYTIME_DISCHARGE_RATE,
    MAX_STAY_HOURS,
    PREDICTION_HOUR,
    REASONS,
    SECOND_HIT_RATE,
    CourseParams,
    death_hazard,
    discharge_hazard,
    outcome_probabilities,
    readmission_probability,
    step_severity,
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


def _exp_factor(tau: float) -> float:
    return float(np.exp(-1.0 / tau))


def _gamma_delay(rng: np.random.Generator, mean: float, n: int) -> np.ndarray:
    return rng.gamma(2.0, mean / 2.0, n)


def simulate_stays(
    admissions: Admissions,
    population: Population,
    profile: SiteProfile,
    age_at_admission: np.ndarray,
    rng: np.random.Generator,
    mc_rng: np.random.Generator,
    replicates: int = 64,
) -> StayOutcomes:
    """Simulate a batch of stays hour by hour; return their events, outcomes and true probabilities."""
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
    s = s0.copy()
    stable = np.where(s < 0.6, 1, 0)
    fluid = fluid_w * (0.7 + 0.4 * s0) * np.exp(rng.normal(0, 0.2, n))
    kidney = np.where(
        reason == AdmissionReason.ACUTE_KIDNEY_INJURY.value, 0.9 + 0.3 * rng.standard_normal(n), renal * 0.2 * s0
    )
    kidney = np.maximum(kidney, 0.0)
    on_steroid_course = np.isin(treatment, ("steroid", "dexamethasone"))
    diabetic = cond["type2_diabetes"]
    glucose = base["glucose"] + 25 * s0
    depot = {k: np.zeros(n) for k in _PHARMACODYNAMICS}
    effect = {k: np.zeros(n) for k in _PHARMACODYNAMICS}
    norepi_on = np.zeros(n, dtype=bool)
    norepi_effect = np.zeros(n)
    norepi_started = np.full(n, -1)
    hb_offset = np.zeros(n)
    active = np.ones(n, dtype=bool)
    died = np.zeros(n, dtype=bool)
    end_hour = np.full(n, MAX_STAY_HOURS)
    max_sev = s0.copy()
    sev_at_pred = np.full(n, np.nan)
    stable_at_pred = np.zeros(n, dtype=int)
    alive_at_pred = np.zeros(n, dtype=bool)
    last_given = {k: np.full(n, -1000) for k in ("acetaminophen", "metoprolol", "furosemide")}
    intubated = np.zeros(n, dtype=bool)
    cardioverted = np.zeros(n, dtype=bool)
    complication_seen = {k: np.zeros(n, dtype=bool) for k in COMPLICATION_EVENTS}
    location = np.zeros(n, dtype=int)
    ed_hours = rng.integers(2, 7, n)
    icu_stable_hours = np.zeros(n, dtype=int)
    paths = np.full((n, MAX_STAY_HOURS + 1), np.nan, dtype=np.float32)
    paths[:, 0] = s0

    vital_every = max(1, round(profile.vitals_every_hours))
    vital_offset = rng.integers(0, vital_every, n)
    lab_stride_days = max(1, round(profile.labs_every_hours / 24))
    twice_daily_labs = profile.labs_every_hours <= 12
    miss = profile.missingness
    wants_lactate = np.isin(reason, ("sepsis", "pneumonia", "covid19", "acute_mi")) | (s0 > 1.0)
    cardiac = np.isin(reason, ("acute_mi", "heart_failure"))
    poc_glucose = diabetic | on_steroid_course
    hba1c_due = diabetic & (rng.random(n) < 0.6)
    height_due = rng.random(n) < 0.35

    obs = EventLog(("stay", "hour", "item", "value", "value2"))
    drugs = EventLog(("stay", "hour", "drug", "dose"))
    infusions = EventLog(("stay", "start", "end"))
    procedures = EventLog(("stay", "hour", "procedure"))
    complications = EventLog(("stay", "hour", "complication"))
    locations = EventLog(("stay", "hour", "location"))
    locations.add(stay=np.arange(n), hour=0, location=0)
    scheduled = np.zeros(len(ITEMS), dtype=np.int64)
    recorded = np.zeros(len(ITEMS), dtype=np.int64)

    def give(mask: np.ndarray, drug: str, hour: int, dose: float) -> None:
        idx = np.flatnonzero(mask)
        drugs.add(stay=idx, hour=hour, drug=DRUG_INDEX[drug], dose=dose)

    def procedure(mask: np.ndarray, name: str, hour: int) -> None:
        procedures.add(stay=np.flatnonzero(mask), hour=hour, procedure=PROCEDURE_INDEX[name])

    def complication(mask: np.ndarray, name: str, hour: int) -> None:
        new = mask & ~complication_seen[name]
        complication_seen[name] |= new
        complications.add(stay=np.flatnonzero(new), hour=hour, complication=COMPLICATION_EVENTS.index(name))

    procedure(cardiac | (reason == "sepsis") | (rng.random(n) < 0.4), "ecg", 0)
    procedure(
        np.isin(reason, ("pneumonia", "covid19", "heart_failure", "sepsis", "copd_exacerbation")), "chest_xray", 0
    )

    for hour in range(MAX_STAY_HOURS):
        if not active.any():
            break
        hod = (params.admit_hour + hour) % 24
        day = hour // 24
        e = effect
        ne = norepi_effect

        # --- what the patient looks like now (canonical units) ---------------------------------
        temp = base["temperature"] + 1.1 * s * infl - 0.9 * e["acetaminophen"]
        values = {
            "temperature": temp,
            "heart_rate": base["heart_rate"]
            + 12 * s * (0.4 + card)
            + 6 * np.maximum(temp - 37.2, 0)
            - 14 * e["metoprolol"],
            "sbp": base["sbp"] - 15 * s * card + 6 * fluid - 9 * e["furosemide"] + 24 * ne,
            "resp_rate": base["resp_rate"] + 3.5 * s * (0.3 + resp) + 2.0 * fluid,
            "spo2": base["spo2"] - 3.2 * s * resp - 2.5 * fluid,
            "glucose": glucose,
            "glucose_poc": glucose,
            "creatinine": base["creatinine"] * (1 + kidney),
            "bun": 14 * (1 + 1.3 * kidney) * np.sqrt(base["creatinine"] / 0.9) + 3 * s,
            "sodium": base["sodium"] - 2.0 * fluid,
            "potassium": base["potassium"] + 0.7 * kidney - 0.1 * e["insulin"],
            "wbc": base["wbc"] + 5.0 * s * infl + 3.0 * e["steroid"],
            "hemoglobin": base["hemoglobin"] - 0.12 * day - 0.3 * s + hb_offset,
            "platelets": base["platelets"] * (1 - 0.22 * np.minimum(s, 3) * infl),
            "crp": 3 + 70 * s * infl,
            "albumin": base["albumin"] - 0.25 * s - 0.04 * day,
            "lactate": 0.9 + 1.1 * np.maximum(s - 0.7, 0) * (0.3 + card + 0.5 * infl),
            "troponin": np.where(
                reason == "acute_mi", 2500 * np.exp(-(((hour - 14) / 12.0) ** 2)) + 40, 6 + 12 * s * card
            ),
            "weight": base["weight"] + 2.5 * fluid,
            "height": base["height"],
            "hba1c": base["hba1c"],
        }
        values["dbp"] = 0.5 * values["sbp"] + 14
        values["bmi"] = values["weight"] / (base["height"] / 100.0) ** 2

        # --- what is due, and what actually gets recorded -----------------------------------------
        tilt = np.where(s < 0.5, 0.8, np.where(s > 1.5, -0.6, 0.0))
        p_miss = np.clip(miss.base_rate * (1 + miss.informativeness * tilt), 0.0, 0.95)
        if hour == 0:
            p_miss = p_miss * 0.3
        vitals_due = active & (
            (hour == 0)
            | ((hour - vital_offset) % vital_every == 0)
            | ((s > 1.5) & ((hour - vital_offset) % max(1, vital_every // 2) == 0))
        )
        lab_time = (hour >= 4) & (((hod == 6) & (day % lab_stride_days == 0)) | (twice_daily_labs & (hod == 18)))
        labs_due = active & ((hour == 0) | lab_time)
        due: dict[str, np.ndarray] = {item: vitals_due for item in VITAL_ITEMS}
        due.update({item: labs_due for item in PANEL_ITEMS})
        due["lactate"] = active & (
            ((hour == 0) & wants_lactate)
            | (lab_time & (s > 1.0))
            | ((reason == "sepsis") & (s > 1.5) & (hour % 6 == 0))
        )
        due["troponin"] = (
            active & cardiac & (np.isin(hour, (0, 3, 6)) | ((reason == "acute_mi") & lab_time & (hour < 72)))
        )
        due["glucose_poc"] = active & poc_glucose & np.isin(hod, (7, 11, 16, 21))
        due["weight"] = active & ((hour == 0) | ((reason == "heart_failure") & (hod == 6)))
        due["height"] = active & (hour == 0) & height_due
        due["bmi"] = due["height"]
        due["hba1c"] = active & (hour == 0) & hba1c_due

        measured: dict[str, np.ndarray] = {}
        for item in ITEMS:
            mask = due[item]
            if not mask.any():
                continue
            keep = mask & (rng.random(n) >= p_miss) if item not in ("height", "bmi", "hba1c") else mask
            scheduled[ITEM_INDEX[item]] += int(mask.sum())
            recorded[ITEM_INDEX[item]] += int(keep.sum())
            idx = np.flatnonzero(keep)
            if idx.size == 0:
                continue
            if item == "bp":
                sbp = _noisy("sbp", values["sbp"][idx], rng)
                dbp = np.minimum(_noisy("dbp", values["dbp"][idx], rng), sbp - 10)
                obs.add(stay=idx, hour=hour, item=ITEM_INDEX[item], value=sbp, value2=dbp)
                measured["sbp"] = _scatter(n, idx, sbp)
                continue
            v = _noisy(item, values[item][idx], rng)
            obs.add(stay=idx, hour=hour, item=ITEM_INDEX[item], value=v, value2=np.nan)
            measured[item] = _scatter(n, idx, v)

        # --- what the clinicians do about it --------------------------------------------------------
        glucose_seen = np.fmax(
            measured.get("glucose", np.full(n, np.nan)), measured.get("glucose_poc", np.full(n, np.nan))
        )
        needs_insulin = glucose_seen > 180
        if needs_insulin.any():
            units = np.clip(2 + 2 * np.floor((np.nan_to_num(glucose_seen) - 180) / 40), 2, 12)
            idx = np.flatnonzero(needs_insulin)
            drugs.add(stay=idx, hour=hour, drug=DRUG_INDEX["insulin_lispro"], dose=units[idx])
            depot["insulin"][idx] += units[idx]

        sbp_seen = measured.get("sbp", np.full(n, np.nan))
        start_ne = active & ~norepi_on & (sbp_seen < 88)
        stop_ne = norepi_on & (sbp_seen > 110)
        norepi_started[start_ne] = hour
        norepi_on |= start_ne
        if stop_ne.any():
            idx = np.flatnonzero(stop_ne)
            infusions.add(stay=idx, start=norepi_started[idx], end=hour)
            norepi_on &= ~stop_ne
        complication(start_ne & (reason == "sepsis"), "septic_shock", hour)

        furo = active & (fluid > 0.35) & (hour - last_given["furosemide"] >= 12) & ~(sbp_seen < 95)
        furo &= (reason == "heart_failure") | (fluid > 0.6)
        give(furo, "furosemide", hour, 40)
        depot["furosemide"][furo] += 1.0
        last_given["furosemide"][furo] = hour

        fever = active & (measured.get("temperature", np.full(n, np.nan)) > 38.3)
        fever &= hour - last_given["acetaminophen"] >= 6
        give(fever, "acetaminophen", hour, 1000)
        depot["acetaminophen"][fever] += 1.0
        last_given["acetaminophen"][fever] = hour

        hr_seen = measured.get("heart_rate", np.full(n, np.nan))
        rate_control = active & cond["atrial_fibrillation"] & (hr_seen > 110) & (hour - last_given["metoprolol"] >= 12)
        give(rate_control, "metoprolol", hour, 25)
        depot["metoprolol"][rate_control] += 1.0
        last_given["metoprolol"][rate_control] = hour
        shock_rhythm = active & cond["atrial_fibrillation"] & (hr_seen > 140) & ~cardioverted
        procedure(shock_rhythm, "cardioversion", hour)
        cardioverted |= shock_rhythm

        since_tx = hour - np.where(np.isfinite(treatment_start), treatment_start, 1e6)
        on_tx = active & (since_tx >= 0) & (since_tx < 7 * 24)
        give(on_tx & (reason == "pneumonia") & (since_tx % 24 == 0), "ceftriaxone", hour, 2000)
        give(on_tx & (reason == "sepsis") & (since_tx % 8 == 0), "piperacillin", hour, 4000)
        vanco = on_tx & (reason == "sepsis") & (since_tx % 12 == 0)
        give(vanco, "vancomycin", hour, 1000)
        steroid_now = on_tx & (since_tx % 24 == 0) & (since_tx < 5 * 24)
        give(steroid_now & (reason == "copd_exacerbation"), "prednisone", hour, 40)
        give(steroid_now & (reason == "covid19"), "dexamethasone", hour, 6)
        depot["steroid"][steroid_now & on_steroid_course] += 1.0
        give(active & (reason == "copd_exacerbation") & (hour % 6 == 0), "albuterol", hour, 2.5)
        give(active & (reason == "acute_mi") & (hour % 24 == 0), "aspirin", hour, 81)
        give(active & (reason == "acute_mi") & (hour % 24 == 0), "clopidogrel", hour, 75)
        give(active & (reason == "stroke") & (hour % 24 == 0), "aspirin", hour, 81)
        prophylaxis_drug = "enoxaparin" if profile.kind == "academic" else "heparin"
        prophylaxis_every = 24 if prophylaxis_drug == "enoxaparin" else 12
        give(
            active & (hour >= 6) & ((hour - 6) % prophylaxis_every == 0) & (reason != "stroke"),
            prophylaxis_drug,
            hour,
            40 if prophylaxis_drug == "enoxaparin" else 5000,
        )
        procedure(active & (reason == "acute_mi") & (treatment_start == hour), "pci", hour)

        spo2_seen = measured.get("spo2", np.full(n, np.nan))
        intubate = active & ~intubated & (spo2_seen < 88) & (s > 2.3)
        procedure(intubate, "intubation", hour)
        intubated |= intubate
        transfuse = active & (measured.get("hemoglobin", np.full(n, np.nan)) < 7.0)
        procedure(transfuse, "transfusion", hour)
        hb_offset[transfuse] += 1.0
        complication(active & (kidney > 0.5) & (reason != "aki"), "aki", hour)
        complication(active & (measured.get("potassium", np.full(n, np.nan)) > 5.5), "hyperkalemia", hour)

        # --- where the patient is -------------------------------------------------------------------
        leave_ed = active & (location == 0) & (hour >= ed_hours)
        to_icu = (leave_ed & (s > 2.0)) | (active & (location == 1) & ((s > 2.4) | intubate))
        to_ward = (leave_ed & (s <= 2.0)) | (active & (location == 2) & (icu_stable_hours >= 12) & ~intubated)
        icu_stable_hours = np.where((location == 2) & (s < 1.2), icu_stable_hours + 1, 0)
        location[to_icu] = 2
        location[to_ward] = 1
        locations.add(stay=np.flatnonzero(to_icu), hour=hour, location=2)
        locations.add(stay=np.flatnonzero(to_ward), hour=hour, location=1)
        intubated &= ~((location == 2) & (s < 1.0))

        # --- one hour passes ---------------------------------------------------------------------------
        for drug, (tau_a, tau_e) in _PHARMACODYNAMICS.items():
            absorbed = depot[drug] * (1 - _exp_factor(tau_a))
            depot[drug] = depot[drug] - absorbed
            effect[drug] = effect[drug] * _exp_factor(tau_e) + absorbed
        norepi_effect = norepi_effect + (norepi_on.astype(float) - norepi_effect) * (1 - np.exp(-2.0))
        target = base["glucose"] + 30 * s + 40 * effect["steroid"]
        glucose = np.maximum(40.0, glucose + (target - glucose) * (1 - _exp_factor(5.0)) - 5.0 * effect["insulin"])
        fluid = np.maximum(0.0, fluid * _exp_factor(96.0) - 0.08 * effect["furosemide"] * fluid)
        vanco_active = (reason == "sepsis") & (hour >= treatment_start)
        kidney = kidney * _exp_factor(60.0) + 0.012 * np.maximum(s - 0.4, 0) * renal + 0.003 * vanco_active

        s_next = step_severity(s, hour, params, rng)
        s = np.where(active, s_next, s)
        stable = np.where(active, update_stable_hours(stable, s), stable)
        max_sev = np.where(active, np.maximum(max_sev, s), max_sev)
        paths[active, hour + 1] = s[active]

        next_hour = hour + 1
        dies = active & (rng.random(n) < -np.expm1(-death_hazard(s, params)))
        if next_hour >= MAX_STAY_HOURS:
            leaves = active & ~dies
        else:
            leaves = active & ~dies & (rng.random(n) < -np.expm1(-discharge_hazard(stable, next_hour, params)))
        ended = dies | leaves
        died |= dies
        end_hour[ended] = next_hour
        closing = ended & norepi_on
        if closing.any():
            idx = np.flatnonzero(closing)
            infusions.add(stay=idx, start=norepi_started[idx], end=next_hour)
            norepi_on &= ~closing
        active &= ~ended
        if next_hour == PREDICTION_HOUR:
            alive_at_pred = active.copy()
            sev_at_pred = np.where(active, s, np.nan)
            stable_at_pred = stable.copy()

    # --- true probabilities ---------------------------------------------------------------------------
    p_death = np.full(n, np.nan)
    p_los = np.full(n, np.nan)
    at_pred = np.flatnonzero(alive_at_pred)
    probs = outcome_probabilities(
        sev_at_pred[at_pred], stable_at_pred[at_pred], params.take(at_pred), mc_rng, replicates=replicates
    )
    p_death[at_pred] = probs.death
    p_los[at_pred] = probs.los_over_7_days

    burden = population.chronic_burden()[pid]
    p_readmit = readmission_probability(
        s, frailty, age, burden, cond["heart_failure"], cond["copd"], end_hour, profile.readmission_offset
    )
    p_readmit = np.where(died, np.nan, p_readmit)
    disposition = [
        "exp" if d else ("long" if h >= MAX_STAY_HOURS else ("snf" if (a > 80 and f > 0.8) else "home"))
        for d, h, a, f in zip(died, end_hour, age, frailty, strict=True)
    ]

    return StayOutcomes(
        admissions=admissions,
        age=age,
        initial_severity=s0,
        treatment_start=treatment_start,
        end_hour=end_hour,
        died=died,
        severity_at_end=s,
        max_severity=max_sev,
        alive_at_prediction=alive_at_pred,
        p_death=p_death,
        p_los_over_7_days=p_los,
        p_readmission_30d=p_readmit,
        disposition=disposition,
        observations=obs.frame(),
        drugs=drugs.frame(),
        infusions=infusions.frame(),
        procedures=procedures.frame(),
        complications=complications.frame(),
        locations=locations.frame(),
        scheduled=scheduled,
        recorded=recorded,
        severity_paths=[paths[i, : end_hour[i] + 1] for i in range(n)],
    )


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


def _noisy(item: str, clean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    kind, size = _NOISE[item]
    if kind == "abs":
        noisy = clean + rng.normal(0.0, size, clean.shape)
    else:
        noisy = clean * np.exp(rng.normal(0.0, size, clean.shape))
    low, high = CLEAN_RANGES[item]
    return np.clip(noisy, low, high)


def _scatter(n: int, idx: np.ndarray, values: np.ndarray) -> np.ndarray:
    out = np.full(n, np.nan)
    out[idx] = values
    return out
