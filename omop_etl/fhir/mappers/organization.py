"""Organization and Location -> care_site (+ location for its address); Practitioner -> provider.

Only what describes the care setting is kept: no practitioner names or identifiers.
"""

from __future__ import annotations

from omop_etl.fhir.drafts import CareSiteDraft, ProviderDraft
from omop_etl.fhir.mappers.base import CODEABLE, REFERENCE, first_code, reference_id, register

ADDRESS = {"city": True, "state": True, "postalCode": True, "country": True}


def _address(address: dict | None) -> dict:
    a = address or {}
    return {"city": a.get("city"), "state": a.get("state"), "zip": a.get("postalCode"), "country": a.get("country")}


@register("Organization", {"name": True, "type": CODEABLE, "address": ADDRESS, "partOf": REFERENCE})
def extract_organization(r: dict, record: int) -> list:
    return [
        CareSiteDraft(
            record=record,
            kind="Organization",
            source_id=r["id"],
            name=r.get("name"),
            type_code=first_code((r.get("type") or [None])[0]),
            parent_ref=reference_id(r.get("partOf"), "Organization", "partOf"),
            **_address((r.get("address") or [None])[0]),
        )
    ]


@register(
    "Location",
    {"name": True, "type": CODEABLE, "physicalType": CODEABLE, "address": ADDRESS, "managingOrganization": REFERENCE},
)
def extract_location(r: dict, record: int) -> list:
    return [
        CareSiteDraft(
            record=record,
            kind="Location",
            source_id=r["id"],
            name=r.get("name"),
            type_code=first_code((r.get("type") or [None])[0]),
            parent_ref=reference_id(r.get("managingOrganization"), "Organization", "managingOrganization"),
            **_address(r.get("address")),
        )
    ]


@register("Practitioner", {"gender": True})
def extract_practitioner(r: dict, record: int) -> list:
    return [ProviderDraft(record=record, practitioner_id=r["id"], gender=r.get("gender"))]
