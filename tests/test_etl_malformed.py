"""Malformed input never aborts a load: each broken record is quarantined with its file, position, rule
and a sentence; a damaged file (cut-off gzip, not gzip at all) keeps the records before the damage and is
reported as one quarantined record naming the file; the load goes on with the other files; and the
report still reconciles (input = loaded + quarantined + skipped + excluded).

These are the findings of an independent probe ("no traceback on bad input"), one test each, plus a
property-based test that throws random JSON at the FHIR reader."""

from __future__ import annotations

import gzip
import json
import tempfile
import zlib
from pathlib import Path

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from omop_etl.database import open_engine
from omop_etl.fhir.extract import extract_bundle, extract_ndjson
from omop_etl.fhir.json_input import MAX_LINE_BYTES, duplicate_keys
from omop_etl.load.batches import Batch
from omop_etl.load.pipeline import EtlSettings, run_etl
from omop_etl.load.sources import InputFile, batches
from tests import fhir_samples as S
from tests.etl_helpers import count, load


def _load(folder: Path, files: dict[str, bytes], **options):
    """Write `files` into folder/export and load them into a new SQLite database there."""
    export = folder / "export"
    export.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (export / name).write_bytes(content)
    url = f"sqlite:///{folder / 'omop.sqlite'}"
    return load([export], url, folder / "secret", **options), url


def _quarantine(url: str) -> list:
    engine = open_engine(url)
    with engine.connect() as connection:
        rows = connection.execute(
            text(
                "SELECT file, position_kind, position, resource_type, rule, detail, raw FROM twinfed_quarantine "
                "ORDER BY file, position"
            )
        ).all()
    engine.dispose()
    return rows


def _reconciles(report) -> None:
    assert report.reconciles
    parts = report.loaded.total + report.quarantined.total + report.skipped.total + report.excluded.total
    assert report.input.total == parts


def _ndjson(*resources: dict) -> bytes:
    return b"".join(orjson.dumps(r) + b"\n" for r in resources)


def _bundle(*entries: object) -> bytes:
    return orjson.dumps({"resourceType": "Bundle", "type": "collection", "entry": list(entries)})


# Finding 1: a resource whose resourceType is not a string, and a Bundle entry with a numeric fullUrl.


def test_a_resource_type_that_is_not_a_string_is_quarantined(tmp_path):
    lines = _ndjson(S.PATIENT, {"resourceType": 123}, {"resourceType": ["Patient"], "id": "p9"}, {**S.PATIENT, "id": 7})
    report, url = _load(tmp_path, {"Patient.ndjson": lines, "mixed.json": _bundle({"resource": {"resourceType": 123}})})
    _reconciles(report)
    assert report.input.total == 5 and report.loaded.total == 1
    assert report.quarantine_by_rule == {"schema_violation": 4}
    rows = _quarantine(url)
    by_place = {(Path(r.file).name, r.position): r for r in rows}
    assert set(by_place) == {("Patient.ndjson", 2), ("Patient.ndjson", 3), ("Patient.ndjson", 4), ("mixed.json", 1)}
    for place in (("Patient.ndjson", 2), ("Patient.ndjson", 3), ("mixed.json", 1)):
        assert "resourceType" in by_place[place].detail and "not" in by_place[place].detail
    assert "id" in by_place[("Patient.ndjson", 4)].detail
    assert count(url, "person") == 1


def test_a_bundle_entry_with_a_numeric_full_url_is_quarantined_and_the_rest_loads(tmp_path):
    bundle = _bundle(
        {"fullUrl": 5, "resource": {**S.PATIENT, "id": "p2"}}, {"fullUrl": "Patient/p1", "resource": S.PATIENT}
    )
    report, url = _load(tmp_path, {"patients.json": bundle})
    _reconciles(report)
    assert report.loaded.total == 1 and report.quarantine_by_rule == {"schema_violation": 1}
    (row,) = _quarantine(url)
    assert (row.position_kind, row.position) == ("entry", 1)
    assert "fullUrl" in row.detail and "5" in row.detail
    assert count(url, "person") == 1


# Finding 2: a truncated .ndjson.gz ended the load with "Aborted." and no file name.


def _complete_lines(cut: bytes) -> int:
    """How many whole lines the readable part of a cut-off gzip stream holds."""
    return zlib.decompressobj(wbits=31).decompress(cut).count(b"\n")


