"""MedicationRequest, MedicationAdministration, MedicationStatement and Immunization -> drug_exposure."""

from __future__ import annotations

import datetime as dt

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

PREFERRED = ("RxNorm", "CVX", "NDC")
DOSE = {"value": True, "unit": True}


def _drug_code(r: dict) -> tuple[str, str, str]:
    if r.get("medicationCodeableConcept") is None:
        raise Reject(
            "unresolvable_medication",
            "the drug is given as medicationReference; only medicationCodeableConcept can be mapped",
        )
    return pick_coding(r["medicationCodeableConcept"], PREFERRED, "medicationCodeableConcept")


def _route(route: dict | None) -> str | None:
    if not route:
        return None
    codings = route.get("coding") or []
    return (codings[0].get("code") if codings else None) or route.get("text")


def _plus_days(day: str, days: float) -> str:
    return (dt.date.fromisoformat(day) + dt.timedelta(days=max(0, round(days)))).isoformat()


REQUEST_SPEC = {
    "status": True,
    "intent": True,
    "medicationCodeableConcept": CODEABLE,
    "medicationReference": REFERENCE,
    "subject": REFERENCE,
    "encounter": REFERENCE,
    "authoredOn": True,
    "requester": REFERENCE,
    "dosageInstruction": {
        "text": True,
        "route": CODEABLE,
        "timing": {"repeat": {"boundsPeriod": PERIOD}},
        "doseAndRate": {"doseQuantity": DOSE},
    },
    "dispenseRequest": {
        "quantity": DOSE,
        "expectedSupplyDuration": {"value": True, "unit": True},
        "numberOfRepeatsAllowed": True,
    },
}
ORDERS = {"order", "original-order", "reflex-order", "filler-order", "instance-order"}


@register("MedicationRequest", REQUEST_SPEC)
def extract_request(r: dict, record: int) -> list:
    if r["status"] in ("entered-in-error", "cancelled", "draft"):
        raise Skip(f"MedicationRequest status '{r['status']}' is not a prescription that was issued")
    if r["intent"] not in ORDERS:
        raise Skip(f"MedicationRequest intent '{r['intent']}' is a proposal or plan, not an order")
    patient = reference_id(r.get("subject"), "Patient", "subject", required=True)
    code = _drug_code(r)
    dosage = (r.get("dosageInstruction") or [{}])[0]
    bounds = ((dosage.get("timing") or {}).get("repeat") or {}).get("boundsPeriod") or {}
    start, start_dt = date_parts(bounds.get("start") or r.get("authoredOn"), "authoredOn")
    if start is None:
        raise Reject("missing_date", "neither a dosage start nor authoredOn is given")
    end, end_dt = date_parts(bounds.get("end"), "boundsPeriod.end")
    dispense = r.get("dispenseRequest") or {}
    supply = dispense.get("expectedSupplyDuration") or {}
    days_supply = (
        int(supply["value"]) if supply.get("value") is not None and supply.get("unit") in ("d", "days", "day") else None
    )
    if end is None:
        end = _plus_days(start, days_supply) if days_supply else start
    if end < start:
        raise Reject("impossible_date", f"the dosage period ends ({end}) before it starts ({start})")
    dose = ((dosage.get("doseAndRate") or [{}])[0].get("doseQuantity") or {}).get("value")
    return [
        EventDraft(
            record=record,
            kind="drug",
            key=f"MedicationRequest/{r['id']}",
            patient_ref=patient,
            encounter_ref=reference_id(r.get("encounter"), "Encounter", "encounter"),
            code=code,
            start=start,
            start_datetime=start_dt,
            end=end,
            end_datetime=end_dt,
            type_hint="prescription",
            quantity=(dispense.get("quantity") or {}).get("value") or dose,
            route=_route(dosage.get("route")),
            sig=dosage.get("text"),
            refills=dispense.get("numberOfRepeatsAllowed"),
            days_supply=days_supply,
            practitioner_ref=reference_id(r.get("requester"), "Practitioner", "requester"),
        )
    ]


ADMINISTRATION_SPEC = {
    "status": True,
    "medicationCodeableConcept": CODEABLE,
    "medicationReference": REFERENCE,
    "subject": REFERENCE,
    "context": REFERENCE,
    "effectiveDateTime": True,
    "effectivePeriod": PERIOD,
    "dosage": {"text": True, "route": CODEABLE, "dose": DOSE},
    "performer": {"actor": REFERENCE},
}


