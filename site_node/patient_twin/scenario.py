"""What-if scenarios for the patient twin: a change to the treatments planned over the forecast horizon.

A scenario file (YAML) holds one scenario or a list under `scenarios:`. Each change names one of the
study's treatments and what happens to it from `from_hours` to `to_hours` after the decision time (the
whole horizon by default): `stop` (none given), `start` (given every step; with a dose for a treatment
the study reads doses of) or `set_dose` (that dose every step). The twin's decoder is driven by the
planned treatments, so a scenario changes the forecast through the path the data taught, and nothing
else changes. Every error names the file, the scenario, the change and the rule.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from federation.common.validation import read_one_or_many
from federation.common.yaml_files import YamlLimits
from federation.contract.twin_specs import TrajectorySpec

SCENARIO_FILE = YamlLimits(
    what="a scenario file", max_bytes=256 * 1024, hint="a scenario lists treatment changes, not patient data"
)


class ScenarioError(ValueError):
    """A scenario file that cannot be applied; the message names the file, the scenario, the change and why."""


class TreatmentChange(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    treatment: str = Field(min_length=1, description="One of the study's treatment names.")
    action: Literal["start", "stop", "set_dose"]
    dose: float | None = Field(None, gt=0, description="In the drug's own unit (e.g. units of insulin).")
    from_hours: float = Field(0.0, ge=0, description="Hours after the decision time the change begins.")
    to_hours: float | None = Field(None, gt=0, description="Hours after the decision time it ends (default: never).")

    @model_validator(mode="after")
    def _consistent(self) -> TreatmentChange:
        if self.action == "set_dose" and self.dose is None:
            raise ValueError("action 'set_dose' needs a dose")
        if self.action == "stop" and self.dose is not None:
            raise ValueError("action 'stop' takes no dose")
        if self.to_hours is not None and self.to_hours <= self.from_hours:
            raise ValueError(f"to_hours ({self.to_hours:g}) must come after from_hours ({self.from_hours:g})")
        return self


class Scenario(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z][a-z0-9_\-]{0,59}$", description="Short, for tables and JSON.")
    description: str = Field("", max_length=500)
    changes: list[TreatmentChange] = Field(min_length=1, max_length=20)


class ScenarioFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    scenarios: list[Scenario] = Field(min_length=1, max_length=100)


def check_scenario(scenario: Scenario, spec: TrajectorySpec, where: str) -> None:
    """ScenarioError unless every change names one of the study's treatments and fits its horizon."""
    names = [t.name for t in spec.treatments]
    for index, change in enumerate(scenario.changes, start=1):
        at = f"{where}: scenario '{scenario.name}', change {index}"
        if change.treatment not in names:
            known = ", ".join(names) or "none (the study declares no treatments)"
            raise ScenarioError(f"{at}: treatment '{change.treatment}' is not one of the study's ({known})")
        if change.from_hours >= spec.horizon_hours:
            raise ScenarioError(
                f"{at}: from_hours {change.from_hours:g} is beyond the twin's horizon of {spec.horizon_hours:g} h"
            )
        dosed = next(t for t in spec.treatments if t.name == change.treatment).dose
        if change.dose is not None and not dosed:
            raise ScenarioError(
                f"{at}: the study reads '{change.treatment}' as given or not, not as a dose; drop `dose`"
            )


def load_scenarios(path: Path, spec: TrajectorySpec) -> list[Scenario]:
    """The scenarios of a YAML file (one scenario, or `scenarios: [...]`), checked against the study."""
    scenarios = read_one_or_many(Path(path), SCENARIO_FILE, Scenario, ScenarioFile, "scenarios", ScenarioError,
                                 "scenario", missing_hint="write one (docs/twins.md)")  # fmt: skip
    for scenario in scenarios:
        check_scenario(scenario, spec, str(path))
    names = [s.name for s in scenarios]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ScenarioError(f"{path}: scenario names must be distinct: {', '.join(repeated)} repeated")
    return list(scenarios)


def apply(scenario: Scenario, spec: TrajectorySpec, planned: np.ndarray) -> np.ndarray:
    """The planned treatments over the horizon (F, R), in the twin's units (doses over `typical_dose`),
    with the scenario's changes applied in order."""
    out = np.array(planned, dtype=np.float64, copy=True)
    names = [t.name for t in spec.treatments]
    starts = np.arange(spec.horizon_steps) * spec.step_hours
    for change in scenario.changes:
        column = names.index(change.treatment)
        treatment = spec.treatments[column]
        end = np.inf if change.to_hours is None else change.to_hours
        steps = (starts + spec.step_hours > change.from_hours) & (starts < end)
        if change.action == "stop":
            out[steps, column] = 0.0
        elif change.dose is not None:
            out[steps, column] = change.dose / treatment.typical_dose
        else:
            out[steps, column] = 1.0
    return out