def test_a_truncated_gzip_keeps_the_lines_before_the_damage_and_names_the_file(tmp_path):
    patients = [{**S.PATIENT, "id": f"p{i}", "birthDate": f"19{10 + i % 80}-01-01"} for i in range(400)]
    whole = gzip.compress(_ndjson(*patients))
    cut = whole[: len(whole) // 2]
    readable = _complete_lines(cut)
    assert 0 < readable < 400
    encounter = {**S.ENCOUNTER, "subject": {"reference": "Patient/p0"}}
    files = {"Organization.ndjson": _ndjson(S.ORG), "Patient.ndjson.gz": cut, "Encounter.ndjson": _ndjson(encounter)}
    report, url = _load(tmp_path, files)
    _reconciles(report)
    assert count(url, "person") == readable
    assert count(url, "visit_occurrence") == 1  # the load went on with the files after the damaged one
    assert count(url, "care_site") >= 1
    damaged = [r for r in _quarantine(url) if r.rule == "damaged_file"]
    assert len(damaged) == 1
    (row,) = damaged
    assert Path(row.file).name == "Patient.ndjson.gz" and row.position == readable + 1
    assert "Patient.ndjson.gz" in row.detail and f"line {row.position}" in row.detail and "copy" in row.detail.lower()


def test_a_truncated_gzip_bundle_keeps_the_entries_before_the_damage(tmp_path):
    patients = [{**S.PATIENT, "id": f"p{i}"} for i in range(300)]
    whole = gzip.compress(_bundle(*({"fullUrl": f"Patient/{p['id']}", "resource": p} for p in patients)))
    report, url = _load(tmp_path, {"site.json.gz": whole[: len(whole) // 2], "Organization.ndjson": _ndjson(S.ORG)},
                        exclude_opted_out=True)  # fmt: skip
    _reconciles(report)
    assert 0 < count(url, "person") < 300
    (row,) = [r for r in _quarantine(url) if r.rule == "damaged_file"]
    assert Path(row.file).name == "site.json.gz" and "site.json.gz" in row.detail
    assert report.loaded.by_resource_type["Patient"] == count(url, "person")


def test_json_that_breaks_part_way_keeps_the_bundle_entries_before_and_no_part_of_a_single_resource(tmp_path):
    bundle = _bundle({"resource": S.PATIENT}, {"resource": {**S.PATIENT, "id": "p2"}})
    broken = bundle[: bundle.index(b'"p2"')] + b"!" + bundle[bundle.index(b'"p2"') :]
    single = orjson.dumps(S.PATIENT)
    report, url = _load(tmp_path, {"a.json": broken, "b.json": single[: len(single) // 2]})
    _reconciles(report)
    assert report.input.total == 3 and count(url, "person") == 1
    rows = {Path(r.file).name: r for r in _quarantine(url)}
    assert (rows["a.json"].position, rows["a.json"].rule) == (2, "malformed_json")
    assert "a.json cannot be read from entry 2 on" in rows["a.json"].detail
    assert "entries before were read" in rows["a.json"].detail
    assert (rows["b.json"].position, rows["b.json"].rule) == (1, "malformed_json")
    assert "ends in the middle" in rows["b.json"].detail


def test_a_file_that_is_not_gzip_at_all_is_reported_and_the_load_goes_on(tmp_path):
    files = {"Patient.ndjson.gz": _ndjson(S.PATIENT), "Organization.ndjson": _ndjson(S.ORG)}
    report, url = _load(tmp_path, files)
    _reconciles(report)
    (row,) = _quarantine(url)
    assert (Path(row.file).name, row.position, row.rule) == ("Patient.ndjson.gz", 1, "damaged_file")
    assert "gzip" in row.detail and "Patient.ndjson.gz" in row.detail
    assert report.loaded.by_resource_type == {"Organization": 1}


CSV_MAPPING = (
    "file: labs.csv\nkind: measurement\nid: lab_id\npatient: mrn\ncode: loinc\ncode_system: http://loinc.org\ntime: t\n"
)


def test_a_csv_row_that_is_not_utf8_is_quarantined_alone(tmp_path):
    rows = [f"L{i},p1,2345-7,2024-03-02\n".encode() for i in range(6)]
    rows[2] = b"L2,p1,2345-7,2024-03-\xff\xfe02\n"
    report, url = _load(tmp_path, {"Patient.ndjson": _ndjson(S.PATIENT), "labs.yaml": CSV_MAPPING.encode(),
                                   "labs.csv": b"lab_id,mrn,loinc,t\n" + b"".join(rows)})  # fmt: skip
    _reconciles(report)
    assert report.loaded.by_resource_type.get("CSV:measurement") == 5
    (row,) = _quarantine(url)
    assert (Path(row.file).name, row.position, row.rule) == ("labs.csv", 3, "invalid_encoding")
    assert "UTF-8" in row.detail and "column t" in row.detail


def test_a_file_that_cannot_be_opened_becomes_one_record_naming_the_file(tmp_path):
    # The suite runs as root, which can open any file; the state discover() records for a file it could not
    # open (InputFile.unreadable) is set directly here, and the rest of the path is the real one.
    path = tmp_path / "Patient.ndjson"
    path.write_bytes(_ndjson(S.PATIENT))
    source = InputFile(path, "ndjson", "Patient", path.stat().st_size, path.stat().st_mtime_ns)
    source.unreadable = "it cannot be read (Permission denied)"
    (batch,) = batches(source, 1, 100, set())
    out = extract_ndjson(batch)
    assert (out.positions, out.status, out.rule) == ([1], ["quarantined"], ["damaged_file"])
    assert "Patient.ndjson cannot be read from line 1 on: it cannot be read (Permission denied)" in out.detail[0]


# Finding 3: a Bundle whose `entry` is a string was counted as one record per character.


@pytest.mark.parametrize("entry", ["abc", {"resource": S.PATIENT}, 42])
def test_a_bundle_whose_entry_is_not_an_array_is_one_quarantined_record(tmp_path, entry):
    report, url = _load(
        tmp_path, {"b.json": orjson.dumps({"resourceType": "Bundle", "type": "collection", "entry": entry})}
    )
    _reconciles(report)
    assert report.input.total == 1 and report.quarantine_by_rule == {"schema_violation": 1}
    (row,) = _quarantine(url)
    assert "entry" in row.detail and "array" in row.detail


# Finding 4: a duplicated JSON key loaded whichever value came last.

DUPLICATE_GENDER = b'{"resourceType":"Patient","id":"p1","gender":"male","birthDate":"1950-01-01","gender":"nonsense"}'
SPACED_DUPLICATE = b'{ "resourceType" : "Patient", "id" : "p3", "gender" : "male", "gender" : "female" }'
NESTED_DUPLICATE = orjson.dumps(S.GLUCOSE_MMOL).replace(b'"value":5.5', b'"value":5.5,"value":55')


def test_duplicate_keys_quarantine_the_record_naming_the_key(tmp_path):
    other = orjson.dumps({**S.PATIENT, "id": "p2"})
    patients = b"\n".join((DUPLICATE_GENDER, other, SPACED_DUPLICATE)) + b"\n"
    bundle = (b'{"resourceType":"Bundle","type":"collection","entry":[{"fullUrl":"Patient/p4","resource":'
              + DUPLICATE_GENDER.replace(b'"p1"', b'"p4"') + b"}]}")  # fmt: skip
    files = {"Patient.ndjson": patients, "Observation.ndjson": NESTED_DUPLICATE + b"\n", "b.json": bundle}
    report, url = _load(tmp_path, files)
    _reconciles(report)
    assert report.quarantine_by_rule.get("duplicate_key") == 4
    rows = {(Path(r.file).name, r.position): r for r in _quarantine(url) if r.rule == "duplicate_key"}
    assert set(rows) == {("Patient.ndjson", 1), ("Patient.ndjson", 3), ("Observation.ndjson", 1), ("b.json", 1)}
    for place in (("Patient.ndjson", 1), ("Patient.ndjson", 3), ("b.json", 1)):
        assert "'gender'" in rows[place].detail
    assert "'value'" in rows[("Observation.ndjson", 1)].detail
    assert count(url, "person") == 1  # p2 only


def test_a_repeated_key_is_named_even_when_its_last_value_breaks_the_schema(tmp_path):
    line = b'{"resourceType":"Patient","id":"p1","gender":"female","birthDate":"1950-01-01","birthDate":"soon"}'
    report, url = _load(tmp_path, {"Patient.ndjson": line + b"\n"})
    _reconciles(report)
    assert report.quarantine_by_rule == {"duplicate_key": 1}
    assert "'birthDate'" in _quarantine(url)[0].detail


@settings(max_examples=300, deadline=None)
@given(
    value=st.dictionaries(st.text(max_size=5), st.recursive(st.none() | st.text(max_size=6) | st.integers(),
                          lambda inner: st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=6),
                          min_size=1, max_size=5),
    spacing=st.sampled_from([(",", ":"), (", ", ": "), (" ,", " : ")]),
    repeat=st.booleans(),
    ascii_only=st.booleans(),
)  # fmt: skip
def test_the_cheap_duplicate_count_misses_no_repeated_key(value, spacing, repeat, ascii_only):
    text = json.dumps(value, separators=spacing, ensure_ascii=ascii_only)
    key = next(iter(value))
    if repeat:  # the first key once more at the end, with another value
        text = text[:-1] + spacing[0] + json.dumps(key, ensure_ascii=ascii_only) + spacing[1] + '"again"}'
    assert duplicate_keys(text.encode()) == ([key] if repeat else [])


# Finding 5 (the reading part): an NDJSON line longer than any FHIR resource is not read into memory whole.


def test_an_over_long_line_in_gzip_ndjson_is_quarantined_and_the_next_line_loads(tmp_path):
    huge = {**S.GLUCOSE_MMOL, "id": "huge", "note": [{"text": "x" * (MAX_LINE_BYTES + 10)}]}
    content = gzip.compress(_ndjson(S.PATIENT) + _ndjson(huge) + _ndjson({**S.PATIENT, "id": "p2"}), compresslevel=1)
    report, url = _load(tmp_path, {"Patient.ndjson.gz": content})
    _reconciles(report)
    assert report.loaded.total == 2 and report.quarantine_by_rule == {"line_too_long": 1}
    (row,) = _quarantine(url)
    assert (row.position, row.resource_type) == (2, "Observation")
    assert "line 2" in row.detail and "MiB" in row.detail and row.raw is None


# The reader under random input: never raises, and every record is accounted for.


def _dumps(value: object) -> bytes:
    """JSON as an export tool might write it: stdlib json takes integers beyond 64 bits and writes Infinity."""
    return json.dumps(value).encode()


_SCALARS = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8)
_JSON = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
_TYPES = st.sampled_from(
    ["Patient", "Observation", "Encounter", "Condition", "Bundle", "CarePlan", 7, None, ["Patient"]]
)
_FIELDS = st.sampled_from(["id", "gender", "birthDate", "subject", "code", "status", "valueQuantity", "entry"])
_RESOURCES = st.builds(
    lambda kind, fields, extra: {**({"resourceType": kind} if kind is not None else {}), **dict(fields), **extra},
    _TYPES,
    st.lists(st.tuples(_FIELDS, _JSON), max_size=4),
    st.sampled_from([{}, {"id": "p1"}, {"subject": {"reference": "Patient/p1"}}]),
)
_LINE = _RESOURCES.map(_dumps) | _JSON.map(_dumps) | st.binary(max_size=40)


def _line_ok(line: bytes) -> bytes:
    return line.replace(b"\n", b" ").replace(b"\r", b" ")


@settings(max_examples=300, deadline=None)
@given(lines=st.lists(_LINE, max_size=8), hint=st.sampled_from([None, "Patient", "Observation"]))
def test_fuzz_the_ndjson_reader_accounts_for_every_line(lines, hint):
    lines = [_line_ok(line) + b"\n" for line in lines]
    out = extract_ndjson(Batch(1, "fuzz.ndjson", 0, "ndjson", 1, lines=lines, type_hint=hint))
    assert sorted(out.positions) == [n for n, line in enumerate(lines, start=1) if line.strip()]
    assert all(isinstance(t, str) for t in out.types) and set(out.status) <= {"pending", "quarantined", "skipped"}


@settings(max_examples=300, deadline=None)
@given(entries=st.lists(st.one_of(_JSON, st.builds(lambda r, u: {"resource": r, "fullUrl": u}, _RESOURCES, _SCALARS)),
                        max_size=6))  # fmt: skip
def test_fuzz_the_bundle_reader_accounts_for_every_entry(tmp_path_factory, entries):
    path = tmp_path_factory.mktemp("fuzz") / "b.json"
    path.write_bytes(_dumps({"resourceType": "Bundle", "type": "collection", "entry": entries}))
    out = extract_bundle(Batch(1, str(path), 0, "bundle", 1))
    assert sorted(out.positions) == list(range(1, len(entries) + 1))
    assert all(isinstance(t, str) for t in out.types)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(_LINE, min_size=1, max_size=6), entries=st.lists(_RESOURCES, max_size=4))
def test_fuzz_a_whole_load_never_raises_and_reconciles(tmp_path_factory, lines, entries):
    folder = tmp_path_factory.mktemp("load")
    ndjson = b"".join(_line_ok(line) + b"\n" for line in lines)
    bundle = _dumps({"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in entries]})
    cut = gzip.compress(ndjson)[:-5]  # the whole text, but not the gzip trailer: one damage record after it
    report, _ = _load(folder, {"Patient.ndjson": ndjson, "b.json": bundle, "Observation.ndjson.gz": cut})
    _reconciles(report)
    non_blank = sum(1 for line in ndjson.splitlines() if line.strip())
    assert report.input.total == 2 * non_blank + 1 + len(entries)


def test_worker_processes_read_damaged_files_the_same_way(tmp_path):
    patients = [{**S.PATIENT, "id": f"p{i}"} for i in range(200)]
    whole = gzip.compress(_bundle(*({"fullUrl": f"Patient/{p['id']}", "resource": p} for p in patients)))
    lines = gzip.compress(_ndjson(*({**S.GLUCOSE_MMOL, "id": f"g{i}", "subject": {"reference": f"Patient/p{i}"}}
                                    for i in range(200))))  # fmt: skip
    files = {"site.json.gz": whole[: len(whole) * 2 // 3], "Observation.ndjson.gz": lines[: len(lines) // 2],
             "dup.json": _bundle({"resource": orjson.loads(DUPLICATE_GENDER.replace(b'"p1"', b'"p9"'))})}  # fmt: skip
    one, _ = _load(tmp_path / "one", files)
    export = tmp_path / "one" / "export"
    two = run_etl([export], EtlSettings(db_url=f"sqlite:///{tmp_path / 'two.sqlite'}", secret_file=tmp_path / "s",
                                        workers=2))  # fmt: skip
    _reconciles(two)
    for part in ("input", "loaded", "quarantined", "skipped", "excluded"):
        assert getattr(two, part) == getattr(one, part), part
    assert two.quarantine_by_rule == one.quarantine_by_rule and one.quarantine_by_rule["damaged_file"] == 2


def _sample_bundle() -> bytes:
    """The sample resources as one Synthea-style Bundle (urn:uuid references), as bytes."""
    with tempfile.TemporaryDirectory() as folder:
        return S.write_bundle(Path(folder) / "b.json", S.ALL).read_bytes()


_CUT_BUNDLE = _sample_bundle()


@settings(max_examples=200, deadline=None)
@given(cut=st.integers(0, len(_CUT_BUNDLE)), pretty=st.booleans())
def test_fuzz_a_bundle_cut_at_any_byte_keeps_the_entries_before_and_one_damage_record(tmp_path_factory, cut, pretty):
    data = orjson.dumps(orjson.loads(_CUT_BUNDLE), option=orjson.OPT_INDENT_2) if pretty else _CUT_BUNDLE
    cut = min(cut, len(data))
    path = tmp_path_factory.mktemp("cut") / "b.json"
    path.write_bytes(data[:cut])
    out = extract_bundle(Batch(1, str(path), 0, "bundle", 1))
    damaged = [i for i, rule in enumerate(out.rule) if rule == "malformed_json"]
    if cut == len(data):
        assert sorted(out.positions) == list(range(1, len(S.ALL) + 1)) and not damaged
    else:
        assert len(damaged) == 1
        assert sorted(out.positions) == list(range(1, out.positions[damaged[0]] + 1))
        assert "b.json cannot be read from entry" in (out.detail[damaged[0]] or "")


_GZ_LINES = gzip.compress(_ndjson(*({**S.PATIENT, "id": f"p{i}"} for i in range(40))))


@settings(max_examples=200, deadline=None)
@given(cut=st.integers(0, len(_GZ_LINES)), batch_size=st.sampled_from([7, 100]))
def test_fuzz_a_gzip_ndjson_cut_at_any_byte_accounts_for_every_line_read(tmp_path_factory, cut, batch_size):
    path = tmp_path_factory.mktemp("cut") / "Patient.ndjson.gz"
    path.write_bytes(_GZ_LINES[:cut])
    source = InputFile(path, "ndjson", "Patient", cut, path.stat().st_mtime_ns)
    outs = [extract_ndjson(batch) for batch in batches(source, 1, batch_size, set())]
    positions = sorted(p for out in outs for p in out.positions)
    rules = [rule for out in outs for rule in out.rule]
    assert positions == list(range(1, len(positions) + 1))
    if cut == len(_GZ_LINES):
        assert len(positions) == 40 and rules.count("damaged_file") == 0
    else:
        assert rules.count("damaged_file") == 1 and rules[-1] == "damaged_file" and len(positions) <= 41
