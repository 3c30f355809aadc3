"""FHIR R4 resources as a hospital's Bulk Data export writes them (plain dicts, serialised as NDJSON).

The shapes follow FHIR R4 (they validate against `fhir.resources.R4B`) and the conventions of real
exports: vital signs with the vital-signs category and UCUM units, the blood-pressure panel with
systolic/diastolic components, US Core race/ethnicity extensions at US sites, Encounter.class from
v3-ActCode, Consent with scope `research`. Identifiers are UUIDs derived from the site, the seed and a
running key, so the same seed always gives the same ids.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from omop_etl.vocabulary import Concept
from synthetic.codes import (
    ADMISSION_DIAGNOSES,
    BP_PANEL_CONCEPT_ID,
    MEASUREMENTS,
    UNITS,
    ConditionCode,
    DrugCode,
    concept,
)
from synthetic.config import AdmissionReason, SiteProfile

UCUM = "http://unitsofmeasure.org"
OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
CATEGORY_DISPLAY = {"vital-signs": "Vital Signs", "laboratory": "Laboratory"}
ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
ENCOUNTER_CLASS = {
    "IMP": ("inpatient encounter", "Inpatient admission"),
    "AMB": ("ambulatory", "Outpatient clinic visit"),
    "EMER": ("emergency", "Emergency department visit"),
}
LOCATION_KINDS = {
    "emergency": ("ER", "Emergency room", "Emergency Department", "wa", "Ward"),
    "ward": ("HU", "Hospital unit", "Medical Ward 3", "wa", "Ward"),
    "icu": ("ICU", "Intensive care unit", "Intensive Care Unit", "wa", "Ward"),
    "clinic": ("GIM", "General internal medicine clinic", "Internal Medicine Outpatient Clinic", "bu", "Building"),
}
# hospitalization.admitSource: emergency admissions come from the emergency department; planned (elective)
# ones, with operations on, on a physician's referral.
ADMIT_SOURCES = {"emd": "From accident/emergency department", "mp": "Medical Practitioner/physician referral"}
_EPOCH = dt.datetime(1970, 1, 1)
_MASK64 = (1 << 64) - 1
_TYPE_SALT: dict[str, int] = {}


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def hash_key(resource_type: str, key: str | int) -> int:
    """A stable 64-bit number for (resource type, key); Python's own hash() is salted per process."""
    salt = _TYPE_SALT.get(resource_type)
    if salt is None:
        salt = int.from_bytes(uuid.uuid5(uuid.NAMESPACE_OID, resource_type).bytes[:8], "big")
        _TYPE_SALT[resource_type] = salt
    if isinstance(key, int):
        return _splitmix64(salt ^ key)
    return _splitmix64(salt ^ int.from_bytes(uuid.uuid5(uuid.NAMESPACE_OID, key).bytes[:8], "big"))


def coding(c: Concept) -> dict[str, str]:
    """A FHIR Coding for a bundled concept."""
    return {"system": c.fhir_system, "code": c.concept_code, "display": c.concept_name}


def codeable(c: Concept) -> dict[str, Any]:
    return {"coding": [coding(c)], "text": c.concept_name}


