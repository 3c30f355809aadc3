"""Condition -> condition_occurrence (confirmed) or observation (provisional, differential)."""

from __future__ import annotations

from omop_etl.fhir.drafts import EventDraft
from omop_etl.fhir.mappers.base import (
    CODEABLE,
    PERIOD,
    REFERENCE,
    Reject,
    Skip,
    date_parts,
    first_code,
    pick_coding,
    reference_id,
    register,
)

SPEC = {
    "clinicalStatus": CODEABLE,
    "verificationStatus": CODEABLE,
    "category": CODEABLE,
    "code": CODEABLE,
    "subject": REFERENCE,
    "encounter": REFERENCE,
    "onsetDateTime": True,
    "onsetPeriod": PERIOD,
    "abatementDateTime": True,
    "abatementPeriod": PERIOD,
    "recordedDate": True,
}
PREFERRED = ("SNOMED", "ICD10CM", "ICD10", "ICD9CM")


@register("Condition", SPEC)
def extract(r: dict, record: int) -> list:
    verification = first_code(r.get("verificationStatus"))
    if verification in ("entered-in-error", "refuted"):
        raise Skip(f"Condition verificationStatus '{verification}' is not a condition the patient has")
    patient = reference_id(r.get("subject"), "Patient", "subject", required=True)
    code = pick_coding(r.get("code"), PREFERRED, "code")
    onset = r.get("onsetDateTime") or (r.get("onsetPeriod") or {}).get("start") or r.get("recordedDate")
    start, start_dt = date_parts(onset, "onset")
    if start is None:
        raise Reject("missing_date", "neither onset nor recordedDate is given; a condition needs a start date")
    abatement = r.get("abatementDateTime") or (r.get("abatementPeriod") or {}).get("end")
    end, end_dt = date_parts(abatement, "abatement")
    if end is not None and end < start:
        raise Reject("impossible_date", f"abatement {abatement} is before onset {onset}")
    categories = {c.get("code") for cat in r.get("category") or [] for c in cat.get("coding") or []}
    hint = "problem-list" if "problem-list-item" in categories else "encounter-diagnosis"
    kind = "condition" if verification in (None, "confirmed") else "observation"
    return [
        EventDraft(
            record=record,
            kind=kind,
            key=f"Condition/{r['id']}",
            patient_ref=patient,
            encounter_ref=reference_id(r.get("encounter"), "Encounter", "encounter"),
            code=code,
            start=start,
            start_datetime=start_dt,
            end=end,
            end_datetime=end_dt,
            type_hint=hint if kind == "condition" else f"condition-{verification}",
            status_concept=first_code(r.get("clinicalStatus")),
        )
    ]
