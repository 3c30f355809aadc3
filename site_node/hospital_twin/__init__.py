"""The hospital twin at its hospital (issue 13): beds, arrivals and lengths of stay simulated from the
hospital's current state. `simulate` runs one replication of a `HospitalModel`.
"""

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

__all__ = [
    "ArrivalStream",
    "HospitalModel",
    "Occupant",
    "ReplicationResult",
    "Transfer",
    "Ward",
    "exponential_stay",
    "simulate",
]
