"""The latent course of an inpatient stay: severity, death, discharge, and the true outcome probabilities.

Every stay has a latent acute severity S(t) (0 = physiologically stable, ~1 a typical admission,
>2.5 critical), simulated in one-hour steps:

    S(t+1) = max(0, S(t) + d0 * exp(-t / tau) - r(t) * S(t) + 0.05 * noise + jump)

* d0 * exp(-t/tau) is the disease's initial push (deterioration that fades),
* r(t) is the recovery rate: a reason-specific base rate, lower for frail and old patients, multiplied
  up once the disease-specific treatment has started (antibiotics, PCI, steroids, diuretics) and down
  before it, so treatment delay changes outcomes,
* jump is a rare second hit (a hospital-acquired complication).

Death has an hourly hazard exp(b0 + 1.45*S + 0.3*frailty + 0.035*(age-65)); a patient may go home once
S has stayed below 0.6 for 12 hours and at least 25 hours have passed, with a discharge hazard that is
high in daytime and low at night; every stay ends by day 30.

The same `step` drives the realized stay (which the FHIR export shows) and the Monte-Carlo replicates
that give each stay's true probabilities at the prediction time (24 hours after admission), so the
ground truth is exact for the process that produced the data, up to Monte-Carlo error.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Protocol

import numpy as np

from synthetic.config import AdmissionReason

PREDICTION_HOUR = 24
MIN_STAY_HOURS = 25  # one hour past the prediction time, so every discharge follows it
MAX_STAY_HOURS = 720
STABLE_SEVERITY = 0.6
STABLE_HOURS_FOR_DISCHARGE = 12
SEVERITY_NOISE_SD = 0.05
SECOND_HIT_RATE = 0.0008
SECOND_HIT_MEAN = 0.8
DEATH_INTERCEPT = -9.3
DEATH_PER_SEVERITY = 1.45
DEATH_PER_FRAILTY = 0.3
DEATH_PER_AGE_YEAR = 0.035
DAYTIME_DISCHARGE_RATE = 0.12
NIGHT_DISCHARGE_FACTOR = 0.08


@dataclass(frozen=True)
class ReasonDynamics:
    """How one admission reason behaves: its course and which organ systems it shows in."""

    initial_severity: float
    drive: float
    drive_decay_hours: float
    recovery_per_hour: float
    respiratory: float
    cardiovascular: float
    renal: float
    inflammatory: float
    fluid: float
    treatment: str
    treated_multiplier: float
    untreated_multiplier: float


REASONS: dict[AdmissionReason, ReasonDynamics] = {
    AdmissionReason.SEPSIS: ReasonDynamics(1.35, 0.06, 12, 0.012, 0.4, 0.9, 0.6, 1.0, 0.0, "antibiotics", 2.0, 0.5),
    AdmissionReason.PNEUMONIA: ReasonDynamics(1.0, 0.04, 12, 0.013, 1.0, 0.3, 0.2, 0.8, 0.0, "antibiotics", 1.8, 0.6),
    AdmissionReason.COVID19: ReasonDynamics(0.95, 0.035, 36, 0.010, 1.0, 0.2, 0.2, 0.6, 0.0, "dexamethasone", 1.4, 0.9),
    AdmissionReason.HEART_FAILURE: ReasonDynamics(1.05, 0.02, 12, 0.014, 0.6, 0.5, 0.4, 0.0, 1.0, "diuretic", 1.5, 0.6),
    AdmissionReason.ACUTE_MI: ReasonDynamics(1.1, 0.035, 8, 0.016, 0.2, 1.0, 0.2, 0.2, 0.3, "pci", 1.8, 0.8),
    AdmissionReason.STROKE: ReasonDynamics(0.95, 0.012, 12, 0.009, 0.2, 0.3, 0.1, 0.1, 0.0, "supportive", 1.0, 1.0),
    AdmissionReason.ACUTE_KIDNEY_INJURY: ReasonDynamics(
        0.85, 0.02, 12, 0.014, 0.1, 0.2, 1.0, 0.1, 0.3, "supportive", 1.0, 1.0
    ),
    AdmissionReason.COPD_EXACERBATION: ReasonDynamics(
        0.95, 0.03, 12, 0.014, 1.0, 0.3, 0.0, 0.4, 0.0, "steroid", 1.6, 0.7
    ),
}


@dataclass
class CourseParams:
    """Per-stay parameters of the latent course (1-D arrays, or (n, 1) for Monte-Carlo broadcasting)."""

    age: np.ndarray
    frailty: np.ndarray
    drive0: np.ndarray
    drive_tau: np.ndarray
    recovery: np.ndarray
    treatment_start: np.ndarray  # hours after admission; inf when the treatment is never given
    treated_mult: np.ndarray
    untreated_mult: np.ndarray
    hit_rate: np.ndarray
    discharge_rate: np.ndarray
    admit_hour: np.ndarray  # hour of day of admission, 0..23

    def take(self, index: np.ndarray) -> CourseParams:
        """The parameters of a subset of stays."""
        return CourseParams(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    @classmethod
    def concat(cls, parts: list[CourseParams]) -> CourseParams:
        """The parameters of several groups of stays, one after another (stays sampled from several batches)."""
        return cls(**{f.name: np.concatenate([getattr(part, f.name) for part in parts]) for f in fields(cls)})

    def column(self) -> CourseParams:
        """The same parameters shaped (n, 1), to broadcast against (n, replicates) state arrays."""
        return CourseParams(**{f.name: getattr(self, f.name)[:, None] for f in fields(self)})


class RandomDraws(Protocol):
    """The part of numpy's Generator the latent course draws from.

    A protocol rather than the Generator itself so that the counterfactual re-simulation can hand the same
    course code draws it controls (common random numbers shared between scenarios of one stay).
    """

    def random(self, size: tuple[int, ...]) -> np.ndarray: ...

    def exponential(self, scale: float, size: tuple[int, ...]) -> np.ndarray: ...

    def standard_normal(self, size: tuple[int, ...]) -> np.ndarray: ...


def severity_draws(rng: RandomDraws, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The three draws one hour of the course consumes, in the order the generator has always taken them.

    Returns (uniform for the second hit, size of a second hit, standard normal noise). The order is part of
    the output: every synthetic export depends on it.
    """
    return rng.random(shape), rng.exponential(SECOND_HIT_MEAN, shape), rng.standard_normal(shape)


