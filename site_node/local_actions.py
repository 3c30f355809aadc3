"""What a site does with a study on its own, where nothing leaves: a local run, local evaluation, scoring.

* `train_local`: every round of a study at this site alone, with the same DP training, ledger and audit
  as federated rounds (the reference a site compares federated results with). Its evaluation is local:
  exact metrics on the held-out part, shown to the site's own staff and never released, so it spends no
  evaluation budget (the audit records it as kept at the site).
* `score`: applies a study's model to this site's own cohort and writes one risk per patient to a local
  file, audited. The model is the latest global model the coordinator sent this site for the study (kept
  by the site when it evaluated it) or a weights file given by hand (a model card's final-model.pt).

Features are scaled exactly as in training (site_node.cohort.scaling: fixed by the study, not by the
site's data), so a risk computed here is the one the model would give anywhere.
"""

from __future__ import annotations

import csv
import datetime as dt
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from federation.contract import StudySpec, study_hash
from federation.contract.protocol import RoundInstruction, SiteStatus
from federation.twins import build_model, kind_of
from site_node.participation import Refusal, SiteNode
from site_node.releases import WeightsUnreadable, study_weights, weights_digest
from site_node.training.evaluation import evaluate, model_outputs


class LocalActionError(RuntimeError):
    """A local action cannot go on; the message says why and what to do."""


@dataclass(frozen=True)
class LocalRound:
    """One round of a local run: what the site's staff see (nothing of it left the site)."""

    server_round: int
    epsilon: float
    train_loss: float | None
    test: dict[str, float | int | None]


def evaluate_locally(node: SiteNode, spec: StudySpec, state: dict[str, torch.Tensor], part: str = "test") -> dict:
    """Exact metrics of `state` on this site's `part`, for local eyes only (audited as kept at the site)."""
    digest = study_hash(spec)
    plan = node._data(spec, digest)
    data = plan.dataset.subset(part)
    if len(data) == 0:
        return {"num_examples": 0}
    model = node._at_site(spec, node._model(spec, data, state), plan.dataset)
    metrics = evaluate(model, data.features, data.labels, model_spec=spec.model, event_days=data.event_days,
                       threshold=spec.evaluation.threshold, targets=data.targets)  # fmt: skip
    node.governance.audit.append(
        "evaluated-locally",
        {
            "study_hash": digest,
            "part": part,
            "cohort_snapshot": plan.dataset.snapshot_hash,
            "note": "exact metrics shown at the site only; nothing left the site",
        },
    )
    return metrics


def train_local(node: SiteNode, spec: StudySpec) -> Iterator[LocalRound]:
    """Run every round of `spec` here alone; yields each round as it ends. Raises LocalActionError on refusal."""
    run_id = f"local-{dt.datetime.now(dt.UTC).strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    state = build_model(spec.model, node.feature_count(spec), seed=spec.training.seed).state_dict()
    for server_round in range(1, spec.training.rounds + 1):
        trained = node.train(RoundInstruction.for_study(spec, run_id, server_round), state)
        if trained.answer.status != SiteStatus.TRAINED:
            raise LocalActionError(f"Round {server_round} refused: {trained.answer.reason}")
        state = trained.state_dict
        yield LocalRound(
            server_round,
            trained.answer.epsilon_spent or 0.0,
            trained.local_train_loss,
            evaluate_locally(node, spec, state),
        )


class ScoreReport(BaseModel):
    """What `twinfed site score` wrote (kept at the site, like the scores themselves)."""

    model_config = ConfigDict(extra="forbid")

    study_id: str
    study_hash: str
    model_source: str
    model_sha256: str
    out: str
    patients: int
    at_or_above_threshold: int
    threshold: float


def score(
    node: SiteNode,
    spec: StudySpec,
    out: Path,
    *,
    model_file: Path | None = None,
    by: str = "",
    say: Callable[[str], None] = lambda _: None,
) -> ScoreReport:
    """Apply the study's model to every patient of this site's cohort; write person_id, split part, risk."""
    digest = study_hash(spec)
    if not node.governance.approvals.is_approved(digest):
        raise LocalActionError(
            f"study '{spec.study.id}' (hash {digest[:12]}) is not approved at {node.config.site_id}: a model of a "
            "study the data steward has not approved is not applied to this site's patients."
        )
    try:
        found = study_weights(model_file, node.config.base_dir / "models", digest)
    except WeightsUnreadable as exc:
        raise LocalActionError(str(exc)) from None
    if found is None:
        raise LocalActionError(
            f"this site holds no model of study '{spec.study.id}' yet (it keeps the global model the coordinator "
            "sends it for evaluation); pass --model with the study's final-model.pt from its model card."
        )
    source, state = found
    try:
        plan = node._data(spec, digest)
        model = node._model(spec, plan.dataset, state)
    except Refusal as refusal:
        raise LocalActionError(refusal.reason) from None
    say(f"Scoring {len(plan.dataset)} patients of {spec.study.id} with the {source}.")
    # the kind's one risk number: the outcome's risk, or for survival the event's risk by the horizon
    logits = kind_of(spec.model).risk_logits(spec.model, model_outputs(model, plan.dataset.features))
    risks = 1.0 / (1.0 + np.exp(-logits))
    flagged = risks >= spec.evaluation.threshold
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["person_id", "split_part", "risk", f"at_or_above_{spec.evaluation.threshold:g}"])
        for person, part, risk, flag in zip(plan.dataset.person_ids, plan.dataset.split, risks, flagged, strict=True):
            writer.writerow([int(person), str(part), f"{risk:.6f}", int(flag)])
    os.chmod(out, 0o600)
    report = ScoreReport(
        study_id=spec.study.id,
        study_hash=digest,
        model_source=source,
        model_sha256=weights_digest(state),
        out=str(out.resolve()),
        patients=len(plan.dataset),
        at_or_above_threshold=int(flagged.sum()),
        threshold=spec.evaluation.threshold,
    )
    node.governance.audit.append(
        "scored",
        {
            **report.model_dump(),
            "by": by,
            "cohort_snapshot": plan.dataset.snapshot_hash,
            "note": "risks written to a file at this site; nothing left the site",
        },
    )
    return report