@register("MedicationAdministration", ADMINISTRATION_SPEC)
def extract_administration(r: dict, record: int) -> list:
    if r["status"] in ("not-done", "entered-in-error", "unknown"):
        raise Skip(f"MedicationAdministration status '{r['status']}' means the drug was not given")
    patient = reference_id(r.get("subject"), "Patient", "subject", required=True)
    code = _drug_code(r)
    period = r.get("effectivePeriod") or {}
    start, start_dt = date_parts(r.get("effectiveDateTime") or period.get("start"), "effective")
    if start is None:
        raise Reject("missing_date", "effective[x] is missing; an administration needs a time")
    end, end_dt = date_parts(period.get("end"), "effectivePeriod.end")
    if end is not None and (end, end_dt or "") < (start, start_dt or ""):
        raise Reject("impossible_date", f"effectivePeriod.end {period.get('end')} is before its start")
    dosage = r.get("dosage") or {}
    performers = r.get("performer") or []
    return [
        EventDraft(
            record=record,
            kind="drug",
            key=f"MedicationAdministration/{r['id']}",
            patient_ref=patient,
            encounter_ref=reference_id(r.get("context"), "Encounter", "context"),
            code=code,
            start=start,
            start_datetime=start_dt,
            end=end or start,
            end_datetime=end_dt or start_dt,
            type_hint="administration",
            quantity=(dosage.get("dose") or {}).get("value"),
            route=_route(dosage.get("route")),
            sig=dosage.get("text"),
            practitioner_ref=reference_id(performers[0].get("actor"), "Practitioner", "performer.actor")
            if performers
            else None,
        )
    ]


STATEMENT_SPEC = {
    "status": True,
    "medicationCodeableConcept": CODEABLE,
    "medicationReference": REFERENCE,
    "subject": REFERENCE,
    "context": REFERENCE,
    "effectiveDateTime": True,
    "effectivePeriod": PERIOD,
    "dosage": {"text": True, "route": CODEABLE},
}


@register("MedicationStatement", STATEMENT_SPEC)
def extract_statement(r: dict, record: int) -> list:
    if r["status"] not in ("active", "completed"):
        raise Skip(f"MedicationStatement status '{r['status']}' is not a drug the patient takes or took")
    patient = reference_id(r.get("subject"), "Patient", "subject", required=True)
    code = _drug_code(r)
    period = r.get("effectivePeriod") or {}
    start, start_dt = date_parts(r.get("effectiveDateTime") or period.get("start"), "effective")
    if start is None:
        raise Reject("missing_date", "effective[x] is missing; a medication statement needs a date")
    end, end_dt = date_parts(period.get("end"), "effectivePeriod.end")
    if end is not None and end < start:
        raise Reject("impossible_date", f"effectivePeriod.end {period.get('end')} is before its start")
    dosage = (r.get("dosage") or [{}])[0]
    return [
        EventDraft(
            record=record,
            kind="drug",
            key=f"MedicationStatement/{r['id']}",
            patient_ref=patient,
            encounter_ref=reference_id(r.get("context"), "Encounter", "context"),
            code=code,
            start=start,
            start_datetime=start_dt,
            end=end or start,
            end_datetime=end_dt,
            type_hint="statement",
            route=_route(dosage.get("route")),
            sig=dosage.get("text"),
        )
    ]


IMMUNIZATION_SPEC = {
    "status": True,
    "vaccineCode": CODEABLE,
    "patient": REFERENCE,
    "encounter": REFERENCE,
    "occurrenceDateTime": True,
    "doseQuantity": DOSE,
    "route": CODEABLE,
    "lotNumber": True,
    "primarySource": True,
}


@register("Immunization", IMMUNIZATION_SPEC)
def extract_immunization(r: dict, record: int) -> list:
    if r["status"] != "completed":
        raise Skip(f"Immunization status '{r['status']}' means no vaccine was given")
    patient = reference_id(r.get("patient"), "Patient", "patient", required=True)
    code = pick_coding(r.get("vaccineCode"), PREFERRED, "vaccineCode")
    start, start_dt = date_parts(r.get("occurrenceDateTime"), "occurrenceDateTime")
    if start is None:
        raise Reject("missing_date", "occurrenceDateTime is missing; an immunization needs a date")
    return [
        EventDraft(
            record=record,
            kind="drug",
            key=f"Immunization/{r['id']}",
            patient_ref=patient,
            encounter_ref=reference_id(r.get("encounter"), "Encounter", "encounter"),
            code=code,
            start=start,
            start_datetime=start_dt,
            end=start,
            end_datetime=start_dt,
            type_hint="immunization" if r.get("primarySource", True) else "immunization-reported",
            quantity=(r.get("doseQuantity") or {}).get("value"),
            route=_route(r.get("route")),
            lot_number=r.get("lotNumber"),
        )
    ]
