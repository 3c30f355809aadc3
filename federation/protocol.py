"""What crosses the wire between coordinator and sites, as typed records rather than loose dicts.

Flower carries a `ConfigRecord` (str/int/float/bool values) next to the model arrays. These pydantic
models are the only way either side reads or writes one, so a field renamed on one side is an error,
not a silently missing value. A site's answer always says whether it trained, and when it refused,
why: the coordinator turns that into a participation receipt, and a refusal is never mistaken for a
crash or a timeout.
"""

from __future__ import annotations

from enum import StrEnum

import orjson
from flwr.app import ConfigRecord
from pydantic import BaseModel, ConfigDict, ValidationError

from federation.study import StudySpec, canonical_json, parse_study, study_hash


class ProtocolError(ValueError):
    """A message does not carry what the protocol requires; the text says which field."""


class RefusalCode(StrEnum):
    """Why a site did not train or evaluate; the coordinator counts these per round."""

    UNAPPROVED_STUDY = "unapproved-study"
    STUDY_HASH_MISMATCH = "study-hash-mismatch"
    POLICY = "policy"
    NEEDS_SECURE_AGGREGATION = "needs-secure-aggregation"
    NOT_PRIVATE = "not-private"
    BUDGET = "budget"
    COHORT_TOO_SMALL = "cohort-too-small"
    ALREADY_TRAINED = "already-trained"
    SITE_ERROR = "site-error"


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def to_config_record(self) -> ConfigRecord:
        return ConfigRecord({k: v for k, v in self.model_dump(mode="json").items() if v is not None})

    @classmethod
    def from_config_record(cls, record: ConfigRecord | None, what: str):
        if record is None:
            raise ProtocolError(f"the message has no '{what}' record")
        try:
            return cls.model_validate(dict(record))
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise ProtocolError(f"the '{what}' record is not valid: {problems}") from None


class RoundInstruction(_Record):
    """Sent with every train/evaluate message: the whole study (sites check it against their approvals),
    its hash as the coordinator computed it, and where in the run this round is."""

    study_json: str
    study_hash: str
    run_id: str
    server_round: int
    secure_aggregation: bool = False

    @classmethod
    def for_study(
        cls, spec: StudySpec, run_id: str, server_round: int, *, secure_aggregation: bool | None = None
    ) -> RoundInstruction:
        """`secure_aggregation`: whether this round runs SecAgg+ (the study's setting unless the coordinator
        turned it on because a site's policy requires it)."""
        return cls(
            study_json=canonical_json(spec).decode("utf-8"),
            study_hash=study_hash(spec),
            run_id=run_id,
            server_round=server_round,
            secure_aggregation=spec.federation.secure_aggregation if secure_aggregation is None else secure_aggregation,
        )

    def study(self) -> StudySpec:
        try:
            data = orjson.loads(self.study_json)
        except orjson.JSONDecodeError as exc:
            raise ProtocolError(f"the study sent with round {self.server_round} is not JSON: {exc}") from None
        return parse_study(data, source=f"study sent with round {self.server_round}")

    @property
    def round_key(self) -> str:
        """Identifies one training round of one run: a retry of the same round reuses its privacy reservation."""
        return f"{self.run_id}:{self.server_round}"


class SiteStatus(StrEnum):
    READY = "ready"  # secure rounds: the site passed its checks and will train when the protocol asks
    TRAINED = "trained"
    EVALUATED = "evaluated"
    REFUSED = "refused"


class SiteAnswer(_Record):
    """A site's account of what it did with a round: sent back with every reply, trained or not."""

    site_id: str
    status: SiteStatus
    code: RefusalCode | None = None
    reason: str | None = None
    epsilon_spent: float | None = None  # this study at this site, cumulative, after the round
    epsilon_ceiling: float | None = None
    suppressed: str | None = None  # comma-separated metric names withheld under the cell-count floor
    cohort_snapshot: str | None = None  # SHA-256 of the data the round used (proves which data, reveals none)
    consent_snapshot: str | None = None  # SHA-256 of the consent state applied (exclusions on record)