def advance_severity(
    severity: np.ndarray,
    hour: int,
    p: CourseParams,
    hit_uniform: np.ndarray,
    hit_size: np.ndarray,
    noise: np.ndarray,
) -> np.ndarray:
    """Advance S by one hour (from `hour` to `hour + 1`) given that hour's draws (see severity_draws).

    Split from the draws so that a re-simulation can replay the draws a stay received in its factual course.
    """
    drive = p.drive0 * np.exp(-hour / p.drive_tau)
    recovery = p.recovery * np.where(hour >= p.treatment_start, p.treated_mult, p.untreated_mult)
    jump = np.where(hit_uniform < p.hit_rate, hit_size, 0.0)
    return np.maximum(0.0, severity + drive - recovery * severity + SEVERITY_NOISE_SD * noise + jump)


def step_severity(severity: np.ndarray, hour: int, p: CourseParams, rng: RandomDraws) -> np.ndarray:
    """Advance S by one hour (from `hour` to `hour + 1`), drawing from `rng`."""
    return advance_severity(severity, hour, p, *severity_draws(rng, severity.shape))


def death_hazard(severity: np.ndarray, p: CourseParams) -> np.ndarray:
    """Hourly death hazard at severity S."""
    return np.exp(
        DEATH_INTERCEPT
        + DEATH_PER_SEVERITY * severity
        + DEATH_PER_FRAILTY * p.frailty
        + DEATH_PER_AGE_YEAR * (p.age - 65.0)
    )


