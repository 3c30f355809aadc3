"""The generator speaks the vocabulary: every clinical code and unit it emits is a real concept from the
bundled subset (core_concepts.csv plus the verified procedure concepts), in the right domain. The only
exceptions are the records the ground truth lists as invalid_code defects, and those break the code
system's own format rule."""

from __future__ import annotations

import csv
from pathlib import Path

import orjson

from omop_etl.vocabulary import FHIR_SYSTEM_BY_VOCABULARY, bundled_catalog, is_valid_loinc, is_valid_snomed
from tests.fhir_export import defect_keys, lines, sites
from tests.shared_data import shared_path

CODED = {
    "Observation": ("Measurement",),
    "Condition": ("Condition",),
    "MedicationRequest": ("Drug",),
    "MedicationAdministration": ("Drug",),
    "Procedure": ("Procedure",),
}


def _codings(resource: dict) -> list[tuple[dict, str]]:
    """(coding, where) pairs of the clinical codes and units in a resource."""
    found = []
    holder = resource.get("code") or resource.get("medicationCodeableConcept")
    if holder:
        found += [(c, "code") for c in holder["coding"]]
    for component in resource.get("component", []):
        found += [(c, "component") for c in component["code"]["coding"]]
        quantity = component["valueQuantity"]
        found.append(({"system": quantity["system"], "code": quantity["code"]}, "unit"))
    quantity = resource.get("valueQuantity")
    if quantity:
        found.append(({"system": quantity["system"], "code": quantity["code"]}, "unit"))
    return found


def test_every_emitted_code_is_a_bundled_concept_of_the_right_domain(medium_consortium):
    catalog = bundled_catalog()
    checked = 0
    for site_id, export_dir, truth in sites(medium_consortium):
        invalid = defect_keys(truth, {"invalid_code"})
        skip = defect_keys(truth, {"malformed_json"})
        for resource_type, domains in CODED.items():
            for number, line in lines(export_dir, resource_type):
                key = (f"{resource_type}.ndjson", number)
                if key in skip:
                    continue
                resource = orjson.loads(line)
                for coding, where in _codings(resource):
                    concept = catalog.by_fhir_coding(coding["system"], coding["code"])
                    if where == "code" and key in invalid:
                        assert concept is None, f"{site_id} {key}: defect code {coding['code']} is a real concept"
                        continue
                    assert concept is not None, f"{site_id} {key}: {coding} is not in the bundled vocabulary"
                    expected = ("Unit",) if where == "unit" else ("Measurement",) if where == "component" else domains
                    assert concept.domain_id in expected, f"{site_id} {key}: {concept} is not in {expected}"
                    if "display" in coding:
                        assert coding["display"] == concept.concept_name
                    checked += 1
    assert checked > 100_000


def test_invalid_codes_break_their_code_system_rule(medium_consortium):
    for site_id, export_dir, truth in sites(medium_consortium):
        records = [d for d in truth["defects"]["records"] if d["kind"] == "invalid_code"]
        assert records, f"{site_id} has no invalid_code defect"
        wanted = {(d["file"], d["line"]) for d in records}
        for resource_type in CODED:
            for number, line in lines(export_dir, resource_type):
                if (f"{resource_type}.ndjson", number) not in wanted:
                    continue
                record = orjson.loads(line)
                coding = (record.get("code") or record["medicationCodeableConcept"])["coding"][0]
                if coding["system"] == FHIR_SYSTEM_BY_VOCABULARY["LOINC"]:
                    assert not is_valid_loinc(coding["code"])
                elif coding["system"] == FHIR_SYSTEM_BY_VOCABULARY["SNOMED"]:
                    assert not is_valid_snomed(coding["code"])
                else:
                    assert not coding["code"].isdigit()


def test_bundled_core_concepts_are_the_shared_reference_file():
    """The package ships the team's core_concepts.csv unchanged (when the reference copy is available)."""
    shared = shared_path("omop", "core_concepts.csv")
    bundled = Path(__file__).resolve().parents[1] / "omop_etl" / "vocabulary" / "core_concepts.csv"
    rows = list(csv.DictReader(bundled.open(encoding="utf-8")))
    assert len(rows) == 171
    if shared.exists():
        assert shared.read_bytes() == bundled.read_bytes()


def test_every_bundled_loinc_and_snomed_code_passes_its_check_digit():
    for concept in bundled_catalog():
        if concept.vocabulary_id == "LOINC":
            assert is_valid_loinc(concept.concept_code), concept
        if concept.vocabulary_id == "SNOMED":
            assert is_valid_snomed(concept.concept_code), concept


def test_check_digit_rules_reject_single_digit_typos():
    assert is_valid_loinc("8867-4") and not is_valid_loinc("8867-5") and not is_valid_loinc("8876-4")
    assert is_valid_snomed("44054006") and not is_valid_snomed("44054007") and not is_valid_snomed("44045006")
    assert not is_valid_loinc("abc-1") and not is_valid_snomed("0123")
