"""What a synthetic consortium looks like: the generation settings and one profile per hospital.

Hospitals differ the way real ones do, and every difference is a field here so it can be read, tested
and changed: who they treat (age, case mix, admission rate), how they measure (vital-sign and lab
frequency, missingness, units), how they code (specific or generic SNOMED, ingredient or clinical-drug
RxNorm), how they treat (antibiotic delay, cath lab) and how messy their exports are (defect rates).
A consortium may bring its own profiles as a YAML file (`twinfed synth --profiles FILE`).
"""

from __future__ import annotations

import datetime as dt
from enum import StrEnum
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class AdmissionReason(StrEnum):
    """Why a patient is admitted; each reason has its own latent course (see physiology.REASONS)."""

    SEPSIS = "sepsis"
    PNEUMONIA = "pneumonia"
    COVID19 = "covid19"
    HEART_FAILURE = "heart_failure"
    ACUTE_MI = "acute_mi"
    STROKE = "stroke"
    ACUTE_KIDNEY_INJURY = "aki"
    COPD_EXACERBATION = "copd_exacerbation"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class UnitConventions(_Strict):
    """Units a hospital's laboratory system reports in (the ETL normalises them later)."""

    glucose: Literal["mg/dL", "mmol/L"] = "mg/dL"
    creatinine: Literal["mg/dL", "umol/L"] = "mg/dL"
    hemoglobin: Literal["g/dL", "g/L"] = "g/dL"
    temperature: Literal["Cel", "[degF]"] = "Cel"


class Missingness(_Strict):
    """How often a scheduled measurement is not recorded.

    `base_rate` is the probability for a patient of average severity. `informativeness` tilts it:
    stable patients are skipped more often and deteriorating ones less, as on real wards, so a
    missing value carries information about the patient.
    """

    base_rate: float = Field(0.1, ge=0.0, le=0.6)
    informativeness: float = Field(0.5, ge=0.0, le=1.0)


class ConsentSettings(_Strict):
    """Research-consent records the hospital holds (FHIR Consent, scope research)."""

    opt_out_share: float = Field(0.04, ge=0.0, le=0.2, description="patients who deny research use")
    withdrawn_later_share: float = Field(
        0.3, ge=0.0, le=1.0, description="of those, the share who first permitted and withdrew later"
    )
    explicit_permit_share: float = Field(0.15, ge=0.0, le=1.0, description="patients with a recorded permit")


class DefectRates(_Strict):
    """Probability, per exported record of an eligible type, of each injected defect.

    Defects are disjoint: a record carries at most one. Every injected defect is listed in the site's
    ground-truth file with its file, line and record id.
    """

    malformed_json: float = Field(0.0005, ge=0.0, le=0.05)
    schema_violation: float = Field(0.0005, ge=0.0, le=0.05)
    invalid_date: float = Field(0.0003, ge=0.0, le=0.05)
    impossible_date: float = Field(0.0005, ge=0.0, le=0.05)
    invalid_code: float = Field(0.001, ge=0.0, le=0.05)
    dangling_reference: float = Field(0.0005, ge=0.0, le=0.05)
    duplicate: float = Field(0.001, ge=0.0, le=0.05)
    implausible_value: float = Field(0.0005, ge=0.0, le=0.05)

    def scaled(self, factor: float) -> DefectRates:
        """The same catalogue with every rate multiplied by `factor` (capped at the field maximum)."""
        return DefectRates(**{name: min(0.05, value * factor) for name, value in self.model_dump().items()})


class WardCapacity(_Strict):
    """One ward's beds and how many of them are staffed at night (the rest of the day all are).

    Staffed capacity is max(1, floor(beds x share)), the hospital twin's own rule: a shift change never moves
    a patient out of a bed, it only stops new patients taking one until the count is under the new capacity.
    """

    beds: int = Field(ge=1, le=5000)
    night_staffed_share: float = Field(1.0, gt=0.0, le=1.0)


