"""The twin kinds' specs: the `model` section of a study, as every site approves it.

Each spec is the part of one twin kind (federation.twins) that a study file sets; it lives in the contract
because it is part of what is hashed and approved, and the contract must be readable without PyTorch.
`targets` says what the kind learns from, so a study pairing a kind with an outcome it cannot learn
(a risk model on censored times, a survival model on a yes/no label) is refused when it is read.
"""

from __future__ import annotations

import itertools
from typing import Annotated, ClassVar, Literal

from pydantic import Field, model_validator

from federation.contract.strict import Strict

# What a kind learns from: a yes/no outcome per patient, or a time to an event with censoring.
Target = Literal["binary", "time_to_event"]
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


ModelSpec = Annotated[
    LogisticRegressionSpec | MlpSpec | DiscreteTimeSurvivalSpec,
    Field(discriminator="kind"),
]
