"""Encounter -> visit_occurrence, and its location stays -> visit_detail."""

from __future__ import annotations

from omop_etl.fhir.drafts import VisitDraft
from omop_etl.fhir.mappers.base import (
    CODEABLE,
    CODING,
    PERIOD,
    REFERENCE,
    Reject,
    Skip,
    date_parts,
    first_code,
    reference_id,
    register,
)

SPEC = {
    "status": True,
    "class": CODING,
    "type": CODEABLE,
    "subject": REFERENCE,
    "period": PERIOD,
    "hospitalization": {"admitSource": CODEABLE, "dischargeDisposition": CODEABLE},
    "location": {"location": REFERENCE, "period": PERIOD, "status": True},
    "serviceProvider": REFERENCE,
    "participant": {"individual": REFERENCE},
}
NOT_REALIZED = {"planned", "cancelled", "entered-in-error", "unknown"}


@register("Encounter", SPEC)
def extract(r: dict, record: int) -> list:
    status = r["status"]
    if status in NOT_REALIZED:
        raise Skip(f"Encounter status '{status}' is not a realized visit")
    patient = reference_id(r.get("subject"), "Patient", "subject", required=True)
    period = r.get("period") or {}
    start, start_dt = date_parts(period.get("start"), "period.start")
    if start is None:
        raise Reject("missing_date", "period.start is missing; a visit needs a start date")
    end, end_dt = date_parts(period.get("end"), "period.end")
    if end is not None and (end, end_dt or "") < (start, start_dt or ""):
        raise Reject("impossible_date", f"period.end {period.get('end')} is before period.start {period.get('start')}")
    locations = []
    for stay in r.get("location") or []:
        ref = reference_id(stay.get("location"), "Location", "location.location")
        stay_period = stay.get("period") or {}
        s, s_dt = date_parts(stay_period.get("start"), "location.period.start")
        e, e_dt = date_parts(stay_period.get("end"), "location.period.end")
        if ref and s:
            locations.append((ref, s, s_dt, e, e_dt))
    hospitalization = r.get("hospitalization") or {}
    participants = [p for p in r.get("participant") or [] if p.get("individual")]
    return [
        VisitDraft(
            record=record,
            encounter_id=r["id"],
            patient_ref=patient,
            class_code=(r.get("class") or {}).get("code"),
            status=status,
            start=start,
            start_datetime=start_dt,
            end=end,
            end_datetime=end_dt,
            admit_source=first_code(hospitalization.get("admitSource")),
            discharge_disposition=first_code(hospitalization.get("dischargeDisposition")),
            organization_ref=reference_id(r.get("serviceProvider"), "Organization", "serviceProvider"),
            practitioner_ref=reference_id(participants[0]["individual"], "Practitioner", "participant.individual")
            if participants
            else None,
            locations=tuple(locations),
        )
    ]