def discharge_hazard(stable_hours: np.ndarray, hour: int, p: CourseParams) -> np.ndarray:
    """Hourly discharge hazard at the end of hour `hour` (zero until the patient is eligible)."""
    hour_of_day = (p.admit_hour + hour) % 24
    daytime = (hour_of_day >= 9) & (hour_of_day < 19)
    rate = p.discharge_rate * np.where(daytime, 1.0, NIGHT_DISCHARGE_FACTOR)
    eligible = (hour >= MIN_STAY_HOURS) & (stable_hours >= STABLE_HOURS_FOR_DISCHARGE)
    return np.where(eligible, rate, 0.0)


def update_stable_hours(stable_hours: np.ndarray, severity: np.ndarray) -> np.ndarray:
    """Consecutive hours with S below the stability threshold."""
    return np.where(severity < STABLE_SEVERITY, stable_hours + 1, 0)


@dataclass
class CourseProbabilities:
    """True outcome probabilities of stays alive at the prediction hour, from Monte-Carlo replicates."""

    death: np.ndarray
    los_over_7_days: np.ndarray
    replicates: int


def outcome_probabilities(
    severity: np.ndarray,
    stable_hours: np.ndarray,
    params: CourseParams,
    rng: RandomDraws,
    replicates: int = 64,
    start_hour: int = PREDICTION_HOUR,
) -> CourseProbabilities:
    """P(in-hospital death) and P(length of stay > 7 days) given the latent state at `start_hour`.

    Death is integrated exactly along each replicate (probability 1 - exp(-cumulative hazard) up to its
    discharge), so the Monte-Carlo error comes only from the course itself.
    """
    n = severity.shape[0]
    if n == 0:
        empty = np.zeros(0)
        return CourseProbabilities(empty, empty, replicates)
    p = params.column()
    s = np.repeat(severity[:, None], replicates, axis=1).astype(float)
    stable = np.repeat(stable_hours[:, None], replicates, axis=1)
    in_hospital = np.ones_like(s, dtype=bool)
    cumulative_hazard = np.zeros_like(s)
    hazard_at_week = np.full_like(s, np.nan)
    in_hospital_at_week = np.zeros_like(s, dtype=bool)
    week = 7 * 24
    for hour in range(start_hour, MAX_STAY_HOURS):
        s = step_severity(s, hour, p, rng)
        stable = update_stable_hours(stable, s)
        cumulative_hazard += np.where(in_hospital, death_hazard(s, p), 0.0)
        next_hour = hour + 1
        if next_hour >= MAX_STAY_HOURS:
            leave = in_hospital
        else:
            leave = in_hospital & (rng.random(s.shape) < -np.expm1(-discharge_hazard(stable, next_hour, p)))
        in_hospital &= ~leave
        if next_hour == week:
            hazard_at_week = cumulative_hazard.copy()
            in_hospital_at_week = in_hospital.copy()
        if not in_hospital.any():
            break
    if start_hour >= week:
        raise ValueError("the prediction hour must come before day 7")
    if np.isnan(hazard_at_week).all():  # every replicate left before day 7
        hazard_at_week = cumulative_hazard
    death = -np.expm1(-cumulative_hazard).mean(axis=1)
    los_over_week = (in_hospital_at_week * np.exp(-hazard_at_week)).mean(axis=1)
    return CourseProbabilities(death=death, los_over_7_days=los_over_week, replicates=replicates)


def readmission_probability(
    severity_at_discharge: np.ndarray,
    frailty: np.ndarray,
    age: np.ndarray,
    chronic_burden: np.ndarray,
    heart_failure: np.ndarray,
    copd: np.ndarray,
    length_of_stay_hours: np.ndarray,
    site_offset: float,
) -> np.ndarray:
    """P(readmission within 30 days) of a patient discharged alive, given the state at discharge."""
    logit = (
        -2.7
        + 1.1 * severity_at_discharge
        + 0.35 * frailty
        + 0.22 * chronic_burden
        + 0.4 * heart_failure
        + 0.3 * copd
        + 0.3 * (length_of_stay_hours > 7 * 24)
        + 0.15 * (age - 65.0) / 10.0
        + site_offset
    )
    return 1.0 / (1.0 + np.exp(-logit))
