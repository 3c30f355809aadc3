"""One federated round at a hospital, from the coordinator's instruction to what leaves the site.

The order of the checks is the point of this module. Nothing touches patient data before the study
is recognised (its hash recomputed here, not trusted) and approved by this site's data steward, and
before the site's policy accepts it. The privacy budget is reserved (durably) before training and
committed after, so a crash never under-counts and a retry never double-spends. Every decision,
refusals included, goes into the hash-chained audit log with exactly what left the site. The answer
always says what happened: a refusal carries a code and a sentence, never silence.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import time
import traceback
from dataclasses import dataclass, field

import torch

from federation.models import build_model
from federation.protocol import ProtocolError, RefusalCode, RoundInstruction, SiteAnswer, SiteStatus
from federation.study import StudyError, StudySpec, study_hash
from federation.study.features import feature_names
from federation.study.spec import ROBUST_STRATEGIES
from site_node.cohort import CohortError, StudyDataset
from site_node.cohort.cache import cached_dataset
from site_node.config import SiteConfig
from site_node.governance import BudgetRefused, Governance, PrivacyEvent, load_policy, suppress_small_counts
from site_node.governance.ledger import RELEASED, RoundAlreadyTrained
from site_node.releases import Release, ReleasedUpdates
from site_node.training import NotPrivateError, calibrate_noise, check_privacy_honest, evaluate, schedule, train_dp

COUNT_METRICS = ("num-examples", "num-positive")
# Seconds this site spent on the round (checks, cohort, training or evaluation), so the coordinator can
# tell its own overhead from the sites' work. It reveals nothing new: the coordinator already sees how
# long each site took to answer; this only separates the site's part from the transport.
COMPUTE_METRIC = "compute-seconds"


class Refusal(Exception):
    """A round this site will not run, with the code the coordinator counts and a sentence it shows."""

    def __init__(self, code: RefusalCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass
class RoundOutcome:
    """What goes back to the coordinator: the answer, the weights (only after training) and metrics."""

    answer: SiteAnswer
    state_dict: dict[str, torch.Tensor] | None = None
    metrics: dict[str, float | int] = field(default_factory=dict)
    # Stays at the site: the training loss is computed on patients' data without noise, outside the DP
    # guarantee, so it is shown locally (train-local, the audit) but never sent.
    local_train_loss: float | None = None
    # The exact training-set size, for SecAgg+ only, where it is masked with the update as its weight.
    train_examples: int | None = None


@dataclass
class _Plan:
    spec: StudySpec
    study_hash: str
    dataset: StudyDataset
    consent_snapshot: str


class SiteNode:
    """A hospital's side of a study: governance first, then data, then training or evaluation."""

    def __init__(self, config: SiteConfig) -> None:
        self.config = config
        self.policy = load_policy(config.policy)
        self.releases = ReleasedUpdates(config.base_dir / "released")
        self.governance = Governance(
            config.governance_db, self.policy, audit_head_file=config.audit_head, schema=config.governance_schema
        )

    # --- the two things a coordinator may ask -------------------------------------------------------

    def train(self, instruction: RoundInstruction, global_state: dict[str, torch.Tensor]) -> RoundOutcome:
        """Train one round with DP-SGD on this site's training split, if every rule allows it."""
        started = time.perf_counter()
        try:
            return self._train(instruction, global_state, started)
        except Refusal as refusal:
            return self._refused("train", instruction, refusal)
        except Exception as exc:  # a site fault (database down, bad weights): the coordinator must hear why
            return self._refused("train", instruction, self._site_error(exc))

    def evaluate(self, instruction: RoundInstruction, global_state: dict[str, torch.Tensor]) -> RoundOutcome:
        """Evaluate the global model on this site's held-out test split; spends no privacy budget."""
        started = time.perf_counter()
        try:
            return self._evaluate(instruction, global_state, started)
        except Refusal as refusal:
            return self._refused("evaluate", instruction, refusal)
        except Exception as exc:
            return self._refused("evaluate", instruction, self._site_error(exc))

    def admit(self, instruction: RoundInstruction) -> RoundOutcome:
        """Say whether this site would train the round, before a secure round makes any key.

        The same checks as training, in the same order (study, approval, policy, budget, cohort), and
        nothing is reserved or trained. A ready site sends its training-set size under the cell-count
        floor, as a trained site does in a plain round: the coordinator sizes the protocol's weights.
        """
        started = time.perf_counter()
        try:
            spec, digest = self._recognise(instruction)
            self._secure_enough(instruction)
            self._budget_left(spec, digest, instruction.round_key)
            plan = self._data(spec, digest)
        except Refusal as refusal:
            return self._refused("admit", instruction, refusal)
        except Exception as exc:
            return self._refused("admit", instruction, self._site_error(exc))
        n_train = int((plan.dataset.split == "train").sum())
        metrics, suppressed = suppress_small_counts(
            {"num-examples": n_train, COMPUTE_METRIC: _since(started)}, COUNT_METRICS, self.policy.min_cell_count
        )
        return self._metrics_only("round-admitted", SiteStatus.READY, instruction, plan, metrics, suppressed)

    def policy_conflicts(self, spec: StudySpec) -> list[str]:
        """What in a study this site's policy would refuse whatever the data (checked when approving)."""
        problems = []
        if spec.privacy.target_epsilon > self.policy.study_epsilon_ceiling:
            problems.append(
                f"the study's epsilon {spec.privacy.target_epsilon:g} is above the site's per-study ceiling "
                f"{self.policy.study_epsilon_ceiling:g}"
            )
        if spec.privacy.target_delta is not None and spec.privacy.target_delta > self.policy.max_delta:
            problems.append(
                f"the study's delta {spec.privacy.target_delta:g} is above the site's maximum {self.policy.max_delta:g}"
            )
        if (
            self.policy.require_secure_aggregation
            and not spec.federation.secure_aggregation
            and spec.federation.strategy in ROBUST_STRATEGIES
        ):
            problems.append(
                f"the site requires secure aggregation, which the study's strategy '{spec.federation.strategy}' "
                "cannot use (it needs every site's own update)"
            )
        return problems

    def policy_notes(self, spec: StudySpec) -> list[str]:
        """What a steward should know when approving a study this policy accepts, but with a consequence."""
        if self.policy.require_secure_aggregation and not spec.federation.secure_aggregation:
            return [
                "the study does not ask for secure aggregation: this site will refuse its plain rounds "
                "(spending nothing), and the coordinator then runs the later rounds with SecAgg+, which needs "
                "at least 3 hospitals ready in each round"
            ]
        return []

    def feature_count(self, spec: StudySpec) -> int:
        """How many inputs the study's model has (the same at every site)."""
        return len(feature_names(spec))

    # --- steps --------------------------------------------------------------------------------------

    def _recognise(self, instruction: RoundInstruction) -> tuple[StudySpec, str]:
        """The study as sent, its hash as computed here, and this site's approval of exactly that hash."""
        try:
            spec = instruction.study()
        except (ProtocolError, StudyError) as exc:
            raise Refusal(RefusalCode.POLICY, f"the study sent by the coordinator is not valid here: {exc}") from None
        computed = study_hash(spec)
        if computed != instruction.study_hash:
            raise Refusal(
                RefusalCode.STUDY_HASH_MISMATCH,
                f"the coordinator labelled the study {instruction.study_hash[:12]}, but its content hashes to "
                f"{computed[:12]} here (altered study, or a different twinfed version): not run.",
            )
        if not self.governance.approvals.is_approved(computed):
            raise Refusal(
                RefusalCode.UNAPPROVED_STUDY,
                f"study '{spec.study.id}' (hash {computed[:12]}) is not approved at site {self.config.site_id}; "
                "the site's data steward approves it with `twinfed site approve`.",
            )
        return spec, computed

    def _secure_enough(self, instruction: RoundInstruction) -> None:
        """A site whose policy requires secure aggregation releases no update in the clear.

        Evaluation is not concerned: what leaves then are metrics over the held-out split, already under
        the cell-count floor. The coordinator reads this code and runs the study's next rounds with SecAgg+.
        """
        if self.policy.require_secure_aggregation and not instruction.secure_aggregation:
            raise Refusal(
                RefusalCode.NEEDS_SECURE_AGGREGATION,
                f"site {self.config.site_id} requires secure aggregation and this round does not use it.",
            )

    def _data(self, spec: StudySpec, digest: str) -> _Plan:
        withdrawn = self.governance.withdrawals.person_ids()
        try:
            dataset = cached_dataset(
                self.config.omop.url,
                spec,
                digest,
                split_key=self.config.split_key(),
                schema=self.config.omop.schema_name,
                withdrawn=withdrawn,
            )
        except CohortError as exc:
            raise Refusal(
                RefusalCode.SITE_ERROR, f"the cohort cannot be built at {self.config.site_id}: {exc}"
            ) from None
        if len(dataset.person_ids) < self.policy.min_cohort_size:
            # The size itself is not sent: a small count is exactly what the cell-count floor protects.
            raise Refusal(
                RefusalCode.COHORT_TOO_SMALL,
                f"the cohort at {self.config.site_id} is smaller than the site's minimum of "
                f"{self.policy.min_cohort_size} patients.",
            )
        # What consent state this round applied: the site's withdrawals and the count excluded by consent
        # records, hashed with the site key so the value proves the state without revealing anyone.
        consent = hmac.new(
            self.config.split_key(),
            f"{sorted(withdrawn)}|{dataset.excluded_by_consent}".encode(),
            hashlib.sha256,
        ).hexdigest()
        return _Plan(spec, digest, dataset, consent)

    def _model(self, spec: StudySpec, dataset: StudyDataset, global_state: dict[str, torch.Tensor]) -> torch.nn.Module:
        model = build_model(spec.model, dataset.features.shape[1], seed=spec.training.seed)
        try:
            model.load_state_dict(global_state)
        except RuntimeError as exc:
            raise Refusal(
                RefusalCode.SITE_ERROR,
                f"the global model does not fit this site's {dataset.features.shape[1]} features: {exc}",
            ) from None
        return model

    def _delta(self, spec: StudySpec, n_train: int) -> float:
        delta = spec.privacy.target_delta if spec.privacy.target_delta is not None else 1 / (10 * n_train)
        if delta > self.policy.max_delta:
            if spec.privacy.target_delta is not None:
                raise Refusal(
                    RefusalCode.POLICY,
                    f"the study's delta {delta:g} is above this site's maximum of {self.policy.max_delta:g}.",
                )
            delta = self.policy.max_delta
        return delta

    def _budget_left(self, spec: StudySpec, digest: str, round_key: str) -> None:
        """Refuse before reading any patient data when the budget cannot cover another round.

        The exact projection needs the cohort size (the sampling rate), so it is the ledger's reservation,
        later. Here the next round is assumed to cost what the study's last round here cost: cohorts
        change little between rounds, and a larger one would cost slightly less, so this errs on the safe
        side. A retry of a round whose reservation survived a crash is let through: its budget is held; so
        is a retry of a round already trained, whose kept update is re-sent without spending anything.
        """
        ledger = self.governance.ledger
        reservations = [r for r in ledger.reservations(digest) if r.status != RELEASED]
        if any(r.round_key == round_key for r in reservations):
            return  # held (reserved) or spent (committed: the kept update is re-sent at no cost)
        study_ceiling = min(spec.privacy.target_epsilon, self.policy.study_epsilon_ceiling)
        spent, site_spent = ledger.spent(digest), ledger.site_spent()
        if reservations:
            last = reservations[-1]
            events = [r.event for r in reservations] + [last.event]
            projected = ledger.epsilon(events, min(r.delta for r in reservations), last.accountant)
        else:
            projected = spent
        if projected > study_ceiling:
            raise Refusal(
                RefusalCode.BUDGET,
                f"study '{spec.study.id}' has spent epsilon {spent:.3f} of its {study_ceiling:g} at "
                f"{self.config.site_id}; another round like the last would take it to {projected:.3f}.",
            )
        if site_spent + (projected - spent) > self.policy.site_epsilon_ceiling:
            raise Refusal(
                RefusalCode.BUDGET,
                f"{self.config.site_id} has spent epsilon {site_spent:.3f} of its site-wide ceiling "
                f"{self.policy.site_epsilon_ceiling:g}; another round of '{spec.study.id}' would exceed it.",
            )

    def _train(
        self, instruction: RoundInstruction, global_state: dict[str, torch.Tensor], started: float
    ) -> RoundOutcome:
        spec, digest = self._recognise(instruction)
        self._secure_enough(instruction)
        self._budget_left(spec, digest, instruction.round_key)
        plan = self._data(spec, digest)
        train = plan.dataset.subset("train")
        n_train = len(train.person_ids)
        model = self._model(spec, train, global_state)
        delta = self._delta(spec, n_train)
        sample_rate, steps_per_round, total_steps = schedule(n_train, spec.training)
        try:
            sigma = calibrate_noise(
                spec.privacy.target_epsilon, delta, sample_rate, total_steps, spec.privacy.accountant
            )
            check_privacy_honest(sigma, spec.privacy.max_grad_norm, delta, n_train, self.policy.min_noise_multiplier)
        except NotPrivateError as exc:
            raise Refusal(RefusalCode.NOT_PRIVATE, str(exc)) from None
        event = PrivacyEvent(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps_per_round)
        try:
            reservation = self.governance.ledger.reserve(
                digest, instruction.round_key, event, delta, spec.privacy.accountant, spec.privacy.target_epsilon
            )
        except RoundAlreadyTrained as exc:
            return self._resend(digest, instruction, exc)
        except BudgetRefused as exc:
            raise Refusal(RefusalCode.BUDGET, exc.reason) from None
        # The accountant restored for training: every other round of this study that counts (committed, or
        # reserved by a crashed attempt); this round's own reservation is the one being trained now.
        prior_history = [
            r.event
            for r in self.governance.ledger.reservations(digest)
            if r.id != reservation.id and r.status != RELEASED
        ]
        self.governance.membership.record(digest, instruction.round_key, (int(p) for p in train.person_ids))
        self.governance.audit.append(
            "round-started",
            {
                "study_hash": digest,
                "study_id": spec.study.id,
                "round": instruction.round_key,
                "cohort_snapshot": plan.dataset.snapshot_hash,
                "consent_snapshot": plan.consent_snapshot,
                "cohort_size": plan.dataset.cohort_size,
                "excluded_by_consent": plan.dataset.excluded_by_consent,
                "withdrawals_on_record": len(self.governance.withdrawals.person_ids()),
                "train_examples": n_train,
                "noise_multiplier": sigma,
                "sample_rate": sample_rate,
                "steps": steps_per_round,
                "delta": delta,
            },
        )
        result = train_dp(
            model,
            train.features,
            train.labels,
            training=spec.training,
            privacy=spec.privacy,
            noise_multiplier=sigma,
            delta=delta,
            accountant_history=[(e.noise_multiplier, e.sample_rate, e.steps) for e in prior_history],
            global_state=global_state,
            seed=spec.training.seed + instruction.server_round,
        )
        epsilon = self.governance.ledger.commit(
            reservation, PrivacyEvent(noise_multiplier=sigma, sample_rate=sample_rate, steps=result.steps)
        )
        metrics, suppressed = suppress_small_counts(
            {"num-examples": result.num_examples, "epsilon": epsilon, COMPUTE_METRIC: _since(started)},
            COUNT_METRICS,
            self.policy.min_cell_count,
        )
        ceiling = min(spec.privacy.target_epsilon, self.policy.study_epsilon_ceiling)
        self.governance.audit.append(
            "round-trained",
            {
                "study_hash": digest,
                "round": instruction.round_key,
                "epsilon_after": epsilon,
                "epsilon_ceiling": ceiling,
                "train_loss_kept_at_site": result.train_loss,
                "left_the_site": {
                    "tensors": {name: list(t.shape) for name, t in result.state_dict.items()},
                    "update_norm": result.update_norm,
                    "metrics": metrics,
                    "suppressed": suppressed,
                },
            },
        )
        answer = SiteAnswer(
            site_id=self.config.site_id,
            status=SiteStatus.TRAINED,
            epsilon_spent=epsilon,
            epsilon_ceiling=ceiling,
            suppressed=",".join(suppressed) or None,
            cohort_snapshot=plan.dataset.snapshot_hash,
            consent_snapshot=plan.consent_snapshot,
        )
        self.releases.save(
            digest,
            instruction.round_key,
            Release(result.state_dict, metrics, answer.model_dump(mode="json"), num_examples=result.num_examples),
        )
        return RoundOutcome(
            answer, result.state_dict, metrics, local_train_loss=result.train_loss, train_examples=result.num_examples
        )

    def _resend(self, digest: str, instruction: RoundInstruction, refused: RoundAlreadyTrained) -> RoundOutcome:
        """A round trained and committed before (the coordinator restarted): send the same update again.

        It is the release already made, so it costs no privacy budget; without a kept copy (a crash right
        after the commit) the retry is refused instead, never trained twice.
        """
        release = self.releases.load(digest, instruction.round_key)
        if release is None:
            raise Refusal(RefusalCode.ALREADY_TRAINED, str(refused))
        answer = SiteAnswer.model_validate(release.answer)
        self.governance.audit.append(
            "round-resent",
            {
                "study_hash": digest,
                "round": instruction.round_key,
                "note": "the coordinator asked again for a round already trained; the same update was re-sent, "
                "no new privacy budget was spent",
                "left_the_site": {
                    "tensors": {name: list(t.shape) for name, t in release.state_dict.items()},
                    "metrics": release.metrics,
                },
            },
        )
        return RoundOutcome(answer, release.state_dict, dict(release.metrics), train_examples=release.num_examples)

    def _evaluate(
        self, instruction: RoundInstruction, global_state: dict[str, torch.Tensor], started: float
    ) -> RoundOutcome:
        spec, digest = self._recognise(instruction)
        plan = self._data(spec, digest)
        test = plan.dataset.subset("test")
        model = self._model(spec, test, global_state)
        raw = evaluate(model, test.features, test.labels)
        values = {k.replace("_", "-"): v for k, v in raw.items() if isinstance(v, int | float) and math.isfinite(v)}
        values[COMPUTE_METRIC] = _since(started)
        metrics, suppressed = suppress_small_counts(values, COUNT_METRICS, self.policy.min_cell_count)
        return self._metrics_only(
            "evaluated",
            SiteStatus.EVALUATED,
            instruction,
            plan,
            metrics,
            suppressed,
            epsilon_spent=self.governance.ledger.spent(digest),
        )

    def _metrics_only(
        self,
        event: str,
        status: SiteStatus,
        instruction: RoundInstruction,
        plan: _Plan,
        metrics: dict[str, float | int],
        suppressed: list[str],
        epsilon_spent: float | None = None,
    ) -> RoundOutcome:
        """An answer that releases metrics and no weights (admission, evaluation): audited as it leaves."""
        self.governance.audit.append(
            event,
            {
                "study_hash": plan.study_hash,
                "round": instruction.round_key,
                "cohort_snapshot": plan.dataset.snapshot_hash,
                "left_the_site": {"metrics": metrics, "suppressed": suppressed},
            },
        )
        answer = SiteAnswer(
            site_id=self.config.site_id,
            status=status,
            epsilon_spent=epsilon_spent,
            suppressed=",".join(suppressed) or None,
            cohort_snapshot=plan.dataset.snapshot_hash,
            consent_snapshot=plan.consent_snapshot,
        )
        return RoundOutcome(answer, None, metrics)

    # --- refusals -----------------------------------------------------------------------------------

    def _site_error(self, exc: Exception) -> Refusal:
        last = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
        where = f" (in {last.name})" if last else ""
        return Refusal(RefusalCode.SITE_ERROR, f"site {self.config.site_id} failed{where}: {exc}")

    def _refused(self, action: str, instruction: RoundInstruction, refusal: Refusal) -> RoundOutcome:
        self.governance.audit.append(
            "refused",
            {
                "action": action,
                "claimed_study_hash": instruction.study_hash,
                "round": instruction.round_key,
                "code": refusal.code.value,
                "reason": refusal.reason,
            },
        )
        answer = SiteAnswer(
            site_id=self.config.site_id, status=SiteStatus.REFUSED, code=refusal.code, reason=refusal.reason
        )
        return RoundOutcome(answer)


def _since(started: float) -> float:
    """Seconds since `started` (time.perf_counter), to the millisecond."""
    return round(time.perf_counter() - started, 3)
