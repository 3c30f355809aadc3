"""Benchmark: loading an Athena vocabulary download, on SQLite and PostgreSQL.

A real Athena download is millions of concepts and tens of millions of relationships, and a site loads
it again with every vocabulary release. This generates a synthetic Athena-format folder (CONCEPT.csv
with 1,000,000 concepts and CONCEPT_RELATIONSHIP.csv with their 'Maps to' / 'Mapped from' rows) and
loads it with `load_athena` in fresh subprocesses, so the peak resident memory is the loader's own.
A smaller folder is loaded as well: flat peak memory across sizes shows the load streams.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

from benchmarks.machine import write_section

OUTPUT = Path(__file__).resolve().parent / "output" / "vocab"
PG_URL = os.environ.get("TWINFED_BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")

_CONCEPT_HEADER = (
    "concept_id\tconcept_name\tdomain_id\tvocabulary_id\tconcept_class_id\tstandard_concept\tconcept_code"
    "\tvalid_start_date\tvalid_end_date\tinvalid_reason\n"
)
_RELATIONSHIP_HEADER = "concept_id_1\tconcept_id_2\trelationship_id\tvalid_start_date\tvalid_end_date\tinvalid_reason\n"
_WORDS = (
    "acute", "chronic", "primary", "secondary", "disorder", "of", "the", "left", "right", "upper", "lower", "lobe",
    "renal", "hepatic", "cardiac", "pulmonary", "infection", "syndrome", "deficiency", "tablet", "oral", "injection",
    "solution", "measurement", "serum", "plasma", "level",
)  # fmt: skip
# (vocabulary, domain, class, standard flag): roughly the mix of a download with source vocabularies.
_KINDS = (
    ("SNOMED", "Condition", "Clinical Finding", "S"),
    ("SNOMED", "Procedure", "Procedure", "S"),
    ("LOINC", "Measurement", "Lab Test", "S"),
    ("RxNorm", "Drug", "Clinical Drug", "S"),
    ("ICD10CM", "Condition", "Billing Code", ""),
    ("ICD10CM", "Condition", "4-char billing code", ""),
    ("NDC", "Drug", "11-digit NDC", ""),
)


def generate(folder: Path, concepts: int, seed: int = 3) -> dict:
    """Write CONCEPT.csv and CONCEPT_RELATIONSHIP.csv for `concepts` concepts; returns their row counts."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    relationships = 0
    standard_ids: list[int] = []
    with (
        (folder / "CONCEPT.csv").open("w", encoding="utf-8", newline="") as concept_file,
        (folder / "CONCEPT_RELATIONSHIP.csv").open("w", encoding="utf-8", newline="") as relationship_file,
    ):
        concept_file.write(_CONCEPT_HEADER)
        relationship_file.write(_RELATIONSHIP_HEADER)
        concept_lines: list[str] = []
        relationship_lines: list[str] = []
        for i in range(concepts):
            concept_id = 1_000_000 + i
            vocabulary, domain, concept_class, standard = _KINDS[rng.randrange(len(_KINDS))]
            name = " ".join(rng.choices(_WORDS, k=rng.randint(3, 9)))
            start = f"{rng.randint(1970, 2024)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}"
            deprecated = rng.random() < 0.03
            end, reason = ("20230131", "D") if deprecated else ("20991231", "")
            concept_lines.append(
                f"{concept_id}\t{name}\t{domain}\t{vocabulary}\t{concept_class}\t{'' if deprecated else standard}"
                f"\t{vocabulary[:3]}{i:07d}\t{start}\t{end}\t{reason}\n"
            )
            if standard and not deprecated:
                standard_ids.append(concept_id)
                relationship_lines.append(f"{concept_id}\t{concept_id}\tMaps to\t{start}\t20991231\t\n")
                relationships += 1
            elif standard_ids:
                target = standard_ids[rng.randrange(len(standard_ids))]
                relationship_lines.append(f"{concept_id}\t{target}\tMaps to\t{start}\t20991231\t\n")
                relationship_lines.append(f"{target}\t{concept_id}\tMapped from\t{start}\t20991231\t\n")
                relationships += 2
            if len(concept_lines) >= 50_000:
                concept_file.writelines(concept_lines)
                relationship_file.writelines(relationship_lines)
                concept_lines, relationship_lines = [], []
        concept_file.writelines(concept_lines)
        relationship_file.writelines(relationship_lines)
    return {"concept": concepts, "concept_relationship": relationships}


