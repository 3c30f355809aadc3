"""The twin kinds' specs: the `model` section of a study, as every site approves it.

Each spec is the part of one twin kind (federation.twins) that a study file sets; it lives in the contract
because it is part of what is hashed and approved, and the contract must be readable without PyTorch.
`targets` says what the kind learns from, so a study pairing a kind with an outcome it cannot learn
(a risk model on censored times, a survival model on a yes/no label) is refused when it is read.

`TrajectorySpec` is the patient twin's model (federation.twins.trajectory).
"""

from __future__ import annotations

import itertools
import math
from typing import Annotated, ClassVar, Literal

from pydantic import Field, model_validator

from federation.contract.strict import Strict

# What a kind learns from: a yes/no outcome per patient, a time to an event with censoring, or (the trajectory
# kind) the patient's series of signals after each decision time.
Target = Literal["binary", "time_to_event", "trajectory"]
BINARY: Target = "binary"
TIME_TO_EVENT: Target = "time_to_event"

HiddenLayers = list[Annotated[int, Field(ge=1, le=4096)]]


class LogisticRegressionSpec(Strict):
    """A risk score: one logit, linear in the features."""

    targets: ClassVar[Target] = BINARY
    kind: Literal["logistic_regression"] = "logistic_regression"


class MlpSpec(Strict):
    """A risk score: one logit from a small ReLU network."""

    targets: ClassVar[Target] = BINARY
    kind: Literal["mlp"] = "mlp"
    hidden: HiddenLayers = Field(default=[64, 32], min_length=1, max_length=8)
    dropout: float = Field(0.0, ge=0, lt=1)


# A survival model's grid: a few intervals is what DP data support (every interval is outputs to learn and,
# at evaluation, cells to release), and a person reviewing the study can still read the grid.
MAX_INTERVALS = 20


