"""The defect catalogue: the broken records real exports contain, injected at documented rates.

Each exported record of an eligible resource type carries at most one defect, drawn independently
with the site's rates (config.DefectRates). Every injected defect is reported (kind, file, line,
resource id, what was changed) so the ETL's quarantine can be checked record by record.

Kinds (what the record looks like -> the rule it breaks):

* malformed_json: the line is cut off mid-object -> NDJSON, one JSON object per line
* schema_violation: an element FHIR R4 requires is missing (status, subject, intent) -> R4 cardinality
* invalid_date: a calendar date that does not exist (Feb 30) -> R4 dateTime format
* impossible_date: a valid date that cannot be true (before birth, after the export, end before start)
  -> temporal plausibility
* invalid_code: the code fails its check digit (LOINC, SNOMED CT) or is not an RxCUI -> code-system format
* dangling_reference: subject/patient points to a Patient that is not in the export -> referential integrity
* duplicate: the same record (same id, same content) is exported twice -> uniqueness of ids
* implausible_value: a measurement 10-100x beyond physiological limits (unit or decimal slip)
  -> plausible value range
"""

from __future__ import annotations

import bisect
import datetime as dt
import uuid
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np
import orjson
from pydantic import BaseModel

from omop_etl.units import plausible_range
from omop_etl.vocabulary.check_digits import loinc_check_digit
from synthetic.codes import MEASUREMENTS, SITE_UNIT_CONVERSIONS
from synthetic.config import DefectRates


class DefectKind(StrEnum):
    MALFORMED_JSON = "malformed_json"
    SCHEMA_VIOLATION = "schema_violation"
    INVALID_DATE = "invalid_date"
    IMPOSSIBLE_DATE = "impossible_date"
    INVALID_CODE = "invalid_code"
    DANGLING_REFERENCE = "dangling_reference"
    DUPLICATE = "duplicate"
    IMPLAUSIBLE_VALUE = "implausible_value"


K = DefectKind
_CLINICAL = (
    K.MALFORMED_JSON,
    K.SCHEMA_VIOLATION,
    K.INVALID_DATE,
    K.IMPOSSIBLE_DATE,
    K.INVALID_CODE,
    K.DANGLING_REFERENCE,
    K.DUPLICATE,
)
ELIGIBLE_DEFECTS: dict[str, tuple[DefectKind, ...]] = {
    # Patient, Organization, Location and Consent stay intact apart from duplicates: a broken Patient
    # would silently orphan everything it owns, and a lost Consent would change who may be used.
    "Patient": (K.DUPLICATE,),
    "Consent": (K.DUPLICATE,),
    "Encounter": (
        K.MALFORMED_JSON,
        K.SCHEMA_VIOLATION,
        K.INVALID_DATE,
        K.IMPOSSIBLE_DATE,
        K.DANGLING_REFERENCE,
        K.DUPLICATE,
    ),
    "Observation": (*_CLINICAL, K.IMPLAUSIBLE_VALUE),
    "Condition": _CLINICAL,
    "MedicationRequest": tuple(k for k in _CLINICAL if k is not K.INVALID_DATE),
    "MedicationAdministration": _CLINICAL,
    "Procedure": _CLINICAL,
}

# The field FHIR R4 requires that a schema_violation removes, per resource type.
REQUIRED_FIELD_REMOVED = {
    "Encounter": "status",
    "Observation": "status",
    "Condition": "subject",
    "MedicationRequest": "intent",
    "MedicationAdministration": "status",
    "Procedure": "status",
}
# The date field a date defect edits, per resource type.
DATE_FIELD = {
    "Observation": "effectiveDateTime",
    "Condition": "onsetDateTime",
    "MedicationRequest": "authoredOn",
    "MedicationAdministration": "effectiveDateTime",
    "Procedure": "performedDateTime",
}
SUBJECT_FIELD = {"Consent": "patient"}

MEASUREMENT_KEY_BY_LOINC = {m.concept.concept_code: key for key, m in MEASUREMENTS.items()}


def plausible_limits(key: str, unit_code: str) -> tuple[float, float]:
    """The plausible range of a measurement in the unit the value is reported in.

    The limits are the ETL's own (omop_etl.units), so what the generator breaks is what the ETL catches.
    """
    limits = plausible_range(MEASUREMENTS[key].concept_id)
    assert limits is not None, f"no plausible range defined for {key}"
    low, high = limits
    scale, shift = SITE_UNIT_CONVERSIONS.get((key, unit_code), (1.0, 0.0))
    return low * scale + shift, high * scale + shift


class DefectRecord(BaseModel):
    """One injected defect, as listed in the ground-truth file."""

    kind: DefectKind
    resource_type: str
    file: str
    line: int
    resource_id: str
    detail: str


@dataclass
class RecordContext:
    """What the injector may need to know about a record's patient."""

    birth_date: dt.date | None = None


