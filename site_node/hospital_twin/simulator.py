"""The hospital twin's discrete-event simulation of beds (issue 13), on SimPy.

Why SimPy: the model is a network of wards whose beds block one another (a patient boards in the
emergency department while their ward is full; a patient waiting for an ICU bed keeps the ward bed they
are in), whose staffed capacity changes by shift, and which starts from the hospital's current state
(who lies where since when). Ciw models queueing networks with blocking well but not capacity that
changes by the hour or a warm start from named occupants; SimPy's processes and events express all of
it directly, and it is small, maintained and pure Python.

A replication draws every random quantity from numpy Generators seeded by the replication's number,
one per arrival stream and one for the patients already in, and every patient's whole path (arrival
time, wards and stays) is drawn up front, before any bed is taken. So a baseline and a scenario run with
the same seed see the same patients, arriving when and staying as long, where the scenario does not
change that (common random numbers: their difference is the scenario's, not the noise's). Each
replication keeps only its per-day summaries (midnight census, peak occupancy, hours full, patients
boarded and their boarding hours), so memory does not grow with the number of patients or of
replications.

Time is in hours from the simulation's start, which is a midnight; hour-of-day and hour-of-week are taken
from `start_weekday` (0 = Monday).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import simpy

HOURS_PER_DAY = 24
HOURS_PER_WEEK = 7 * HOURS_PER_DAY
MAX_HOPS = 10  # wards in one patient's path at most (a loop of transfers is cut there)

# A length-of-stay sampler: (generator, number of stays) -> hours, one per stay.
StaySampler = Callable[[np.random.Generator, int], np.ndarray]


def exponential_stay(mean_hours: float) -> StaySampler:
    """Exponential lengths of stay (the M/M/c check's; real wards are far from it)."""

    def sample(rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.exponential(mean_hours, n)

    return sample


@dataclass(frozen=True)
class Ward:
    """A ward: its beds, and the share of them staffed in each hour of the day (1.0: all of them)."""

    name: str
    beds: int
    staffed_share: tuple[float, ...] = (1.0,) * HOURS_PER_DAY
    bed_changes: tuple[tuple[int, int], ...] = ()  # (hour of the run, beds from then on), ascending
    # When patients leave the hospital from this ward, by hour of the day (24 shares adding to 1), or None
    # for any hour: a stay that ends in a discharge then ends at the hour of this pattern nearest to when its
    # drawn length would end it (wards discharge after the morning round, not at 3 am), which keeps the
    # lengths of stay and moves the hour. Transfers to another ward keep their drawn time.
    discharge_hours: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.beds < 1 or any(beds < 1 for _, beds in self.bed_changes):
            raise ValueError(f"ward {self.name!r}: beds must be at least 1")
        if len(self.staffed_share) != HOURS_PER_DAY or not all(0.0 <= s <= 1.0 for s in self.staffed_share):
            raise ValueError(f"ward {self.name!r}: staffed_share needs 24 shares between 0 and 1")
        if self.discharge_hours is not None and (
            len(self.discharge_hours) != HOURS_PER_DAY
            or min(self.discharge_hours) < 0
            or abs(sum(self.discharge_hours) - 1.0) > 1e-6
        ):
            raise ValueError(f"ward {self.name!r}: discharge_hours needs 24 shares adding up to 1")
        hours = [hour for hour, _ in self.bed_changes]
        if hours != sorted(hours) or any(h < 0 for h in hours):
            raise ValueError(f"ward {self.name!r}: bed_changes must be in ascending order of hour")

    def beds_at(self, hour: int) -> int:
        beds = self.beds
        for start, count in self.bed_changes:
            if hour >= start:
                beds = count
        return beds

    def capacity(self, hour_of_day: int, hour: int = 0) -> int:
        """Beds usable in the run's `hour` (its `hour_of_day`): the staffed share of the beds, at least one."""
        return max(1, int(np.floor(self.beds_at(hour) * self.staffed_share[hour_of_day] + 1e-9)))


@dataclass(frozen=True)
class Transfer:
    """After a stay in `source`, the patient moves to `target` with `probability`, and stays there for a
    stay drawn from `stay`. They keep their bed in `source` until a bed in `target` is free (blocking)."""

    source: str
    target: str
    probability: float
    stay: StaySampler


@dataclass(frozen=True)
class ArrivalStream:
    """Patients who arrive needing a bed in `ward` (e.g. emergency admissions to the general ward).

    `rate_per_hour` holds the mean arrivals in each hour of the week (168 values, Monday 00:00 first) or one
    value for a constant rate; `run_rates`, when given, holds one rate per hour of the run instead (a fitted
    model's rates with its trend and season, `arrivals.stream_rates`). Arrivals are a Poisson process with
    that piecewise-constant intensity, times a day effect with mean 1 and variance `day_dispersion` drawn
    per day (busier and quieter days, as the history had them). `stay` draws their length of stay in `ward`."""

    name: str
    ward: str
    rate_per_hour: tuple[float, ...]
    stay: StaySampler
    day_dispersion: float = 0.0
    run_rates: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if len(self.rate_per_hour) not in (1, HOURS_PER_WEEK):
            raise ValueError(f"arrivals {self.name!r}: rate_per_hour needs 1 or 168 values (use run_rates per hour)")
        if min(self.rate_per_hour) < 0 or (self.run_rates and min(self.run_rates) < 0) or self.day_dispersion < 0:
            raise ValueError(f"arrivals {self.name!r}: rates and day_dispersion must not be negative")

    def rate(self, hour: int, hour_of_week: int) -> float:
        """The rate in the run's `hour` (which is `hour_of_week` of its week)."""
        if self.run_rates:
            if hour >= len(self.run_rates):
                raise ValueError(f"arrivals {self.name!r}: run_rates cover {len(self.run_rates)} hours, not the run")
            return self.run_rates[hour]
        if len(self.rate_per_hour) == 1:
            return self.rate_per_hour[0]
        return self.rate_per_hour[hour_of_week]


@dataclass(frozen=True)
class Occupant:
    """Someone in a bed when the simulation starts: their ward and the hours they have still to stay
    there (drawn by the caller from the length-of-stay model given the time already spent)."""

    ward: str
    remaining_hours: float


@dataclass(frozen=True)
class HospitalModel:
    """Everything one replication needs: wards, arrival streams, transfers and the current state."""

    wards: tuple[Ward, ...]
    arrivals: tuple[ArrivalStream, ...]
    transfers: tuple[Transfer, ...] = ()
    occupants: tuple[Occupant, ...] = ()
    start_weekday: int = 0

    def __post_init__(self) -> None:
        names = [w.name for w in self.wards]
        if len(set(names)) != len(names):
            raise ValueError(f"ward names must be unique: {names}")
        known = set(names)
        for stream in self.arrivals:
            if stream.ward not in known:
                raise ValueError(f"arrivals {stream.name!r} go to ward {stream.ward!r}, which is not one of {names}")
        for transfer in self.transfers:
            if transfer.source not in known or transfer.target not in known:
                raise ValueError(f"transfer {transfer.source!r} -> {transfer.target!r}: both must be among {names}")
            if not 0.0 <= transfer.probability <= 1.0:
                raise ValueError(f"transfer {transfer.source!r} -> {transfer.target!r}: probability must be in [0, 1]")
        for source in known:
            total = sum(t.probability for t in self.transfers if t.source == source)
            if total > 1.0 + 1e-9:
                raise ValueError(f"transfers out of {source!r} add up to {total:.3f} > 1")
        for occupant in self.occupants:
            if occupant.ward not in known:
                raise ValueError(f"an occupant lies in ward {occupant.ward!r}, which is not one of {names}")
        per_ward = {name: sum(o.ward == name for o in self.occupants) for name in names}
        for ward in self.wards:
            if per_ward[ward.name] > ward.beds:
                raise ValueError(f"ward {ward.name!r} has {per_ward[ward.name]} occupants for {ward.beds} beds")


@dataclass
class ReplicationResult:
    """One replication's per-day summaries, (days, wards) arrays in the model's ward order, and each
    arrival's wait for a first bed (hours; 0 for those admitted at once) summed and counted per day."""

    midnight_census: np.ndarray
    peak_occupancy: np.ndarray
    hours_full: np.ndarray
    boarded: np.ndarray  # arrivals per day (by arrival day) who waited for their first bed
    boarding_hours: np.ndarray  # their waiting summed, per arrival day (up to the end for those still waiting)
    arrived: np.ndarray  # arrivals per day needing a bed in each ward
    still_boarding: int = 0  # arrivals still waiting for their first bed when the run ends
    waits: list[float] = field(default_factory=list)  # every admitted arrival's wait, kept only when asked


class _Beds:
    """A ward's beds as the simulation sees them: occupied count, first-come queue, staffed capacity."""

    def __init__(self, env: simpy.Environment, ward: Ward, index: int, days: int) -> None:
        self.env = env
        self.ward = ward
        self.index = index
        self.occupied = 0
        self.queue: deque[simpy.Event] = deque()
        self.capacity = ward.capacity(0)
        self.peak = np.zeros(days, dtype=np.int32)
        self.full_hours = np.zeros(days, dtype=np.float64)
        self._full_since: float | None = None
        self.days = days

    def request(self) -> simpy.Event:
        event = self.env.event()
        if not self.queue and self.occupied < self.capacity:
            self._take()
            event.succeed()
        else:
            self.queue.append(event)
        return event

    def release(self) -> None:
        self.occupied -= 1
        self._note_fullness()
        self.admit()

    def set_capacity(self, capacity: int) -> None:
        self.capacity = capacity
        self._note_fullness()
        self.admit()

    def admit(self) -> None:
        while self.queue and self.occupied < self.capacity:
            self._take()
            self.queue.popleft().succeed()

    def _take(self) -> None:
        self.occupied += 1
        day = min(int(self.env.now // HOURS_PER_DAY), self.days - 1)
        if self.occupied > self.peak[day]:
            self.peak[day] = self.occupied
        self._note_fullness()

    def _note_fullness(self) -> None:
        full = self.occupied >= self.capacity
        now = self.env.now
        if full and self._full_since is None:
            self._full_since = now
        elif not full and self._full_since is not None:
            self._add_full(self._full_since, now)
            self._full_since = None

    def _add_full(self, start: float, end: float) -> None:
        """Spread a full spell's hours over the days it covers."""
        while start < end:
            day = int(start // HOURS_PER_DAY)
            if day >= self.days:
                return
            stop = min(end, (day + 1) * HOURS_PER_DAY)
            self.full_hours[day] += stop - start
            start = stop

    def close(self, horizon: float) -> None:
        if self._full_since is not None:
            self._add_full(self._full_since, horizon)
            self._full_since = None


def simulate(model: HospitalModel, days: int, seed: int, keep_waits: bool = False) -> ReplicationResult:
    """One replication of `days` days from the model's current state, with its own random stream `seed`."""
    if days < 1:
        raise ValueError("days must be at least 1")
    # One stream per arrival stream and one for the occupants: what each patient draws does not depend
    # on the order in which the beds let the others move.
    *streams, occupants_random = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(
        len(model.arrivals) + 1))
    env = simpy.Environment()
    horizon = float(days * HOURS_PER_DAY)
    wards = {w.name: _Beds(env, w, i, days) for i, w in enumerate(model.wards)}
    n_wards = len(model.wards)
    census = np.zeros((days, n_wards), dtype=np.int32)
    boarded = np.zeros((days, n_wards), dtype=np.int32)
    boarding_hours = np.zeros((days, n_wards), dtype=np.float64)
    arrived = np.zeros((days, n_wards), dtype=np.int32)
    waits: list[float] = []
    waiting: dict[simpy.Event, tuple[int, int, float]] = {}  # boarding now: arrival day, ward, arrival time
    transfers_from: dict[str, list[Transfer]] = {}
    for transfer in model.transfers:
        transfers_from.setdefault(transfer.source, []).append(transfer)

    cumulative = {w.name: np.cumsum(w.discharge_hours) for w in model.wards if w.discharge_hours is not None}

    def leaving(ward: str, ready: float, hour_draw: float) -> float:
        """When a patient whose stay in `ward` would end at `ready` leaves: the pattern's hour (drawn from the
        patient's own uniform) on the day that puts it nearest to `ready`, never before now."""
        hour = float(min(int(np.searchsorted(cumulative[ward], hour_draw, side="right")), HOURS_PER_DAY - 1))
        day = np.floor(ready / HOURS_PER_DAY)
        # the next day's is always late enough: ready >= now and (day + 1) x 24 > ready
        options = [t for t in ((day + k) * HOURS_PER_DAY + hour for k in (-1, 0, 1)) if t >= env.now]
        return min(options, key=lambda t: abs(t - ready))

    def stays(hops: list[tuple[_Beds, float]], hour_draw: float | None = None):
        """The stays after the first bed is taken: each next bed is waited for in the current one; the last
        ends at the ward's discharge hours when it has them (`hour_draw`: the patient's uniform for it)."""
        current: _Beds | None = None
        for number, (beds, hours) in enumerate(hops):
            if current is not None:
                yield beds.request()
                current.release()
            current = beds
            last = number == len(hops) - 1
            if last and hour_draw is not None and beds.ward.name in cumulative:
                yield env.timeout(leaving(beds.ward.name, env.now + hours, hour_draw) - env.now)
            else:
                yield env.timeout(hours)
        if current is not None:
            current.release()

    def patient(hops: list[tuple[_Beds, float]], arrived_at: float, hour_draw: float | None):
        ward = hops[0][0]
        day = int(arrived_at // HOURS_PER_DAY)
        arrived[day, ward.index] += 1
        bed = ward.request()
        if not bed.triggered:
            boarded[day, ward.index] += 1
            waiting[bed] = (day, ward.index, arrived_at)
            yield bed
            del waiting[bed]
            boarding_hours[day, ward.index] += env.now - arrived_at
        if keep_waits:
            waits.append(env.now - arrived_at)
        yield from stays(hops, hour_draw)

    def arrivals(stream: ArrivalStream, random: np.random.Generator):
        """A Poisson process with the stream's hourly rates, drawn for the whole run at once (the counts per
        hour, then uniform times within it, the stays, the paths), then released at its times."""
        hours = int(horizon)
        rates = np.asarray([stream.rate(h, (h + model.start_weekday * HOURS_PER_DAY) % HOURS_PER_WEEK)
                            for h in range(hours)], dtype=np.float64)  # fmt: skip
        if stream.day_dispersion > 0:
            shape = 1.0 / stream.day_dispersion
            rates = rates * np.repeat(random.gamma(shape, 1.0 / shape, days), HOURS_PER_DAY)[:hours]
        counts = random.poisson(rates)
        times = np.repeat(np.arange(hours, dtype=np.float64), counts) + random.random(int(counts.sum()))
        times.sort()
        first = stream.stay(random, times.size)
        drawn = paths(random, stream.ward, first)
        for at, hops, hour_draw in zip(times.tolist(), drawn, hour_draws(random, len(drawn)), strict=True):
            if at > env.now:
                yield env.timeout(at - env.now)
            env.process(patient(hops, at, hour_draw))

    def hour_draws(random: np.random.Generator, n: int) -> list[float | None]:
        """Each patient's uniform for the hour they leave, drawn with their path; none (and nothing drawn, so
        a model without discharge hours draws what it always drew) when no ward has discharge hours."""
        return random.random(n).tolist() if cumulative else [None] * n

    def paths(random: np.random.Generator, ward: str, first: np.ndarray) -> list[list[tuple[_Beds, float]]]:
        """The paths (wards and stays) of patients starting in `ward` with stays `first` there, drawn for all
        of them up front, hop by hop (so a scenario that changes beds changes when they move, never where or
        for how long)."""
        out = [[(wards[ward], float(hours))] for hours in first.tolist()]
        active = np.arange(len(out))
        where = np.full(len(out), ward, dtype=object)
        for _ in range(MAX_HOPS - 1):
            moving = []
            for source in sorted(set(where[active].tolist()) & transfers_from.keys()):
                members = active[where[active] == source]
                draw = random.random(members.size)
                for transfer in transfers_from[source]:
                    chosen = members[(draw >= 0) & (draw < transfer.probability)]
                    draw = np.where((draw >= 0) & (draw < transfer.probability), -1.0, draw - transfer.probability)
                    if chosen.size:
                        for index, hours in zip(chosen.tolist(), transfer.stay(random, chosen.size).tolist(),
                                                strict=True):  # fmt: skip
                            out[index].append((wards[transfer.target], float(hours)))
                        where[chosen] = transfer.target
                        moving.append(chosen)
            if not moving:
                break
            active = np.sort(np.concatenate(moving))
        return out

    def shifts():
        """Each hour: the staffed capacity of every ward that changes it; each midnight: the census."""
        for hour in range(int(horizon)):
            hour_of_day = hour % HOURS_PER_DAY
            if hour_of_day == 0:
                day = hour // HOURS_PER_DAY
                for beds in wards.values():
                    census[day, beds.index] = beds.occupied
                    # a day's peak is at least who lies there at its start (a day without admissions has no take)
                    beds.peak[day] = max(beds.peak[day], beds.occupied)
            for beds in wards.values():
                capacity = beds.ward.capacity(hour_of_day, hour)
                if capacity != beds.capacity:
                    beds.set_capacity(capacity)
            yield env.timeout(1.0)

    for ward in model.wards:  # in their beds already; the fullness bookkeeping starts below
        remaining = np.array([o.remaining_hours for o in model.occupants if o.ward == ward.name], dtype=np.float64)
        wards[ward.name].occupied += remaining.size
        drawn = paths(occupants_random, ward.name, remaining)
        for hops, hour_draw in zip(drawn, hour_draws(occupants_random, len(drawn)), strict=True):
            env.process(stays(hops, hour_draw))
    for beds in wards.values():
        beds.peak[0] = beds.occupied
        beds._note_fullness()
    env.process(shifts())
    for stream, random in zip(model.arrivals, streams, strict=True):
        env.process(arrivals(stream, random))
    env.run(until=horizon)
    peak = np.stack([wards[w.name].peak for w in model.wards], axis=1)
    for beds in wards.values():
        beds.close(horizon)
    full = np.stack([wards[w.name].full_hours for w in model.wards], axis=1)
    for day, index, arrived_at in waiting.values():  # still boarding at the end: their wait so far
        boarding_hours[day, index] += horizon - arrived_at
    return ReplicationResult(census, peak, full, boarded, boarding_hours, arrived, len(waiting), waits)


def simulate_many(model: HospitalModel, days: int, seeds: Sequence[int]) -> list[ReplicationResult]:
    """Replications one after the other (the caller spreads seeds over processes)."""
    return [simulate(model, days, seed) for seed in seeds]
