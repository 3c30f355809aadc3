"""Every exact count that leaves the site, checked as a whole against the cell-count floor before it leaves.

A count is safe to release only if no count below the floor can be worked out from it together with
everything else released, now or before. So a release is described by the cells it reveals sums of (for
an evaluation: true/false positives/negatives at the threshold; `positives` is tp + fn, `examples` all
four), and the check covers:

* every count the release itself lets anyone derive: each released sum, and by subtraction and addition
  every other sum they pin down (19 examples and 13 positives give 6 negatives);
* every difference with what this site released before for the same study and part: the same cohort
  evaluated again after one patient withdrew differs by one example, which says that patient's outcome.

A count of 0 reveals no one and passes (except where a rule says otherwise: an outcome class must be at
or above the floor before anything that depends on the outcome leaves, see site_node.releases).
What passed is recorded in the site's governance database, in the same transaction as the check, so
two releases racing cannot both pass against a register that knows neither.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from sqlalchemy import insert, select

from site_node.governance.store import GovernanceStore, utc_now

Quantity = frozenset[str]

# Readable names of the sums of an evaluation's confusion cells, for the sentences a steward reads.
CELL_NAMES = {
    frozenset({"tp", "fn", "fp", "tn"}): "patients",
    frozenset({"tp", "fn"}): "patients with the outcome",
    frozenset({"fp", "tn"}): "patients without the outcome",
    frozenset({"tp", "fp"}): "patients at or above the threshold",
    frozenset({"fn", "tn"}): "patients below the threshold",
    frozenset({"tp"}): "true positives",
    frozenset({"fn"}): "false negatives",
    frozenset({"fp"}): "false positives",
    frozenset({"tn"}): "true negatives",
    frozenset({"train"}): "training examples",
}


def describe(quantity: Quantity) -> str:
    return CELL_NAMES.get(quantity) or " + ".join(sorted(quantity))


def derivable(released: Mapping[Quantity, int]) -> dict[Quantity, int]:
    """Every sum of cells the released sums pin down: closed under subtracting a contained sum and adding a
    disjoint one (over the cells the release involves)."""
    known = {q: int(v) for q, v in released.items() if q}
    changed = True
    while changed:
        changed = False
        for a, va in list(known.items()):
            for b, vb in list(known.items()):
                if a < b and (b - a) not in known:
                    known[b - a] = vb - va
                    changed = True
                elif not a & b and (a | b) not in known:
                    known[a | b] = va + vb
                    changed = True
    return known


def _small(value: int, floor: int) -> bool:
    return 0 < abs(value) < floor


@dataclass(frozen=True)
class Earlier:
    release_key: str
    counts: dict[Quantity, int]


class DisclosureRegister:
    """What this site has released, by study lineage (the study id here) and split part."""

    def __init__(self, store: GovernanceStore) -> None:
        self.store = store
        self.table = store.tables["disclosures"]

    @staticmethod
    def _encode(counts: Mapping[Quantity, int]) -> str:
        return json.dumps({"+".join(sorted(q)): int(v) for q, v in counts.items()}, sort_keys=True)

    @staticmethod
    def _decode(text: str) -> dict[Quantity, int]:
        return {frozenset(k.split("+")): int(v) for k, v in json.loads(text).items()}

    def earlier(self, lineage: str, part: str, connection=None) -> list[Earlier]:
        query = (
            select(self.table.c.release_key, self.table.c.counts)
            .where(self.table.c.lineage == lineage, self.table.c.part == part)
            .order_by(self.table.c.id)
        )
        if connection is not None:
            return [Earlier(r.release_key, self._decode(r.counts)) for r in connection.execute(query)]
        with self.store.engine.connect() as own:
            return [Earlier(r.release_key, self._decode(r.counts)) for r in own.execute(query)]

    @staticmethod
    def problem(counts: Mapping[Quantity, int], floor: int, earlier: Iterable[Earlier], release_key: str) -> str | None:
        """Why `counts` may not leave (a sentence naming the rule, never the small count), or None."""
        mine = derivable(counts)
        for quantity, value in sorted(mine.items(), key=lambda item: (len(item[0]), sorted(item[0]))):
            if _small(value, floor):
                return (
                    f"fewer than {floor} {describe(quantity)} (the site's cell-count floor), derivable from the counts"
                )
        for before in earlier:
            if before.release_key == release_key:
                continue  # the same release sent again: nothing new leaves
            theirs = derivable(before.counts)
            for quantity in sorted(set(mine) & set(theirs), key=lambda q: (len(q), sorted(q))):
                if _small(mine[quantity] - theirs[quantity], floor):
                    return (
                        f"the number of {describe(quantity)} differs from the release '{before.release_key}' by "
                        f"fewer than {floor}: the difference would describe those patients"
                    )
        return None

    def released(self, lineage: str, study_hash: str, part: str) -> set[str]:
        """The release keys this version of the study has released for `part` (exact counts that left)."""
        query = select(self.table.c.release_key).where(
            self.table.c.lineage == lineage, self.table.c.study_hash == study_hash, self.table.c.part == part
        )
        with self.store.engine.connect() as connection:
            return {row.release_key for row in connection.execute(query)}

    def check_and_record(
        self,
        lineage: str,
        study_hash: str,
        part: str,
        release_key: str,
        counts: Mapping[Quantity, int],
        floor: int,
    ) -> str | None:
        """Check a release as a whole and, when it may leave, record it; returns the reason when it may not."""
        index, reasons = self.first_passing(lineage, study_hash, part, release_key, [dict(counts)], floor)
        return None if index == 0 else reasons[0]

    def first_passing(
        self,
        lineage: str,
        study_hash: str,
        part: str,
        release_key: str,
        tiers: list[dict[Quantity, int]],
        floor: int,
    ) -> tuple[int | None, list[str]]:
        """The first of `tiers` (most revealing first) that may leave, recorded; (its index, why the ones
        before it could not). (None, reasons) when none may."""
        reasons: list[str] = []
        with self.store.locked("disclosures") as connection:
            earlier = self.earlier(lineage, part, connection)
            for index, counts in enumerate(tiers):
                reason = self.problem(counts, floor, earlier, release_key)
                if reason is not None:
                    reasons.append(reason)
                    continue
                if not any(e.release_key == release_key for e in earlier):
                    connection.execute(
                        insert(self.table).values(
                            lineage=lineage,
                            study_hash=study_hash,
                            part=part,
                            release_key=release_key,
                            counts=self._encode(counts),
                            released_at=utc_now(),
                        )
                    )
                return index, reasons
        return None, reasons
