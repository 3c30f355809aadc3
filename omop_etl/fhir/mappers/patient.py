"""Patient -> person (and death). Names, addresses, telecom and identifiers are never read."""

from __future__ import annotations

from omop_etl.fhir.drafts import PersonDraft
from omop_etl.fhir.mappers.base import CODEABLE, CODING, REFERENCE, Reject, date_parts, reference_id, register

US_CORE_RACE = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race"
US_CORE_ETHNICITY = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-ethnicity"

SPEC = {
    "identifier": {"type": CODEABLE, "value": True},
    "gender": True,
    "birthDate": True,
    "deceasedDateTime": True,
    "deceasedBoolean": True,
    "extension": {"url": True, "extension": {"url": True, "valueCoding": CODING, "valueString": True}},
    "managingOrganization": REFERENCE,
    "generalPractitioner": REFERENCE,
}


def _omb_category(extensions: list[dict], url: str) -> tuple[str, str] | None:
    for extension in extensions:
        if extension.get("url") != url:
            continue
        for part in extension.get("extension") or []:
            coding = part.get("valueCoding")
            if part.get("url") == "ombCategory" and coding and coding.get("code"):
                return coding["code"], coding.get("display") or ""
    return None


@register("Patient", SPEC)
def extract(r: dict, record: int) -> list:
    birth_date, birth_datetime = date_parts(r.get("birthDate"), "birthDate")
    if birth_date is None:
        raise Reject("missing_birth_date", "birthDate is missing; OMOP requires a year of birth for every person")
    deceased, _ = date_parts(r.get("deceasedDateTime"), "deceasedDateTime")
    _, deceased_datetime = date_parts(r.get("deceasedDateTime"), "deceasedDateTime")
    extensions = r.get("extension") or []
    mrn = next(
        (
            i["value"]
            for i in r.get("identifier") or []
            if i.get("value") and any(c.get("code") == "MR" for c in (i.get("type") or {}).get("coding") or [])
        ),
        None,
    )
    practitioners = r.get("generalPractitioner") or []
    return [
        PersonDraft(
            record=record,
            patient_id=r["id"],
            gender=r.get("gender"),
            birth_date=birth_date,
            birth_datetime=birth_datetime,
            deceased=deceased_datetime or deceased,
            race=_omb_category(extensions, US_CORE_RACE),
            ethnicity=_omb_category(extensions, US_CORE_ETHNICITY),
            organization_ref=reference_id(r.get("managingOrganization"), "Organization", "managingOrganization"),
            practitioner_ref=reference_id(practitioners[0], "Practitioner", "generalPractitioner")
            if practitioners
            else None,
            mrn=mrn,
        )
    ]
