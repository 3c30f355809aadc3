"""The hospital twin: what it learns from the hospital's history up to a day, and many replications of the
days after it, baseline and scenarios side by side (issue 13).

`learn` fits, from the history as it stood at the start (`WardStays.as_of`): the arrivals model of each
ward and admission kind that has arrivals, the length of stay of each ward and kind (a ward's stays of
all kinds when one kind has too few), the transfer probabilities between wards, and who is in which bed
then, with how long they have been there. Everything in a `HospitalPlan` is plain data, so replications
run in worker processes.

`run` runs replications numbered seed, seed+1, ...; each builds its own `HospitalModel`: the occupants'
remaining stays drawn given their time in, the arrival rates over the run. A scenario is run with the
same replication numbers, so each of its replications sees the same patients as the baseline's (common
random numbers), and the effect is the mean of the paired differences, with its 95% interval. What a run
keeps is a histogram of each ward's midnight census and peak occupancy per day, and running sums: its
memory does not grow with the number of replications.
"""

from __future__ import annotations

import datetime as dt
import math
import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from site_node.hospital_twin.arrivals import ArrivalHistoryError, ArrivalModel, fit_arrivals
from site_node.hospital_twin.config import HospitalConfig
from site_node.hospital_twin.history import DAY_S, HOUR_S, KINDS_SEEN, WardStays
from site_node.hospital_twin.scenario import HospitalScenario
from site_node.hospital_twin.simulator import ArrivalStream, HospitalModel, Occupant, Transfer, Ward, simulate
from site_node.hospital_twin.stays import MIN_STAYS, StayHistoryError, StayModel, fit_stays

ALL_KINDS = "all"
QUANTILES = (0.025, 0.1, 0.5, 0.9, 0.975)
MIN_DISCHARGES = 50


class HospitalTwinError(ValueError):
    """The twin cannot be built or run from this history and site file; the message says why."""


@dataclass(frozen=True)
class HospitalPlan:
    """What the twin learnt from the history up to `at_s` (a midnight, seconds since 1970)."""

    config: HospitalConfig
    at_s: int
    history_days: int
    arrivals: dict[tuple[str, str], ArrivalModel]
    stays: dict[tuple[str, str], StayModel]
    transfers: dict[str, dict[str, float]]
    occupants: tuple[tuple[str, str, float], ...]  # ward, kind, hours in the ward so far
    notes: tuple[str, ...] = ()
    # each occupant's factor on its remaining stay in its ward (length of stay by case mix, case_mix.py); empty:
    # every factor 1
    occupant_factors: tuple[float, ...] = ()
    # per ward, when patients left the hospital from it, by hour of the day (24 shares); a ward with fewer than
    # MIN_DISCHARGES such departures in the history is not in it (its patients leave at any hour)
    discharge_hours: dict[str, tuple[float, ...]] = field(default_factory=dict)

    @property
    def at(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.at_s, tz=dt.UTC).replace(tzinfo=None)

    def stay_model(self, ward: str, kind: str) -> StayModel:
        return self.stays.get((ward, kind)) or self.stays[(ward, ALL_KINDS)]


