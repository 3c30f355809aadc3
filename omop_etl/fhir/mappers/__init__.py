"""Mappers per FHIR resource type, behind one registry (`MAPPERS`)."""

from omop_etl.fhir.mappers import (  # noqa: F401 - importing registers each mapper
    condition,
    consent,
    encounter,
    medication,
    observation,
    organization,
    patient,
    procedure,
)
from omop_etl.fhir.mappers.base import MAPPERS, Mapper, Reject, Skip

__all__ = ["MAPPERS", "Mapper", "Reject", "Skip"]
