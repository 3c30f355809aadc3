"""Consent (scope research) -> the site's consent registry (not an OMOP table)."""

from __future__ import annotations

from omop_etl.fhir.drafts import ConsentDraft
from omop_etl.fhir.mappers.base import CODEABLE, PERIOD, REFERENCE, date_parts, first_code, reference_id, register

SPEC = {
    "status": True,
    "scope": CODEABLE,
    "category": CODEABLE,
    "patient": REFERENCE,
    "dateTime": True,
    "policyRule": CODEABLE,
    "provision": {"type": True, "period": PERIOD},
}


@register("Consent", SPEC)
def extract(r: dict, record: int) -> list:
    patient = reference_id(r.get("patient"), "Patient", "patient", required=True)
    provision = r.get("provision") or {}
    period = provision.get("period") or {}
    start, start_dt = date_parts(period.get("start"), "provision.period.start")
    end, end_dt = date_parts(period.get("end"), "provision.period.end")
    recorded, recorded_dt = date_parts(r.get("dateTime"), "dateTime")
    return [
        ConsentDraft(
            record=record,
            consent_id=r["id"],
            patient_ref=patient,
            status=r["status"],
            provision=provision.get("type"),
            scope=first_code(r.get("scope")),
            policy=first_code(r.get("policyRule")),
            period_start=start_dt or start,
            period_end=end_dt or end,
            recorded=recorded_dt or recorded,
        )
    ]