_RUNNER = textwrap.dedent(
    """
    import json, resource, sys, time
    from sqlalchemy import text
    from omop_etl.database import open_engine
    from omop_etl.schema import create_cdm
    from omop_etl.vocabulary.athena import load_athena
    url, folder, schema = sys.argv[1], sys.argv[2], sys.argv[3] or None
    engine = open_engine(url, bulk_load=True)
    create_cdm(engine, schema)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    began = time.perf_counter()
    result = load_athena(engine, folder, schema=schema)
    seconds = time.perf_counter() - began
    if schema:
        with engine.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    engine.dispose()
    print(json.dumps({
        "seconds": seconds,
        "rows": result.rows,
        "table_seconds": result.table_seconds,
        "bytes": result.bytes_read,
        "baseline_mib": baseline,
        "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))
    """
)


def run_case(database: str, folder: Path) -> dict:
    """Load `folder` into a fresh database in a subprocess; returns timings and peak memory."""
    if database == "sqlite":
        target = OUTPUT / "bench.sqlite"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{target}{suffix}").unlink(missing_ok=True)
        url, schema = f"sqlite:///{target}", ""
    else:
        url, schema = PG_URL, f"twinfed_bench_vocab_{uuid.uuid4().hex[:8]}"
    try:
        completed = subprocess.run(
            [sys.executable, "-c", _RUNNER, url, str(folder), schema], check=True, capture_output=True, text=True
        )
    finally:
        if database == "sqlite":
            for suffix in ("", "-wal", "-shm"):
                Path(f"{OUTPUT / 'bench.sqlite'}{suffix}").unlink(missing_ok=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def postgres_reachable() -> str | None:
    """None when the benchmark's PostgreSQL can be used, else the reason it cannot."""
    from omop_etl.database import DatabaseUnavailable, check_database

    try:
        check_database(PG_URL)
    except DatabaseUnavailable as exc:
        return str(exc)
    return None


def main() -> None:
    sizes = (250_000, 1_000_000)
    folders = {}
    for size in sizes:
        folder = OUTPUT / f"athena-{size}"
        counts = generate(folder, size)
        folders[size] = (folder, counts)
        print(f"generated {size:,} concepts, {counts['concept_relationship']:,} relationships in {folder}")
    pg_problem = postgres_reachable()
    databases = ["sqlite"] + ([] if pg_problem else ["postgresql"])
    results = []
    for database in databases:
        for size in sizes:
            folder, counts = folders[size]
            r = run_case(database, folder)
            r.update(database=database, size=size)
            results.append(r)
            rows = sum(r["rows"].values())
            print(
                f"{database:<10} {size:>9,} concepts: {r['seconds']:6.1f} s, {rows / r['seconds']:>9,.0f} rows/s, "
                f"peak {r['peak_mib']:.0f} MiB (after imports {r['baseline_mib']:.0f} MiB)"
            )
    table = [
        "| database | concepts | relationships | input size | wall time | rows/s | concept rows/s "
        "| concept_relationship rows/s | peak memory (after imports) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rows = r["rows"]
        table.append(
            f"| {r['database']} | {rows['concept']:,} | {rows['concept_relationship']:,} | "
            f"{r['bytes'] / 2**20:,.0f} MiB | {r['seconds']:.1f} s | {sum(rows.values()) / r['seconds']:,.0f} | "
            f"{rows['concept'] / r['table_seconds']['concept']:,.0f} | "
            f"{rows['concept_relationship'] / r['table_seconds']['concept_relationship']:,.0f} | "
            f"{r['peak_mib']:.0f} MiB ({r['baseline_mib']:.0f} MiB) |"
        )
    notes = ""
    if pg_problem:
        notes = f"\n\nPostgreSQL was not measured: {pg_problem}"
    body = (
        "### Vocabulary load (`twinfed vocab load`, synthetic Athena folder)\n\n"
        "Synthetic Athena-format CONCEPT.csv and CONCEPT_RELATIONSHIP.csv (tab-separated, YYYYMMDD dates), "
        "loaded by `load_athena` into an empty database with the CDM indexes in place: one transaction per "
        "table, 50,000-row chunks, COPY on PostgreSQL (local server, scratch schema), executemany on SQLite "
        "(WAL mode). Peak memory is the resident set of the loading process; that it barely moves between the "
        "two sizes shows the files are streamed, not read whole."
        "\n\n" + "\n".join(table) + notes + "\n\nReproduce: `.venv/bin/python -m benchmarks.bench_vocab` "
        "(PostgreSQL from `TWINFED_BENCH_PG_URL`, default postgresql://postgres@127.0.0.1:5432/test)."
    )
    write_section("vocab", body)
    for folder, _counts in folders.values():
        shutil.rmtree(folder, ignore_errors=True)  # hundreds of MiB; regenerated in seconds


if __name__ == "__main__":
    main()
