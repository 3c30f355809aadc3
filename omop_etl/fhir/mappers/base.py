"""The mapper registry and the helpers every mapper uses (codes, references, dates).

A mapper is one module per FHIR resource type: the elements it reads (a spec validated against the
R4B definitions by omop_etl.fhir.lean) and an `extract` function that turns one validated record into
drafts. Adding a resource type means adding a module and registering it; nothing else changes.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Any

from pydantic import TypeAdapter

from omop_etl.fhir.lean import Spec, lean_validator
from omop_etl.vocabulary import VOCABULARY_BY_FHIR_SYSTEM
from omop_etl.vocabulary.check_digits import is_valid_loinc, is_valid_snomed

CODING: Spec = {"system": True, "code": True, "display": True}
CODEABLE: Spec = {"coding": CODING, "text": True}
REFERENCE: Spec = {"reference": True}
PERIOD: Spec = {"start": True, "end": True}
QUANTITY: Spec = {"value": True, "unit": True, "system": True, "code": True, "comparator": True}


class Reject(Exception):
    """This record cannot be loaded: `rule` names the rule it breaks, `detail` says how."""

    def __init__(self, rule: str, detail: str) -> None:
        super().__init__(f"{rule}: {detail}")
        self.rule = rule
        self.detail = detail


class Skip(Exception):
    """This record is deliberately not loaded (e.g. entered-in-error, not-done), with the reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class Mapper:
    resource_type: str
    spec: Spec
    extract: Callable[[dict[str, Any], int], list]

    @cached_property
    def validator(self) -> TypeAdapter:
        """The lean R4B validator of the mapped elements (built once per process)."""
        return lean_validator(self.resource_type, self.spec)


MAPPERS: dict[str, Mapper] = {}


def register(resource_type: str, spec: Spec) -> Callable:
    """Decorator: register `extract(resource, record_index) -> drafts` for a resource type."""

    def wrap(extract: Callable[[dict[str, Any], int], list]) -> Callable:
        MAPPERS[resource_type] = Mapper(resource_type, spec, extract)
        return extract

    return wrap


# --- codes ----------------------------------------------------------------------------------------

RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"


@lru_cache(maxsize=65536)
def code_format_problem(system: str, code: str) -> str | None:
    """Why a code breaks its code system's own format (a typo, not an unknown code), or None."""
    if system == "http://loinc.org" and not is_valid_loinc(code):
        return f"LOINC code {code} fails the LOINC check digit"
    if system == "http://snomed.info/sct" and not is_valid_snomed(code):
        return f"SNOMED CT code {code} fails the Verhoeff check digit"
    if system == RXNORM and not code.isdigit():
        return f"RxNorm code {code} is not an RxCUI (digits only)"
    return None


def check_code_format(system: str, code: str) -> None:
    """Reject a code that breaks its code system's format."""
    problem = code_format_problem(system, code)
    if problem is not None:
        raise Reject("invalid_code", problem)


def pick_coding(concept: dict | None, preferred: tuple[str, ...], element: str) -> tuple[str, str, str]:
    """The coding to map: the first in a preferred vocabulary, else the first with a system and code.

    Every coding we would use is format-checked. Raises Reject when there is no usable coding at all.
    """
    codings = (concept or {}).get("coding") or []
    usable = [c for c in codings if c.get("system") and c.get("code")]
    if not usable:
        text = (concept or {}).get("text")
        raise Reject(
            "missing_code", f"{element} has no coding with a system and a code" + (f" ('{text}')" if text else "")
        )
    chosen = next((c for p in preferred for c in usable if VOCABULARY_BY_FHIR_SYSTEM.get(c["system"]) == p), usable[0])
    check_code_format(chosen["system"], chosen["code"])
    return chosen["system"], chosen["code"], chosen.get("display") or (concept or {}).get("text") or ""


def first_code(concept: dict | None) -> str | None:
    """The first code of a CodeableConcept (for status-like fields)."""
    for coding in (concept or {}).get("coding") or []:
        if coding.get("code"):
            return coding["code"]
    return None


# --- references -------------------------------------------------------------------------------------


def reference_id(reference: dict | None, expected: str, element: str, *, required: bool = False) -> str | None:
    """The id in a reference to a resource of type `expected` ("Patient/123", ".../Patient/123").

    References resolved inside a Bundle (urn:uuid) are rewritten to Type/id before extraction.
    Conditional or contained references cannot be followed: they count as absent.
    """
    value = (reference or {}).get("reference")
    if not value:
        if required:
            raise Reject("missing_reference", f"{element} is missing; the record cannot be linked to a {expected}")
        return None
    if "?" in value or value.startswith("#"):
        if required:
            raise Reject("unresolvable_reference", f"{element} '{value}' is a conditional or contained reference")
        return None
    parts = value.rstrip("/").split("/")
    if len(parts) >= 2 and parts[-2] == expected:
        return parts[-1]
    if len(parts) >= 4 and parts[-2] == "_history" and parts[-4] == expected:
        return parts[-3]
    if required:
        raise Reject("wrong_reference_type", f"{element} '{value}' does not point to a {expected}")
    return None


# --- dates ------------------------------------------------------------------------------------------


@lru_cache(maxsize=65536)
def _is_calendar_date(day: str) -> bool:
    try:
        dt.date.fromisoformat(day)
    except ValueError:
        return False
    return True


def date_parts(value: str | None, element: str) -> tuple[str | None, str | None]:
    """(YYYY-MM-DD, 'YYYY-MM-DD HH:MM:SS' or None) of a FHIR date/dateTime; partial dates take day 1.

    The time is kept as the local wall-clock time that was sent (OMOP has no time zones). Raises
    Reject('invalid_date') for a date that matches the FHIR pattern but is not a calendar date.
    """
    if not value:
        return None, None
    if len(value) == 4:
        day = value + "-01-01"
    elif len(value) == 7:
        day = value + "-01"
    else:
        day = value[:10]
    if not _is_calendar_date(day):
        raise Reject("invalid_date", f"{element} {value} is not a calendar date")
    if len(value) > 10:
        return day, f"{day} {value[11:19]}"
    return day, None