def _diurnal() -> tuple[float, ...]:
    # Emergency admissions by hour of day (relative): a trough at 4-6 h, a rise through the morning, a broad
    # plateau from late morning to the evening, as emergency departments report.
    return (0.55, 0.45, 0.4, 0.35, 0.3, 0.3, 0.4, 0.6, 0.9, 1.2, 1.4, 1.5,
            1.5, 1.5, 1.5, 1.45, 1.4, 1.4, 1.35, 1.3, 1.2, 1.0, 0.85, 0.7)  # fmt: skip


def _discharge_hours() -> tuple[float, ...]:
    # When patients ready for discharge outside the discharge window actually leave the next time it opens:
    # relative weights of the hours of the window (late morning to afternoon, after the ward round).
    return (0.0,) * 10 + (1.0, 2.0, 2.5, 2.0, 1.5, 1.0, 0.6, 0.4) + (0.0,) * 6


class OperationsProfile(_Strict):
    """The hospital as an operation (opt-in): beds, staffed shifts, the arrival pattern and discharge timing.

    With it, admissions follow an hour-of-day, day-of-week and seasonal pattern with occasional surges,
    a share of first admissions is elective (weekday mornings, straight to a ward), and a calendar-time
    simulation of the beds (synthetic/operations.py) decides when each patient really gets a bed: patients
    board in the emergency department while the ward is full, a transfer that finds the next ward full waits
    in its bed, and discharges happen in the discharge window. See docs/synthetic-data.md, "Operations".
    The clinical course (severity, the ward/ICU decision, measurements) is the same simulation as without it.
    """

    ward: WardCapacity = WardCapacity(beds=8, night_staffed_share=0.875)
    icu: WardCapacity = WardCapacity(beds=3)
    night_start_hour: int = Field(22, ge=0, le=23, description="first hour of the night shift")
    night_end_hour: int = Field(7, ge=0, le=24, description="first hour after it (across midnight when smaller)")
    emergency_hour_weights: tuple[float, ...] = Field(
        default_factory=_diurnal, description="24 relative weights of emergency admissions by hour of day"
    )
    weekday_factors: tuple[float, ...] = Field(
        (1.15, 1.05, 1.0, 1.0, 1.0, 0.9, 0.9), description="7 factors on emergency admissions, Monday first"
    )
    seasonal_amplitude: float = Field(0.15, ge=0.0, le=0.9, description="emergency rate x (1 + A cos(season))")
    seasonal_peak_day: int = Field(20, ge=1, le=366, description="day of the year with the highest rate")
    surges_per_year: float = Field(2.0, ge=0.0, le=24.0, description="surges start as a Poisson process")
    surge_days: int = Field(10, ge=1, le=60)
    surge_factor: float = Field(1.6, ge=1.0, le=5.0, description="emergency rate multiplier during a surge")
    elective_share: float = Field(0.15, ge=0.0, le=0.9, description="share of first admissions that are planned")
    elective_start_hour: int = Field(7, ge=0, le=23, description="electives arrive Monday-Friday in [start, end)")
    elective_end_hour: int = Field(11, ge=1, le=24)
    discharge_start_hour: int = Field(10, ge=0, le=23, description="patients are discharged in [start, end)")
    discharge_end_hour: int = Field(18, ge=1, le=24)
    discharge_hour_weights: tuple[float, ...] = Field(
        default_factory=_discharge_hours, description="24 weights: when a patient kept overnight leaves"
    )
    truth_window_days: int = Field(30, ge=1, le=120, description="days the scenario ground truth covers")
    truth_window_end_days_before_export: int = Field(
        15, ge=0, le=3650, description="the window ends this many days before the export date"
    )
    truth_replicates: int = Field(40, ge=2, le=2000, description="Monte-Carlo replicates of the expected effects")

    @model_validator(mode="after")
    def _shapes(self) -> OperationsProfile:
        for name, size in (("emergency_hour_weights", 24), ("weekday_factors", 7), ("discharge_hour_weights", 24)):
            values = getattr(self, name)
            if len(values) != size or any(v < 0 for v in values) or sum(values) <= 0:
                raise ValueError(f"{name} needs {size} non-negative values, not all zero (got {len(values)})")
        if self.elective_end_hour <= self.elective_start_hour:
            raise ValueError("elective_end_hour must come after elective_start_hour (same day)")
        if self.discharge_end_hour <= self.discharge_start_hour:
            raise ValueError("discharge_end_hour must come after discharge_start_hour (same day)")
        window = self.discharge_hour_weights[self.discharge_start_hour : self.discharge_end_hour]
        if sum(window) <= 0:
            raise ValueError("discharge_hour_weights must give weight to some hour of the discharge window")
        return self

    def night_hours(self) -> list[int]:
        """The hours of the day in the night shift."""
        if self.night_end_hour > self.night_start_hour:
            return list(range(self.night_start_hour, self.night_end_hour))
        return list(range(self.night_start_hour, 24)) + list(range(0, self.night_end_hour))