class ResourceFactory:
    """Builds the FHIR resources of one site. Holds the ids of the shared resources (organisation, wards)."""

    def __init__(self, profile: SiteProfile, seed: int) -> None:
        self.profile = profile
        namespace = uuid.uuid5(uuid.NAMESPACE_URL, f"https://twinfed.example/synth/{profile.site_id}/{seed}")
        self._salt = namespace.int
        self._days: dict[int, str] = {}
        sign = "+" if profile.utc_offset_hours >= 0 else "-"
        self._offset = f"{sign}{abs(profile.utc_offset_hours):02d}:00"
        self.organization_id = self.new_id("Organization", "hospital")
        self.location_ids = {kind: self.new_id("Location", kind) for kind in LOCATION_KINDS}
        self.mrn_system = f"https://{profile.site_id}.hospital.example/fhir/sid/mrn"

    # --- ids and times ---------------------------------------------------------------------------

    def new_id(self, resource_type: str, key: str | int) -> str:
        """A deterministic, random-looking version-4 UUID for a resource of this site.

        Derived by mixing the site/seed salt with the resource type and key (splitmix64), which is
        several times faster than uuid5 and just as stable; ids never depend on the run.
        """
        seed = (self._salt ^ hash_key(resource_type, key)) & _MASK64
        high, low = _splitmix64(seed), _splitmix64(seed ^ 0x9E3779B97F4A7C15)
        value = (high << 64) | low
        value = (value & ~(0xF000 << 64)) | (0x4000 << 64)  # version 4
        value = (value & ~(0xC000 << 48)) | (0x8000 << 48)  # RFC 4122 variant
        text = f"{value:032x}"
        return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"

    def instant(self, seconds: float) -> str:
        """Local wall-clock seconds since the epoch as a FHIR dateTime with the site's UTC offset."""
        whole = int(seconds)
        day, rest = divmod(whole, 86400)
        date = self._days.get(day)
        if date is None:
            date = (_EPOCH + dt.timedelta(days=day)).strftime("%Y-%m-%d")
            self._days[day] = date
        hour, rest = divmod(rest, 3600)
        minute, second = divmod(rest, 60)
        return f"{date}T{hour:02d}:{minute:02d}:{second:02d}{self._offset}"

    @staticmethod
    def date(seconds: float) -> str:
        return (_EPOCH + dt.timedelta(seconds=int(seconds))).strftime("%Y-%m-%d")

    def ref(self, resource_type: str, resource_id: str) -> dict[str, str]:
        return {"reference": f"{resource_type}/{resource_id}"}

    # --- administrative resources --------------------------------------------------------------------

    def organization(self) -> dict[str, Any]:
        p = self.profile
        return {
            "resourceType": "Organization",
            "id": self.organization_id,
            "identifier": [{"system": "urn:ietf:rfc:3986", "value": f"urn:twinfed:site:{p.site_id}"}],
            "active": True,
            "type": [
                {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/organization-type",
                            "code": "prov",
                            "display": "Healthcare Provider",
                        }
                    ]
                }
            ],
            "name": p.name,
            "address": [{"city": p.city, "country": p.country}],
        }

    def locations(self) -> list[dict[str, Any]]:
        out = []
        for kind, (code, display, name, physical, physical_display) in LOCATION_KINDS.items():
            out.append(
                {
                    "resourceType": "Location",
                    "id": self.location_ids[kind],
                    "status": "active",
                    "name": name,
                    "mode": "instance",
                    "type": [
                        {
                            "coding": [
                                {
                                    "system": "http://terminology.hl7.org/CodeSystem/v3-RoleCode",
                                    "code": code,
                                    "display": display,
                                }
                            ]
                        }
                    ],
                    "physicalType": {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/location-physical-type",
                                "code": physical,
                                "display": physical_display,
                            }
                        ]
                    },
                    "managingOrganization": self.ref("Organization", self.organization_id),
                }
            )
        return out

    def patient(
        self,
        patient_id: str,
        mrn: str,
        female: bool,
        birth_date: dt.date,
        given: str,
        family: str,
        street: str,
        postal_code: str,
        phone: str,
        race: tuple[str, str] | None,
        hispanic: bool,
        deceased_seconds: float | None,
    ) -> dict[str, Any]:
        p = self.profile
        resource: dict[str, Any] = {
            "resourceType": "Patient",
            "id": patient_id,
            "identifier": [
                {
                    "type": {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                "code": "MR",
                                "display": "Medical record number",
                            }
                        ]
                    },
                    "system": self.mrn_system,
                    "value": mrn,
                }
            ],
            "active": True,
            "name": [{"use": "official", "family": family, "given": [given]}],
            "telecom": [{"system": "phone", "value": phone, "use": "home"}],
            "gender": "female" if female else "male",
            "birthDate": birth_date.isoformat(),
            "address": [
                {"use": "home", "line": [street], "city": p.city, "postalCode": postal_code, "country": p.country}
            ],
            "managingOrganization": self.ref("Organization", self.organization_id),
        }
        if deceased_seconds is not None:
            resource["deceasedDateTime"] = self.instant(deceased_seconds)
        if p.records_race and race is not None:
            eth_code, eth_display = (
                ("2135-2", "Hispanic or Latino") if hispanic else ("2186-5", "Not Hispanic or Latino")
            )
            resource["extension"] = [
                {
                    "url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race",
                    "extension": [
                        {
                            "url": "ombCategory",
                            "valueCoding": {
                                "system": "urn:oid:2.16.840.1.113883.6.238",
                                "code": race[0],
                                "display": race[1],
                            },
                        },
                        {"url": "text", "valueString": race[1]},
                    ],
                },
                {
                    "url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-ethnicity",
                    "extension": [
                        {
                            "url": "ombCategory",
                            "valueCoding": {
                                "system": "urn:oid:2.16.840.1.113883.6.238",
                                "code": eth_code,
                                "display": eth_display,
                            },
                        },
                        {"url": "text", "valueString": eth_display},
                    ],
                },
            ]
        return resource

    def consent(
        self,
        consent_id: str,
        patient_id: str,
        provision: str,
        status: str,
        recorded: float,
        period_start: float,
        period_end: float | None,
    ) -> dict[str, Any]:
        period: dict[str, str] = {"start": self.instant(period_start)}
        if period_end is not None:
            period["end"] = self.instant(period_end)
        return {
            "resourceType": "Consent",
            "id": consent_id,
            "status": status,
            "scope": {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/consentscope",
                        "code": "research",
                        "display": "Research",
                    }
                ]
            },
            "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0", "display": "Patient Consent"}]}],
            "patient": self.ref("Patient", patient_id),
            "dateTime": self.instant(recorded),
            "organization": [self.ref("Organization", self.organization_id)],
            "policyRule": {"coding": [{"system": ACT_CODE, "code": "OPTOUT" if provision == "deny" else "OPTIN"}]},
            "provision": {"type": provision, "period": period},
        }

    # --- encounters --------------------------------------------------------------------------------

    def encounter(
        self,
        encounter_id: str,
        patient_id: str,
        kind: str,
        start: float,
        end: float | None,
        reason: AdmissionReason | None = None,
        disposition: str | None = None,
        location_segments: list[tuple[str, float, float | None]] | None = None,
        admit_source: str = "emd",
    ) -> dict[str, Any]:
        class_display, type_text = ENCOUNTER_CLASS[kind]
        period: dict[str, str] = {"start": self.instant(start)}
        if end is not None:
            period["end"] = self.instant(end)
        resource: dict[str, Any] = {
            "resourceType": "Encounter",
            "id": encounter_id,
            "status": "finished" if end is not None else "in-progress",
            "class": {"system": ACT_CODE, "code": kind, "display": class_display},
            "type": [{"text": type_text}],
            "subject": self.ref("Patient", patient_id),
            "period": period,
            "serviceProvider": self.ref("Organization", self.organization_id),
        }
        if reason is not None:
            resource["reasonCode"] = [codeable(ADMISSION_DIAGNOSES[reason].for_site(self.profile))]
        if kind == "IMP":
            hospitalization: dict[str, Any] = {
                "admitSource": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/admit-source",
                            "code": admit_source,
                            "display": ADMIT_SOURCES[admit_source],
                        }
                    ]
                }
            }
            if disposition is not None:
                hospitalization["dischargeDisposition"] = {
                    "coding": [
                        {"system": "http://terminology.hl7.org/CodeSystem/discharge-disposition", "code": disposition}
                    ]
                }
            resource["hospitalization"] = hospitalization
        if location_segments:
            resource["location"] = [
                {
                    "location": self.ref("Location", self.location_ids[where]),
                    "status": "completed" if seg_end is not None else "active",
                    "period": {"start": self.instant(seg_start)}
                    | ({"end": self.instant(seg_end)} if seg_end is not None else {}),
                }
                for where, seg_start, seg_end in location_segments
            ]
        return resource

    # --- clinical facts ----------------------------------------------------------------------------

    def observation(
        self,
        observation_id: str,
        patient_id: str,
        encounter_id: str,
        key: str,
        when: float,
        value: float,
        unit_code: str,
        decimals: int,
    ) -> dict[str, Any]:
        m = MEASUREMENTS[key]
        unit = UNITS[unit_code]
        resource: dict[str, Any] = {
            "resourceType": "Observation",
            "id": observation_id,
            "status": "final",
            "category": [
                {"coding": [{"system": OBS_CATEGORY, "code": m.category, "display": CATEGORY_DISPLAY[m.category]}]}
            ],
            "code": codeable(m.concept),
            "subject": self.ref("Patient", patient_id),
            "encounter": self.ref("Encounter", encounter_id),
            "effectiveDateTime": self.instant(when),
            "valueQuantity": {
                "value": _round(value, decimals),
                "unit": unit.display,
                "system": UCUM,
                "code": unit.code,
            },
        }
        if m.category == "laboratory":
            resource["issued"] = self.instant(when + 2700)  # results are released ~45 minutes later
        return resource

    def blood_pressure(
        self, observation_id: str, patient_id: str, encounter_id: str, when: float, systolic: float, diastolic: float
    ) -> dict[str, Any]:
        mmhg = UNITS["mm[Hg]"]
        return {
            "resourceType": "Observation",
            "id": observation_id,
            "status": "final",
            "category": [{"coding": [{"system": OBS_CATEGORY, "code": "vital-signs", "display": "Vital Signs"}]}],
            "code": codeable(concept(BP_PANEL_CONCEPT_ID)),
            "subject": self.ref("Patient", patient_id),
            "encounter": self.ref("Encounter", encounter_id),
            "effectiveDateTime": self.instant(when),
            "component": [
                {
                    "code": codeable(MEASUREMENTS[key].concept),
                    "valueQuantity": {
                        "value": round(float(v)),
                        "unit": mmhg.display,
                        "system": UCUM,
                        "code": mmhg.code,
                    },
                }
                for key, v in (("sbp", systolic), ("dbp", diastolic))
            ],
        }

    def condition(
        self,
        condition_id: str,
        patient_id: str,
        encounter_id: str | None,
        code: ConditionCode,
        category: str,
        onset: str,
        recorded: float,
        abatement: float | None = None,
    ) -> dict[str, Any]:
        resource: dict[str, Any] = {
            "resourceType": "Condition",
            "id": condition_id,
            "clinicalStatus": {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                        "code": "resolved" if abatement is not None else "active",
                    }
                ]
            },
            "verificationStatus": {
                "coding": [
                    {"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status", "code": "confirmed"}
                ]
            },
            "category": [
                {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-category", "code": category}]}
            ],
            "code": codeable(code.for_site(self.profile)),
            "subject": self.ref("Patient", patient_id),
            "onsetDateTime": onset,
            "recordedDate": self.instant(recorded),
        }
        if encounter_id is not None:
            resource["encounter"] = self.ref("Encounter", encounter_id)
        if abatement is not None:
            resource["abatementDateTime"] = self.instant(abatement)
        return resource

    def medication_request(
        self,
        request_id: str,
        patient_id: str,
        encounter_id: str,
        drug: DrugCode,
        authored: float,
        status: str,
        frequency_per_day: float,
    ) -> dict[str, Any]:
        unit = UNITS[drug.dose_unit]
        period_hours = 24 / frequency_per_day
        return {
            "resourceType": "MedicationRequest",
            "id": request_id,
            "status": status,
            "intent": "order",
            "medicationCodeableConcept": codeable(drug.for_site(self.profile)),
            "subject": self.ref("Patient", patient_id),
            "encounter": self.ref("Encounter", encounter_id),
            "authoredOn": self.instant(authored),
            "dosageInstruction": [
                {
                    "text": f"{_round(drug.dose, 1)} {unit.display} {drug.route} every {_round(period_hours, 1)} hours",
                    "timing": {"repeat": {"frequency": 1, "period": _round(period_hours, 1), "periodUnit": "h"}},
                    "route": {"text": drug.route},
                    "doseAndRate": [
                        {
                            "doseQuantity": {
                                "value": _round(drug.dose, 2),
                                "unit": unit.display,
                                "system": UCUM,
                                "code": unit.code,
                            }
                        }
                    ],
                }
            ],
        }

    def medication_administration(
        self,
        administration_id: str,
        patient_id: str,
        encounter_id: str,
        request_id: str,
        drug: DrugCode,
        when: float,
        dose: float | None,
        until: float | None = None,
    ) -> dict[str, Any]:
        resource: dict[str, Any] = {
            "resourceType": "MedicationAdministration",
            "id": administration_id,
            "status": "completed" if until is not None or dose is not None else "in-progress",
            "medicationCodeableConcept": codeable(drug.for_site(self.profile)),
            "subject": self.ref("Patient", patient_id),
            "context": self.ref("Encounter", encounter_id),
            "request": self.ref("MedicationRequest", request_id),
        }
        if until is not None:
            resource["effectivePeriod"] = {"start": self.instant(when), "end": self.instant(until)}
            resource["dosage"] = {
                "text": "continuous infusion titrated to mean arterial pressure >= 65 mmHg",
                "route": {"text": drug.route},
            }
        else:
            resource["effectiveDateTime"] = self.instant(when)
            if dose is not None:
                unit = UNITS[drug.dose_unit]
                resource["dosage"] = {
                    "route": {"text": drug.route},
                    "dose": {"value": _round(dose, 2), "unit": unit.display, "system": UCUM, "code": unit.code},
                }
        return resource

    def procedure(
        self, procedure_id: str, patient_id: str, encounter_id: str, concept_id: int, when: float
    ) -> dict[str, Any]:
        return {
            "resourceType": "Procedure",
            "id": procedure_id,
            "status": "completed",
            "code": codeable(concept(concept_id)),
            "subject": self.ref("Patient", patient_id),
            "encounter": self.ref("Encounter", encounter_id),
            "performedDateTime": self.instant(when),
        }


def _round(value: float, decimals: int) -> float | int:
    """JSON-friendly rounding: integers stay integers."""
    if decimals <= 0:
        return round(float(value))
    return round(float(value), decimals)
