"""Test helpers that read a synthetic consortium back from disk, independently of the generator's internals."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import orjson

from synthetic.writer import EXPORT_TYPES

TYPES = EXPORT_TYPES  # the ten resource types of a Bulk Data export, as the writer names them


def index(out: Path) -> dict:
    return orjson.loads((out / "consortium.json").read_bytes())


def sites(out: Path) -> list[tuple[str, Path, dict]]:
    """(site_id, export folder, ground truth) for every site."""
    data = index(out)
    return [
        (s["site_id"], out / s["fhir_export"], orjson.loads((out / s["ground_truth"]).read_bytes()))
        for s in data["sites"]
    ]


def lines(export_dir: Path, resource_type: str) -> Iterator[tuple[int, bytes]]:
    with (export_dir / f"{resource_type}.ndjson").open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            yield number, line.rstrip(b"\n")


def resources(export_dir: Path, resource_type: str) -> Iterator[dict]:
    """Every parseable, first-seen record of a type (broken lines and duplicate copies skipped)."""
    seen: set[str] = set()
    for _, line in lines(export_dir, resource_type):
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if record.get("id") in seen:
            continue
        seen.add(record.get("id"))
        yield record


def defect_keys(truth: dict, kinds: set[str] | None = None) -> set[tuple[str, int]]:
    return {(d["file"], d["line"]) for d in truth["defects"]["records"] if kinds is None or d["kind"] in kinds}


def clean_resources(export_dir: Path, resource_type: str, truth: dict) -> Iterator[dict]:
    """Records of a type without any injected defect (what a careful ETL would load)."""
    broken = {d["resource_id"] for d in truth["defects"]["records"] if d["kind"] != "duplicate"}
    for record in resources(export_dir, resource_type):
        if record.get("id") not in broken:
            yield record
