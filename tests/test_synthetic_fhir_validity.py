"""Every generated resource is FHIR R4: it validates against fhir.resources.R4B, except the records the
ground truth lists as deliberately broken, which must fail in exactly the documented way."""

from __future__ import annotations

import orjson
import pytest
from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

from tests.fhir_export import TYPES, defect_keys, lines, sites

STRUCTURAL = {"malformed_json", "schema_violation", "invalid_date"}


def test_every_resource_validates_against_r4b_except_the_structural_defects(small_consortium):
    validated = 0
    for site_id, export_dir, truth in sites(small_consortium):
        broken = {(d["file"], d["line"]): d["kind"] for d in truth["defects"]["records"] if d["kind"] in STRUCTURAL}
        failures = []
        for resource_type in TYPES:
            model = get_fhir_model_class(resource_type)
            for number, line in lines(export_dir, resource_type):
                key = (f"{resource_type}.ndjson", number)
                try:
                    model.model_validate(orjson.loads(line))
                    ok = True
                except (orjson.JSONDecodeError, ValidationError):
                    ok = False
                validated += 1
                if ok == (key in broken):
                    failures.append((key, broken.get(key, "clean")))
        assert not failures, f"{site_id}: validity disagrees with the ground truth for {failures[:5]}"
    assert validated > 20_000


def test_structural_defects_exist_in_every_site_and_are_not_parseable_as_r4b(small_consortium):
    for site_id, export_dir, truth in sites(small_consortium):
        keys = defect_keys(truth, STRUCTURAL)
        assert keys, f"{site_id} has no structural defect to exercise the ETL's quarantine"
        by_file: dict[str, set[int]] = {}
        for file, line in keys:
            by_file.setdefault(file, set()).add(line)
        for file, numbers in by_file.items():
            resource_type = file.removesuffix(".ndjson")
            model = get_fhir_model_class(resource_type)
            for number, line in lines(export_dir, resource_type):
                if number in numbers:
                    with pytest.raises((orjson.JSONDecodeError, ValidationError)):
                        model.model_validate(orjson.loads(line))


def test_the_bulk_manifest_lists_every_file_with_its_line_count(small_consortium):
    for _, export_dir, truth in sites(small_consortium):
        manifest = orjson.loads((export_dir / "manifest.json").read_bytes())
        listed = {entry["url"]: entry["count"] for entry in manifest["output"]}
        actual = {f"{t}.ndjson": sum(1 for _ in lines(export_dir, t)) for t in TYPES}
        assert listed == {k: v for k, v in actual.items() if v}
        assert truth["export_files"] == actual
        assert manifest["transactionTime"].startswith(truth["export_date"])
