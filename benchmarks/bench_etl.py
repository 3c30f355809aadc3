"""Benchmark: FHIR -> OMOP load throughput next to the plain orjson parse-only rate of the same files.

For one synthetic hospital (and the same data as Synthea-style per-patient Bundles) it measures, in
fresh subprocesses so peak memory is per run:

* parse-only: read every line/file and `orjson.loads` it, nothing else (one process);
* `twinfed etl` into a new SQLite database and into PostgreSQL (if reachable): resources/s, patients/s,
  peak memory;
* the incremental re-run on unchanged input;
* memory at two input sizes (a bounded-memory load does not grow with the input).

Target (issue 3): ETL >= 1/3 of the parse-only rate on the 2-core reference machine.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

from benchmarks.machine import write_section

OUTPUT = Path(__file__).resolve().parent / "output" / "etl"
PG_URL = "postgresql://postgres@127.0.0.1:5432/test"

_PARSE = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    import orjson
    root = Path(sys.argv[1]); began = time.perf_counter(); records = 0
    for path in sorted(root.rglob("*")):
        if path.suffix == ".ndjson":
            with path.open("rb") as handle:
                for line in handle:
                    try:
                        orjson.loads(line); records += 1
                    except orjson.JSONDecodeError:
                        records += 1
        elif path.suffix == ".json" and path.name != "manifest.json":
            bundle = orjson.loads(path.read_bytes()); records += len(bundle.get("entry", []))
    print(json.dumps({"records": records, "seconds": time.perf_counter() - began}))
    """
)

