"""The hospital twin at its hospital (issue 13): beds, arrivals and lengths of stay simulated from the
hospital's current state. `simulate` runs one replication of a `HospitalModel`; `fit_arrivals` fits the
arrivals model from the hospital's history and `stream_rates` turns it into a run's hourly rates;
`fit_stays` fits a ward's length of stay with the stays still running censored.
"""

from site_node.hospital_twin.arrivals import ArrivalHistoryError, ArrivalModel, fit_arrivals, stream_rates
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

__all__ = [
    "ArrivalHistoryError",
    "ArrivalModel",
    "ArrivalStream",
    "HospitalModel",
    "Occupant",
    "ReplicationResult",
    "StayHistoryError",
    "StayModel",
    "Transfer",
    "Ward",
    "exponential_stay",
    "fit_arrivals",
    "fit_stays",
    "simulate",
    "stream_rates",
]
