"""What-if scenarios for the hospital twin (`twinfed twin hospital --scenario FILE`): YAML, checked against
the hospital's wards before anything runs.

A scenario lists changes, each one of:
- `beds`: a ward has `beds` beds from `from_day` (days after the run's start, 0 = its first day) on;
- `staffing`: a ward (or every ward) staffs `factor` times its usual share of beds between `start_hour`
  and `end_hour` each day (e.g. 15% fewer nurses at night: factor 0.85, 22 to 7);
- `arrivals`: arrivals of one kind (or all) to one ward (or all) are `factor` times the model's over
  days `from_day` to `to_day` (an epidemic wave);
- `length_of_stay`: stays of one kind (or all) in one ward (or all) last `factor` times as long (a
  discharge-to-assess scheme: 0.9).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from federation.common.validation import read_one_or_many
from federation.common.yaml_files import YamlLimits
from site_node.hospital_twin.config import HospitalConfig, Shift

SCENARIO_FILE = YamlLimits(
    what="a hospital scenario file", max_bytes=256 * 1024, hint="a scenario lists changes to beds, staff, arrivals"
)
KINDS = ("emergency", "elective")


class HospitalScenarioError(ValueError):
    """A scenario file that cannot be applied; the message names the file, the change and why."""


class BedChange(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    change: Literal["beds"]
    ward: str
    beds: int = Field(ge=1, le=5000)
    from_day: int = Field(0, ge=0)


class StaffingChange(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    change: Literal["staffing"]
    ward: str | None = Field(None, description="one ward, or every ward when absent")
    start_hour: int = Field(ge=0, le=23)
    end_hour: int = Field(ge=0, le=24)
    factor: float = Field(gt=0.0, le=2.0)

    def hours(self) -> list[int]:
        return Shift(start_hour=self.start_hour, end_hour=self.end_hour, staffed_share=1.0).hours()


class _Targeted(BaseModel):
    """A change to one ward's (or every ward's) patients of one kind (or every kind)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    ward: str | None = None
    kind: Literal["emergency", "elective"] | None = None

    def applies(self, ward: str, kind: str) -> bool:
        return self.ward in (None, ward) and self.kind in (None, kind)


class ArrivalChange(_Targeted):
    change: Literal["arrivals"]
    factor: float = Field(ge=0.0, le=10.0)
    from_day: int = Field(0, ge=0)
    to_day: int | None = Field(None, ge=1, description="exclusive; absent: to the end of the run")

    @model_validator(mode="after")
    def _period(self) -> ArrivalChange:
        if self.to_day is not None and self.to_day <= self.from_day:
            raise ValueError(f"to_day ({self.to_day}) must come after from_day ({self.from_day})")
        return self


class StayChange(_Targeted):
    change: Literal["length_of_stay"]
    factor: float = Field(gt=0.0, le=10.0)


Change = Annotated[BedChange | StaffingChange | ArrivalChange | StayChange, Field(discriminator="change")]


class HospitalScenario(BaseModel):
    """One named scenario: its changes, applied together."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9 _.+-]{0,79}$")
    description: str = ""
    changes: list[Change] = Field(min_length=1)

    def beds(self, ward: str, usual: int) -> tuple[int, tuple[tuple[int, int], ...]]:
        """The ward's beds at the start and its changes (hour of the run, beds) under this scenario."""
        changes = sorted((c.from_day * 24, c.beds) for c in self.changes if isinstance(c, BedChange) and c.ward == ward)
        start = next((beds for hour, beds in changes if hour == 0), usual)
        return start, tuple((hour, beds) for hour, beds in changes if hour > 0)

    def staffed_share(self, ward: str, usual: tuple[float, ...]) -> tuple[float, ...]:
        shares = list(usual)
        for c in self.changes:
            if isinstance(c, StaffingChange) and c.ward in (None, ward):
                for hour in c.hours():
                    shares[hour] = min(1.0, shares[hour] * c.factor)
        return tuple(shares)

    def arrival_factor(self, ward: str, kind: str, days: int) -> list[float]:
        """Per day of the run, the factor on arrivals of `kind` to `ward`."""
        factors = [1.0] * days
        for c in self.changes:
            if isinstance(c, ArrivalChange) and c.applies(ward, kind):
                for day in range(c.from_day, min(days, c.to_day or days)):
                    factors[day] *= c.factor
        return factors

    def stay_factor(self, ward: str, kind: str) -> float:
        factor = 1.0
        for c in self.changes:
            if isinstance(c, StayChange) and c.applies(ward, kind):
                factor *= c.factor
        return factor


class HospitalScenarioFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    scenarios: list[HospitalScenario] = Field(min_length=1)


def load_hospital_scenarios(path: Path, hospital: HospitalConfig) -> list[HospitalScenario]:
    """The scenarios of a YAML file (one scenario, or `scenarios: [...]`), checked against the wards."""
    scenarios = read_one_or_many(
        Path(path), SCENARIO_FILE, HospitalScenario, HospitalScenarioFile, "scenarios", HospitalScenarioError,
        "scenario", missing_hint="write one (docs/twins.md)",
    )
    wards = [w.name for w in hospital.wards]
    for scenario in scenarios:
        for number, change in enumerate(scenario.changes, start=1):
            if change.ward is not None and change.ward not in wards:
                raise HospitalScenarioError(
                    f"{path}: scenario '{scenario.name}', change {number} ({change.change}): ward "
                    f"'{change.ward}' is not one of the hospital's wards ({', '.join(wards)}, site file `hospital:`)"
                )
    names = [s.name for s in scenarios]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise HospitalScenarioError(f"{path}: scenario names must be distinct: {', '.join(repeated)} repeated")
    return list(scenarios)