class DiscreteTimeSurvivalSpec(Strict):
    """Time to the outcome's event as a discrete-time hazard: on the grid of `interval_days` (the upper ends
    of consecutive intervals from the prediction time), the probability of the event in each interval given
    the patient reached it. Each patient's likelihood is a product of their own terms only, so one patient's
    gradient depends on no one else's and DP-SGD's per-patient clipping bounds its sensitivity (a Cox partial
    likelihood couples every patient of a risk set). `horizon_days`, one of the grid's ends (default the
    last), is where calibration, the Brier score and the risk strata are read. `hidden` empty is a linear
    hazard per interval; otherwise a ReLU network shared by the intervals.
    """

    targets: ClassVar[Target] = TIME_TO_EVENT
    kind: Literal["discrete_time_survival"] = "discrete_time_survival"
    interval_days: list[Annotated[float, Field(gt=0, le=36_500)]] = Field(min_length=1, max_length=MAX_INTERVALS)
    horizon_days: float | None = Field(None, gt=0)
    hidden: HiddenLayers = Field(default=[], max_length=8)
    dropout: float = Field(0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _grid(self) -> DiscreteTimeSurvivalSpec:
        if any(b <= a for a, b in itertools.pairwise(self.interval_days)):
            raise ValueError("interval_days are the ends of consecutive intervals: strictly increasing days")
        if self.horizon_days is not None and self.horizon_days not in self.interval_days:
            raise ValueError(
                f"horizon_days {self.horizon_days:g} must be one of interval_days "
                f"({', '.join(f'{d:g}' for d in self.interval_days)}): survival is predicted at the grid's ends"
            )
        return self

    @property
    def horizon(self) -> float:
        return self.horizon_days if self.horizon_days is not None else self.interval_days[-1]

    @property
    def horizon_interval(self) -> int:
        """How many intervals lie up to and including the horizon."""
        return self.interval_days.index(self.horizon) + 1


# --- the trajectory kind (issue 12): the patient twin's model ----------------------------------------------

TRAJECTORY: Target = "trajectory"  # a patient's series of signals after the decision time, under treatments
SIGNAL_NAME = r"^[a-z][a-z0-9_]{0,39}$"
MAX_SIGNALS = 16
MAX_TREATMENTS = 8
MAX_STEPS = 168  # a week of hourly steps, or 24 weeks of daily ones: beyond it a site cannot review the model


class Signal(Strict):
    """A measurement the twin estimates and forecasts (glucose, creatinine, heart rate, a tumour volume)."""

    name: str = Field(pattern=SIGNAL_NAME)
    concept_ids: list[int] = Field(min_length=1, max_length=50)
    # 'log': a signal that is positive and multiplicative (creatinine, lactate, a volume) is modelled as its log
    transform: Literal["none", "log"] = "none"
    # The usual range in the measurement's own unit (glucose [70, 180] mg/dL): the twin sees the value scaled so
    # this range is -1..1 (after the transform), the same at every site, whatever its own patients look like.
    normal_range: tuple[float, float]
    unit: str = Field("", max_length=40)  # for people: the plot's axis and the forecast table

    @model_validator(mode="after")
    def _range(self) -> Signal:
        low, high = self.normal_range
        if not low < high:
            raise ValueError(f"signal '{self.name}': normal_range must be [low, high] with low < high")
        if self.transform == "log" and low <= 0:
            raise ValueError(f"signal '{self.name}' is modelled as its log: its normal_range must be above 0")
        return self

    def centre_and_half_width(self) -> tuple[float, float]:
        """Where the scaled value is 0 and what one unit of it is, in the transformed measurement."""
        low, high = (math.log(v) for v in self.normal_range) if self.transform == "log" else self.normal_range
        return (low + high) / 2, (high - low) / 2


class Treatment(Strict):
    """A control input of the twin: exposure per step to a drug or procedure (the dose where OMOP records a
    quantity and `dose` asks for it, else 0/1). A what-if scenario changes this input and nothing else."""

    name: str = Field(pattern=SIGNAL_NAME)
    domain: Literal["drug", "procedure"] = "drug"
    concept_ids: list[int] = Field(min_length=1, max_length=50)
    dose: bool = False
    # With `dose`: the dose the twin sees as 1 (insulin 4 units), so doses of every drug enter on one scale.
    typical_dose: float = Field(1.0, gt=0)
    # The ward doses it on a value it measures in the same step (a sliding scale reads the glucose it treats):
    # within a step the measurement then comes first, so the twin reads the dose from the next step on (read
    # at its own step, it would learn that the drug comes with the value that triggered it).
    dosed_on_measurement: bool = False


# `adjustment: inverse_propensity` truncates the stabilised weights P(a) / P(a | history) to this range (Cole
# and Hernan 2008): a window whose treatment the practice almost never gives would otherwise dominate its
# patient's forecast loss. A twin's plan beyond it is flagged as outside the hospitals' practice.
WEIGHT_RANGE = (0.1, 10.0)


class TrajectorySpec(Strict):
    """The patient twin: from a patient's history of `signals` and `treatments` on a grid of `step_hours`
    (each signal with a mask and the time since it was last measured, the study's covariates as static
    inputs), forecast each signal `horizon_steps` ahead as `quantiles`, driven by the planned treatments,
    and the risk of the study's outcome over the horizon.

    `history_steps` steps before each decision time are the encoder's input; a patient gives up to
    `windows_per_patient` decision times, and all of them form one example (the privacy unit is the
    patient: DP-SGD samples and clips patients, not windows). `adjustment` is how treatment effects are
    learnt despite treatment going to the sicker patients: `per_step_inverse_propensity` weights each step
    ahead by the inverse of the stabilised probability of the treatments received up to it, each given what
    was observed before it (the ward doses on what it measures during the horizon too);
    `inverse_propensity` weights by the treatments of the first step ahead only, given the history; `none`
    is the naive model (for comparison). `conformal_fraction` of each site's training patients is kept aside at the
    site to calibrate the intervals (split conformal), so the nominal coverage holds at every site.
    """

    targets: ClassVar[Target] = TRAJECTORY
    kind: Literal["trajectory"] = "trajectory"
    signals: list[Signal] = Field(min_length=1, max_length=MAX_SIGNALS)
    treatments: list[Treatment] = Field(default_factory=list, max_length=MAX_TREATMENTS)
    step_hours: float = Field(4.0, gt=0, le=24 * 28)
    history_steps: int = Field(6, ge=1, le=MAX_STEPS)
    horizon_steps: int = Field(6, ge=1, le=MAX_STEPS)
    windows_per_patient: int = Field(4, ge=1, le=64)
    quantiles: list[Annotated[float, Field(gt=0, lt=1)]] = Field(
        default=[0.025, 0.1, 0.5, 0.9, 0.975], min_length=3, max_length=11
    )
    encoder: Literal["gru", "tcn"] = "gru"
    hidden: int = Field(32, ge=4, le=512)
    adjustment: Literal["per_step_inverse_propensity", "inverse_propensity", "none"] = "per_step_inverse_propensity"
    conformal_fraction: float = Field(0.2, gt=0, le=0.5)
    event_risk: bool = True

    @property
    def lagged(self) -> list[bool]:
        """Per treatment, whether the twin reads its dose from the next step on (`dosed_on_measurement`)."""
        return [t.dosed_on_measurement for t in self.treatments]

    @model_validator(mode="after")
    def _consistent(self) -> TrajectorySpec:
        names = [s.name for s in self.signals] + [t.name for t in self.treatments]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"signal and treatment names must be distinct: {', '.join(repeated)} repeated")
        q = self.quantiles
        if any(b <= a for a, b in itertools.pairwise(q)):
            raise ValueError("quantiles must be strictly increasing")
        if 0.5 not in q:
            raise ValueError("quantiles must include 0.5: the median is the forecast")
        missing = [f"{lo:g}/{hi:g}" for lo, hi in INTERVALS.values() if lo not in q or hi not in q]
        if missing:
            raise ValueError(
                f"quantiles must include the ends of the 80% and 95% intervals ({', '.join(missing)} missing)"
            )
        return self

    @property
    def history_hours(self) -> float:
        return self.history_steps * self.step_hours

    @property
    def horizon_hours(self) -> float:
        return self.horizon_steps * self.step_hours


# The intervals every forecast shows: nominal coverage -> (lower, upper) quantile.
INTERVALS: dict[float, tuple[float, float]] = {0.8: (0.1, 0.9), 0.95: (0.025, 0.975)}


ModelSpec = Annotated[
    LogisticRegressionSpec | MlpSpec | DiscreteTimeSurvivalSpec | TrajectorySpec,
    Field(discriminator="kind"),
]
