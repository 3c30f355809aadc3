"""Benchmark: peak memory of `twinfed etl` against the size of its input, before and after the streaming reader.

An independent probe found a 21 MB Bundle taking 56 times its size in memory, and gzip NDJSON growing
with its longest line. This loads, in fresh subprocesses so each peak is the load's own (VmHWM):

* one ~21 MB FHIR Bundle (compact JSON: the first synthetic patients of seed 7 with all their resources);
* two gzip NDJSON files of 20,000 Observations, one with a line carrying a 12 MB note and one with a
  96 MB note (the shape of an export with an embedded document): the old reader held each line whole, so
  its memory grew with the longest line; the bounded reader drops what is over 16 MiB unread.

each with the code of this tree and with the code before the streaming reader (`git archive` of
BASELINE into a temporary folder, run with the same interpreter), in one process (`workers=1`) and
with two worker processes (`workers=2`: a Bundle is then read in the worker). The memory of the idle
process that imported the loader is measured too, so the growth with the input can be told from the
interpreter and its libraries.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
from io import BytesIO
from pathlib import Path

import orjson

from benchmarks.machine import write_section

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = Path(__file__).resolve().parent / "output" / "etl_memory"
BASELINE = "674ec51"  # the last commit before the streaming reader (json_input.py)
BUNDLE_BYTES = 21_000_000
NOTES_MB = (12, 96)  # the longest line of each NDJSON input

_LOAD = textwrap.dedent(
    """
    import json, resource, sys
    from pathlib import Path
    from omop_etl.load.pipeline import EtlSettings, run_etl

    def hwm():
        status = Path("/proc/self/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))) / 1024

    if __name__ == "__main__":
        inputs, url, secret, workers = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]) or None
        idle = hwm()
        report = run_etl([inputs], EtlSettings(db_url=url, secret_file=secret, workers=workers))
        print(json.dumps({"records": report.input.total, "loaded": report.loaded.total,
                          "quarantined": report.quarantine_by_rule, "reconciles": report.reconciles,
                          "seconds": report.seconds, "idle_mib": idle, "peak_mib": hwm(),
                          "worker_peak_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
    """
)


def _baseline_tree(target: Path) -> Path:
    """The omop_etl package as it was at BASELINE, unpacked under `target` (read from git, nothing checked out)."""
    archive = subprocess.run(["git", "archive", BASELINE, "omop_etl"], cwd=ROOT, check=True, capture_output=True)
    target.mkdir(parents=True)
    with tarfile.open(fileobj=BytesIO(archive.stdout)) as tar:
        tar.extractall(target, filter="data")
    return target


def _patient_of(resource: dict) -> str | None:
    """The Patient a resource belongs to (None: shared, such as an Organization)."""
    if resource.get("resourceType") == "Patient":
        return resource.get("id")
    for element in ("subject", "patient"):
        value = resource.get(element)
        reference = value.get("reference") if isinstance(value, dict) else None
        if isinstance(reference, str) and reference.startswith("Patient/"):
            return reference.split("/", 1)[1]
    return None


def _inputs(work: Path) -> dict[str, Path]:
    from synthetic import SynthConfig, generate_consortium

    consortium = work / "consortium"
    generate_consortium(SynthConfig(sites=1, patients_per_site=120, seed=7), consortium, workers=1)
    export = next(consortium.glob("*/fhir"))
    resources = []
    for path in sorted(export.glob("*.ndjson")):
        for line in path.open("rb"):
            try:
                resources.append(orjson.loads(line))
            except orjson.JSONDecodeError:
                continue  # a Bundle must be valid JSON as a whole: the generator's broken lines are left out
    observations = [r for r in resources if r.get("resourceType") == "Observation"][:20_000]
    # The first patients (with everything of theirs, and every shared resource) up to BUNDLE_BYTES.
    owner = {id(r): _patient_of(r) for r in resources}
    size_of: dict[str | None, int] = {}
    for r in resources:
        size_of[owner[id(r)]] = size_of.get(owner[id(r)], 0) + len(orjson.dumps(r)) + 60
    kept, total = {None}, size_of.get(None, 0)
    for patient in (p for p in size_of if p is not None):
        if total >= BUNDLE_BYTES:
            break
        kept.add(patient)
        total += size_of[patient]
    entries = [{"fullUrl": f"{r.get('resourceType')}/{r.get('id')}", "resource": r} for r in resources
               if owner[id(r)] in kept]  # fmt: skip
    bundle = work / "bundle" / "site.json"
    bundle.parent.mkdir(parents=True)
    bundle.write_bytes(orjson.dumps({"resourceType": "Bundle", "type": "collection", "entry": entries}))
    lines = [orjson.dumps(r) for r in observations]
    folders = {}
    for size in NOTES_MB:
        noted = {**observations[0], "id": "noted", "note": [{"text": "n" * (size << 20)}]}
        folder = work / f"ndjson-{size}"
        folder.mkdir()
        with gzip.open(folder / "Observation.ndjson.gz", "wb", compresslevel=1) as handle:
            for number, line in enumerate(lines):
                handle.write((orjson.dumps(noted) if number == len(lines) // 2 else line) + b"\n")
        for name in ("Patient.ndjson", "Encounter.ndjson"):  # what the Observations refer to
            shutil.copy(export / name, folder / name)
        folders[f"gzip NDJSON, longest line {size} MB"] = folder
    return {"Bundle (compact JSON)": bundle.parent, **folders}


def _size(folder: Path) -> tuple[int, int]:
    """(bytes on disk, bytes of JSON once decompressed) of the files in `folder`."""
    disk = text = 0
    for path in folder.iterdir():
        disk += path.stat().st_size
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as handle:
                while chunk := handle.read(1 << 24):
                    text += len(chunk)
        else:
            text += path.stat().st_size
    return disk, text


def _load(code: Path, inputs: Path, db: Path, workers: int) -> dict:
    db.unlink(missing_ok=True)
    command = [sys.executable, "-c", _LOAD, str(inputs), f"sqlite:///{db}", str(OUTPUT / "secret"), str(workers)]
    env = {**os.environ, "PYTHONPATH": str(code)}
    done = subprocess.run(command, check=True, capture_output=True, text=True, cwd=code, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    shutil.rmtree(OUTPUT, ignore_errors=True)
    OUTPUT.mkdir(parents=True)
    old = _baseline_tree(OUTPUT / "baseline")
    inputs = _inputs(OUTPUT)
    rows = [
        "| input | size on disk / as JSON | workers | code | records (loaded) | peak main / worker | idle | growth "
        "| growth / JSON size | time |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    ratios = []
    for label, folder in inputs.items():
        disk, text = _size(folder)
        for workers in (1, 2):
            measured = {}
            for code_label, code in (("before", old), ("after", ROOT)):
                result = _load(code, folder, OUTPUT / "bench.sqlite", workers)
                assert result["reconciles"], (label, code_label, result)
                measured[code_label] = result
                growth = max(result["peak_mib"], result["worker_peak_mib"]) - result["idle_mib"]
                rows.append(
                    f"| {label} | {disk / 1e6:.1f} / {text / 1e6:.1f} MB | {workers} | {code_label} | "
                    f"{result['records']:,} ({result['loaded']:,}) | {result['peak_mib']:.0f} / "
                    f"{result['worker_peak_mib']:.0f} MiB | {result['idle_mib']:.0f} MiB | {growth:.0f} MiB | "
                    f"{growth * 2**20 / text:.1f}x | {result['seconds']:.1f} s |"
                )
                print(rows[-1], flush=True)
            before, after = (max(m["peak_mib"], m["worker_peak_mib"]) - m["idle_mib"] for m in measured.values())
            ratios.append(f"{label}, workers {workers}: growth {before:.0f} -> {after:.0f} MiB "
                          f"(before / after = {before / after:.1f})")  # fmt: skip
    body = (
        "### ETL peak memory against input size (`benchmarks/bench_etl_memory.py`)\n\n"
        "Peak resident memory (VmHWM) of a fresh process loading one input into a new SQLite database, with "
        f"the code of this tree ('after') and of {BASELINE} ('before': the whole Bundle parsed at once, NDJSON "
        "lines read whole). 'growth' is the larger of the main and worker peaks less the memory of the idle "
        "process after its imports ('idle'); it is also given per byte of the input as JSON. The 96 MB line is "
        "over the 16 MiB limit: quarantined (line_too_long) after, loaded before; the 12 MB line loads in "
        "both, and costs a little more after: the repeated-key check parses a line once more. The probe's "
        "figure of 56 times a 21 MB Bundle is not what 'before' shows on this input (see its rows).\n\n"
        + "\n".join(rows)
        + "\n\nSame run: "
        + "; ".join(ratios)
        + ".\n\nReproduce: `.venv/bin/python -m benchmarks.bench_etl_memory`."
    )
    write_section("etl-memory", body)
    shutil.rmtree(OUTPUT, ignore_errors=True)


if __name__ == "__main__":
    main()
