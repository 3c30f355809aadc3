"""The hospital twin's arrivals model (issue 13): admissions per hour as a count model fitted from the
hospital's own history (visit_occurrence start times), and the hourly rates it gives the simulation.

The model: log rate(hour) = intercept + hour-of-day effect + day-of-week effect + a yearly cycle (two
harmonics) + a linear trend, a Poisson regression on the hourly counts fitted by maximum likelihood
(Newton's method on the convex log-likelihood, a small ridge on every effect but the intercept so a
never-seen hour gets a finite rate). Why this shape: emergency arrivals follow the clock and the week
far more than anything else, with winter peaks and slow growth on top; it is the structure published
hospital arrival models share, and with 33 coefficients it is estimated well from a few months of a
small hospital's admissions.

Days are busier or quieter together beyond what the clock explains (a local outbreak, a closed
neighbouring emergency department): the model measures that as the overdispersion of daily counts
(`day_dispersion`, the variance of a gamma day effect with mean 1, by the method of moments) and the
simulation draws one such effect per day and replication, so its bands are as wide as the history's
days are variable. A Poisson model without it would give bands too narrow to cover.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel, Field

HOURS_PER_DAY = 24
DAYS_PER_WEEK = 7
DAYS_PER_YEAR = 365.25
HARMONICS = 2
RIDGE = 1e-3
MIN_HISTORY_DAYS = 28


class ArrivalHistoryError(ValueError):
    """The history cannot support the model; the message says what is missing."""


class ArrivalModel(BaseModel):
    """A fitted arrivals model: everything the simulation and a report need, as numbers."""

    stream: str = Field(description="what arrives, e.g. 'emergency' or 'elective'")
    start_day: float = Field(description="the history's first day, in days since 1970-01-01 (a midnight)")
    history_days: int
    intercept: float
    hour_of_day: list[float] = Field(description="24 log-rate effects, hour 0 first (sum to 0)")
    day_of_week: list[float] = Field(description="7 log-rate effects, Monday first (sum to 0)")
    season: list[float] = Field(description="cos and sin coefficients of the yearly cycle's harmonics")
    trend_per_year: float = Field(description="log-rate change per year")
    day_dispersion: float = Field(ge=0.0, description="variance of the day effect (0: Poisson days)")
    arrivals: int = Field(description="arrivals in the history")

    def log_rates(self, day: np.ndarray, hour: np.ndarray) -> np.ndarray:
        """Log rates per hour at absolute `day` (days since 1970-01-01, integer) and `hour` of that day."""
        return _design(day, hour, self.start_day) @ self._coefficients()

    def rates(self, first_day: int, days: int) -> np.ndarray:
        """Expected arrivals in each hour of `days` days from `first_day` (days since 1970-01-01)."""
        day = np.repeat(np.arange(first_day, first_day + days), HOURS_PER_DAY)
        hour = np.tile(np.arange(HOURS_PER_DAY), days)
        return np.exp(self.log_rates(day, hour))

    def _coefficients(self) -> np.ndarray:
        return np.concatenate(
            [[self.intercept], self.hour_of_day[1:], self.day_of_week[1:], self.season, [self.trend_per_year]]
        )


def _design(day: np.ndarray, hour: np.ndarray, start_day: float) -> np.ndarray:
    """The model's design matrix, effects coded as deviations (sum-to-zero) so none is a baseline."""
    day = np.asarray(day, dtype=np.float64)
    hour = np.asarray(hour, dtype=np.int64)
    weekday = ((day.astype(np.int64) + 3) % DAYS_PER_WEEK)  # 1970-01-01 was a Thursday: Monday = 0
    columns = [np.ones_like(day)]
    columns += _sum_to_zero(hour, HOURS_PER_DAY)
    columns += _sum_to_zero(weekday, DAYS_PER_WEEK)
    phase = 2 * np.pi * (day + hour / HOURS_PER_DAY) / DAYS_PER_YEAR
    for k in range(1, HARMONICS + 1):
        columns += [np.cos(k * phase), np.sin(k * phase)]
    columns.append((day - start_day) / DAYS_PER_YEAR)
    return np.stack(columns, axis=1)