def learn(
    history: WardStays,
    config: HospitalConfig,
    at_s: int,
    history_days: int | None = None,
    stay_factors: dict[int, float] | None = None,
) -> HospitalPlan:
    """Fit the twin's parts from the history as it stood at `at_s` (see the module's docstring).
    `stay_factors` (by visit id) multiply those occupants' remaining stays (case_mix.py)."""
    if at_s % DAY_S:
        raise HospitalTwinError("the twin starts at a midnight")
    seen = history.as_of(at_s)
    stays = seen.stays
    if history_days is not None:
        stays = stays[stays.start_s >= at_s - history_days * DAY_S]
    if stays.empty:
        raise HospitalTwinError(f"no ward stays began before {_day(at_s)}: the twin has no history to learn from")
    first_day = int(stays.start_s.min() // DAY_S)
    days = at_s // DAY_S - first_day
    notes: list[str] = []
    arrivals: dict[tuple[str, str], ArrivalModel] = {}
    first = stays.drop_duplicates("visit", keep="first")
    for ward in config.wards:
        for kind in KINDS_SEEN:
            starts = first[(first.ward == ward.name) & (first.kind == kind)].start_s.to_numpy()
            if starts.size == 0:
                continue
            try:
                arrivals[(ward.name, kind)] = fit_arrivals(
                    f"{kind} to {ward.name}", (starts - first_day * DAY_S) / HOUR_S, first_day, days
                )
            except ArrivalHistoryError as exc:
                raise HospitalTwinError(str(exc)) from None
    if not arrivals:
        raise HospitalTwinError("no admission to any ward of the site file's `hospital:` in the history")
    models: dict[tuple[str, str], StayModel] = {}
    for ward in config.wards:
        own = stays[stays.ward == ward.name]
        try:
            models[(ward.name, ALL_KINDS)] = fit_stays(ward.name, ALL_KINDS, (own.end_s - own.start_s) / HOUR_S,
                                                       own.ended.to_numpy())  # fmt: skip
        except StayHistoryError as exc:
            raise HospitalTwinError(f"{exc}; the twin cannot simulate ward {ward.name} from this history") from None
        for kind in KINDS_SEEN:
            part = own[own.kind == kind]
            if int(part.ended.sum()) >= MIN_STAYS:
                models[(ward.name, kind)] = fit_stays(ward.name, kind, (part.end_s - part.start_s) / HOUR_S,
                                                      part.ended.to_numpy())  # fmt: skip
            elif len(part):
                notes.append(f"{ward.name}, {kind}: {int(part.ended.sum())} finished stays; the ward's stays of "
                             "every kind stand in for them")  # fmt: skip
    transfers: dict[str, dict[str, float]] = {}
    for ward in config.wards:
        ended = stays[(stays.ward == ward.name) & stays.ended]
        if len(ended):
            counts = ended.next_ward[ended.next_ward != ""].value_counts()
            transfers[ward.name] = {str(k): float(v) / len(ended) for k, v in counts.items()}
    discharge_hours = {}
    for ward in config.wards:
        left = stays[(stays.ward == ward.name) & stays.ended & (stays.next_ward == "")]
        if len(left) >= MIN_DISCHARGES:
            counts = np.bincount(((left.end_s.to_numpy() % DAY_S) // HOUR_S).astype(int), minlength=24) + 0.5
            discharge_hours[ward.name] = tuple(float(c) for c in counts / counts.sum())
        else:
            notes.append(f"{ward.name}: {len(left)} departures from the hospital in the history; its patients "
                         "leave at any hour")  # fmt: skip
    running = seen.occupants(at_s)
    occupants = tuple((str(r.ward), str(r.kind), float((at_s - r.start_s) / HOUR_S)) for r in running.itertuples())
    factors = tuple(float((stay_factors or {}).get(int(v), 1.0)) for v in running.visit) if stay_factors else ()
    for ward in config.wards:
        count = sum(o[0] == ward.name for o in occupants)
        if count > ward.beds:
            raise HospitalTwinError(
                f"ward {ward.name} had {count} patients at {_day(at_s)} but the site file gives it {ward.beds} beds; "
                "correct `hospital: wards: beds` (count every bed patients can lie in)"
            )
    return HospitalPlan(config, int(at_s), int(days), arrivals, models, transfers, occupants, tuple(notes), factors,
                        discharge_hours)  # fmt: skip


def _day(seconds: int) -> str:
    return dt.datetime.fromtimestamp(seconds, tz=dt.UTC).strftime("%Y-%m-%d %H:%M")


def replication_model(plan: HospitalPlan, days: int, seed: int, scenario: HospitalScenario | None = None
                      ) -> HospitalModel:  # fmt: skip
    """The HospitalModel of replication `seed`: its occupants' remaining stays drawn from their own stream."""
    at_day = plan.at_s // DAY_S
    wards = []
    for ward in plan.config.wards:
        usual_share = ward.staffed_share()
        leave = plan.discharge_hours.get(ward.name)
        if scenario is None:
            wards.append(Ward(ward.name, ward.beds, usual_share, discharge_hours=leave))
            continue
        start, later = scenario.beds(ward.name, ward.beds)
        changes = (((0, start),) if start != ward.beds else ()) + later
        wards.append(Ward(ward.name, ward.beds, scenario.staffed_share(ward.name, usual_share), changes, leave))
    streams = []
    for (ward, kind), model in sorted(plan.arrivals.items()):
        rates = model.rates(at_day, days)
        if scenario is not None:
            rates = rates * np.repeat(scenario.arrival_factor(ward, kind, days), 24)
        scale = scenario.stay_factor(ward, kind) if scenario is not None else 1.0
        streams.append(ArrivalStream(f"{kind} to {ward}", ward, (0.0,), plan.stay_model(ward, kind).sampler(scale),
                                     model.day_dispersion, tuple(float(r) for r in rates)))  # fmt: skip
    transfers = tuple(
        Transfer(source, target, p, plan.stay_model(target, ALL_KINDS).sampler(
            scenario.stay_factor(target, ALL_KINDS) if scenario is not None else 1.0))
        for source, targets in sorted(plan.transfers.items()) for target, p in sorted(targets.items())
    )  # fmt: skip
    random = np.random.default_rng(np.random.SeedSequence([seed, 1]))
    occupants = []
    factors = plan.occupant_factors or (1.0,) * len(plan.occupants)
    for (ward, kind, elapsed), factor in zip(plan.occupants, factors, strict=True):
        scale = (scenario.stay_factor(ward, kind) if scenario is not None else 1.0) * factor
        remaining = plan.stay_model(ward, kind).sample_remaining(random, np.array([elapsed]))[0] * scale
        occupants.append(Occupant(ward, float(remaining)))
    weekday = dt.datetime.fromtimestamp(plan.at_s, tz=dt.UTC).weekday()
    return HospitalModel(tuple(wards), tuple(streams), transfers, tuple(occupants), weekday)


# ------------------------------------------------------------------------------------------------ runs


@dataclass
class Paired:
    """Running mean and variance (Welford) of one effect's paired differences."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def add(self, value: float) -> None:
        self.n += 1
        delta = value - self.mean
        self.mean += delta / self.n
        self.m2 += delta * (value - self.mean)

    def interval(self) -> tuple[float, float]:
        if self.n < 2:
            return (math.nan, math.nan)
        half = 1.96 * math.sqrt(self.m2 / (self.n - 1) / self.n)
        return (self.mean - half, self.mean + half)


@dataclass
class ArmSummary:
    """One arm (the baseline or a scenario) over every replication: histograms and sums, per ward and day."""

    wards: list[str]
    days: int
    top: int  # census values 0..top
    census: np.ndarray = field(init=False)  # (wards, days, top + 1) counts of replications
    peak: np.ndarray = field(init=False)
    full_days: np.ndarray = field(init=False)  # (wards, days) replications in which the ward was full that day
    boarded: np.ndarray = field(init=False)  # (wards, days) sums
    boarding_hours: np.ndarray = field(init=False)
    runs: int = 0

    def __post_init__(self) -> None:
        shape = (len(self.wards), self.days)
        self.census = np.zeros((*shape, self.top + 1), dtype=np.int64)
        self.peak = np.zeros_like(self.census)
        self.full_days = np.zeros(shape, dtype=np.int64)
        self.boarded = np.zeros(shape)
        self.boarding_hours = np.zeros(shape)
        self._grid = np.meshgrid(np.arange(len(self.wards)), np.arange(self.days), indexing="ij")

    def add(self, result) -> None:
        w, d = self._grid
        np.add.at(self.census, (w, d, np.clip(result.midnight_census.T, 0, self.top)), 1)
        np.add.at(self.peak, (w, d, np.clip(result.peak_occupancy.T, 0, self.top)), 1)
        self.full_days += (result.hours_full.T > 0).astype(np.int64)
        self.boarded += result.boarded.T
        self.boarding_hours += result.boarding_hours.T
        self.runs += 1

    def quantiles(self, histogram: np.ndarray) -> np.ndarray:
        """(wards, days, len(QUANTILES)) quantiles of a histogram (lower value at ties)."""
        cumulative = np.cumsum(histogram, axis=-1) / max(self.runs, 1)
        return np.stack([np.argmax(cumulative >= q - 1e-12, axis=-1) for q in QUANTILES], axis=-1)


@dataclass
class TwinRun:
    """A run's result: the baseline arm, each scenario's arm and the paired effects (scenario minus baseline)."""

    plan: HospitalPlan
    days: int
    seed: int
    baseline: ArmSummary
    scenarios: dict[str, ArmSummary]
    effects: dict[str, dict[str, Paired]]  # scenario -> effect name -> paired differences


EFFECTS = {
    "mean_census": "mean midnight census, all wards",
    "days_full": "ward-days full at some hour",
    "boarded": "patients who waited for a bed",
    "boarding_hours": "hours waited for a bed, in total",
}

_WORK: dict[str, object] = {}


def _init(plan: HospitalPlan, days: int, scenarios: Sequence[HospitalScenario]) -> None:
    _WORK.update(plan=plan, days=days, scenarios=list(scenarios))


def _one(seed: int):
    plan, days, scenarios = _WORK["plan"], _WORK["days"], _WORK["scenarios"]
    arms = [simulate(replication_model(plan, days, seed), days, seed)]  # type: ignore[arg-type]
    arms += [simulate(replication_model(plan, days, seed, s), days, seed) for s in scenarios]  # type: ignore[arg-type]
    return arms


def _scalars(result) -> dict[str, float]:
    return {
        "mean_census": float(result.midnight_census.sum(axis=1).mean()),
        "days_full": float((result.hours_full > 0).sum()),
        "boarded": float(result.boarded.sum()),
        "boarding_hours": float(result.boarding_hours.sum()),
    }


def run(
    plan: HospitalPlan,
    days: int,
    runs: int,
    scenarios: Sequence[HospitalScenario] = (),
    *,
    seed: int = 0,
    workers: int = 1,
    on_progress: Callable[[int], None] | None = None,
) -> TwinRun:
    """`runs` replications of `days` days, the baseline and each scenario with the same replication numbers."""
    if days < 1 or runs < 1:
        raise HospitalTwinError("days and runs must be at least 1")
    wards = [w.name for w in plan.config.wards]
    top = max([w.beds for w in plan.config.wards] + [c.beds for s in scenarios for c in s.changes
                                                       if getattr(c, "change", "") == "beds"])  # fmt: skip
    baseline = ArmSummary(wards, days, top)
    arms = {s.name: ArmSummary(wards, days, top) for s in scenarios}
    effects = {s.name: {name: Paired() for name in EFFECTS} for s in scenarios}
    seeds = range(seed, seed + runs)

    def take(results) -> None:
        base = _scalars(results[0])
        baseline.add(results[0])
        for scenario, result in zip(scenarios, results[1:], strict=True):
            arms[scenario.name].add(result)
            values = _scalars(result)
            for name in EFFECTS:
                effects[scenario.name][name].add(values[name] - base[name])

    done = 0
    if workers <= 1:
        _init(plan, days, scenarios)
        for s in seeds:
            take(_one(s))
            done += 1
            if on_progress:
                on_progress(done)
    else:
        # forkserver, not fork: the caller may run threads (a progress bar's), and a fork copies their locks
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("forkserver"),
                                   initializer=_init, initargs=(plan, days, list(scenarios)))  # fmt: skip
        with pool:
            for results in pool.map(_one, seeds, chunksize=max(1, runs // (workers * 8))):
                take(results)
                done += 1
                if on_progress:
                    on_progress(done)
    return TwinRun(plan, days, seed, baseline, arms, effects)
