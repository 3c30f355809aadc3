"""What crosses the wire between coordinator and sites, as typed records rather than loose dicts.

Flower carries a `ConfigRecord` (str/int/float/bool values) next to the model arrays. These pydantic
models are the only way either side reads or writes one, so a field renamed on one side is an error,
not a silently missing value. A site's answer always says whether it trained, and when it refused,
why: the coordinator turns that into a participation receipt, and a refusal is never mistaken for a
crash or a timeout.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

import orjson
from flwr.app import ConfigRecord
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from federation.contract import StudySpec, canonical_json, parse_study, study_hash


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
    IN_PROGRESS = "round-in-progress"  # another process at the site is running this very round now
    GOVERNANCE_INCONSISTENT = "governance-inconsistent"  # ledger and audit chain disagree: nothing runs
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
    # Which of the site's split parts an evaluation message scores ('validation' or 'test'); training uses
    # the training part whatever this says.
    part: Literal["validation", "test"] = "test"
    # An evaluation with adaptive strata has two stages: 'scores' (the scores' distribution, no outcomes)
    # and 'outcomes' (per outcome class and stratum), whose strata the coordinator sends in `score_edges`.
    stage: Literal["scores", "outcomes"] = "outcomes"
    score_edges: list[float] | None = None

    @classmethod
    def for_study(
        cls,
        spec: StudySpec,
        run_id: str,
        server_round: int,
        *,
        secure_aggregation: bool | None = None,
        part: Literal["validation", "test"] = "test",
        stage: Literal["scores", "outcomes"] = "outcomes",
        score_edges: list[float] | None = None,
    ) -> RoundInstruction:
        """`secure_aggregation`: whether this round runs SecAgg+ (the study's setting unless the coordinator
        turned it on because a site's policy requires it). `part`: what an evaluation message scores."""
        return cls(
            study_json=canonical_json(spec).decode("utf-8"),
            study_hash=study_hash(spec),
            run_id=run_id,
            server_round=server_round,
            secure_aggregation=spec.federation.secure_aggregation if secure_aggregation is None else secure_aggregation,
            part=part,
            stage=stage,
            score_edges=score_edges,
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

    @property
    def evaluation_key(self) -> str:
        """Identifies one evaluation release (a part scored after a round): a retry re-sends the same release."""
        key = f"{self.run_id}:{self.server_round}:{self.part}"
        return key if self.stage == "outcomes" else f"{key}:{self.stage}"


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
    # The study's epsilon at this site split by what spent it (each alone); epsilon_spent is both composed.
    epsilon_training: float | None = None
    epsilon_evaluation: float | None = None
    differentially_private: bool = True  # False: a non-private study (privacy mode none) the site allowed
    # The site's audit head as it answered (its newest entry's hash): the consortium keeps it in the receipts, a
    # witness outside the site against which `twinfed site audit verify --receipts` checks the chain. The hash
    # only: the entry's number would tell how many events (consent withdrawals among them) happened in between.
    audit_hash: str | None = None
    # The calendar months the round's training examples cover, "YYYY-MM/YYYY-MM", trimmed and coarsened under the
    # site's cell-count floor (site_node.governance.data_period); None when withheld or the policy says not to.
    data_period: str | None = Field(None, pattern=r"^\d{4}-\d{2}/\d{4}-\d{2}$")


class ReleaseMode(StrEnum):
    """How a site's evaluation left it."""

    DP = "dp"  # noisy score histograms, accounted in the site's ledger
    EXACT = "exact"  # exact aggregates, every cell at or above the site's cell-count floor
    WITHHELD = "withheld"  # nothing outcome-dependent could leave; `withheld_reason` says why


class EvaluationRelease(_Record):
    """What one site releases about a model's performance on one of its held-out parts.

    `dp`: the twin kind's histograms of held-out patients over the risk strata `score_edges`
    (federation.contract.strata), each count with Gaussian noise of standard deviation `noise_sd`: for the
    risk kinds, per outcome class the patients in each stratum; for survival, the patients per stratum,
    interval and event. The coordinator adds the sites' histograms. At the `scores` stage of adaptive
    strata: the patients per cell of the fixed score grid, outcomes not involved, from which the
    coordinator places the strata. `exact`: the kind's exact metrics (risk: the confusion counts at the
    threshold, AUROC, loss and Brier score; survival: the C-index with its standard error and the Brier
    scores), only when every count is at or above the site's floor and none differs from an earlier release
    of the same study by less than it; otherwise those fields are absent and `withheld` names them.
    """

    part: Literal["validation", "test"]
    mode: ReleaseMode
    stage: Literal["scores", "outcomes"] = "outcomes"
    scores: list[float] | None = None  # stage scores: noisy patients per cell of the score grid (no outcomes)
    score_edges: list[float] | None = None  # the strata the histograms below are cut at (DP outcome releases)
    positives: list[float] | None = None  # risk kinds: patients with the outcome per stratum
    negatives: list[float] | None = None  # risk kinds: patients without it
    # survival: patients per (stratum, interval, event), flattened in that order; trajectory: patients per bin of
    # their 80% coverage, 95% coverage and forecast error (federation.twins.trajectory)
    cells: list[float] | None = None
    # The same histograms within subgroups of patients (TRIPOD): `subgroups` names them ('sex:female',
    # 'age:50-69', ...), `subgroup_counts` holds each one's histograms in turn (the kind's fields in order),
    # with noise of standard deviation `subgroup_noise_sd`. Each way of grouping is a partition (every patient
    # in one sex group and one age band), released with its own share of the release's budget.
    subgroups: list[str] | None = None
    subgroup_counts: list[float] | None = None
    subgroup_noise_sd: float | None = None
    noise_sd: float | None = None
    epsilon: float | None = None  # this release alone, at the study's delta
    examples: int | None = None
    with_outcome: int | None = None
    true_positives: int | None = None
    false_negatives: int | None = None
    false_positives: int | None = None
    true_negatives: int | None = None
    auroc: float | None = None
    loss: float | None = None
    brier: float | None = None
    c_index: float | None = None  # survival, exact: Harrell's C on exact times, its standard error, the Brier
    c_index_se: float | None = None  # score at the horizon and the integrated Brier score up to it
    brier_at_horizon: float | None = None
    integrated_brier: float | None = None
    # trajectory, exact: the share of observed future values inside the 80% and 95% intervals, and the mean
    # absolute error of the median forecast in normal-range units (DP: histograms of each patient's in `cells`)
    coverage_80: float | None = None
    coverage_95: float | None = None
    forecast_mae: float | None = None
    withheld: str | None = None  # comma-separated names of what was withheld
    withheld_reason: str | None = None
    cell_floor: int | None = None  # the site's floor, for exact releases

    @model_validator(mode="after")
    def _complete(self) -> EvaluationRelease:
        if self.mode == ReleaseMode.DP and self.stage == "scores":
            if self.scores is None or self.noise_sd is None:
                raise ValueError("a DP score release carries its histogram and its noise level")
        elif self.mode == ReleaseMode.DP:
            # Which histograms a release must carry depends on the study's twin kind: it checks them
            # (federation.twins, `check_histograms`) where the study is known.
            if self.noise_sd is None or not self.score_edges:
                raise ValueError("a DP release carries its strata and its noise level")
            if self.positives is None and self.cells is None:
                raise ValueError("a DP release carries its histograms")
        return self
