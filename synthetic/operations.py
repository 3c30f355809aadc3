"""The synthetic hospital as an operation: beds, staffed shifts, the arrival pattern, boarding and discharge timing.

Sites whose profile has an `operations` block (config.OperationsProfile) get capacity; the others are generated
exactly as before (their export is byte-identical). The design keeps the clinical simulation (inpatient.py,
vectorised per stay-hour, blind to the calendar) as it is and adds three steps around it:

1. When admissions happen (`AdmissionClock`, a hook of timeline.build_timeline). The timeline's own uniform draws
   of first-admission times are mapped by the inverse of the cumulative arrival intensity instead of spread evenly:
   emergency admissions follow an hour-of-day x day-of-week x season x surge intensity; a share of first admissions
   is elective and falls on weekday mornings. Readmissions keep their day (discharge + the drawn gap) and get an
   hour of the emergency pattern. The timeline then applies all of its rules (30-day windows, deaths, censoring) to
   these times, so no rule is broken by the re-timing.
2. Who gets a bed when (`BedSimulation`, a plain event loop in calendar time over every stay's desired location
   path from the clinical simulation). Staffed capacity per ward and hour is the hospital twin's rule,
   max(1, floor(beds x staffed share)); beds are taken first come, first served. An emergency patient whose ward (or
   ICU) is full waits in the emergency department (boarding: the ED segment lengthens); an elective patient finding
   no bed is postponed (the encounter starts when a bed frees, the wait is in the ground truth only); a transfer that
   finds the next ward full waits in the bed it has (blocking); when two patients each wait for the other's ward they
   swap. A patient ready to go home outside the discharge window stays in bed until the window opens. Every later
   segment shifts by the waits; a patient's next stay moves only as far as needed to keep the timeline's rules (a
   readmission at least 12 h after the real discharge, any other admission 30 days after it).
3. What is written (`apply_operations`): each stay's calendar-time segments (StayRef.segments), its start and end,
   deaths and visits moved out of the shifted stays, and the ground truth (`OperationsTruth`): the arrival
   intensities, lengths of stay by ward and admission kind, every stay's waits, and the effect of three standard
   scenarios over a 30-day window, by re-simulating the same hospital with common random numbers.

Clinical timestamps (measurements, drugs, procedures) stay tied to the stay's start, as without operations: a
boarding patient is treated in the emergency department on the course the clinical simulation drew.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from synthetic.config import OperationsProfile, SiteProfile, SynthConfig
from synthetic.ground_truth import OperationsTruth
from synthetic.inpatient import LOCATIONS, StayOutcomes
from synthetic.timeline import READMISSION_WINDOW, StayRef, Timeline, Visit, to_seconds

MINUTE = 60
HOUR = 3600
DAY = 86400
ED, WARD, ICU = 0, 1, 2  # location codes of the clinical simulation (inpatient.LOCATIONS)
WARD_CODES = (WARD, ICU)  # bed-holding locations, in the order of the simulation's ward index
WARD_NAMES = tuple(LOCATIONS[c] for c in WARD_CODES)  # ("ward", "icu"): the export's Location kinds
EMERGENCY, ELECTIVE = "emergency", "elective"
READMISSION_MIN_GAP = 12 * HOUR  # the timeline's shortest readmission gap is half a day
_EPOCH_WEEKDAY = 3  # 1970-01-01 was a Thursday (Monday = 0)
_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


class OperationsError(ValueError):
    """The operations layer cannot build a consistent history; the message says which stay and why."""


class WardOverloaded(OperationsError):
    """A ward whose beds cannot hold the site's demand; `load` is the demand in occupied beds on average and
    `staffed_share` the ward's mean staffed share of its beds, so a caller can size the ward."""

    def __init__(self, message: str, ward: str, load: float, staffed_share: float) -> None:
        super().__init__(message)
        self.ward, self.load, self.staffed_share = ward, load, staffed_share

    def __reduce__(self):  # raised in a worker process, it crosses back to the caller whole
        return (type(self), (str(self), self.ward, self.load, self.staffed_share))