class DefectInjector:
    """Decides, record by record, whether and how to break it; deterministic for its generator."""

    def __init__(self, rates: DefectRates, rng: np.random.Generator, export_date: dt.date) -> None:
        self._rng = rng
        self._export_date = export_date
        self._buffer = np.empty(0)
        self._cursor = 0
        rate_of = rates.model_dump()
        self._thresholds: dict[str, tuple[list[float], tuple[DefectKind, ...]]] = {}
        for resource_type, kinds in ELIGIBLE_DEFECTS.items():
            cumulative = np.cumsum([rate_of[k.value] for k in kinds]).tolist()
            self._thresholds[resource_type] = (cumulative, kinds)

    def _uniform(self) -> float:
        if self._cursor >= self._buffer.size:
            self._buffer = self._rng.random(65536)
            self._cursor = 0
        value = self._buffer[self._cursor]
        self._cursor += 1
        return float(value)

    def lines(self, resource: dict[str, Any], context: RecordContext) -> list[tuple[bytes, DefectKind | None, str]]:
        """The NDJSON line(s) to write for this record, each with its defect (if any) and a detail text."""
        resource_type = resource["resourceType"]
        clean = orjson.dumps(resource)
        plan = self._thresholds.get(resource_type)
        if plan is None:
            return [(clean, None, "")]
        cumulative, kinds = plan
        u = self._uniform()
        position = bisect.bisect_right(cumulative, u)
        if position >= len(kinds):
            return [(clean, None, "")]
        kind = kinds[position]
        if kind is K.DUPLICATE:
            return [(clean, None, ""), (clean, kind, "the same record exported a second time")]
        if kind is K.MALFORMED_JSON:
            cut = max(10, len(clean) // 2)
            return [(clean[:cut], kind, f"line cut off after {cut} of {len(clean)} bytes")]
        broken = orjson.loads(clean)
        detail = self._break(kind, broken, context)
        if detail is None:  # this record offers nothing to break in that way: export it clean
            return [(clean, None, "")]
        return [(orjson.dumps(broken), kind, detail)]

    # --- the individual defects --------------------------------------------------------------------

    def _break(self, kind: DefectKind, r: dict[str, Any], context: RecordContext) -> str | None:
        resource_type = r["resourceType"]
        if kind is K.SCHEMA_VIOLATION:
            field = REQUIRED_FIELD_REMOVED[resource_type]
            del r[field]
            return f"required element {resource_type}.{field} removed"
        if kind is K.DANGLING_REFERENCE:
            field = SUBJECT_FIELD.get(resource_type, "subject")
            ghost = str(uuid.UUID(int=int(self._uniform() * 2**64) << 64 | 0xDEAD))
            r[field] = {"reference": f"Patient/{ghost}"}
            return f"{field} points to Patient/{ghost}, which is not in the export"
        if kind is K.INVALID_DATE:
            if resource_type == "Encounter":
                start = r["period"]["start"]
                r["period"]["start"] = _february_30(start)
                return f"period.start {r['period']['start']} is not a calendar date"
            field = DATE_FIELD[resource_type]
            if field not in r:
                return None
            r[field] = _february_30(r[field])
            return f"{field} {r[field]} is not a calendar date"
        if kind is K.IMPOSSIBLE_DATE:
            if resource_type == "Encounter":
                if "end" not in r["period"]:
                    return None
                start = r["period"]["start"]
                r["period"]["end"] = _shift_days(start, -2)
                return f"period.end {r['period']['end']} is before period.start {start}"
            field = DATE_FIELD[resource_type]
            if field not in r:
                return None
            if context.birth_date is not None and self._uniform() < 0.5:
                before_birth = context.birth_date - dt.timedelta(days=400)
                r[field] = _replace_date(r[field], before_birth)
                return f"{field} {r[field]} is before the patient's birth date {context.birth_date}"
            future = self._export_date + dt.timedelta(days=3 * 365)
            r[field] = _replace_date(r[field], future)
            return f"{field} {r[field]} is after the export date {self._export_date}"
        if kind is K.INVALID_CODE:
            return _break_code(r, self._uniform())
        if kind is K.IMPLAUSIBLE_VALUE:
            return _implausible(r)
        raise AssertionError(kind)


def _february_30(value: str) -> str:
    return "2024-02-30" + value[10:]


def _replace_date(value: str, day: dt.date) -> str:
    return day.isoformat() + value[10:]


def _shift_days(value: str, days: int) -> str:
    day = dt.date.fromisoformat(value[:10]) + dt.timedelta(days=days)
    return day.isoformat() + value[10:]


def _code_holder(r: dict[str, Any]) -> dict[str, Any] | None:
    if "code" in r:
        return r["code"]
    if "medicationCodeableConcept" in r:
        return r["medicationCodeableConcept"]
    return None


def _break_code(r: dict[str, Any], u: float) -> str | None:
    holder = _code_holder(r)
    if holder is None:
        return None
    c = holder["coding"][0]
    original = c["code"]
    if c["system"] == "http://loinc.org":
        number, _ = original.split("-")
        wrong = (loinc_check_digit(number) + 1 + int(u * 8)) % 10
        c["code"] = f"{number}-{wrong}"
        rule = "fails the LOINC check digit"
    elif c["system"] == "http://snomed.info/sct":
        last = (int(original[-1]) + 1 + int(u * 8)) % 10
        c["code"] = original[:-1] + str(last)
        rule = "fails the SNOMED CT Verhoeff check digit"
    else:
        c["code"] = f"{original}-{1 + int(u * 98):02d}"
        rule = "is not an RxNorm concept unique identifier (RxCUIs are digits only)"
    return f"code {c['code']} (was {original}) {rule}"


def _implausible(r: dict[str, Any]) -> str | None:
    code = r.get("code", {}).get("coding", [{}])[0].get("code")
    if "valueQuantity" in r:
        quantity = r["valueQuantity"]
        key = MEASUREMENT_KEY_BY_LOINC.get(code)
    elif "component" in r:
        quantity = r["component"][0]["valueQuantity"]
        key = "sbp"
    else:
        return None
    if key is None:
        return None
    _, high = plausible_limits(key, quantity["code"])
    original = quantity["value"]
    value = float(original) if original else 1.0
    while abs(value) <= 2 * high:
        value *= 10
    quantity["value"] = round(value, 2)
    return f"value {quantity['value']} {quantity['code']} (was {original}) is beyond the plausible maximum {high:g}"
