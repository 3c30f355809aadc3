"""Each patient's history over the export window: outpatient visits, admissions, readmissions, death.

Admissions arrive as a Poisson process whose rate grows with frailty, chronic burden and age; the
reason is drawn from the site's case mix, weighted by the patient's conditions (heart-failure and
COPD exacerbations need the disease). Stays are simulated in waves (one admission per patient per
wave) because each discharge decides what comes next:

* a stay that ends in death ends the history;
* a patient discharged alive is readmitted within 30 days with exactly the stay's true readmission
  probability, and no other admission falls in those 30 days, so the readmission label is a clean
  Bernoulli draw from the ground-truth probability;
* stays still running at the export date are exported in progress (no end, no outcome) and flagged
  as censored in the ground truth.

Patients may also die outside hospital (a background hazard); such deaths are moved out of any stay
and out of the 30 days after a discharge, so they never change an in-hospital or readmission label.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from synthetic.config import AdmissionReason, SiteProfile
from synthetic.inpatient import Admissions, CounterfactualHook, StayOutcomes, simulate_stays
from synthetic.population import Population

DAY = 86400.0
READMISSION_WINDOW = 30 * DAY
EPOCH = dt.datetime(1970, 1, 1)


def to_seconds(when: dt.date | dt.datetime) -> float:
    """Local wall-clock time as seconds since the epoch (no time zone: the site's offset is added on export)."""
    if not isinstance(when, dt.datetime):
        when = dt.datetime(when.year, when.month, when.day)
    return (when - EPOCH).total_seconds()


@dataclass
class Visit:
    """An outpatient or emergency visit (no physiology simulation, a few measurements)."""

    patient: int
    kind: str  # "AMB" or "EMER"
    start: float
    end: float


@dataclass
class StayRef:
    """Where one inpatient stay lives: its batch and row, its times, and what followed it."""

    batch: int
    row: int
    patient: int
    start: float
    end: float | None  # None while still in hospital at export (censored)
    readmitted_within_30d: bool | None = None
    is_readmission: bool = False
    # Set by the operations layer (operations.py) only; None: the export derives both from the clinical course.
    segments: list[tuple[str, float, float | None]] | None = None  # (location, start, end or None) in calendar time
    elective: bool = False


class AdmissionClock(Protocol):
    """When admissions happen, for a site with operations (operations.AdmissionClock): the timeline's own uniform
    draws mapped onto the arrival pattern, so the timeline keeps every rule (30-day windows, deaths) on them."""

    def admission_times(self, patient: int, uniforms: np.ndarray) -> np.ndarray: ...

    def readmission_time(self, discharge: float, when: float) -> float: ...


@dataclass
class Timeline:
    """All encounters of a site, plus the per-patient facts the export and ground truth need."""

    visits: list[Visit]
    stays: list[StayRef]
    batches: list[StayOutcomes]
    death_time: np.ndarray  # seconds; inf when alive at export
    death_in_hospital: np.ndarray
    first_contact: np.ndarray  # seconds of the patient's first encounter in the window
    export_time: float
    batch_sort: list[dict[str, np.ndarray]] = field(default_factory=list)


def _reason_weights(profile: SiteProfile, pop: Population, patient: int) -> tuple[list[AdmissionReason], np.ndarray]:
    c = {name: bool(flags[patient]) for name, flags in pop.conditions.items()}
    child = pop.age_at_start[patient] < 18
    reasons = list(profile.case_mix)
    weights = []
    for reason in reasons:
        w = profile.case_mix[reason]
        if reason is AdmissionReason.HEART_FAILURE:
            w *= 3.0 if c["heart_failure"] else 0.3
        elif reason is AdmissionReason.COPD_EXACERBATION:
            w *= 4.0 if c["copd"] else 0.0
        elif reason is AdmissionReason.ACUTE_MI:
            w *= 1.8 if c["coronary_disease"] else 0.6
        elif reason is AdmissionReason.ACUTE_KIDNEY_INJURY:
            w *= 2.0 if c["ckd"] else 0.8
        if child and reason not in (AdmissionReason.PNEUMONIA, AdmissionReason.SEPSIS, AdmissionReason.COVID19):
            w = 0.0
        weights.append(w)
    weights_arr = np.asarray(weights, dtype=float)
    if weights_arr.sum() <= 0:
        weights_arr = np.array([profile.case_mix[r] for r in reasons], dtype=float)
    return reasons, weights_arr / weights_arr.sum()


def admission_rates(profile: SiteProfile, pop: Population) -> np.ndarray:
    """Each patient's rate of first admissions per year while at risk (alive, not in hospital, not within 30
    days of a discharge): it grows with frailty, chronic burden and age; children's is lower."""
    rate = profile.admission_rate_per_year * np.exp(
        0.45 * pop.frailty + 0.25 * pop.chronic_burden() + 0.15 * (pop.age_at_start - 65) / 10
    )
    return np.where(pop.age_at_start < 18, rate * 0.3, rate)


def build_timeline(
    profile: SiteProfile,
    pop: Population,
    history_start: dt.date,
    export_date: dt.date,
    rng: np.random.Generator,
    mc_rng: np.random.Generator,
    replicates: int = 64,
    counterfactuals: CounterfactualHook | None = None,
    clock: AdmissionClock | None = None,
) -> Timeline:
    """Simulate every patient's encounters over the window [history_start, export_date).

    `counterfactuals` follows each wave of stays for the counterfactual ground truth (it draws nothing from
    `rng` or `mc_rng`, so the timeline is the same with or without it). `clock` (sites with operations only)
    maps the same uniform draws onto the site's arrival pattern instead of spreading them evenly; it draws
    from its own stream, never from `rng`.
    """
    n = pop.n
    t0, t_end = to_seconds(history_start), to_seconds(export_date)
    years = (t_end - t0) / (365.25 * DAY)
    burden = pop.chronic_burden()

    # Background (out-of-hospital) death.
    bg_rate = 0.004 * np.exp(0.085 * (pop.age_at_start - 65) + 0.4 * pop.frailty + 0.3 * burden)
    bg_death = t0 + rng.exponential(1.0 / bg_rate) * 365.25 * DAY
    death_time = np.where(bg_death < t_end, bg_death, np.inf)
    death_in_hospital = np.zeros(n, dtype=bool)

    # Candidate admission times (Poisson process).
    rate = admission_rates(profile, pop)
    counts = rng.poisson(rate * years)
    if clock is None:
        candidates: list[list[float]] = [sorted((t0 + rng.random(k) * (t_end - t0)).tolist()) for k in counts]
    else:
        candidates = [sorted(clock.admission_times(p, rng.random(k)).tolist()) for p, k in enumerate(counts)]
    # Readmissions scheduled by earlier stays: patient -> (time, reason)
    scheduled: dict[int, tuple[float, AdmissionReason]] = {}
    blocked_until = np.full(n, t0)  # no new admission before this time (stay + 30-day window)

    stays: list[StayRef] = []
    batches: list[StayOutcomes] = []
    batch_no = 0
    while True:
        patients: list[int] = []
        starts: list[float] = []
        reasons: list[AdmissionReason] = []
        readmit_flags: list[bool] = []
        for p in range(n):
            if p in scheduled:
                when, reason = scheduled.pop(p)
                if when < min(t_end, death_time[p]):
                    patients.append(p)
                    starts.append(when)
                    reasons.append(reason)
                    readmit_flags.append(True)
                continue
            queue = candidates[p]
            while queue and queue[0] < blocked_until[p]:
                queue.pop(0)
            if queue and queue[0] < min(t_end, death_time[p]):
                when = queue.pop(0)
                options, weights = _reason_weights(profile, pop, p)
                patients.append(p)
                starts.append(when)
                reasons.append(options[int(rng.choice(len(options), p=weights))])
                readmit_flags.append(False)
        if not patients:
            break
        pid = np.asarray(patients)
        start = np.floor(np.asarray(starts) / 60.0) * 60.0
        age = pop.age_at_start[pid] + (start - t0) / (365.25 * DAY)
        outcome = simulate_stays(
            Admissions(pid, start, reasons, np.asarray(readmit_flags)),
            pop,
            profile,
            age,
            rng,
            mc_rng,
            replicates=replicates,
            counterfactuals=counterfactuals,
        )
        batches.append(outcome)
        for row, p in enumerate(pid):
            begin = float(start[row])
            finish = begin + float(outcome.end_hour[row]) * 3600.0
            ref = StayRef(
                batch=batch_no, row=row, patient=int(p), start=begin, end=finish, is_readmission=readmit_flags[row]
            )
            stays.append(ref)
            if finish >= t_end:
                ref.end = None  # still in hospital at export: censored
                blocked_until[p] = np.inf
                continue
            if outcome.died[row]:
                death_time[p] = finish
                death_in_hospital[p] = True
                continue
            readmit = rng.random() < outcome.p_readmission_30d[row]
            ref.readmitted_within_30d = bool(readmit)
            blocked_until[p] = finish + READMISSION_WINDOW
            if readmit:
                gap = max(0.5 * DAY, READMISSION_WINDOW * rng.beta(1.2, 2.5))
                same = rng.random() < 0.5
                if same:
                    reason = reasons[row]
                else:
                    options, weights = _reason_weights(profile, pop, int(p))
                    reason = options[int(rng.choice(len(options), p=weights))]
                when = finish + gap if clock is None else clock.readmission_time(finish, finish + gap)
                scheduled[int(p)] = (when, reason)
            # A background death inside the readmission window moves past it.
            if finish <= death_time[p] < finish + READMISSION_WINDOW and not death_in_hospital[p]:
                death_time[p] = finish + READMISSION_WINDOW + rng.random() * 10 * DAY
                if death_time[p] >= t_end:
                    death_time[p] = np.inf
        batch_no += 1

    # Background deaths that fall inside a stay move to 31+ days after its discharge.
    for ref in stays:
        p = ref.patient
        if death_in_hospital[p] or not np.isfinite(death_time[p]):
            continue
        stay_end = ref.end if ref.end is not None else np.inf
        if ref.start <= death_time[p] <= stay_end:
            moved = stay_end + READMISSION_WINDOW + rng.random() * 10 * DAY
            death_time[p] = moved if moved < t_end else np.inf

    visits = _outpatient_and_emergency_visits(profile, pop, stays, death_time, t0, t_end, burden, rng)
    first_contact = np.full(n, np.inf)
    for v in visits:
        first_contact[v.patient] = min(first_contact[v.patient], v.start)
    for ref in stays:
        first_contact[ref.patient] = min(first_contact[ref.patient], ref.start)
    return Timeline(
        visits=visits,
        stays=stays,
        batches=batches,
        death_time=death_time,
        death_in_hospital=death_in_hospital,
        first_contact=first_contact,
        export_time=t_end,
    )


def _outpatient_and_emergency_visits(
    profile: SiteProfile,
    pop: Population,
    stays: list[StayRef],
    death_time: np.ndarray,
    t0: float,
    t_end: float,
    burden: np.ndarray,
    rng: np.random.Generator,
) -> list[Visit]:
    """Clinic visits (at least one per patient, the registration visit) and a few ER visits."""
    years = (t_end - t0) / (365.25 * DAY)
    busy: dict[int, list[tuple[float, float]]] = {}
    for ref in stays:
        busy.setdefault(ref.patient, []).append((ref.start, ref.end if ref.end is not None else np.inf))
    visits: list[Visit] = []
    for p in range(pop.n):
        last = min(t_end, death_time[p])
        k = max(1, rng.poisson(profile.outpatient_visits_per_year * (1 + 0.3 * burden[p]) * years))
        times = t0 + rng.random(k) * (last - t0)
        times[0] = t0 + rng.random() * min(120 * DAY, last - t0)  # the registration visit comes early
        for when in sorted(times):
            day_start = np.floor(when / DAY) * DAY
            start = day_start + (8 + rng.integers(0, 9)) * 3600 + 15 * 60 * rng.integers(0, 4)
            end = start + 20 * 60
            if end >= last or any(s - DAY <= start <= e + DAY for s, e in busy.get(p, [])):
                continue
            visits.append(Visit(patient=p, kind="AMB", start=float(start), end=float(end)))
        for when in t0 + rng.random(rng.poisson(0.08 * years)) * (last - t0):
            start = np.floor(when / 60.0) * 60.0
            end = start + (2 + rng.random() * 4) * 3600
            if end >= last or any(s - DAY <= start <= e + DAY for s, e in busy.get(p, [])):
                continue
            visits.append(Visit(patient=p, kind="EMER", start=float(start), end=float(end)))
    visits.sort(key=lambda v: (v.patient, v.start))
    return visits
