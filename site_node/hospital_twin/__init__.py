"""The hospital twin at its hospital (issue 13): beds, arrivals and lengths of stay simulated from the
hospital's current state.

`simulate` runs one replication of a `HospitalModel`; `fit_arrivals` fits the arrivals model from the
hospital's history and `stream_rates` turns it into a run's hourly rates; `fit_stays` fits a ward's
length of stay with the stays still running censored; `HospitalConfig` is the site file's `hospital:`.

The names are loaded on first use (PEP 562): the site file's model imports `HospitalConfig`, and reading
a site file must not pay for the simulation engine.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from site_node.hospital_twin.arrivals import ArrivalHistoryError, ArrivalModel, fit_arrivals, stream_rates
    from site_node.hospital_twin.config import HospitalConfig, Shift, WardConfig
    from site_node.hospital_twin.simulator import (
        ArrivalStream,
        HospitalModel,
        Occupant,
        ReplicationResult,
        Transfer,
        Ward,
        exponential_stay,
        simulate,
    )
    from site_node.hospital_twin.stays import StayHistoryError, StayModel, fit_stays

_WHERE = {
    "ArrivalHistoryError": "arrivals",
    "ArrivalModel": "arrivals",
    "fit_arrivals": "arrivals",
    "stream_rates": "arrivals",
    "HospitalConfig": "config",
    "Shift": "config",
    "WardConfig": "config",
    "ArrivalStream": "simulator",
    "HospitalModel": "simulator",
    "Occupant": "simulator",
    "ReplicationResult": "simulator",
    "Transfer": "simulator",
    "Ward": "simulator",
    "exponential_stay": "simulator",
    "simulate": "simulator",
    "StayHistoryError": "stays",
    "StayModel": "stays",
    "fit_stays": "stays",
}

__all__ = [
    "ArrivalHistoryError",
    "ArrivalModel",
    "ArrivalStream",
    "HospitalConfig",
    "HospitalModel",
    "Occupant",
    "ReplicationResult",
    "Shift",
    "StayHistoryError",
    "StayModel",
    "Transfer",
    "Ward",
    "WardConfig",
    "exponential_stay",
    "fit_arrivals",
    "fit_stays",
    "simulate",
    "stream_rates",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value
