"""The lean validators check the mapped elements by the R4B definitions: on real exports they accept and
reject exactly what the full fhir.resources R4B models accept and reject (calendar-date validity is
checked one step later, when dates are converted)."""

from __future__ import annotations

import orjson
import pytest
from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

from omop_etl.fhir.lean import lean_validator
from omop_etl.fhir.mappers import MAPPERS
from tests import fhir_samples as S
from tests.fhir_export import lines, sites


def _ok(validate, raw: bytes) -> bool:
    try:
        validate(raw)
    except (ValidationError, orjson.JSONDecodeError):
        return False
    return True


def test_lean_and_full_r4b_validation_agree_on_every_exported_record(small_consortium):
    compared = 0
    for site_id, export_dir, truth in sites(small_consortium):
        calendar = {(d["file"], d["line"]) for d in truth["defects"]["records"] if d["kind"] == "invalid_date"}
        for resource_type, mapper in MAPPERS.items():
            path = export_dir / f"{resource_type}.ndjson"
            if not path.exists():
                continue
            full = get_fhir_model_class(resource_type)
            for number, raw in lines(export_dir, resource_type):
                lean_ok = _ok(mapper.validator.validate_json, raw)
                full_ok = _ok(lambda r, m=full: m.model_validate(orjson.loads(r)), raw)
                if (f"{resource_type}.ndjson", number) in calendar:
                    assert lean_ok and not full_ok
                else:
                    assert lean_ok == full_ok, (site_id, resource_type, number)
                compared += 1
    assert compared > 20_000


def test_lean_validation_keeps_r4_types_and_cardinality():
    validator = MAPPERS["Observation"].validator
    good = orjson.dumps(S.GLUCOSE_MMOL)
    assert validator.validate_json(good)["valueQuantity"]["value"] == 5.5
    as_string = {**S.GLUCOSE_MMOL, "valueQuantity": {**S.GLUCOSE_MMOL["valueQuantity"], "value": "5.5"}}
    empty_list = {**S.GLUCOSE_MMOL, "category": []}
    bad_date = {**S.GLUCOSE_MMOL, "effectiveDateTime": "2024-03-01 06:00"}
    no_code = {k: v for k, v in S.GLUCOSE_MMOL.items() if k != "code"}
    for broken in (as_string, empty_list, bad_date, no_code):
        with pytest.raises(ValidationError):
            validator.validate_json(orjson.dumps(broken))
    extra = {**S.GLUCOSE_MMOL, "note": [{"text": "not mapped, not checked"}], "interpretation": "whatever"}
    assert "note" not in validator.validate_json(orjson.dumps(extra))


def test_a_required_choice_element_is_enforced():
    request = MAPPERS["MedicationRequest"].validator
    without = {k: v for k, v in S.PRESCRIPTION.items() if k != "medicationCodeableConcept"}
    with pytest.raises(ValidationError, match="medicationCodeableConcept, medicationReference"):
        request.validate_json(orjson.dumps(without))
    with_reference = {**without, "medicationReference": {"reference": "Medication/m1"}}
    assert request.validate_json(orjson.dumps(with_reference))["medicationReference"]


def test_specs_name_only_elements_that_exist_in_r4():
    with pytest.raises(KeyError, match="no element 'effectiveDate'"):
        lean_validator("Observation", {"effectiveDate": True})