def _sum_to_zero(level: np.ndarray, levels: int) -> list[np.ndarray]:
    """Deviation coding: level j > 0 gets column j-1 = 1, level 0 gets -1 in every column."""
    out = []
    for j in range(1, levels):
        out.append(np.where(level == j, 1.0, np.where(level == 0, -1.0, 0.0)))
    return out


def fit_arrivals(
    stream: str, arrival_hours: Sequence[float] | np.ndarray, start_day: int, days: int
) -> ArrivalModel:
    """Fit the model to arrivals at `arrival_hours` (hours since `start_day`'s midnight; `start_day` in
    days since 1970-01-01) observed over `days` whole days."""
    if days < MIN_HISTORY_DAYS:
        raise ArrivalHistoryError(
            f"arrivals '{stream}': {days} days of history, the model needs at least {MIN_HISTORY_DAYS} "
            "(four weeks, so every weekday is seen four times)"
        )
    times = np.asarray(arrival_hours, dtype=np.float64)
    inside = (times >= 0) & (times < days * HOURS_PER_DAY)
    if not inside.all():
        raise ArrivalHistoryError(
            f"arrivals '{stream}': {int((~inside).sum())} of {times.size} arrival times fall outside the "
            f"{days}-day history"
        )
    if times.size == 0:
        raise ArrivalHistoryError(f"arrivals '{stream}': no arrivals in the {days}-day history")
    counts = np.bincount(times.astype(np.int64), minlength=days * HOURS_PER_DAY).astype(np.float64)
    day = np.repeat(np.arange(start_day, start_day + days), HOURS_PER_DAY)
    hour = np.tile(np.arange(HOURS_PER_DAY), days)
    design = _design(day, hour, start_day)
    if days < DAYS_PER_YEAR:  # less than a year cannot tell a season from a trend: neither is fitted
        design[:, -(2 * HARMONICS + 1):] = 0.0
    beta = _poisson_newton(design, counts)
    mean = np.exp(design @ beta)
    daily_counts, daily_mean = counts.reshape(days, -1).sum(1), mean.reshape(days, -1).sum(1)
    # E[(y - m)^2 - y] = m^2 * var(day effect) under a gamma-Poisson day: solve for the variance
    dispersion = float(max(0.0, ((daily_counts - daily_mean) ** 2 - daily_counts).sum() / (daily_mean**2).sum()))
    hours_effects = beta[1:HOURS_PER_DAY]
    week_effects = beta[HOURS_PER_DAY:HOURS_PER_DAY + DAYS_PER_WEEK - 1]
    return ArrivalModel(
        stream=stream,
        start_day=float(start_day),
        history_days=days,
        intercept=float(beta[0]),
        hour_of_day=[float(-hours_effects.sum()), *map(float, hours_effects)],
        day_of_week=[float(-week_effects.sum()), *map(float, week_effects)],
        season=[float(v) for v in beta[-(2 * HARMONICS + 1):-1]],
        trend_per_year=float(beta[-1]),
        day_dispersion=dispersion,
        arrivals=int(times.size),
    )


def _poisson_newton(design: np.ndarray, counts: np.ndarray, iterations: int = 50) -> np.ndarray:
    """Maximum-likelihood Poisson regression, log link, with a small ridge (not on the intercept)."""
    width = design.shape[1]
    penalty = np.full(width, RIDGE * len(counts))
    penalty[0] = 0.0
    beta = np.zeros(width)
    beta[0] = np.log(max(counts.mean(), 1e-9))
    for _ in range(iterations):
        mean = np.exp(np.clip(design @ beta, -30, 30))
        gradient = design.T @ (counts - mean) - penalty * beta
        hessian = (design * mean[:, None]).T @ design + np.diag(penalty)
        step = np.linalg.solve(hessian, gradient)
        beta += step
        if np.abs(step).max() < 1e-8:
            break
    return beta


def stream_rates(model: ArrivalModel, first_day: int, days: int, multiplier: float = 1.0) -> tuple[float, ...]:
    """The hourly rates the simulation's ArrivalStream takes for a run of `days` days from `first_day`."""
    return tuple(float(v) for v in model.rates(first_day, days) * multiplier)
