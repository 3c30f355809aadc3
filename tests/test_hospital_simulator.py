"""The hospital twin's bed simulation (issue 13): the engine against queueing theory, the warm start, capacity
by shift, blocking transfers, and common random numbers between a baseline and a scenario."""

from __future__ import annotations

import math

import numpy as np
import pytest

from site_node.hospital_twin import (
    ArrivalStream,
    HospitalModel,
    Occupant,
    Transfer,
    Ward,
    exponential_stay,
    simulate,
)


def erlang_c(servers: int, load: float) -> float:
    """The probability that an arrival waits in an M/M/c queue with offered load `load` = lambda / mu."""
    below = sum(load**k / math.factorial(k) for k in range(servers))
    top = load**servers / math.factorial(servers) * servers / (servers - load)
    return top / (below + top)


def test_a_single_ward_reproduces_the_erlang_c_waiting_probability_and_mean_wait():
    beds, arrivals_per_hour, mean_stay = 10, 8.0, 1.0
    model = HospitalModel(
        wards=(Ward("ward", beds),),
        arrivals=(ArrivalStream("emergency", "ward", (arrivals_per_hour,), exponential_stay(mean_stay)),),
    )
    runs = [simulate(model, days=200, seed=seed, keep_waits=True) for seed in range(6)]
    waits = np.concatenate([np.asarray(run.waits[500:]) for run in runs])  # the empty start left out
    expected = erlang_c(beds, arrivals_per_hour * mean_stay)
    assert len(waits) > 200_000
    assert (waits > 0).mean() == pytest.approx(expected, rel=0.02)
    assert waits.mean() == pytest.approx(expected / (beds / mean_stay - arrivals_per_hour), rel=0.02)


def test_the_simulation_starts_from_who_is_in_which_bed():
    model = HospitalModel(
        wards=(Ward("general", 5), Ward("icu", 2)),
        arrivals=(),
        occupants=(Occupant("general", 10), Occupant("general", 30), Occupant("general", 50), Occupant("icu", 80)),
    )
    result = simulate(model, days=4, seed=0)
    # at each midnight: those whose remaining stay reaches past it
    assert result.midnight_census.tolist() == [[3, 1], [2, 1], [1, 1], [0, 1]]
    assert result.peak_occupancy[0].tolist() == [3, 1]
    assert result.boarded.sum() == 0 and result.arrived.sum() == 0


def test_patients_leave_at_the_wards_discharge_hour_nearest_to_their_stays_end():
    at_two_pm = tuple(1.0 if hour == 14 else 0.0 for hour in range(24))
    remaining = (3.0, 20.0, 40.0, 49.0, 75.0, 100.0)
    # the discharge at 14:00 of the day that puts it nearest to the drawn end, never in the past
    leaves = [min((t for t in (24 * (r // 24 + k) + 14 for k in (-1, 0, 1)) if t >= 0), key=lambda t: abs(t - r))
              for r in remaining]  # fmt: skip
    assert leaves == [14, 14, 38, 38, 86, 110]
    model = HospitalModel(
        wards=(Ward("general", 6, discharge_hours=at_two_pm),),
        arrivals=(),
        occupants=tuple(Occupant("general", r) for r in remaining),
    )
    result = simulate(model, days=6, seed=0)
    assert result.midnight_census[:, 0].tolist() == [sum(t > 24 * day for t in leaves) for day in range(6)]
    assert result.peak_occupancy[1:, 0].tolist() == [sum(t > 24 * day for t in leaves) for day in range(1, 6)]
    with pytest.raises(ValueError, match="discharge_hours needs 24 shares adding up to 1"):
        Ward("general", 6, discharge_hours=(0.5,) * 24)


def test_a_full_ward_makes_arrivals_board_until_a_bed_frees():
    model = HospitalModel(
        wards=(Ward("general", 2),),
        arrivals=(ArrivalStream("emergency", "general", (0.5,), exponential_stay(8.0)),),
        occupants=(Occupant("general", 48), Occupant("general", 48)),
    )
    result = simulate(model, days=3, seed=1)
    assert result.arrived[:2].sum() > 0, "the seed brings arrivals in the first two days"
    assert result.boarded[:2].sum() == result.arrived[:2].sum(), "every arrival before the beds free up waits"
    assert result.still_boarding > 0, "more came than two beds could take by the end; they are counted"
    assert result.hours_full[0, 0] == pytest.approx(24.0), "full all of the first day"
    assert result.peak_occupancy.max() <= 2


def test_staffed_capacity_by_shift_holds_admissions_back_at_night():
    night_half = tuple(0.5 if hour < 8 else 1.0 for hour in range(24))
    model = HospitalModel(
        wards=(Ward("general", 4, staffed_share=night_half),),
        arrivals=(ArrivalStream("emergency", "general", (1.0,), exponential_stay(1000.0)),),
    )
    result = simulate(model, days=1, seed=3)
    # two staffed beds until 08:00, then four: long stays fill two by night, the other two only after 08:00
    assert result.peak_occupancy[0, 0] == 4
    assert result.boarded[0, 0] >= 1, "someone who came at night waited for the day shift's beds"


def test_a_transfer_keeps_its_bed_until_the_next_ward_has_one():
    model = HospitalModel(
        wards=(Ward("general", 1), Ward("icu", 1)),
        arrivals=(),
        transfers=(Transfer("general", "icu", 1.0, exponential_stay(1e-6)),),
        occupants=(Occupant("general", 1.0), Occupant("icu", 30.0)),
    )
    result = simulate(model, days=2, seed=0)
    # the general-ward patient is due to move at 1 h but the ICU bed frees only at 30 h: still there at midnight
    assert result.midnight_census[1].tolist() == [1, 1]
    assert result.hours_full[0].tolist() == [pytest.approx(24.0), pytest.approx(24.0)]


def test_a_baseline_and_a_scenario_with_the_same_seed_see_the_same_patients():
    def hospital(beds: int) -> HospitalModel:
        return HospitalModel(
            wards=(Ward("general", beds), Ward("icu", 3)),
            arrivals=(ArrivalStream("emergency", "general", (2.0,), exponential_stay(20.0)),),
            transfers=(Transfer("general", "icu", 0.1, exponential_stay(30.0)),),
        )

    baseline, more_beds = simulate(hospital(30), days=14, seed=5), simulate(hospital(34), days=14, seed=5)
    assert np.array_equal(baseline.arrived, more_beds.arrived), "the same arrivals on the same days"
    assert more_beds.boarding_hours.sum() < baseline.boarding_hours.sum()
    assert np.array_equal(simulate(hospital(30), days=14, seed=5).midnight_census, baseline.midnight_census)


def test_a_model_that_cannot_be_simulated_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="not one of"):
        HospitalModel(wards=(Ward("general", 2),), arrivals=(ArrivalStream("e", "icu", (1.0,), exponential_stay(1)),))
    with pytest.raises(ValueError, match="3 occupants for 2 beds"):
        HospitalModel(wards=(Ward("general", 2),), arrivals=(), occupants=(Occupant("general", 1),) * 3)
    with pytest.raises(ValueError, match="add up to"):
        HospitalModel(
            wards=(Ward("a", 1), Ward("b", 1)), arrivals=(),
            transfers=(Transfer("a", "b", 0.7, exponential_stay(1)), Transfer("a", "a", 0.7, exponential_stay(1))),
        )  # fmt: skip
    with pytest.raises(ValueError, match="24 shares"):
        Ward("general", 2, staffed_share=(1.0,))