# The floor under any ETL that validates what it maps: the lean R4B validators alone (pydantic-core parses the
# JSON and checks the mapped elements), one process, no mapping and no database.
_VALIDATE = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    import orjson
    from omop_etl.fhir.mappers.base import MAPPERS
    import omop_etl.fhir.mappers  # registers every mapper
    root = Path(sys.argv[1]); records = 0; seconds = 0.0
    for path in sorted(root.rglob("*")):
        if path.suffix == ".ndjson":
            mapper = MAPPERS.get(path.stem)
            lines = path.read_bytes().splitlines()
            records += len(lines)
            if mapper is None:
                continue
            validator = mapper.validator
            began = time.perf_counter()
            for line in lines:
                try:
                    validator.validate_json(line)
                except ValueError:
                    pass
            seconds += time.perf_counter() - began
    print(json.dumps({"records": records, "seconds": seconds}))
    """
)

_ETL = textwrap.dedent(
    """
    import json, resource, sys, time
    from pathlib import Path
    from omop_etl.load.pipeline import EtlSettings, run_etl
    inputs, url, secret = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    schema = sys.argv[4] or None
    report = run_etl([inputs], EtlSettings(db_url=url, schema=schema, secret_file=secret))
    # VmHWM is this process's own peak since exec (ru_maxrss would include the parent's pages at fork time)
    status = Path("/proc/self/status").read_text()
    peak = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))) / 1024
    print(json.dumps({"records": report.input.total, "seconds": report.seconds,
                      "patients": report.loaded.by_resource_type.get("Patient", 0),
                      "reconciles": report.reconciles, "peak_mib": peak,
                      "worker_peak_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
    """
)


def _run(script: str, *args: str) -> dict:
    completed = subprocess.run([sys.executable, "-c", script, *args], check=True, capture_output=True, text=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _pg_reachable() -> bool:
    try:
        from omop_etl.database import check_database

        check_database(PG_URL)
        return True
    except Exception:
        return False


def _drop_schema(schema: str) -> None:
    from sqlalchemy import text

    from omop_etl.database import open_engine

    engine = open_engine(PG_URL)
    with engine.begin() as connection:
        connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    engine.dispose()


def main() -> None:
    from synthetic import SynthConfig, generate_consortium

    shutil.rmtree(OUTPUT, ignore_errors=True)
    OUTPUT.mkdir(parents=True)
    consortium = OUTPUT / "consortium"
    generate_consortium(SynthConfig(sites=1, patients_per_site=2000, seed=7), consortium, workers=1)
    export = consortium / "aster-university" / "fhir"
    small = OUTPUT / "small"
    generate_consortium(SynthConfig(sites=1, patients_per_site=500, seed=7), small, workers=1)
    bundles = OUTPUT / "bundles"
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path; from benchmarks.synthea_style import "
            "write_bundles; write_bundles(Path(sys.argv[1]), Path(sys.argv[2]))",
            str(export),
            str(bundles),
        ],
        check=True,
    )  # in its own process: it holds a whole site in memory
    secret = OUTPUT / "secret"
    rows = []
    for label, source in (("Bulk NDJSON", export), ("Synthea-style Bundles", bundles)):
        parse = _run(_PARSE, str(source))
        db = OUTPUT / f"{label.split()[0].lower()}.sqlite"
        etl = _run(_ETL, str(source), f"sqlite:///{db}", str(secret), "")
        again = _run(_ETL, str(source), f"sqlite:///{db}", str(secret), "")
        rows.append((label, "SQLite", parse, etl, again))
        if label == "Bulk NDJSON" and _pg_reachable():
            _drop_schema("bench_etl")
            pg = _run(_ETL, str(source), PG_URL, str(secret), "bench_etl")
            pg_again = _run(_ETL, str(source), PG_URL, str(secret), "bench_etl")
            _drop_schema("bench_etl")
            rows.append((label, "PostgreSQL", parse, pg, pg_again))
    validate = _run(_VALIDATE, str(export))
    small_etl = _run(_ETL, str(small / "aster-university" / "fhir"), f"sqlite:///{OUTPUT / 'small.sqlite'}",
                     str(secret), "")  # fmt: skip
    table = [
        "| input | database | records | parse-only (orjson) | ETL | ETL / parse-only | patients/s | unchanged re-run "
        "| peak memory (main / worker) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, database, parse, etl, again in rows:
        parse_rate = parse["records"] / parse["seconds"]
        etl_rate = etl["records"] / etl["seconds"]
        table.append(
            f"| {label} | {database} | {etl['records']:,} | {parse_rate:,.0f}/s | {etl_rate:,.0f}/s | "
            f"1/{parse_rate / etl_rate:.0f} | {etl['patients'] / etl['seconds']:,.0f} | "
            f"{again['seconds']:.2f} s ({again['seconds'] / etl['seconds']:.1%}) | {etl['peak_mib']:.0f} / "
            f"{etl['worker_peak_mib']:.0f} MiB |"
        )
        print(table[-1])
    best = max(etl["records"] / etl["seconds"] / (parse["records"] / parse["seconds"]) for _, _, parse, etl, _ in rows)
    verdict = f"Target met: {'yes' if best >= 1 / 3 else 'no'} (best ratio 1/{1 / best:.0f})."
    parse_rate = rows[0][2]["records"] / rows[0][2]["seconds"]
    validate_rate = validate["records"] / validate["seconds"]
    floor = (
        f"Validation floor (Bulk NDJSON): the lean R4B validators alone, without mapping or database, run "
        f"{validate_rate:,.0f} records/s on one core, {parse_rate / validate_rate:.1f}x the cost of the parse "
        f"({parse_rate:,.0f}/s). On 2 cores that leaves "
        f"{max(0.0, 2 * 3 / parse_rate - 1 / validate_rate) * 1e6:.1f} us of CPU per record for mapping, ids and "
        "writing if the ETL is to reach 1/3 of the parse rate."
    )
    body = (
        "### FHIR -> OMOP load (`twinfed etl`), one hospital of the synthetic consortium (seed 7, 2,000 patients)\n\n"
        "Target (issue 3): ETL >= 1/3 of the orjson parse-only rate of the same files. Every mapped resource is "
        "validated (lean validators derived from the R4B models), mapped, checked and written in transactions.\n\n"
        + "\n".join(table)
        + f"\n\n{verdict}\n\n{floor}\n\nMemory at two input sizes (bounded-memory check): 500 patients "
        f"({small_etl['records']:,} records) peak {small_etl['peak_mib']:.0f} MiB; 2,000 patients "
        f"({rows[0][3]['records']:,} records) peak {rows[0][3]['peak_mib']:.0f} MiB.\n\n"
        "Reproduce: `.venv/bin/python -m benchmarks.bench_etl`."
    )
    write_section("etl", body)
    shutil.rmtree(OUTPUT, ignore_errors=True)


if __name__ == "__main__":
    main()
