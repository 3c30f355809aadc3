"""The hospital twin's length-of-stay model (issue 13): how long a stay in a ward lasts, by ward and
admission kind, estimated with the patients still in counted as censored, and drawn from by the
simulation, also for the patients in a bed when it starts (given how long they have been there).

Why Kaplan-Meier: a ward's stays are skewed, often with more than one mode (a day-case bump and a long
tail), and the patients still in hospital when the history is read are exactly the long stays; dropping
them biases every mean down, treating their stay so far as complete biases it too. The Kaplan-Meier
estimate (federation.twins.survival_maths, tested against lifelines and scikit-survival) uses them as
what they are, makes no shape assumption, and its inverse gives draws. Beyond the longest stay observed
its curve stops above zero when the longest were censored (and is cut before its last drop to zero when
the longest ended); the draws there continue with an exponential tail whose rate is the hazard observed
over the curve's last quarter, so a warm start never meets a patient the model says cannot still be there.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel, Field, PrivateAttr

from federation.twins.survival_maths import kaplan_meier, survival_at

MIN_STAYS = 20  # fewer finished stays than this: no curve worth drawing from
TAIL_FROM = 0.75  # the tail's hazard is measured over the curve's last quarter of time


class StayHistoryError(ValueError):
    """The stays cannot support a model; the message says what is missing."""


class StayModel(BaseModel):
    """A ward's (and admission kind's) length of stay: the Kaplan-Meier curve and its tail."""

    ward: str
    kind: str = Field(description="admission kind, e.g. 'emergency' or 'elective'")
    times: list[float] = Field(description="hours at which the curve steps, ascending")
    survival: list[float] = Field(description="share still in the ward just after each time")
    tail_rate_per_hour: float = Field(gt=0.0, description="hazard beyond the last time")
    stays: int
    censored: int = Field(description="stays still running when the history was read")

    _arrays: tuple[np.ndarray, np.ndarray] | None = PrivateAttr(None)

    def _curve(self) -> tuple[np.ndarray, np.ndarray]:
        """The curve as arrays, made once (a simulation draws from it thousands of times)."""
        if self._arrays is None:
            self._arrays = (np.asarray(self.times, dtype=np.float64), np.asarray(self.survival, dtype=np.float64))
        return self._arrays

    def survival_at(self, hours: np.ndarray) -> np.ndarray:
        """S(t): the share of stays longer than `hours`."""
        times, survival = self._curve()
        hours = np.asarray(hours, dtype=np.float64)
        inside = survival_at(times, survival, hours)
        beyond = survival[-1] * np.exp(-self.tail_rate_per_hour * np.clip(hours - times[-1], 0, None))
        return np.where(hours > times[-1], beyond, inside)

    def _inverse(self, target: np.ndarray) -> np.ndarray:
        """The smallest t with S(t) <= target (draws by inversion), with the tail past the curve's end."""
        times, survival = self._curve()
        # survival is non-increasing: search its reverse
        index = np.searchsorted(-survival, -target, side="left")
        inside = times[np.clip(index, 0, len(times) - 1)]
        last = survival[-1]
        with np.errstate(divide="ignore"):
            tail = times[-1] + np.log(last / np.clip(target, 1e-300, None)) / self.tail_rate_per_hour
        return np.where(target < last, tail, inside)

    def sample(self, rng: np.random.Generator, n: int, scale: float = 1.0) -> np.ndarray:
        """`n` lengths of stay in hours (times `scale`: a scenario's change for this case mix)."""
        return self._inverse(rng.random(n)) * scale

    def sample_remaining(self, rng: np.random.Generator, elapsed_hours: np.ndarray, scale: float = 1.0) -> np.ndarray:
        """For patients in the ward for `elapsed_hours` already: the hours each has left, drawn from the
        curve given that the stay has lasted that long (S(t) / S(elapsed))."""
        elapsed = np.asarray(elapsed_hours, dtype=np.float64)
        target = self.survival_at(elapsed) * rng.random(elapsed.shape)
        return np.maximum(self._inverse(target) - elapsed, 0.0) * scale

    def sampler(self, scale: float = 1.0):
        """The simulation's StaySampler for this model."""

        def draw(rng: np.random.Generator, n: int) -> np.ndarray:
            return self.sample(rng, n, scale)

        return draw


def fit_stays(
    ward: str, kind: str, hours: Sequence[float] | np.ndarray, ended: Sequence[bool] | np.ndarray
) -> StayModel:
    """Fit from stays of `hours` each, `ended` False for those still running when the history was read."""
    hours = np.asarray(hours, dtype=np.float64)
    ended = np.asarray(ended, dtype=bool)
    if hours.shape != ended.shape:
        raise StayHistoryError(f"stays in {ward} ({kind}): {hours.size} lengths but {ended.size} ended flags")
    if (hours < 0).any() or not np.isfinite(hours).all():
        bad = int(((hours < 0) | ~np.isfinite(hours)).sum())
        raise StayHistoryError(f"stays in {ward} ({kind}): {bad} lengths are negative or not numbers")
    if int(ended.sum()) < MIN_STAYS:
        raise StayHistoryError(
            f"stays in {ward} ({kind}): {int(ended.sum())} finished stays, the model needs at least {MIN_STAYS}"
        )
    times, survival = kaplan_meier(hours, ended)
    if survival[-1] <= 0.0 and len(times) > 1:
        # the longest stay ended: the curve's last drop to zero goes to the tail instead, so a patient in
        # for longer than anyone in the history still has time left
        times, survival = times[:-1], survival[:-1]
    tail_start = times[-1] * TAIL_FROM
    late = hours >= tail_start
    exposure = float((hours[late] - tail_start).sum())
    events = int(ended[late].sum())
    rate = events / exposure if events and exposure > 0 else 1.0 / max(float(hours[ended].mean()), 1e-6)
    return StayModel(
        ward=ward,
        kind=kind,
        times=[float(t) for t in times],
        survival=[float(s) for s in survival],
        tail_rate_per_hour=rate,
        stays=int(hours.size),
        censored=int((~ended).sum()),
    )