class SiteProfile(_Strict):
    """One hospital of the synthetic consortium."""

    site_id: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{1,40}$")
    name: str
    kind: Literal["academic", "community", "rural"]
    city: str
    country: str = Field(pattern=r"^[A-Z]{2}$")
    utc_offset_hours: int = Field(0, ge=-12, le=14)

    age_mean: float = Field(ge=20, le=90)
    age_sd: float = Field(ge=5, le=30)
    pediatric_share: float = Field(0.0, ge=0.0, le=0.3)
    female_share: float = Field(0.5, ge=0.2, le=0.8)
    records_race: bool = True
    hispanic_share: float = Field(0.1, ge=0.0, le=1.0)

    admission_rate_per_year: float = Field(ge=0.01, le=2.0)
    case_mix: dict[AdmissionReason, float]
    severity_offset: float = Field(0.0, ge=-1.0, le=1.0)
    readmission_offset: float = Field(0.0, ge=-2.0, le=2.0)
    outpatient_visits_per_year: float = Field(1.5, ge=0.0, le=12.0)

    vitals_every_hours: float = Field(ge=1.0, le=12.0)
    labs_every_hours: float = Field(ge=6.0, le=72.0)
    missingness: Missingness = Missingness()
    units: UnitConventions = UnitConventions()
    condition_coding: Literal["specific", "generic"] = "specific"
    drug_coding: Literal["ingredient", "clinical_drug"] = "ingredient"
    has_cath_lab: bool = True
    antibiotic_delay_hours: float = Field(3.0, ge=0.25, le=12.0)
    discharge_speed: float = Field(1.0, ge=0.2, le=3.0)

    consent: ConsentSettings = ConsentSettings()
    defects: DefectRates = DefectRates()
    operations: OperationsProfile | None = Field(
        None, description="beds, shifts, arrival pattern and discharge timing; absent: no capacity (as before)"
    )

    @field_validator("case_mix")
    @classmethod
    def _case_mix_positive(cls, value: dict[AdmissionReason, float]) -> dict[AdmissionReason, float]:
        if not value or any(weight < 0 for weight in value.values()) or sum(value.values()) <= 0:
            raise ValueError("case_mix needs at least one admission reason with a positive weight")
        return value


