"""Hand-written FHIR R4 resources for mapping tests (what a hospital's export could contain)."""

from __future__ import annotations

import uuid
from pathlib import Path

import orjson

ORG = {
    "resourceType": "Organization",
    "id": "org1",
    "name": "Test Hospital",
    "address": [{"city": "Utrecht", "country": "NL"}],
}
WARD = {
    "resourceType": "Location",
    "id": "icu",
    "name": "Intensive Care Unit",
    "managingOrganization": {"reference": "Organization/org1"},
}
DOCTOR = {"resourceType": "Practitioner", "id": "dr1", "gender": "female", "name": [{"family": "Doctorow"}]}
PATIENT = {
    "resourceType": "Patient",
    "id": "p1",
    "gender": "female",
    "birthDate": "1950-04-03",
    "deceasedDateTime": "2024-03-05T10:00:00+01:00",
    "name": [{"family": "Verysecretname", "given": ["Anna"]}],
    "telecom": [{"system": "phone", "value": "+31-6-5550199"}],
    "address": [{"line": ["Kerkstraat 12"], "city": "Utrecht", "postalCode": "3511AB"}],
    "identifier": [{"type": {"coding": [{"code": "MR"}]}, "system": "urn:mrn", "value": "MRN998877"}],
    "extension": [
        {
            "url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race",
            "extension": [
                {
                    "url": "ombCategory",
                    "valueCoding": {"system": "urn:oid:2.16.840.1.113883.6.238", "code": "2106-3", "display": "White"},
                }
            ],
        }
    ],
    "managingOrganization": {"reference": "Organization/org1"},
}
ENCOUNTER = {
    "resourceType": "Encounter",
    "id": "e1",
    "status": "finished",
    "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP"},
    "subject": {"reference": "Patient/p1"},
    "period": {"start": "2024-03-01T08:00:00+01:00", "end": "2024-03-05T10:00:00+01:00"},
    "hospitalization": {
        "admitSource": {"coding": [{"code": "emd"}]},
        "dischargeDisposition": {"coding": [{"code": "exp"}]},
    },
    "location": [
        {
            "location": {"reference": "Location/icu"},
            "period": {"start": "2024-03-01T12:00:00+01:00", "end": "2024-03-03T12:00:00+01:00"},
        }
    ],
    "serviceProvider": {"reference": "Organization/org1"},
    "participant": [{"individual": {"reference": "Practitioner/dr1"}}],
}
CONDITION = {
    "resourceType": "Condition",
    "id": "c1",
    "verificationStatus": {"coding": [{"code": "confirmed"}]},
    "category": [{"coding": [{"code": "encounter-diagnosis"}]}],
    "code": {"coding": [{"system": "http://snomed.info/sct", "code": "91302008", "display": "Sepsis"}]},
    "subject": {"reference": "Patient/p1"},
    "encounter": {"reference": "Encounter/e1"},
    "onsetDateTime": "2024-03-01T08:00:00+01:00",
}
PROBLEM = {
    "resourceType": "Condition",
    "id": "c2",
    "category": [{"coding": [{"code": "problem-list-item"}]}],
    "code": {
        "coding": [
            {"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "E11.9"},
            {"system": "http://snomed.info/sct", "code": "44054006"},
        ]
    },
    "subject": {"reference": "Patient/p1"},
    "onsetDateTime": "2010-06",
}
BP = {
    "resourceType": "Observation",
    "id": "bp1",
    "status": "final",
    "category": [{"coding": [{"code": "vital-signs"}]}],
    "code": {"coding": [{"system": "http://loinc.org", "code": "85354-9"}]},
    "subject": {"reference": "Patient/p1"},
    "encounter": {"reference": "Encounter/e1"},
    "effectiveDateTime": "2024-03-01T09:00:00+01:00",
    "component": [
        {
            "code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]},
            "valueQuantity": {"value": 128, "unit": "mmHg", "system": "http://unitsofmeasure.org", "code": "mm[Hg]"},
        },
        {
            "code": {"coding": [{"system": "http://loinc.org", "code": "8462-4"}]},
            "valueQuantity": {"value": 79, "unit": "mmHg", "system": "http://unitsofmeasure.org", "code": "mm[Hg]"},
        },
    ],
}
GLUCOSE_MMOL = {
    "resourceType": "Observation",
    "id": "g1",
    "status": "final",
    "category": [{"coding": [{"code": "laboratory"}]}],
    "code": {"coding": [{"system": "http://loinc.org", "code": "2345-7"}]},
    "subject": {"reference": "Patient/p1"},
    "encounter": {"reference": "Encounter/e1"},
    "effectiveDateTime": "2024-03-01T06:00:00+01:00",
    "valueQuantity": {"value": 5.5, "unit": "mmol/L", "system": "http://unitsofmeasure.org", "code": "mmol/L"},
    "referenceRange": [{"low": {"value": 3.9}, "high": {"value": 7.8}}],
}
TEMPERATURE_F = {
    "resourceType": "Observation",
    "id": "t1",
    "status": "final",
    "category": [{"coding": [{"code": "vital-signs"}]}],
    "code": {"coding": [{"system": "http://loinc.org", "code": "8310-5"}]},
    "subject": {"reference": "Patient/p1"},
    "effectiveDateTime": "2024-03-02T06:00:00+01:00",
    "valueQuantity": {"value": 101.3, "unit": "degF", "system": "http://unitsofmeasure.org", "code": "[degF]"},
}
SMOKING = {  # unmapped LOINC code, social history -> observation with concept 0
    "resourceType": "Observation",
    "id": "s1",
    "status": "final",
    "category": [{"coding": [{"code": "social-history"}]}],
    "code": {"coding": [{"system": "http://loinc.org", "code": "72166-2"}]},
    "subject": {"reference": "Patient/p1"},
    "effectiveDateTime": "2023-05-01",
    "valueCodeableConcept": {"coding": [{"system": "http://snomed.info/sct", "code": "8517006"}]},
}
PRELIMINARY = {**GLUCOSE_MMOL, "id": "g2", "status": "preliminary"}
PRESCRIPTION = {
    "resourceType": "MedicationRequest",
    "id": "mr1",
    "status": "completed",
    "intent": "order",
    "medicationCodeableConcept": {
        "coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "6809"}]
    },
    "subject": {"reference": "Patient/p1"},
    "authoredOn": "2024-01-10",
    "dosageInstruction": [{"text": "500 mg twice daily"}],
    "dispenseRequest": {"expectedSupplyDuration": {"value": 30, "unit": "days"}, "numberOfRepeatsAllowed": 2},
}
ADMINISTRATION = {
    "resourceType": "MedicationAdministration",
    "id": "ma1",
    "status": "completed",
    "medicationCodeableConcept": {
        "coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "4603"}]
    },
    "subject": {"reference": "Patient/p1"},
    "context": {"reference": "Encounter/e1"},
    "effectiveDateTime": "2024-03-01T10:00:00+01:00",
    "dosage": {"dose": {"value": 40, "unit": "mg"}},
}
VACCINE = {
    "resourceType": "Immunization",
    "id": "im1",
    "status": "completed",
    "vaccineCode": {"coding": [{"system": "http://hl7.org/fhir/sid/cvx", "code": "140"}]},
    "patient": {"reference": "Patient/p1"},
    "occurrenceDateTime": "2023-10-01",
    "lotNumber": "LOT42",
}
PROCEDURE = {
    "resourceType": "Procedure",
    "id": "pr1",
    "status": "completed",
    "code": {"coding": [{"system": "http://snomed.info/sct", "code": "399208008"}]},
    "subject": {"reference": "Patient/p1"},
    "encounter": {"reference": "Encounter/e1"},
    "performedDateTime": "2024-03-01T09:30:00+01:00",
}
NOT_DONE = {**PROCEDURE, "id": "pr2", "status": "not-done"}
CONSENT = {
    "resourceType": "Consent",
    "id": "cs1",
    "status": "active",
    "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "research"}]},
    "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
    "patient": {"reference": "Patient/p1"},
    "dateTime": "2023-01-01T00:00:00+01:00",
    "policyRule": {"coding": [{"code": "OPTOUT"}]},
    "provision": {"type": "deny", "period": {"start": "2023-01-01"}},
}
CARE_PLAN = {
    "resourceType": "CarePlan",
    "id": "cp1",
    "status": "active",
    "intent": "plan",
    "subject": {"reference": "Patient/p1"},
}

ALL = [
    ORG,
    WARD,
    DOCTOR,
    PATIENT,
    ENCOUNTER,
    CONDITION,
    PROBLEM,
    BP,
    GLUCOSE_MMOL,
    TEMPERATURE_F,
    SMOKING,
    PRELIMINARY,
    PRESCRIPTION,
    ADMINISTRATION,
    VACCINE,
    PROCEDURE,
    NOT_DONE,
    CONSENT,
    CARE_PLAN,
]


def write_ndjson(folder: Path, resources: list[dict], manifest_date: str = "2025-01-01") -> Path:
    """Write resources as a Bulk Data export (one file per type) with a manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    by_type: dict[str, list[dict]] = {}
    for resource in resources:
        by_type.setdefault(resource["resourceType"], []).append(resource)
    for resource_type, items in by_type.items():
        (folder / f"{resource_type}.ndjson").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in items))
    (folder / "manifest.json").write_bytes(
        orjson.dumps({"transactionTime": f"{manifest_date}T00:00:00Z", "output": []})
    )
    return folder


def write_bundle(path: Path, resources: list[dict], bundle_type: str = "transaction") -> Path:
    """Write resources as one Bundle with urn:uuid references, the way Synthea does."""
    ids = {
        f"{r['resourceType']}/{r['id']}": f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, r['resourceType'] + r['id'])}"
        for r in resources
    }

    def rewrite(node):
        if isinstance(node, dict):
            return {
                k: (ids.get(v, v) if k == "reference" and isinstance(v, str) else rewrite(v)) for k, v in node.items()
            }
        if isinstance(node, list):
            return [rewrite(x) for x in node]
        return node

    entries = []
    for r in resources:
        url = ids[f"{r['resourceType']}/{r['id']}"]
        body = rewrite({k: v for k, v in r.items() if k != "id"})
        entries.append({"fullUrl": url, "resource": body, "request": {"method": "POST", "url": r["resourceType"]}})
    path.write_bytes(orjson.dumps({"resourceType": "Bundle", "type": bundle_type, "entry": entries}))
    return path
