"""The hospital's own description for its twin (site.yaml, `hospital:`): its wards, their beds and staffed
shifts, and which of the OMOP database's care sites each ward is.

Why in the site file: bed counts and staffing are not in OMOP (care_site has no capacity), and they are
the hospital's to state; the care sites are matched by name, by source value (the FHIR Location id the
ETL kept) or by place-of-service source value, whichever the hospital's export carries.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

HOURS_PER_DAY = 24


class Shift(BaseModel):
    """A share of the beds staffed between two hours of the day (e.g. nights: 22 to 7, 0.85)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    start_hour: int = Field(ge=0, le=23)
    end_hour: int = Field(ge=0, le=24, description="exclusive; a shift across midnight has end < start")
    staffed_share: float = Field(gt=0.0, le=1.0)

    def hours(self) -> list[int]:
        if self.end_hour > self.start_hour:
            return list(range(self.start_hour, self.end_hour))
        return list(range(self.start_hour, HOURS_PER_DAY)) + list(range(0, self.end_hour))


class WardConfig(BaseModel):
    """One ward of the twin: its beds and the care sites of the OMOP database that are this ward."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9 _.-]{0,63}$")
    beds: int = Field(ge=1, le=5000)
    care_sites: list[str] = Field(
        min_length=1, description="care_site_name, care_site_source_value or place_of_service_source_value values"
    )
    shifts: list[Shift] = Field(default_factory=list, description="hours with fewer beds staffed than all")

    def staffed_share(self) -> tuple[float, ...]:
        shares = [1.0] * HOURS_PER_DAY
        for shift in self.shifts:
            for hour in shift.hours():
                shares[hour] = shift.staffed_share
        return tuple(shares)

    @model_validator(mode="after")
    def _shifts_do_not_overlap(self) -> WardConfig:
        seen: dict[int, int] = {}
        for number, shift in enumerate(self.shifts):
            for hour in shift.hours():
                if hour in seen:
                    raise ValueError(
                        f"ward {self.name}: shifts {seen[hour] + 1} and {number + 1} both cover hour {hour}"
                    )
                seen[hour] = number
        return self


class LengthOfStayConfig(BaseModel):
    """The consortium's length-of-stay study whose model the twin asks about the patients in the beds
    (site_node/hospital_twin/case_mix.py): the study file (approved at this site) and, optionally, its weights
    (a model card's final-model.pt; default: the study's global model this site keeps). Relative paths are
    read from the site file's folder."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    study: Path
    model: Path | None = None


class HospitalConfig(BaseModel):
    """`hospital:` in site.yaml: the wards the twin simulates and the care sites that are the emergency
    department (where patients wait for a bed: boarding)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    wards: list[WardConfig] = Field(min_length=1)
    emergency_department: list[str] = Field(
        default_factory=list, description="care sites that are the emergency department (not simulated as a ward)"
    )
    length_of_stay: LengthOfStayConfig | None = Field(
        None, description="a length-of-stay study whose model adjusts the occupants' remaining stays by case mix"
    )

    @field_validator("wards")
    @classmethod
    def _unique(cls, wards: list[WardConfig]) -> list[WardConfig]:
        names = [w.name for w in wards]
        if len(set(names)) != len(names):
            raise ValueError(f"ward names must be unique: {names}")
        sites = [s for w in wards for s in w.care_sites]
        twice = sorted({s for s in sites if sites.count(s) > 1})
        if twice:
            raise ValueError(f"care sites named for more than one ward: {twice}")
        return wards

    @model_validator(mode="after")
    def _emergency_is_not_a_ward(self) -> HospitalConfig:
        both = sorted(set(self.emergency_department) & {s for w in self.wards for s in w.care_sites})
        if both:
            raise ValueError(f"care sites both a ward and the emergency department: {both}")
        return self