class SynthConfig(_Strict):
    """Settings of one `twinfed synth` run. The same settings and seed give byte-identical files."""

    sites: int = Field(3, ge=1, le=200)
    patients_per_site: int = Field(2000, ge=10, le=1_000_000)
    seed: int = Field(7, ge=0)
    export_date: dt.date = dt.date(2026, 1, 1)
    history_years: float = Field(3.0, gt=0.0, le=20.0)
    profiles: list[SiteProfile] | None = None
    counterfactual_stays: int = Field(
        40,
        ge=0,
        le=1_000,
        description="stays per site re-simulated under the counterfactual scenarios (ground truth only; 0: none)",
    )
    counterfactual_horizon_hours: int = Field(
        48, ge=1, le=168, description="hours after the decision hour that each counterfactual trajectory covers"
    )

    @model_validator(mode="after")
    def _profiles_unique(self) -> SynthConfig:
        if self.profiles is not None:
            ids = [p.site_id for p in self.profiles]
            if len(set(ids)) != len(ids):
                raise ValueError(f"site_id values must be unique, got {ids}")
        return self

    @property
    def history_start(self) -> dt.date:
        """First day of the exported history window."""
        return self.export_date - dt.timedelta(days=round(365.25 * self.history_years))

    def site_profiles(self) -> list[SiteProfile]:
        """The profile of every site: the user's own, else the built-in hospitals (extended past three)."""
        if self.profiles is not None:
            base = list(self.profiles)
            if len(base) >= self.sites:
                return base[: self.sites]
            return [*base, *derived_profiles(base, self.sites - len(base), self.seed)]
        base = list(BUILTIN_PROFILES)
        if self.sites <= len(base):
            return base[: self.sites]
        return [*base, *derived_profiles(base, self.sites - len(base), self.seed)]


def load_profiles(path: Path) -> list[SiteProfile]:
    """Read site profiles from YAML (a list, or a mapping with a `sites` list) with errors that name the site.

    Raises ValueError whose message names the file, the entry and the field that is wrong.
    """
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: cannot read site profiles: {exc}") from exc
    entries = raw.get("sites") if isinstance(raw, dict) else raw
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: expected a list of site profiles (or a mapping with a 'sites' list)")
    profiles = []
    for index, entry in enumerate(entries):
        label = entry.get("site_id", f"entry {index + 1}") if isinstance(entry, dict) else f"entry {index + 1}"
        try:
            profiles.append(SiteProfile.model_validate(entry))
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or '(profile)'}: {err['msg']}" for err in exc.errors()
            )
            raise ValueError(f"{path}: site profile '{label}' is invalid: {problems}") from exc
    return profiles


# --- the built-in consortium ------------------------------------------------------------------------

R = AdmissionReason

BUILTIN_PROFILES: tuple[SiteProfile, ...] = (
    SiteProfile(
        site_id="aster-university",
        name="St. Aster University Hospital",
        kind="academic",
        city="Boston",
        country="US",
        utc_offset_hours=-5,
        age_mean=63,
        age_sd=16,
        female_share=0.49,
        hispanic_share=0.12,
        admission_rate_per_year=0.15,
        case_mix={
            R.SEPSIS: 0.24,
            R.ACUTE_MI: 0.16,
            R.PNEUMONIA: 0.14,
            R.HEART_FAILURE: 0.12,
            R.STROKE: 0.10,
            R.ACUTE_KIDNEY_INJURY: 0.09,
            R.COPD_EXACERBATION: 0.07,
            R.COVID19: 0.08,
        },
        severity_offset=0.25,
        vitals_every_hours=3,
        labs_every_hours=12,
        missingness=Missingness(base_rate=0.05, informativeness=0.4),
        units=UnitConventions(),
        condition_coding="specific",
        drug_coding="ingredient",
        has_cath_lab=True,
        antibiotic_delay_hours=1.5,
        discharge_speed=1.2,
        consent=ConsentSettings(opt_out_share=0.035, withdrawn_later_share=0.3, explicit_permit_share=0.25),
    ),
    SiteProfile(
        site_id="birchwood-general",
        name="Birchwood General Hospital",
        kind="community",
        city="Utrecht",
        country="NL",
        utc_offset_hours=1,
        age_mean=54,
        age_sd=19,
        pediatric_share=0.04,
        female_share=0.52,
        records_race=False,
        admission_rate_per_year=0.12,
        case_mix={
            R.PNEUMONIA: 0.24,
            R.COPD_EXACERBATION: 0.16,
            R.COVID19: 0.14,
            R.HEART_FAILURE: 0.14,
            R.SEPSIS: 0.10,
            R.ACUTE_MI: 0.08,
            R.STROKE: 0.08,
            R.ACUTE_KIDNEY_INJURY: 0.06,
        },
        severity_offset=-0.1,
        vitals_every_hours=4,
        labs_every_hours=24,
        missingness=Missingness(base_rate=0.15, informativeness=0.5),
        units=UnitConventions(glucose="mmol/L", creatinine="umol/L", hemoglobin="g/L", temperature="Cel"),
        condition_coding="specific",
        drug_coding="clinical_drug",
        has_cath_lab=True,
        antibiotic_delay_hours=3.0,
        discharge_speed=1.0,
        consent=ConsentSettings(opt_out_share=0.05, withdrawn_later_share=0.35, explicit_permit_share=0.05),
    ),
    SiteProfile(
        site_id="cedar-valley",
        name="Cedar Valley Regional Medical Center",
        kind="rural",
        city="Cedar Valley",
        country="US",
        utc_offset_hours=-6,
        age_mean=69,
        age_sd=13,
        female_share=0.51,
        hispanic_share=0.06,
        admission_rate_per_year=0.18,
        readmission_offset=0.3,
        case_mix={
            R.HEART_FAILURE: 0.24,
            R.COPD_EXACERBATION: 0.18,
            R.PNEUMONIA: 0.18,
            R.SEPSIS: 0.12,
            R.ACUTE_KIDNEY_INJURY: 0.10,
            R.STROKE: 0.08,
            R.ACUTE_MI: 0.05,
            R.COVID19: 0.05,
        },
        severity_offset=0.05,
        outpatient_visits_per_year=1.0,
        vitals_every_hours=6,
        labs_every_hours=48,
        missingness=Missingness(base_rate=0.34, informativeness=0.6),
        units=UnitConventions(temperature="[degF]"),
        condition_coding="generic",
        drug_coding="ingredient",
        has_cath_lab=False,
        antibiotic_delay_hours=5.0,
        discharge_speed=0.7,
        consent=ConsentSettings(opt_out_share=0.03, withdrawn_later_share=0.25, explicit_permit_share=0.1),
        defects=DefectRates().scaled(2.0),
    ),
)

