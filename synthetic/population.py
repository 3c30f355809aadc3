"""A hospital's patients: demographics, latent frailty, chronic conditions and baseline physiology.

Chronic conditions have age-dependent prevalence (a logistic model in age, frailty and the conditions
that cause them: diabetes raises CKD, hypertension and coronary disease raise heart failure, ...).
Each condition shifts the patient's baseline physiology (hypertension raises blood pressure, diabetes
glucose, CKD creatinine, COPD lowers SpO2) so the chronic state is visible in the data.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np

from synthetic.codes import US_CORE_RACE
from synthetic.config import SiteProfile

# condition -> (intercept, per decade over 60, per frailty SD, {parent condition: log-odds})
PREVALENCE_MODEL: dict[str, tuple[float, float, float, dict[str, float]]] = {
    "hypertension": (-0.3, 0.65, 0.2, {}),
    "obesity": (-1.1, 0.0, 0.2, {}),
    "type2_diabetes": (-1.7, 0.3, 0.25, {"obesity": 0.9}),
    "hyperlipidemia": (-0.8, 0.35, 0.1, {"obesity": 0.4}),
    "coronary_disease": (-2.6, 0.6, 0.3, {"hypertension": 0.5, "type2_diabetes": 0.5, "hyperlipidemia": 0.4}),
    "heart_failure": (-3.2, 0.7, 0.4, {"coronary_disease": 1.0, "hypertension": 0.4}),
    "atrial_fibrillation": (-3.3, 0.8, 0.2, {"heart_failure": 0.6}),
    "copd": (-3.0, 0.5, 0.4, {}),
    "asthma": (-2.6, -0.2, 0.1, {}),
    "ckd": (-3.1, 0.6, 0.3, {"type2_diabetes": 0.8, "hypertension": 0.5}),
    "dementia": (-5.0, 1.2, 0.4, {}),
    "anemia": (-2.6, 0.3, 0.3, {"ckd": 0.8}),
}
CONDITION_ORDER = tuple(PREVALENCE_MODEL)
MAJOR_CONDITIONS = ("type2_diabetes", "heart_failure", "copd", "ckd", "coronary_disease", "dementia")

_GIVEN_NAMES = {
    "female": ("Anna", "Maria", "Sofia", "Emma", "Olivia", "Grace", "Lena", "Julia", "Ruth", "Nora", "Ines", "Mae"),
    "male": ("James", "Lucas", "Noah", "Daniel", "Pieter", "Omar", "Samuel", "Henry", "Jonas", "Victor", "Levi"),
}
_FAMILY_NAMES = (
    "Smith",
    "de Vries",
    "Johnson",
    "Jansen",
    "Garcia",
    "Bakker",
    "Nguyen",
    "Visser",
    "Brown",
    "Meijer",
    "Miller",
    "Mulder",
    "Davis",
    "Bos",
    "Lopez",
    "Dekker",
    "Wilson",
    "Peters",
    "Moore",
    "Hendriks",
)
_STREETS = ("Main St", "Oak Ave", "Kerkstraat", "Station Rd", "Elm St", "Molenweg", "Lake Dr", "Dorpsstraat")


@dataclass
class Population:
    """The patients of one site as column arrays (index = patient number within the site)."""

    n: int
    birth_date: list[dt.date]
    age_at_start: np.ndarray  # years, at the start of the history window
    female: np.ndarray
    frailty: np.ndarray
    race: list[tuple[str, str] | None]
    hispanic: np.ndarray
    conditions: dict[str, np.ndarray]  # condition -> bool array
    onset: dict[str, list[dt.date | None]]  # condition -> onset date (None if absent)
    baseline: dict[str, np.ndarray]
    given_name: list[str]
    family_name: list[str]
    street: list[str]
    postal_code: list[str]
    phone: list[str]

    def chronic_burden(self) -> np.ndarray:
        """Number of major chronic conditions per patient."""
        return np.sum([self.conditions[c] for c in MAJOR_CONDITIONS], axis=0)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def generate_population(profile: SiteProfile, n: int, history_start: dt.date, rng: np.random.Generator) -> Population:
    """Draw `n` patients for a site. Deterministic for the generator's state."""
    pediatric = rng.random(n) < profile.pediatric_share
    adult_age = np.clip(rng.normal(profile.age_mean, profile.age_sd, n), 18.0, 98.0)
    child_age = rng.uniform(1.0, 17.9, n)
    age = np.where(pediatric, child_age, adult_age)
    female = rng.random(n) < profile.female_share
    frailty = rng.standard_normal(n) + 0.02 * (age - 60)

    birth_offsets = np.round(age * 365.25).astype(int)
    birth_date = [history_start - dt.timedelta(days=int(days)) for days in birth_offsets]

    decades = (age - 60.0) / 10.0
    conditions: dict[str, np.ndarray] = {}
    for name in CONDITION_ORDER:
        intercept, per_decade, per_frailty, parents = PREVALENCE_MODEL[name]
        logit = intercept + per_decade * decades + per_frailty * frailty
        for parent, weight in parents.items():
            logit = logit + weight * conditions[parent]
        has = rng.random(n) < _sigmoid(logit)
        has &= ~pediatric | (name in ("asthma", "obesity"))
        conditions[name] = has

    onset: dict[str, list[dt.date | None]] = {}
    for name, has in conditions.items():
        # Diagnosed some years before the window, or within it (then recorded at a visit in the window).
        years_before = rng.exponential(6.0, n) - 1.0
        years_before = np.minimum(years_before, np.maximum(age - 1.0, 0.0))
        onset[name] = [
            (history_start - dt.timedelta(days=int(365.25 * yb))) if flag else None
            for flag, yb in zip(has, years_before, strict=True)
        ]

    c = conditions
    baseline = {
        "heart_rate": 74 + rng.normal(0, 7, n) + 8 * c["atrial_fibrillation"] + np.where(pediatric, 15, 0),
        "sbp": 112 + 0.35 * np.clip(age - 30, 0, None) + 14 * c["hypertension"] + rng.normal(0, 8, n),
        "resp_rate": 15 + rng.normal(0, 1.2, n) + 2 * c["copd"],
        "temperature": 36.75 + rng.normal(0, 0.15, n),
        "spo2": 97.5 - 3.0 * c["copd"] - 1.0 * c["heart_failure"] + rng.normal(0, 0.6, n),
        "glucose": 92 + 65 * c["type2_diabetes"] + rng.normal(0, 8, n),
        "creatinine": np.where(female, 0.75, 0.92)
        * np.exp(rng.normal(0, 0.12, n))
        * (1 + 0.9 * c["ckd"])
        * np.where(pediatric, 0.6, 1.0),
        "hemoglobin": np.where(female, 13.0, 14.6) - 1.8 * c["anemia"] - 0.9 * c["ckd"] + rng.normal(0, 0.6, n),
        "platelets": 250 * np.exp(rng.normal(0, 0.18, n)),
        "wbc": 7.0 * np.exp(rng.normal(0, 0.15, n)),
        # Serum albumin falls with frailty and chronic illness: the frailty a clinician can measure.
        "albumin": 4.2 - 0.3 * frailty - 0.25 * c["ckd"] - 0.2 * c["heart_failure"] + rng.normal(0, 0.2, n),
        "sodium": 139.5 + rng.normal(0, 1.5, n),
        "potassium": 4.1 + 0.3 * c["ckd"] + rng.normal(0, 0.2, n),
        "height": np.where(
            pediatric,
            np.clip(75 + 6.5 * age, 70, 185),
            np.where(female, 163.0, 177.0) + rng.normal(0, 7, n),
        ),
    }
    bmi = np.where(pediatric, 18.0, 25.5 + 8.0 * c["obesity"]) + rng.normal(0, 2.8, n)
    baseline["weight"] = np.clip(bmi * (baseline["height"] / 100.0) ** 2, 8.0, 250.0)
    baseline["hba1c"] = np.where(c["type2_diabetes"], 7.6 + rng.normal(0, 1.0, n), 5.3 + rng.normal(0, 0.3, n))

    race: list[tuple[str, str] | None]
    if profile.records_race:
        weights = np.array([w for _, _, w in US_CORE_RACE])
        picks = rng.choice(len(US_CORE_RACE), size=n, p=weights / weights.sum())
        race = [(US_CORE_RACE[i][0], US_CORE_RACE[i][1]) for i in picks]
    else:
        race = [None] * n
    hispanic = rng.random(n) < profile.hispanic_share

    given_name = [
        _GIVEN_NAMES["female" if f else "male"][i % len(_GIVEN_NAMES["female" if f else "male"])]
        for f, i in zip(female, rng.integers(0, 1000, n), strict=True)
    ]
    family_name = [_FAMILY_NAMES[i] for i in rng.integers(0, len(_FAMILY_NAMES), n)]
    street = [f"{num} {_STREETS[s]}" for num, s in zip(rng.integers(1, 400, n), rng.integers(0, 8, n), strict=True)]
    postal_code = [f"{code:05d}" for code in rng.integers(1000, 99999, n)]
    phone = [
        f"+1-555-{a:03d}-{b:04d}" for a, b in zip(rng.integers(100, 999, n), rng.integers(0, 9999, n), strict=True)
    ]

    return Population(
        n=n,
        birth_date=birth_date,
        age_at_start=age,
        female=female,
        frailty=frailty,
        race=race,
        hispanic=hispanic,
        conditions=conditions,
        onset=onset,
        baseline=baseline,
        given_name=given_name,
        family_name=family_name,
        street=street,
        postal_code=postal_code,
        phone=phone,
    )
