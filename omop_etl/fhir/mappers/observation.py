"""Observation -> measurement or observation (by the concept's domain); panels give a row per component."""

from __future__ import annotations

from omop_etl.fhir.drafts import EventDraft
from omop_etl.fhir.mappers.base import (
    CODEABLE,
    PERIOD,
    QUANTITY,
    REFERENCE,
    Reject,
    Skip,
    date_parts,
    pick_coding,
    reference_id,
    register,
)

VALUES = {
    "valueQuantity": QUANTITY,
    "valueCodeableConcept": CODEABLE,
    "valueString": True,
    "valueInteger": True,
    "valueBoolean": True,
}
SPEC = {
    "status": True,
    "category": CODEABLE,
    "code": CODEABLE,
    "subject": REFERENCE,
    "encounter": REFERENCE,
    "effectiveDateTime": True,
    "effectivePeriod": PERIOD,
    "effectiveInstant": True,
    "issued": True,
    **VALUES,
    "dataAbsentReason": CODEABLE,
    "referenceRange": {"low": {"value": True}, "high": {"value": True}},
    "component": {"code": CODEABLE, **VALUES, "dataAbsentReason": CODEABLE},
}
REALIZED = {"final", "amended", "corrected"}
PREFERRED = ("LOINC", "SNOMED")


def _value(element: dict) -> dict:
    """The value fields of an Observation or component as EventDraft keyword arguments."""
    quantity = element.get("valueQuantity")
    if quantity is not None:
        if quantity.get("value") is None:
            return {}
        unit_code = quantity.get("code") if quantity.get("system", "http://unitsofmeasure.org") else None
        return {
            "value": quantity["value"],
            "unit_code": unit_code,
            "unit_text": quantity.get("unit"),
            "operator": quantity.get("comparator"),
        }
    if element.get("valueCodeableConcept") is not None:
        concept = element["valueCodeableConcept"]
        codings = [c for c in concept.get("coding") or [] if c.get("system") and c.get("code")]
        if codings:
            c = codings[0]
            return {"value_code": (c["system"], c["code"], c.get("display") or "")}
        return {"value_string": concept.get("text")}
    if element.get("valueInteger") is not None:
        return {"value": float(element["valueInteger"])}
    if element.get("valueBoolean") is not None:
        return {"value_string": "true" if element["valueBoolean"] else "false"}
    if element.get("valueString") is not None:
        return {"value_string": element["valueString"]}
    return {}


@register("Observation", SPEC)
def extract(r: dict, record: int) -> list:
    status = r["status"]
    if status not in REALIZED:
        raise Skip(f"Observation status '{status}' is not a final result")
    patient = reference_id(r.get("subject"), "Patient", "subject", required=True)
    when = r.get("effectiveDateTime") or (r.get("effectivePeriod") or {}).get("start") or r.get("effectiveInstant")
    start, start_dt = date_parts(when or r.get("issued"), "effective")
    if start is None:
        raise Reject("missing_date", "no effective[x] or issued time; a measurement needs a date")
    encounter = reference_id(r.get("encounter"), "Encounter", "encounter")
    categories = {c.get("code") for cat in r.get("category") or [] for c in cat.get("coding") or []}
    hint = "vital" if "vital-signs" in categories else "lab" if "laboratory" in categories else "ehr"
    ranges = r.get("referenceRange") or [{}]
    low = (ranges[0].get("low") or {}).get("value")
    high = (ranges[0].get("high") or {}).get("value")
    common = {
        "patient_ref": patient,
        "encounter_ref": encounter,
        "start": start,
        "start_datetime": start_dt,
        "end": None,
        "end_datetime": None,
        "type_hint": hint,
    }
    components = r.get("component") or []
    if components and not any(k in r for k in VALUES):
        drafts = []
        for index, component in enumerate(components):
            if component.get("dataAbsentReason") is not None:
                continue
            code = pick_coding(component.get("code"), PREFERRED, f"component[{index}].code")
            drafts.append(
                EventDraft(
                    record=record,
                    kind="observation",
                    key=f"Observation/{r['id']}#{code[1]}",
                    code=code,
                    **common,
                    **_value(component),
                )
            )
        if not drafts:
            raise Skip("every component has a dataAbsentReason; there is no value to load")
        pick_coding(r.get("code"), PREFERRED, "code")  # the panel code itself must be well-formed
        return drafts
    if r.get("dataAbsentReason") is not None:
        raise Skip("the Observation has a dataAbsentReason instead of a value")
    code = pick_coding(r.get("code"), PREFERRED, "code")
    return [
        EventDraft(
            record=record,
            kind="observation",
            key=f"Observation/{r['id']}",
            code=code,
            range_low=low,
            range_high=high,
            **common,
            **_value(r),
        )
    ]
