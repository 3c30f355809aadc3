"""Participation receipts: for every round, what each site did, in words a consortium can act on.

A site is never dropped silently. Every node the coordinator sent a message to ends the round with one
receipt: trained or evaluated, refused (with the site's own code and sentence: budget, consent,
unapproved study, cohort too small...), failed (its ClientApp raised), timed out, rejected (its update
was not a valid set of weights), or disconnected (it answered in an earlier round of the run and was no
longer connected when this one started). The receipts of a run are appended to `receipts.jsonl` as each round
ends, so they survive a coordinator crash.
"""

from __future__ import annotations

import datetime as dt
from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from federation.contract.protocol import EvaluationRelease


class Participation(StrEnum):
    READY = "ready"  # secure rounds: passed its checks, but the round stopped before training
    TRAINED = "trained"
    EVALUATED = "evaluated"
    REFUSED = "refused"
    FAILED = "failed"
    TIMED_OUT = "timed-out"
    REJECTED = "rejected"
    DISCONNECTED = "disconnected"  # took part earlier in the run, not connected when this round started


class SiteReceipt(BaseModel):
    """One site's part in one phase of one round."""

    model_config = ConfigDict(extra="forbid")

    node_id: int
    site_id: str | None = None  # as the site names itself; unknown when it never answered
    status: Participation
    code: str | None = None
    reason: str | None = None
    epsilon_spent: float | None = None
    epsilon_ceiling: float | None = None
    epsilon_training: float | None = None
    epsilon_evaluation: float | None = None
    differentially_private: bool = True
    num_examples: int | None = None
    metrics: dict[str, float] = {}
    cohort_snapshot: str | None = None
    consent_snapshot: str | None = None
    # The site's audit head (its hash) as it answered: a witness, kept outside the site, of what its chain held then
    # (`twinfed site audit verify --receipts` checks the site's chain against it).
    audit_hash: str | None = None
    data_period: str | None = None  # the months the site's training examples cover, as it disclosed them
    seconds: float | None = None
    evaluation: EvaluationRelease | None = None  # what the site released for an evaluation

    @property
    def label(self) -> str:
        return self.site_id or f"node {self.node_id}"


class RoundReceipt(BaseModel):
    """Every site's receipt for one phase (train or evaluate) of one round, and what the coordinator did."""

    model_config = ConfigDict(extra="forbid")

    run_name: str
    server_round: int
    phase: str  # "train" | "evaluate" (the part in `part`)
    started_at: dt.datetime
    finished_at: dt.datetime
    required_sites: int
    sites: list[SiteReceipt]
    aggregated: bool = False
    secure_aggregation: bool = False  # SecAgg+: the coordinator saw only the weighted mean of the updates
    part: str | None = None  # evaluation: the held-out part scored (validation or test)
    note: str = ""

    def count(self, status: Participation) -> int:
        return sum(1 for s in self.sites if s.status == status)

    def summary(self) -> str:
        parts = [f"{self.count(s)} {s.value}" for s in Participation if self.count(s)]
        phase = self.phase if self.part is None else f"{self.phase} ({self.part})"
        return f"round {self.server_round} {phase}: " + ", ".join(parts or ["no site answered"])


def append_receipt(path: Path, receipt: RoundReceipt) -> None:
    """Append one receipt as a JSON line and flush it to disk before the run goes on."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(receipt.model_dump_json() + "\n")
        handle.flush()


def read_receipts(path: Path) -> list[RoundReceipt]:
    if not path.exists():
        return []
    return [RoundReceipt.model_validate_json(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