_EXTRA_NAMES = (
    "Dogwood",
    "Elm Park",
    "Fir Crest",
    "Ginkgo",
    "Hawthorn",
    "Ivy Lane",
    "Juniper",
    "Larch",
    "Maple Grove",
    "Northoak",
    "Olive Bay",
    "Pinecrest",
    "Quince",
    "Rowan",
    "Spruce Hill",
    "Tamarack",
    "Umber",
    "Vale",
    "Willow",
    "Yew Tree",
)


def derived_profiles(base: list[SiteProfile], count: int, seed: int) -> list[SiteProfile]:
    """Further hospitals made from the base profiles with jittered parameters, for scale experiments.

    Deterministic for the seed: site k takes base profile k mod len(base) and perturbs its numbers.
    """
    import numpy as np

    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x51735]))
    profiles: list[SiteProfile] = []
    for k in range(count):
        template = base[k % len(base)]
        label = _EXTRA_NAMES[k % len(_EXTRA_NAMES)]
        number = len(base) + k + 1
        jitter = rng.uniform(0.85, 1.15, size=6)
        data = template.model_dump()
        data.update(
            site_id=f"{label.lower().replace(' ', '-')}-{number}",
            name=f"{label} {template.kind.title()} Hospital {number}",
            age_mean=float(np.clip(template.age_mean * jitter[0], 25, 85)),
            admission_rate_per_year=float(np.clip(template.admission_rate_per_year * jitter[1], 0.02, 1.5)),
            vitals_every_hours=float(np.clip(template.vitals_every_hours * jitter[2], 1, 12)),
            labs_every_hours=float(np.clip(template.labs_every_hours * jitter[3], 6, 72)),
            antibiotic_delay_hours=float(np.clip(template.antibiotic_delay_hours * jitter[4], 0.25, 12)),
            severity_offset=float(np.clip(template.severity_offset + (jitter[5] - 1.0), -1, 1)),
        )
        profiles.append(SiteProfile.model_validate(data))
    return profiles
