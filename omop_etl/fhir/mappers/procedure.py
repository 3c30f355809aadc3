"""Procedure -> procedure_occurrence (or measurement when the concept's domain says so)."""

from __future__ import annotations

from omop_etl.fhir.drafts import EventDraft
from omop_etl.fhir.mappers.base import (
    CODEABLE,
    PERIOD,
    REFERENCE,
    Reject,
    Skip,
    date_parts,
    pick_coding,
    reference_id,
    register,
)

SPEC = {
    "status": True,
    "code": CODEABLE,
    "subject": REFERENCE,
    "encounter": REFERENCE,
    "performedDateTime": True,
    "performedPeriod": PERIOD,
    "performer": {"actor": REFERENCE},
}
PREFERRED = ("SNOMED", "CPT4", "HCPCS", "ICD10PCS")


@register("Procedure", SPEC)
def extract(r: dict, record: int) -> list:
    if r["status"] != "completed":
        raise Skip(f"Procedure status '{r['status']}' is not a procedure that was done")
    patient = reference_id(r.get("subject"), "Patient", "subject", required=True)
    code = pick_coding(r.get("code"), PREFERRED, "code")
    period = r.get("performedPeriod") or {}
    start, start_dt = date_parts(r.get("performedDateTime") or period.get("start"), "performed")
    if start is None:
        raise Reject("missing_date", "performed[x] is missing; a procedure needs a date")
    end, end_dt = date_parts(period.get("end"), "performedPeriod.end")
    if end is not None and end < start:
        raise Reject("impossible_date", f"performedPeriod.end {period.get('end')} is before its start")
    performers = r.get("performer") or []
    return [
        EventDraft(
            record=record,
            kind="procedure",
            key=f"Procedure/{r['id']}",
            patient_ref=patient,
            encounter_ref=reference_id(r.get("encounter"), "Encounter", "encounter"),
            code=code,
            start=start,
            start_datetime=start_dt,
            end=end,
            end_datetime=end_dt,
            type_hint="procedure",
            practitioner_ref=reference_id(performers[0].get("actor"), "Practitioner", "performer.actor")
            if performers
            else None,
        )
    ]
