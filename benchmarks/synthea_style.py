"""Turn a Bulk Data export into Synthea-style input: one FHIR transaction Bundle per patient.

Synthea writes one Bundle per patient with `urn:uuid:` fullUrls and references; hospitals that export
per patient do the same. The benchmark loads the same data both ways. Broken NDJSON lines are left out
(a Bundle must be valid JSON as a whole).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import orjson

SHARED = ("Organization", "Location", "Practitioner")


def _patient_of(resource: dict) -> str | None:
    if resource["resourceType"] == "Patient":
        return resource.get("id")
    for element in ("subject", "patient"):
        reference = (resource.get(element) or {}).get("reference", "")
        if reference.startswith("Patient/"):
            return reference.split("/", 1)[1]
    return None


def _urn(resource_type: str, resource_id: str) -> str:
    return f"urn:uuid:{resource_id}" if len(resource_id) == 36 else f"urn:uuid:{resource_type}-{resource_id}"


def _rewrite(node, targets: dict[str, str]):
    if isinstance(node, dict):
        return {k: (targets.get(v, v) if k == "reference" and isinstance(v, str) else _rewrite(v, targets))
                for k, v in node.items()}  # fmt: skip
    if isinstance(node, list):
        return [_rewrite(x, targets) for x in node]
    return node


def write_bundles(export_dir: Path, out_dir: Path) -> int:
    """Write one transaction Bundle per patient (plus one with the shared resources); returns bundle count."""
    out_dir.mkdir(parents=True, exist_ok=True)
    by_patient: dict[str | None, list[dict]] = defaultdict(list)
    for path in sorted(export_dir.glob("*.ndjson")):
        for line in path.open("rb"):
            try:
                resource = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            key = None if resource.get("resourceType") in SHARED else _patient_of(resource)
            by_patient[key].append(resource)
    targets = {f"{r['resourceType']}/{r['id']}": _urn(r["resourceType"], r["id"])
               for items in by_patient.values() for r in items if r.get("id")}  # fmt: skip
    count = 0
    for patient, items in by_patient.items():
        entries = [
            {"fullUrl": targets[f"{r['resourceType']}/{r['id']}"], "resource": _rewrite(r, targets),
             "request": {"method": "POST", "url": r["resourceType"]}}
            for r in items if r.get("id")
        ]  # fmt: skip
        name = "shared-resources" if patient is None else f"patient-{patient}"
        (out_dir / f"{name}.json").write_bytes(orjson.dumps({"resourceType": "Bundle", "type": "transaction",
                                                             "entry": entries}))  # fmt: skip
        count += 1
    return count
