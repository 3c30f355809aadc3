"""Benchmark: what the governance check costs a site as its audit chain grows.

The site node verifies its whole audit chain (links, Ed25519 signatures, the head file) and replays the
ledger's chained changes against the ledger table before it starts and before every round. That check
grows with the chain, so a site that has run many studies pays more per round. This builds chains of
growing length in a real SQLite governance database (a mix like a real site's: per training round a
reservation, a round-started entry, a commit and a round-trained entry, i.e. four entries and one ledger
row; plus one DP evaluation release every five rounds) and times, side by side in one run, the chain
verification alone, the full integrity check, and one round's own governance writes (reserve + commit
with their chained entries, and two audit appends), for the ratio of the check to the round's own work.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.machine import write_section
from site_node.governance import Governance, PrivacyEvent, SitePolicy

ROUNDS = (100, 400, 1600)  # training rounds recorded before the measurement (four entries each)
EVENT = PrivacyEvent(noise_multiplier=5.0, sample_rate=0.01, steps=10)  # cheap to account, as a real round
REPEATS = 3


def _governance(folder: Path) -> Governance:
    policy = SitePolicy(study_epsilon_ceiling=1e9, site_epsilon_ceiling=1e9)
    return Governance(f"sqlite:///{folder / 'governance.sqlite'}", policy, audit_head_file=folder / "audit.head")


def _round(governance: Governance, study: int, n: int) -> None:
    """One round's governance writes, as the site node makes them (its own study id, so accounting stays short)."""
    lineage = f"study-{study}"
    reservation = governance.ledger.reserve(lineage, f"r{n}", EVENT, 1e-5, "rdp", 1e9, lineage=lineage)
    governance.audit.append("round-started", {"study_hash": lineage, "round": f"r{n}", "noise_multiplier": 5.0})
    governance.ledger.commit(reservation)
    governance.audit.append("round-trained", {"study_hash": lineage, "round": f"r{n}", "left_the_site": {}})


def _timed(action) -> float:
    times = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure(rounds: tuple[int, ...] = ROUNDS) -> list[dict[str, float]]:
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        governance = _governance(Path(tmp))
        done = 0
        for target in rounds:
            while done < target:
                _round(governance, done // 20, done)  # a new study every 20 rounds
                done += 1
            entries = governance.audit.count()
            verify = _timed(governance.audit.verify)
            check = _timed(governance.integrity)
            assert governance.integrity().ok
            write = _timed(lambda: _round(governance, 10_000, time.perf_counter_ns()))
            results.append(
                {"rounds": target, "entries": entries, "verify": verify, "integrity": check, "round_writes": write}
            )
        governance.close()
    return results


def render(results: list[dict[str, float]]) -> str:
    lines = [
        "### Governance check per round against the length of the audit chain (`benchmarks/bench_integrity.py`)",
        "",
        "A real SQLite governance database with an audit key and head file. 'verify' re-checks every link and "
        "Ed25519 signature and the head file; 'integrity' adds the replay of the ledger's chained changes and "
        "the rounds the chain records (what the node runs before it starts and before every round); 'round "
        "writes' is one training round's own governance work (reserve and commit with their chained entries, "
        "two audit appends, each with an fsync of the head file). Medians of three.",
        "",
        "| training rounds recorded | audit entries | verify | integrity check | round writes | check / writes |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        ratio = r["integrity"] / r["round_writes"]
        lines.append(
            f"| {r['rounds']:,} | {r['entries']:,} | {r['verify'] * 1000:.0f} ms | {r['integrity'] * 1000:.0f} ms | "
            f"{r['round_writes'] * 1000:.0f} ms | {ratio:.1f} |"
        )
    per_entry = results[-1]["integrity"] / results[-1]["entries"] * 1e6
    lines += [
        "",
        f"The check grows linearly with the chain, about {per_entry:.0f} µs per entry here: a site with "
        f"{results[-1]['entries']:,} entries spends {results[-1]['integrity']:.2f} s on it per round, next to "
        "DP-SGD training that takes seconds to minutes.",
        "",
        "Reproduce: `.venv/bin/python -m benchmarks.bench_integrity`.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-write", action="store_true", help="print the table; leave docs/benchmarks.md alone")
    args = parser.parse_args(argv)
    body = render(measure())
    print(body)
    if not args.no_write:
        write_section("integrity", body)


if __name__ == "__main__":
    main()