def weekday(seconds: float) -> int:
    """Day of the week (Monday = 0) of a local wall-clock time in seconds since the epoch."""
    return int((seconds // DAY + _EPOCH_WEEKDAY) % 7)


# --- 1. the arrival pattern --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Surge:
    start_day: int  # days since the epoch
    days: int
    factor: float


class ArrivalPattern:
    """The true relative arrival intensity of each stream, hour by hour over the history window.

    intensity_stream(hour) = scale x hour_of_week factor x day factor; the day factor is the season x surges for
    emergencies and 1 for electives. Surges are drawn once per site (a Poisson process of starts).
    """

    def __init__(self, ops: OperationsProfile, t0: float, t_end: float, rng: np.random.Generator) -> None:
        if t0 % DAY or t_end % DAY:
            raise OperationsError("the history window must start and end at midnight")
        self.ops = ops
        self.t0, self.t_end = int(t0), int(t_end)
        self.first_day = self.t0 // DAY
        self.days = (self.t_end - self.t0) // DAY
        years = self.days / 365.25
        surges = []
        for start in sorted(rng.integers(0, self.days, rng.poisson(ops.surges_per_year * years)).tolist()):
            surges.append(Surge(self.first_day + int(start), ops.surge_days, ops.surge_factor))
        self.surges = tuple(surges)
        self.hour_of_week = {EMERGENCY: self._emergency_week(), ELECTIVE: self._elective_week()}
        day_numbers = np.arange(self.first_day, self.first_day + self.days)
        self.day_factor = {EMERGENCY: self._season(day_numbers) * self._surge(day_numbers),
                           ELECTIVE: np.ones(self.days)}  # fmt: skip
        self.hourly = {s: self._hourly(s) for s in (EMERGENCY, ELECTIVE)}
        self.cumulative = {s: np.cumsum(v) for s, v in self.hourly.items()}

    def _emergency_week(self) -> np.ndarray:
        hours = np.asarray(self.ops.emergency_hour_weights, dtype=float)
        hours = hours / hours.mean()
        return np.concatenate([hours * factor for factor in self.ops.weekday_factors])

    def _elective_week(self) -> np.ndarray:
        day = np.zeros(24)
        day[self.ops.elective_start_hour : self.ops.elective_end_hour] = 1.0
        return np.concatenate([day if d < 5 else np.zeros(24) for d in range(7)])

    def _season(self, day_numbers: np.ndarray) -> np.ndarray:
        import datetime as dt

        epoch = dt.date(1970, 1, 1)
        doy = np.array([(epoch + dt.timedelta(days=int(d))).timetuple().tm_yday for d in day_numbers], dtype=float)
        return 1.0 + self.ops.seasonal_amplitude * np.cos(2 * np.pi * (doy - self.ops.seasonal_peak_day) / 365.25)

    def _surge(self, day_numbers: np.ndarray) -> np.ndarray:
        factor = np.ones(day_numbers.size)
        for surge in self.surges:
            factor[(day_numbers >= surge.start_day) & (day_numbers < surge.start_day + surge.days)] *= surge.factor
        return factor

    def _hourly(self, stream: str) -> np.ndarray:
        """Relative intensity of every hour of the window (hour 0 = the window's first midnight)."""
        week = self.hour_of_week[stream]
        first_weekday = weekday(self.t0)
        how = (np.arange(self.days * 24) + first_weekday * 24) % 168
        return week[how] * np.repeat(self.day_factor[stream], 24)

    def times(self, stream: str, uniforms: np.ndarray) -> np.ndarray:
        """Uniform draws mapped onto the stream's intensity (inverse of its cumulative), floored to the minute."""
        rates, cumulative = self.hourly[stream], self.cumulative[stream]
        x = np.asarray(uniforms, dtype=float) * cumulative[-1]
        index = np.minimum(np.searchsorted(cumulative, x, side="right"), rates.size - 1)
        before = np.where(index > 0, cumulative[np.maximum(index - 1, 0)], 0.0)
        within = np.clip((x - before) / np.maximum(rates[index], 1e-12), 0.0, 1.0 - 1e-9)
        seconds = self.t0 + (index + within) * HOUR
        return np.floor(seconds / MINUTE) * MINUTE

    def draw(self, per_hour: np.ndarray, start: int, rng: np.random.Generator) -> list[int]:
        """Arrival times of a fresh Poisson process with `per_hour` expected arrivals in each hour from `start`."""
        counts = rng.poisson(per_hour)
        hours = np.repeat(np.arange(per_hour.size), counts)
        minutes = rng.integers(0, 60, hours.size)
        return sorted(int(start + h * HOUR + m * MINUTE) for h, m in zip(hours, minutes, strict=True))


class AdmissionClock:
    """timeline.AdmissionClock for a site with operations: first admissions on the arrival pattern, readmissions at
    an hour of the emergency pattern. Draws only from its own generator; remembers which admissions are elective."""

    def __init__(self, pattern: ArrivalPattern, rng: np.random.Generator) -> None:
        self.pattern = pattern
        self.rng = rng
        self.elective: set[tuple[int, float]] = set()
        weights = np.asarray(pattern.ops.emergency_hour_weights, dtype=float)
        self._hour_cdf = np.cumsum(weights) / weights.sum()

    def admission_times(self, patient: int, uniforms: np.ndarray) -> np.ndarray:
        planned = self.rng.random(uniforms.size) < self.pattern.ops.elective_share
        times = np.where(planned, self.pattern.times(ELECTIVE, uniforms), self.pattern.times(EMERGENCY, uniforms))
        for when in times[planned].tolist():
            self.elective.add((patient, float(when)))
        return times

    def readmission_time(self, discharge: float, when: float) -> float:
        hour = int(np.searchsorted(self._hour_cdf, self.rng.random(), side="right"))
        minute = int(self.rng.integers(0, 60))
        at = math.floor(when / DAY) * DAY + min(hour, 23) * HOUR + minute * MINUTE
        if at < discharge + READMISSION_MIN_GAP:
            at += DAY
        if at >= discharge + READMISSION_WINDOW - MINUTE:
            at -= DAY
        return float(max(at, math.ceil((discharge + READMISSION_MIN_GAP) / MINUTE) * MINUTE))

    def is_elective(self, patient: int, start: float) -> bool:
        return (patient, float(start)) in self.elective


# --- 2. the beds ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StayPlan:
    """What a stay needs, independent of the beds: when it asks, where it wants to be and for how long."""

    key: int  # position in timeline.stays (factual stays) or a fresh id (replicate arrivals)
    patient: int
    arrival: int  # ED arrival (emergency) or planned admission (elective), seconds
    elective: bool
    path: tuple[tuple[int, int], ...]  # (location code, desired seconds there), in order
    died: bool
    readmission: bool
    draws: tuple[float, float]  # uniforms of the discharge time (common random numbers)

    @property
    def desired_end(self) -> int:
        return self.arrival + sum(d for _, d in self.path)


@dataclass(frozen=True)
class Capacity:
    """Beds and staffed shares per ward index (0: ward, 1: ICU), with an optional change from a time on."""

    beds: tuple[int, int]
    shares: tuple[tuple[float, ...], tuple[float, ...]]  # 24 staffed shares per ward
    changed_from: int | None = None
    changed_beds: tuple[int, int] | None = None
    changed_shares: tuple[tuple[float, ...], tuple[float, ...]] | None = None

    @classmethod
    def of(cls, ops: OperationsProfile) -> Capacity:
        night = set(ops.night_hours())
        shares = tuple(
            tuple(w.night_staffed_share if h in night else 1.0 for h in range(24)) for w in (ops.ward, ops.icu)
        )
        return cls((ops.ward.beds, ops.icu.beds), shares)  # type: ignore[arg-type]

    def at(self, ward: int, t: int) -> int:
        """Staffed beds of `ward` at time `t` (the hospital twin's rule)."""
        late = self.changed_from is not None and t >= self.changed_from
        beds = (self.changed_beds if late and self.changed_beds else self.beds)[ward]
        share = (self.changed_shares if late and self.changed_shares else self.shares)[ward][(t % DAY) // HOUR]
        return max(1, math.floor(beds * share + 1e-9))

    def change_hours(self) -> list[int]:
        """Hours of the day at which some ward's staffed beds may change."""
        out = set()
        for shares in [self.shares, *([self.changed_shares] if self.changed_shares else [])]:
            for ward in shares:
                out |= {h for h in range(24) if ward[h] != ward[h - 1]}
        return sorted(out)


@dataclass
class _Run:
    """One stay's progress through the beds in one simulation."""

    seg: int = -1  # index into the plan's path of the current location; -1 before the first
    holding: int | None = None  # ward index of the bed held
    open_loc: int | None = None
    open_start: int = 0
    segments: list[tuple[int, int, int | None]] = field(default_factory=list)  # (location, start, end)
    request: int | None = None  # first bed asked for
    bed: int | None = None  # first bed taken
    waiting_for: int | None = None
    wait_since: int = 0
    blocked: int = 0  # seconds waited in a bed for the next one
    ready: int | None = None
    end: int | None = None

    def copy(self) -> _Run:
        clone = _Run(**{k: getattr(self, k) for k in self.__dataclass_fields__})
        clone.segments = list(self.segments)
        return clone


_CAP, _MOVE, _ARRIVE = 0, 1, 2  # event priorities at one instant: shift changes, then departures/moves, then arrivals


class BedSimulation:
    """The calendar-time simulation of the beds over a set of stays (see the module's docstring, step 2).

    Deterministic: the same plans, capacity and start give the same history, so a scenario re-simulated with the
    same plans differs from the factual history only by the scenario (common random numbers).
    """

    def __init__(
        self,
        plans: list[StayPlan],
        successor: dict[int, int],
        firsts: Iterable[int],
        capacity: Capacity,
        ops: OperationsProfile,
        export_time: int,
    ) -> None:
        self.plans = plans
        self.extra: dict[int, StayPlan] = {}
        self.successor = successor
        self.capacity = capacity
        self.ops = ops
        self.export_time = export_time
        self.heap: list[tuple[int, int, int, int]] = []
        self.seq = 0
        self.occupied = [0, 0]
        self.queue: list[deque[int]] = [deque(), deque()]
        self.active: dict[int, _Run] = {}
        self.done: dict[int, _Run] = {}
        self.arrival_at: dict[int, int] = {}
        self.dropped: dict[int, str] = {}
        self.live = 0
        self.chain_until: int | None = None  # replicates: no chained stays arriving at or after this time
        self.now = 0
        self._cap_hours = capacity.change_hours()
        self._cap_pending = False
        weights = np.zeros(24)
        window = slice(ops.discharge_start_hour, ops.discharge_end_hour)
        weights[window] = np.asarray(ops.discharge_hour_weights, dtype=float)[window]
        self._discharge_cdf = np.cumsum(weights) / weights.sum()
        firsts = sorted(firsts, key=lambda k: (plans[k].arrival, k))
        start = plans[firsts[0]].arrival if firsts else 0
        self.cap = [capacity.at(w, start) for w in range(2)]
        for key in firsts:
            self._schedule_arrival(key, plans[key].arrival)
        self._schedule_cap(start)

    # --- bookkeeping -------------------------------------------------------------------------------------

    def plan(self, key: int) -> StayPlan:
        return self.plans[key] if key < len(self.plans) else self.extra[key]

    def _push(self, t: int, priority: int, key: int) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, priority, self.seq, key))

    def _schedule_arrival(self, key: int, t: int) -> None:
        self.arrival_at[key] = t
        self.live += 1
        self._push(t, _ARRIVE, key)

    def _next_change(self, t: int) -> int | None:
        candidates = []
        if self._cap_hours:
            day = t - t % DAY
            for offset in (0, DAY):
                candidates += [day + offset + h * HOUR for h in self._cap_hours if day + offset + h * HOUR > t]
        if self.capacity.changed_from is not None and self.capacity.changed_from > t:
            candidates.append(self.capacity.changed_from)
        return min(candidates) if candidates else None

    def _schedule_cap(self, t: int) -> None:
        if self._cap_pending or self.live == 0:
            return
        nxt = self._next_change(t)
        if nxt is not None:
            self._cap_pending = True
            self._push(nxt, _CAP, -1)

    # --- the loop -----------------------------------------------------------------------------------------

    def run(self, until: int | None = None) -> BedSimulation:
        """Process events before `until` (all of them when None)."""
        while self.heap and (until is None or self.heap[0][0] < until):
            t, priority, _, key = heapq.heappop(self.heap)
            self.now = t
            if priority == _CAP:
                self._cap_pending = False
                for w in range(2):
                    self.cap[w] = self.capacity.at(w, t)
                    self._admit(w, t)
                self._schedule_cap(t)
            elif priority == _ARRIVE:
                self._arrive(key, t)
            else:
                self._advance(key, t)
        if until is not None:
            self.now = until
        return self

    def clone(self, capacity: Capacity | None = None) -> BedSimulation:
        """The simulation's state now, to continue apart (a scenario or a replicate); finished stays are left out.

        A new capacity applies from its `changed_from` on (it must not change the past)."""
        other = object.__new__(BedSimulation)
        other.__dict__.update(self.__dict__)
        other.extra = dict(self.extra)
        other.heap = list(self.heap)
        other.occupied = list(self.occupied)
        other.queue = [deque(q) for q in self.queue]
        other.active = {k: r.copy() for k, r in self.active.items()}
        other.done = {}
        other.arrival_at = dict(self.arrival_at)
        other.dropped = {}
        other.cap = list(self.cap)
        if capacity is not None:
            if capacity.changed_from is None or capacity.changed_from < self.now:
                raise OperationsError("a scenario's capacity must change at or after the moment it branches off")
            other.capacity = capacity
            other._cap_hours = capacity.change_hours()
            other.heap = [e for e in other.heap if e[1] != _CAP]
            heapq.heapify(other.heap)
            other._cap_pending = True
            other._push(capacity.changed_from, _CAP, -1)
        return other

    def add_arrival(self, plan: StayPlan) -> None:
        """A stay that is not in the factual history (a replicate's or a scenario's extra arrival)."""
        self.extra[plan.key] = plan
        self._schedule_arrival(plan.key, plan.arrival)
        self._schedule_cap(self.now)

    # --- what happens to a stay ---------------------------------------------------------------------------

    def _arrive(self, key: int, t: int) -> None:
        plan = self.plan(key)
        run = self.active[key] = _Run()
        if plan.path[0][0] == ED:
            run.seg = 0
            self._open(run, ED, t)
            self._push(t + plan.path[0][1], _MOVE, key)
        else:
            run.request = t
            self._request(key, run, self._ward(plan.path[0][0]), t)

    def _advance(self, key: int, t: int) -> None:
        """The current location's desired time is over: ask for the next bed, or leave."""
        run = self.active[key]
        plan = self.plan(key)
        if run.ready is not None:  # the discharge (or death) itself
            self._leave(key, run, t)
            return
        if run.seg + 1 < len(plan.path):
            if run.request is None:
                run.request = t
            self._request(key, run, self._ward(plan.path[run.seg + 1][0]), t)
            return
        run.ready = t
        self._push(t if plan.died else self._discharge_time(t, plan.draws), _MOVE, key)

    @staticmethod
    def _ward(location: int) -> int:
        if location not in WARD_CODES:
            raise OperationsError(f"a stay's path goes back to location {LOCATIONS[location]}: only wards have beds")
        return WARD_CODES.index(location)

    def _request(self, key: int, run: _Run, ward: int, t: int) -> None:
        if not self.queue[ward] and self.occupied[ward] < self.cap[ward]:
            self._move(key, run, ward, t)
            return
        if run.holding is not None:  # two patients each waiting for the other's ward swap beds
            for other in self.queue[run.holding]:
                partner = self.active[other]
                if partner.holding == ward:
                    self.queue[run.holding].remove(other)
                    self._swap(key, run, other, partner, t)
                    return
        run.waiting_for, run.wait_since = ward, t
        self.queue[ward].append(key)

    def _admit(self, ward: int, t: int) -> None:
        while self.queue[ward] and self.occupied[ward] < self.cap[ward]:
            key = self.queue[ward].popleft()
            self._move(key, self.active[key], ward, t)

    def _place(self, key: int, run: _Run, ward: int, t: int) -> None:
        """Segment bookkeeping of a move into `ward` at `t` (beds counted by the caller)."""
        if run.waiting_for is not None and run.holding is not None:
            run.blocked += t - run.wait_since
        run.waiting_for = None
        if run.bed is None:
            run.bed = t
        run.holding = ward
        run.seg += 1
        self._open(run, WARD_CODES[ward], t)
        self._push(t + self.plan(key).path[run.seg][1], _MOVE, key)

    def _move(self, key: int, run: _Run, ward: int, t: int) -> None:
        old = run.holding
        self.occupied[ward] += 1
        self._place(key, run, ward, t)
        if old is not None:
            self.occupied[old] -= 1
            self._admit(old, t)

    def _swap(self, key: int, run: _Run, other: int, partner: _Run, t: int) -> None:
        mine, theirs = run.holding, partner.holding
        assert mine is not None and theirs is not None
        self._place(key, run, theirs, t)
        self._place(other, partner, mine, t)

    def _open(self, run: _Run, location: int, t: int) -> None:
        if run.open_loc is not None:
            run.segments.append((run.open_loc, run.open_start, t))
        run.open_loc, run.open_start = location, t

    def _leave(self, key: int, run: _Run, t: int) -> None:
        if run.open_loc is not None:
            run.segments.append((run.open_loc, run.open_start, t))
            run.open_loc = None
        run.end = t
        if run.holding is not None:
            ward, run.holding = run.holding, None
            self.occupied[ward] -= 1
            self._admit(ward, t)
        self.done[key] = self.active.pop(key)
        self.live -= 1
        self._chain(key, t)

    def _discharge_time(self, ready: int, draws: tuple[float, float]) -> int:
        """When a patient ready to go home at `ready` leaves: within the discharge window after the paperwork
        (30 min to 2.5 h), else the next time the window opens, at an hour of the discharge-hour weights."""
        ops = self.ops
        hour = (ready % DAY) // HOUR
        if ops.discharge_start_hour <= hour < ops.discharge_end_hour:
            return ready + int((0.5 + 2.0 * draws[0]) * HOUR) // MINUTE * MINUTE
        day = ready - ready % DAY + (DAY if hour >= ops.discharge_end_hour else 0)
        at_hour = int(min(np.searchsorted(self._discharge_cdf, draws[0], side="right"), ops.discharge_end_hour - 1))
        return day + at_hour * HOUR + int(draws[1] * 60) * MINUTE

    def _chain(self, key: int, end: int) -> None:
        """Schedule the patient's next stay no earlier than the timeline's rules allow after this real discharge."""
        nxt = self.successor.get(key)
        if nxt is None:
            return
        plan = self.plan(nxt)
        if plan.readmission:
            at = max(plan.arrival, math.ceil((end + READMISSION_MIN_GAP) / MINUTE) * MINUTE)
        elif plan.arrival < end + READMISSION_WINDOW:
            at = plan.arrival + math.ceil((end + READMISSION_WINDOW - plan.arrival) / DAY) * DAY
        else:
            at = plan.arrival
        if end >= self.export_time or at >= self.export_time:
            self._drop(nxt, "its patient's earlier stay ended too late for it to begin before the export date")
        elif self.chain_until is not None and at >= self.chain_until and not plan.readmission:
            return  # a replicate: its first admissions are fresh draws
        else:
            self._schedule_arrival(nxt, at)

    def _drop(self, key: int, why: str) -> None:
        while key is not None:
            self.dropped[key] = why
            key = self.successor.get(key)  # type: ignore[assignment]

    # --- results ------------------------------------------------------------------------------------------

    def runs(self) -> dict[int, _Run]:
        return {**self.done, **self.active}

    def window(self, start: int, end: int) -> dict[str, float]:
        """Boarding and midnight census over [start, end) from this simulation's stays (run it to `end` first).

        boarded: first-bed requests in the window that waited; boarding_hours: their waits, cut at the window's
        end (as the hospital twin counts them); mean_boarding_hours: per first-bed request in the window;
        mean_midnight_census_<ward>: patients in the ward's beds at each midnight of the window, averaged."""
        requests = boarded = 0
        hours = 0.0
        by_kind = {EMERGENCY: 0, ELECTIVE: 0}
        midnights = np.arange(start, end, DAY)
        census = np.zeros((2, midnights.size))
        for key, run in self.runs().items():
            if run.request is not None and start <= run.request < end:
                requests += 1
                got = run.bed if run.bed is not None else end
                wait = min(got, end) - run.request
                if wait > 0 or run.bed is None:
                    boarded += 1
                    hours += wait / HOUR
                    by_kind[ELECTIVE if self.plan(key).elective else EMERGENCY] += 1
            spans = list(run.segments)
            if run.open_loc is not None:
                spans.append((run.open_loc, run.open_start, None))
            for location, s, e in spans:
                if location in WARD_CODES:
                    inside = (midnights >= s) & ((midnights < e) if e is not None else True)
                    census[WARD_CODES.index(location)] += inside
        out = {
            "boarded": float(boarded),
            "boarding_hours": hours,
            "mean_boarding_hours": hours / requests if requests else 0.0,
            "bed_requests": float(requests),
            "boarded_emergency": float(by_kind[EMERGENCY]),
            "boarded_elective": float(by_kind[ELECTIVE]),
        }
        for w, name in enumerate(WARD_NAMES):
            out[f"mean_midnight_census_{name}"] = float(census[w].mean()) if midnights.size else 0.0
        out["mean_midnight_census_all"] = float(census.sum(axis=0).mean()) if midnights.size else 0.0
        return out


# --- 3. plans from the timeline, the history written back, the ground truth ------------------------------------


def _paths(batch: StayOutcomes) -> list[list[tuple[int, int]]]:
    """Each stay's desired (location, hour entered) list from the clinical simulation's location log."""
    loc = batch.locations
    n = len(batch.admissions)
    stays = np.asarray(loc["stay"], dtype=np.int64)
    order = np.argsort(stays, kind="stable")
    bounds = np.searchsorted(stays[order], np.arange(n + 1))
    out = []
    for row in range(n):
        rows = order[bounds[row] : bounds[row + 1]]
        out.append([(int(loc["location"][r]), int(loc["hour"][r])) for r in rows])
    return out


def desired_path(entries: list[tuple[int, int]], end_hour: int, elective: bool) -> tuple[tuple[int, int], ...]:
    """(location, seconds) of a stay's clinical course: zero-length stops merged away; an elective patient goes
    straight to the ward the course leads to (their emergency-department hours are spent there)."""
    path: list[list[int]] = []
    for k, (location, hour) in enumerate(entries):
        until = entries[k + 1][1] if k + 1 < len(entries) else end_hour
        seconds = max(0, until - hour) * HOUR
        if path and path[-1][0] == location:
            path[-1][1] += seconds
        elif seconds > 0 or not path:
            path.append([location, seconds])
    path = [p for p in path if p[1] > 0] or [[path[0][0], max(path[0][1], HOUR)]]
    merged: list[list[int]] = []
    for location, seconds in path:
        if merged and merged[-1][0] == location:
            merged[-1][1] += seconds
        else:
            merged.append([location, seconds])
    if elective and merged[0][0] == ED:
        ed_seconds = merged.pop(0)[1]
        if merged:
            merged[0][1] += ed_seconds
        else:
            merged = [[WARD, ed_seconds]]
    return tuple((int(a), int(b)) for a, b in merged)


@dataclass
class OperationsResult:
    """What the operations layer did to a site's timeline, for the ground truth (see ground_truth.OperationsTruth)."""

    truth: dict
    stay_keys: dict[int, int]  # id(StayRef) -> key, for the per-stay truth rows
    runs: dict[int, _Run]
    plans: list[StayPlan]
    dropped: dict[int, str]


class OperationsLayer:
    """Builds the plans from a timeline, runs the factual history and the scenario re-simulations."""

    def __init__(
        self,
        ops: OperationsProfile,
        timeline: Timeline,
        pattern: ArrivalPattern,
        clock: AdmissionClock,
        rng: np.random.Generator,
        rates_per_year: np.ndarray,
    ) -> None:
        self.ops = ops
        self.tl = timeline
        self.pattern = pattern
        self.clock = clock
        self.rng = rng
        self.export_time = int(timeline.export_time)
        paths = [_paths(b) for b in timeline.batches]
        self.plans: list[StayPlan] = []
        draws = rng.random((len(timeline.stays), 2))
        for key, ref in enumerate(timeline.stays):
            batch = timeline.batches[ref.batch]
            elective = clock.is_elective(ref.patient, ref.start)
            self.plans.append(StayPlan(
                key=key, patient=ref.patient, arrival=int(ref.start), elective=elective,
                path=desired_path(paths[ref.batch][ref.row], int(batch.end_hour[ref.row]), elective),
                died=bool(batch.died[ref.row]), readmission=ref.is_readmission,
                draws=(float(draws[key, 0]), float(draws[key, 1])),
            ))  # fmt: skip
        by_patient: dict[int, list[int]] = {}
        for key, ref in enumerate(timeline.stays):
            by_patient.setdefault(ref.patient, []).append(key)
        self.successor: dict[int, int] = {}
        self.firsts: list[int] = []
        for keys in by_patient.values():
            keys.sort(key=lambda k: self.plans[k].arrival)
            self.firsts.append(keys[0])
            self.successor.update(itertools.pairwise(keys))
        self.capacity = Capacity.of(ops)
        self._check_load()
        self.intensity = self._first_admission_intensity(rates_per_year)

    def _check_load(self) -> None:
        """Refuse wards the history's demand overloads: their queue would never clear (boarding for months), which
        is no hospital's history. Demand = the clinical courses' bed-hours (discharge waits not counted) over the
        window; the limit is 90% of the mean staffed beds."""
        hours = self.pattern.days * 24
        for w, code in enumerate(WARD_CODES):
            load = sum(sec for plan in self.plans for loc, sec in plan.path if loc == code) / HOUR / hours
            staffed = float(np.mean([self.capacity.at(w, h * HOUR) for h in range(24)]))
            if load > 0.9 * staffed:
                name = ("ward", "icu")[w]
                share = staffed / self.capacity.beds[w]
                beds = math.ceil(load / (0.75 * share))
                raise WardOverloaded(
                    f"operations.{name}: {self.capacity.beds[w]} beds ({staffed:.1f} staffed on average) cannot hold "
                    f"this site's demand of {load:.1f} occupied beds on average; the queue would never clear. "
                    f"Give it about {beds} beds (75% occupancy) or fewer patients",
                    name,
                    load,
                    share,
                )

    def _first_admission_intensity(self, rates_per_year: np.ndarray) -> dict[str, np.ndarray]:
        """The true expected first admissions per hour of each stream over the history (before any bed delay).

        A patient's candidate admissions are a Poisson process of rate_p per year spread by the stream's relative
        intensity; a candidate becomes an admission when the patient is at risk (alive, not in hospital, not within
        30 days of a discharge: the timeline's rules). So the intensity is sum over patients at risk of rate_p /
        hours per year x the stream's share x relative intensity / its mean, with the at-risk set of this history.
        """
        tl, t0 = self.tl, self.pattern.t0
        hours = self.pattern.days * 24
        at_risk = np.zeros(hours + 1)

        def add(patient: int, begin: float, end: float) -> None:
            a = int(max(0, (begin - t0) // HOUR))
            b = int(min(hours, max(0, math.ceil((end - t0) / HOUR))))
            if b > a:
                at_risk[a] += rates_per_year[patient]
                at_risk[b] -= rates_per_year[patient]

        by_patient: dict[int, list[StayPlan]] = {}
        for plan in self.plans:
            by_patient.setdefault(plan.patient, []).append(plan)
        for patient in range(rates_per_year.size):
            free_from = float(t0)
            for plan in sorted(by_patient.get(patient, []), key=lambda p: p.arrival):
                add(patient, free_from, plan.arrival)
                censored = plan.desired_end >= self.export_time
                free_from = np.inf if plan.died or censored else plan.desired_end + READMISSION_WINDOW
            add(patient, free_from, min(float(tl.death_time[patient]), float(self.export_time)))
        rate = np.cumsum(at_risk)[:hours] / (365.25 * 24)
        share = {EMERGENCY: 1.0 - self.ops.elective_share, ELECTIVE: self.ops.elective_share}
        return {s: rate * share[s] * self.pattern.hourly[s] / self.pattern.hourly[s].mean() for s in share}

    def _hours(self, start: int, end: int) -> slice:
        return slice((start - self.pattern.t0) // HOUR, (end - self.pattern.t0) // HOUR)

    def simulate(self, capacity: Capacity | None = None) -> BedSimulation:
        """The whole history through the beds (the factual one with the profile's capacity)."""
        sim = BedSimulation(self.plans, self.successor, self.firsts, capacity or self.capacity, self.ops,
                            self.export_time)  # fmt: skip
        return sim.run()

    # --- writing the history back --------------------------------------------------------------------------

    def apply(self, sim: BedSimulation) -> None:
        """Write the factual history into the timeline: stays' times and segments, deaths, visits."""
        tl = self.tl
        runs = sim.runs()
        export = self.export_time
        self.dropped = dict(sim.dropped)
        kept: list[StayRef] = []
        self.kept: list[tuple[int, StayRef]] = []
        for key, ref in enumerate(tl.stays):
            if key in self.dropped:
                continue
            run = runs.get(key)
            if run is None or run.end is None:
                raise OperationsError(f"stay {key} (patient {ref.patient}) never left the simulation of the beds")
            plan = self.plans[key]
            start = run.segments[0][1]
            if start >= export:  # an elective postponed past the export date (its successors begin later still)
                self.dropped[key] = "an elective admission postponed past the export date for want of a bed"
                continue
            ref.start = float(start)
            ref.elective = plan.elective
            ref.segments = [
                (LOCATIONS[loc], float(s), float(e) if e is not None else None) for loc, s, e in run.segments
            ]
            if run.end >= export:
                ref.end = None
                ref.readmitted_within_30d = None
            else:
                ref.end = float(run.end)
            kept.append(ref)
            self.kept.append((key, ref))
        tl.stays[:] = kept
        self._deaths()
        self.moved_visits, self.dropped_visits = self._visits(kept)
        first_contact = np.full(tl.first_contact.size, np.inf)
        for visit in tl.visits:
            first_contact[visit.patient] = min(first_contact[visit.patient], visit.start)
        for ref in kept:
            first_contact[ref.patient] = min(first_contact[ref.patient], ref.start)
        tl.first_contact[:] = first_contact

    def _deaths(self) -> None:
        """In-hospital deaths at the stay's real end; other deaths out of every shifted stay and 30-day window."""
        tl = self.tl
        by_patient: dict[int, list[tuple[int, StayRef]]] = {}
        for key, ref in self.kept:
            by_patient.setdefault(ref.patient, []).append((key, ref))
        offsets = self.rng.random(tl.death_time.size)
        for patient in range(tl.death_time.size):
            if tl.death_in_hospital[patient] and patient not in by_patient:
                tl.death_in_hospital[patient] = False  # the fatal stay begins after the export now
                tl.death_time[patient] = np.inf
        for patient, pairs in by_patient.items():
            pairs.sort(key=lambda pair: pair[1].start)
            last_key, last = pairs[-1]
            refs = [ref for _, ref in pairs]
            if tl.death_in_hospital[patient]:
                if last.end is None or not self.plans[last_key].died:  # still in, or the fatal stay is dropped
                    tl.death_in_hospital[patient] = False
                    tl.death_time[patient] = np.inf
                else:
                    tl.death_time[patient] = last.end
                continue
            death = tl.death_time[patient]
            if not np.isfinite(death):
                continue
            for ref in refs:
                if ref.end is None:
                    death = np.inf
                    break
                if death < ref.start or death <= ref.end + READMISSION_WINDOW:
                    death = ref.end + READMISSION_WINDOW + offsets[patient] * 10 * DAY
            tl.death_time[patient] = death if death < tl.export_time else np.inf

    def _visits(self, stays: list[StayRef]) -> tuple[int, int]:
        """Visits that the shifted stays now cover (within a day, the timeline's rule) move by whole days."""
        tl = self.tl
        busy: dict[int, list[tuple[float, float]]] = {}
        for ref in stays:
            busy.setdefault(ref.patient, []).append((ref.start, ref.end if ref.end is not None else np.inf))

        def clash(v: Visit, start: float) -> bool:
            return any(s - DAY <= start <= e + DAY for s, e in busy.get(v.patient, []))

        moved = dropped = 0
        kept: list[Visit] = []
        t0 = self.pattern.t0
        for v in tl.visits:
            if not clash(v, v.start):
                kept.append(v)
                continue
            last = min(tl.export_time, tl.death_time[v.patient])
            length = v.end - v.start
            for days in [d for k in range(1, 120) for d in (k, -k)]:
                start = v.start + days * DAY
                if start >= t0 and start + length < last and not clash(v, start):
                    kept.append(Visit(v.patient, v.kind, start, start + length))
                    moved += 1
                    break
            else:
                dropped += 1
        kept.sort(key=lambda v: (v.patient, v.start))
        tl.visits[:] = kept
        return moved, dropped

    # --- ground truth --------------------------------------------------------------------------------------

    def window(self) -> tuple[int, int]:
        end_day = (self.export_time // DAY) - self.ops.truth_window_end_days_before_export
        start = (end_day - self.ops.truth_window_days) * DAY
        if start < self.pattern.t0 + 7 * DAY:
            raise OperationsError(
                f"the scenario window ({self.ops.truth_window_days} days ending "
                f"{self.ops.truth_window_end_days_before_export} days before the export) needs a longer history"
            )
        return start, end_day * DAY

    def scenarios(self, start: int) -> dict[str, tuple[str, Capacity, float]]:
        """The standard scenarios: (definition, capacity from `start`, extra emergency arrivals as a share)."""
        base = self.capacity
        night = set(self.ops.night_hours())
        fewer = tuple(tuple(s * 0.85 if h in night else s for h, s in enumerate(ward)) for ward in base.shares)
        return {
            "plus_4_ward_beds": ("four more general-ward beds from the window's start (staffed as the others)",
                                 Capacity(base.beds, base.shares, start, (base.beds[0] + 4, base.beds[1]), base.shares),
                                 0.0),
            "night_staffing_minus_15pct": ("15% fewer staffed beds at night on every ward (staffed share x 0.85 in "
                                           "the night hours) from the window's start",
                                           Capacity(base.beds, base.shares, start, base.beds, fewer), 0.0),  # type: ignore[arg-type]
            "emergency_arrivals_plus_20pct": ("20% more emergency arrivals over the window: extra arrivals at 0.2 "
                                              "times the true emergency intensity, paths drawn from the site's "
                                              "emergency stays", Capacity(base.beds, base.shares, start), 0.2),
        }  # fmt: skip

    def _fresh(self, stream: str, per_hour: np.ndarray, start: int, rng: np.random.Generator,
               next_key: int) -> list[StayPlan]:  # fmt: skip
        """New arrivals of a stream from `start` (`per_hour` expected in each hour), each with the path of a stay of
        the site's drawn at random among the stream's first admissions."""
        pool = [p for p in self.plans if p.elective == (stream == ELECTIVE) and not p.readmission]
        if not pool:
            return []
        out = []
        for k, at in enumerate(self.pattern.draw(per_hour, start, rng)):
            source = pool[int(rng.integers(0, len(pool)))]
            u = rng.random(2)
            out.append(StayPlan(key=next_key + k, patient=-1, arrival=at, elective=source.elective,
                                path=source.path, died=source.died, readmission=False,
                                draws=(float(u[0]), float(u[1]))))  # fmt: skip
        return out

    def truth(self, factual: BedSimulation) -> dict:
        """The operations ground truth (the OperationsTruth fields)."""
        start, end = self.window()
        runs = factual.runs()
        arrivals = self._arrival_truth()
        window = self._hours(start, end)
        first = {s: self.intensity[s][window] for s in (EMERGENCY, ELECTIVE)}
        readmissions = sum(1 for p in self.plans if p.readmission and start <= factual.arrival_at.get(p.key, -1) < end)
        shape = self.pattern.hourly[EMERGENCY][window]
        # +20% of every emergency arrival: first admissions and, spread like them, the window's readmissions
        surge = 0.2 * (first[EMERGENCY] + readmissions * shape / shape.sum())
        scenarios = self.scenarios(start)
        branch = self._branch(start)
        base = branch.clone().run(end).window(start, end)
        if base != factual_window(self, start, end):
            raise OperationsError("re-simulating the baseline from the window's start did not reproduce the history")
        results: dict[str, dict] = {}
        extra_rng = np.random.default_rng(np.random.SeedSequence([int(self.rng.integers(0, 2**63)), 1]))
        extras = self._fresh(EMERGENCY, surge, start, extra_rng, 10**9)
        for name, (definition, capacity, extra_share) in scenarios.items():
            sim = branch.clone(capacity)
            if extra_share:
                for plan in extras:
                    sim.add_arrival(plan)
            factual_scenario = sim.run(end).window(start, end)
            results[name] = {"definition": definition, "factual": _metrics(base, factual_scenario)}
        expected = self._expected(branch, scenarios, first, surge, start, end)
        for name, metrics in expected.items():
            results[name]["expected"] = metrics
        ward_stays = self._length_of_stay(runs)
        boarded = [r for k, r in runs.items() if k not in self.dropped and r.request is not None
                   and not self.plans[k].elective]  # fmt: skip
        waits = np.array([(r.bed - r.request) / HOUR for r in boarded if r.bed is not None])
        return {
            "design": {
                "capacity": "staffed beds = max(1, floor(beds x staffed share of the hour)); no one leaves a bed "
                "when the share drops; beds are taken first come, first served",
                "boarding": "an emergency patient waits in the emergency department while the next ward is full; an "
                "elective one is postponed (the encounter starts at the bed)",
                "blocking": "a transfer that finds the next ward full waits in its bed; two patients waiting for "
                "each other's ward swap",
                "discharge": f"ready in [{self.ops.discharge_start_hour}, {self.ops.discharge_end_hour}) h: leaves "
                "0.5-2.5 h later; otherwise in the next window at an hour of discharge_hour_weights; "
                "deaths at once",
                "clinical_times": "measurements, drugs and procedures keep their times from the stay's start",
                "scenario_window": "local wall-clock time; metrics over first-bed requests in the window and its "
                "midnights; boarding still running at the window's end counted up to it",
                "common_random_numbers": "baseline and scenario share every patient, path and discharge draw; the "
                "history before the window is the factual one; the baseline re-simulated "
                "from the window's start reproduces the factual window exactly",
                "expected_effect": f"{self.ops.truth_replicates} replicates: the factual state at the window's start, "
                "then fresh arrivals from the true intensities with paths drawn from the site's "
                "stays of their kind, baseline and scenario paired; mean and 95% interval "
                "(1.96 standard errors)",
            },
            "wards": {
                name: {
                    "beds": self.capacity.beds[w],
                    "staffed_by_hour": [self.capacity.at(w, h * HOUR) for h in range(24)],
                }
                for w, name in enumerate(WARD_NAMES)
            },
            "arrivals": arrivals,
            "surges": [{"start": _date(s.start_day), "days": s.days, "factor": s.factor} for s in self.pattern.surges],
            "length_of_stay": ward_stays,
            "transfers": self._transfers(),
            "summary": {
                "stays": len(self.plans),
                "stays_exported": len(self.kept),
                "emergency_admissions_to_a_bed": len(boarded),
                "share_emergency_boarded": round(float((waits > 0).mean()), 4) if waits.size else 0.0,
                "mean_boarding_hours_emergency": round(float(waits.mean()), 3) if waits.size else 0.0,
                "mean_boarding_hours_when_boarded": round(float(waits[waits > 0].mean()), 3)
                if (waits > 0).any()
                else 0.0,
                "electives_postponed": sum(
                    1
                    for k, r in runs.items()
                    if self.plans[k].elective and r.bed is not None and r.request is not None and r.bed > r.request
                ),
                "blocked_transfers": sum(1 for r in runs.values() if r.blocked > 0),
                "visits_moved": self.moved_visits,
                "visits_dropped": self.dropped_visits,
            },
            "dropped_stays": [
                {"patient": self.plans[k].patient, "planned_arrival": _instant(self.plans[k].arrival), "why": why}
                for k, why in sorted(self.dropped.items())
            ],
            "window_start": _instant(start),
            "window_end": _instant(end),
            "baseline_window": base,
            "scenarios": results,
        }

    def _branch(self, start: int) -> BedSimulation:
        """The factual history run up to the window's start (the state every scenario branches from)."""
        sim = BedSimulation(self.plans, self.successor, self.firsts, self.capacity, self.ops, self.export_time)
        return sim.run(start)

    def _expected(self, branch: BedSimulation, scenarios, first: dict[str, np.ndarray], surge: np.ndarray,
                  start: int, end: int) -> dict[str, dict]:  # fmt: skip
        """Each scenario's expected effect over replicates of the window's first admissions (common random numbers:
        the factual state at the window's start and the readmissions it triggers, then fresh first admissions
        from the true intensities, the same in both arms)."""
        seeds = np.random.SeedSequence([int(self.rng.integers(0, 2**63)), 2]).spawn(self.ops.truth_replicates)
        rows: dict[str, list[tuple[dict, dict]]] = {name: [] for name in scenarios}
        for seed in seeds:
            rng = np.random.default_rng(seed)
            fresh = self._fresh(EMERGENCY, first[EMERGENCY], start, rng, 10**9)
            fresh += self._fresh(ELECTIVE, first[ELECTIVE], start, rng, 2 * 10**9)
            extra = self._fresh(EMERGENCY, surge, start, rng, 3 * 10**9)
            root = branch.clone()
            root.chain_until = start
            root.heap = [e for e in root.heap if e[1] != _ARRIVE or e[0] < start or root.plan(e[3]).readmission]
            root.live = len(root.active) + sum(1 for e in root.heap if e[1] == _ARRIVE)
            heapq.heapify(root.heap)
            for plan in fresh:
                root.add_arrival(plan)
            base = root.clone().run(end).window(start, end)
            for name, (_, capacity, extra_share) in scenarios.items():
                sim = root.clone(capacity)
                if extra_share:
                    for plan in extra:
                        sim.add_arrival(plan)
                rows[name].append((base, sim.run(end).window(start, end)))
        out = {}
        for name, pairs in rows.items():
            metrics = {}
            for metric in pairs[0][0]:
                b = np.array([p[0][metric] for p in pairs])
                s = np.array([p[1][metric] for p in pairs])
                d = s - b
                se = float(d.std(ddof=1) / math.sqrt(d.size)) if d.size > 1 else float("nan")
                mean = float(d.mean())
                metrics[metric] = {"baseline": round(float(b.mean()), 4), "scenario": round(float(s.mean()), 4),
                                   "effect": round(mean, 4), "standard_error": round(se, 4),
                                   "ci95": [round(mean - 1.96 * se, 4), round(mean + 1.96 * se, 4)]}  # fmt: skip
            out[name] = {"replicates": len(pairs), "metrics": metrics}
        return out

    def _arrival_truth(self) -> dict[str, dict]:
        out = {}
        hours = self.pattern.days * 24
        for stream in (EMERGENCY, ELECTIVE):
            elective = stream == ELECTIVE
            count = sum(1 for p in self.plans if p.elective == elective and not p.readmission)
            week = self.pattern.hour_of_week[stream]
            day_share = week.reshape(7, 24).sum(axis=0)
            per_hour = self.intensity[stream]
            out[stream] = {
                "arrivals": count,
                "expected_arrivals": round(float(per_hour.sum()), 3),
                "mean_per_hour": round(count / hours, 6),
                "per_hour_first": _instant(self.pattern.t0),
                "per_hour": [round(float(v), 7) for v in per_hour],
                "hour_of_week": [round(float(v), 6) for v in week],
                "hour_of_day_share": [round(float(v), 6) for v in day_share / day_share.sum()],
                "day_factor_first_date": _date(self.pattern.first_day),
                "day_factor": [round(float(v), 6) for v in self.pattern.day_factor[stream]],
                "definition": (
                    "first admissions only (readmissions: the 'readmission' entry); per_hour[h] = expected admissions "
                    "in hour h = sum of the at-risk patients' yearly rates / 8766 x the stream's share x "
                    "hour_of_week[hours since Monday 00:00] x day_factor[day] / their mean over the history; "
                    "at risk: alive, not in hospital, not within 30 days of a discharge (the timeline's rules, "
                    "before any delay by the beds). "
                    + ("Weekday mornings." if elective else "day_factor = season x surges.")
                ),
            }
        readmissions = [p for p in self.plans if p.readmission]
        out["readmission"] = {
            "arrivals": len(readmissions),
            "mean_per_hour": round(len(readmissions) / hours, 6),
            "definition": "triggered by discharges, not a calendar intensity: a patient discharged alive is "
            "readmitted with the stay's true readmission probability, max(0.5 d, 30 d x Beta(1.2, 2.5)) later, "
            "at an hour drawn from emergency_hour_weights (at least 12 h after the real discharge); emergency kind",
        }
        return out

    def _length_of_stay(self, runs: dict[int, _Run]) -> list[dict]:
        """Ward stays (time in one ward's bed) by ward and admission kind: realized (with blocking and the
        discharge window) and desired (the clinical course), over stays finished before the export."""
        groups: dict[tuple[str, str], tuple[list[float], list[float]]] = {}
        for key, run in runs.items():
            plan = self.plans[key]
            kind = ELECTIVE if plan.elective else EMERGENCY
            desired = {loc: [] for loc in WARD_CODES}
            for loc, seconds in plan.path:
                if loc in WARD_CODES:
                    desired[loc].append(seconds / HOUR)
            seen = {loc: 0 for loc in WARD_CODES}
            for loc, s, e in run.segments:
                if loc not in WARD_CODES or e is None or e >= self.export_time:
                    continue
                real, wanted = groups.setdefault((LOCATIONS[loc], kind), ([], []))
                real.append((e - s) / HOUR)
                if seen[loc] < len(desired[loc]):
                    wanted.append(desired[loc][seen[loc]])
                seen[loc] += 1
        out = []
        for (ward, kind), (real, wanted) in sorted(groups.items()):
            out.append({"ward": ward, "kind": kind, "stays": len(real),
                        "realized_hours": _summary(real), "desired_hours": _summary(wanted)})  # fmt: skip
        return out

    def _transfers(self) -> dict[str, dict[str, float]]:
        """P(next location | location) over the desired paths: where the clinical course sends patients."""
        counts: dict[str, dict[str, int]] = {}
        for plan in self.plans:
            path = [loc for loc, _ in plan.path]
            for k, loc in enumerate(path):
                nxt = LOCATIONS[path[k + 1]] if k + 1 < len(path) else ("death" if plan.died else "discharge")
                row = counts.setdefault(LOCATIONS[loc], {})
                row[nxt] = row.get(nxt, 0) + 1
        return {
            src: {dst: round(n / sum(row.values()), 4) for dst, n in sorted(row.items())}
            for src, row in sorted(counts.items())
        }

    def stay_rows(self, factual: BedSimulation, encounter_of: dict[tuple[int, int], str]) -> list[dict]:
        """Every exported stay's waits (StayOperationsTruth rows)."""
        runs = factual.runs()
        rows = []
        for key, ref in self.kept:
            run, plan = runs[key], self.plans[key]
            assert run.end is not None
            boarding = (run.bed - run.request) / HOUR if run.bed is not None and run.request is not None else 0.0
            rows.append({
                "encounter_id": encounter_of[(ref.batch, ref.row)],
                "kind": ELECTIVE if plan.elective else EMERGENCY,
                "arrival": _instant(factual.arrival_at[key]),
                "first_bed_request": _instant(run.request) if run.request is not None else None,
                "first_bed": _instant(run.bed) if run.bed is not None else None,
                "boarding_hours": round(boarding, 4),
                "blocked_hours": round(run.blocked / HOUR, 4),
                "discharge_wait_hours": round((run.end - run.ready) / HOUR, 4) if run.ready is not None else 0.0,
            })  # fmt: skip
        return rows


class SiteOperations:
    """The operations layer across generate_site's steps: the clock for the timeline, then the beds, then the truth."""

    def __init__(self, ops: OperationsProfile, t0: float, t_end: float, seed: int, site_index: int) -> None:
        rng_pattern, rng_clock, self._rng = operations_streams(seed, site_index)
        self.ops = ops
        self.pattern = ArrivalPattern(ops, t0, t_end, rng_pattern)
        self.clock = AdmissionClock(self.pattern, rng_clock)
        self.layer: OperationsLayer | None = None
        self.factual: BedSimulation | None = None

    @classmethod
    def of(cls, profile: SiteProfile, config: SynthConfig, site_index: int) -> SiteOperations | None:
        """None for a site without an operations block (generated exactly as before)."""
        if profile.operations is None:
            return None
        return cls(profile.operations, to_seconds(config.history_start), to_seconds(config.export_date), config.seed,
                   site_index)  # fmt: skip

    def apply(self, timeline: Timeline, rates_per_year: np.ndarray) -> None:
        """Run the factual history through the beds and write it into the timeline (before the export).
        `rates_per_year`: each patient's first-admission rate (timeline.admission_rates), for the true intensity."""
        self.layer = OperationsLayer(self.ops, timeline, self.pattern, self.clock, self._rng, rates_per_year)
        self.factual = self.layer.simulate()
        self.layer.apply(self.factual)

    def ground_truth(self, encounter_of: dict[tuple[int, int], str]) -> OperationsTruth:
        """The operations ground truth (after the export, which gave the encounters their ids)."""
        if self.layer is None or self.factual is None:
            raise OperationsError("the operations ground truth needs the beds simulated first (apply)")
        data = self.layer.truth(self.factual)
        data["stays"] = self.layer.stay_rows(self.factual, encounter_of)
        return OperationsTruth.model_validate(data)


def factual_window(layer: OperationsLayer, start: int, end: int) -> dict[str, float]:
    """The window's metrics of the uninterrupted factual history (what the branch's baseline must reproduce)."""
    return layer._branch(0).run(end).window(start, end)


def _metrics(base: dict[str, float], scenario: dict[str, float]) -> dict[str, dict[str, float]]:
    return {
        k: {"baseline": round(base[k], 4), "scenario": round(scenario[k], 4), "effect": round(scenario[k] - base[k], 4)}
        for k in base
    }


def _summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": float("nan")}
    arr = np.asarray(values, dtype=float)
    out = {"mean": round(float(arr.mean()), 3)}
    out.update({f"q{int(q * 100)}": round(float(np.quantile(arr, q)), 3) for q in _QUANTILES})
    return out


def _date(day: int) -> str:
    import datetime as dt

    return (dt.date(1970, 1, 1) + dt.timedelta(days=int(day))).isoformat()


def _instant(seconds: int) -> str:
    import datetime as dt

    return (dt.datetime(1970, 1, 1) + dt.timedelta(seconds=int(seconds))).isoformat()


def operations_streams(seed: int, site_index: int) -> tuple[np.random.Generator, np.random.Generator,
                                                            np.random.Generator]:  # fmt: skip
    """The operations layer's own random streams (pattern, clock, beds and truth): the clinical streams never see
    them, so a site without operations draws exactly what it drew before."""
    streams = np.random.SeedSequence([seed, site_index, 0x0B5E7A7]).spawn(3)
    return tuple(np.random.default_rng(s) for s in streams)  # type: ignore[return-value]


__all__ = [
    "AdmissionClock",
    "ArrivalPattern",
    "BedSimulation",
    "Capacity",
    "OperationsError",
    "OperationsLayer",
    "SiteOperations",
    "StayPlan",
    "desired_path",
    "operations_streams",
    "weekday",
]
