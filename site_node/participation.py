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
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from federation.contract import StudyError, StudySpec, study_hash
from federation.contract.features import feature_names
from federation.contract.protocol import (
    EvaluationRelease,
    ProtocolError,
    RefusalCode,
    ReleaseMode,
    RoundInstruction,
    SiteAnswer,
    SiteStatus,
)
from federation.contract.spec import ROBUST_STRATEGIES
from federation.contract.strata import Strata
from federation.twins import build_model, kind_of
from site_node.cohort import CohortError, StudyDataset, most_removed, render_attrition
from site_node.cohort.cache import cached_dataset
from site_node.cohort.dataset import CALIBRATION
from site_node.config import SiteConfig
from site_node.evaluation_release import (
    dp_release,
    dp_score_release,
    evaluation_noise,
    exact_release,
    outcome_noise,
)
from site_node.governance import (
    BudgetRefused,
    Governance,
    GovernanceInconsistent,
    PrivacyEvent,
    load_policy,
    suppress_small_counts,
)
from site_node.governance.data_period import data_period
from site_node.governance.ledger import (
    EVALUATE,
    NON_PRIVATE,
    RELEASED,
    TRAIN,
    Inheritance,
    Reservation,
    RoundAlreadyTrained,
    RoundInProgress,
)
from site_node.releases import Release, ReleasedUpdates, save_global_model
from site_node.training import (
    NotPrivateError,
    TrainResult,
    calibrate_noise,
    check_privacy_honest,
    schedule,
    train_dp,
    train_plain,
)
from site_node.training.objectives import objective_of

COUNT_METRICS = ("num-examples", "num-positive")
NON_PRIVATE_REFUSED = (
    "it is not differentially private (privacy mode none), and this site's policy does not allow non-private "
    "studies (allow_non_private: false); the data steward may allow them under a data-sharing agreement by "
    "setting allow_non_private: true and require_dp: false"
)
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
    # What an evaluation released (sent as its own record beside the answer).
    evaluation: EvaluationRelease | None = None


@dataclass
class _Plan:
    spec: StudySpec
    study_hash: str
    dataset: StudyDataset
    consent_snapshot: str


@dataclass(frozen=True)
class _Round:
    """A training round past its checks, as the reserved part of it needs it."""

    instruction: RoundInstruction
    spec: StudySpec
    digest: str
    plan: _Plan
    train: StudyDataset
    model: torch.nn.Module
    global_state: dict[str, torch.Tensor]
    started: float

    def parts(self) -> tuple:
        return (
            self.instruction,
            self.spec,
            self.digest,
            self.plan,
            self.train,
            self.model,
            self.global_state,
            self.started,
        )


class SiteNode:
    """A hospital's side of a study: governance first, then data, then training or evaluation."""

    def __init__(self, config: SiteConfig) -> None:
        self.config = config
        self.policy = load_policy(config.policy)
        self.releases = ReleasedUpdates(config.base_dir / "released")
        self.governance = Governance.of_site(config, self.policy)

    # --- the two things a coordinator may ask -------------------------------------------------------

    def train(self, instruction: RoundInstruction, global_state: dict[str, torch.Tensor]) -> RoundOutcome:
        """Train one round with DP-SGD on this site's training split, if every rule allows it."""
        started = time.perf_counter()
        try:
            self._intact()
            return self._witnessed(self._train(instruction, global_state, started))
        except Refusal as refusal:
            return self._refused("train", instruction, refusal)
        except Exception as exc:  # a site fault (database down, bad weights): the coordinator must hear why
            return self._refused("train", instruction, self._site_error(exc))

    def evaluate(self, instruction: RoundInstruction, global_state: dict[str, torch.Tensor]) -> RoundOutcome:
        """Evaluate the global model on the held-out part the instruction names (validation or test).

        What leaves is the release the site's policy chooses (site_node.evaluation_release): DP score
        histograms whose epsilon the ledger accounts, or exact aggregates under the cell-count floor."""
        started = time.perf_counter()
        try:
            self._intact()
            return self._witnessed(self._evaluate(instruction, global_state, started))
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
            self._intact()
            spec, digest = self._recognise(instruction)
            self._private_enough(spec)
            self._secure_enough(instruction)
            self._budget_left(spec, digest, instruction.round_key)
            plan = self._data(spec, digest)
        except Refusal as refusal:
            return self._refused("admit", instruction, refusal)
        except Exception as exc:
            return self._refused("admit", instruction, self._site_error(exc))
        n_train = int((plan.dataset.split == "train").sum())
        metrics, suppressed = self._counted(
            plan, instruction.round_key, {"num-examples": n_train, COMPUTE_METRIC: _since(started)}
        )
        return self._witnessed(
            self._metrics_only("round-admitted", SiteStatus.READY, instruction, plan, metrics, suppressed)
        )

    def policy_conflicts(self, spec: StudySpec) -> list[str]:
        """What in a study this site's policy would refuse whatever the data (checked when approving)."""
        problems = []
        if not spec.privacy.private:
            if not self.policy.allow_non_private:
                problems.append(NON_PRIVATE_REFUSED)
            return problems
        budget = spec.epsilon_budget() or 0.0
        if budget > self.policy.study_epsilon_ceiling:
            problems.append(
                f"the study's epsilon {budget:g} (training {spec.privacy.target_epsilon:g} + evaluation "
                f"{spec.evaluation.epsilon:g}) is above the site's per-study ceiling "
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
        notes = []
        if self.policy.require_secure_aggregation and not spec.federation.secure_aggregation:
            notes.append(
                "the study does not ask for secure aggregation: this site will refuse its plain rounds "
                "(spending nothing), and the coordinator then runs the later rounds with SecAgg+, which needs "
                "at least 3 hospitals ready in each round"
            )
        if not spec.privacy.private:
            notes.append(
                "this study is NOT differentially private: its updates and evaluations leave the site without "
                "noise (exact evaluation aggregates stay under the cell-count floor); the ledger records its "
                "rounds as not differentially private"
            )
        elif self.policy.evaluation_release == "exact":
            notes.append(
                "this site releases exact evaluation aggregates under its cell-count floor (evaluation_release: "
                "exact), so the study's evaluation epsilon is not spent here"
            )
        else:
            notes.append(
                f"evaluation leaves this site as differentially private score histograms: epsilon "
                f"{spec.evaluation.epsilon:g} over {spec.evaluation_releases()} release(s), composed with training's "
                f"{spec.privacy.target_epsilon:g} in the ledger"
            )
        return notes

    def inheritance(self, spec: StudySpec, digest: str) -> Inheritance | None:
        """What this version of a study takes over from earlier versions that ran here (its budget follows
        the study id, not the hash): told to the steward when approving it."""
        ceiling = spec.epsilon_budget() if spec.privacy.private else self.policy.study_epsilon_ceiling
        return self.governance.ledger.inherited(spec.study.id, digest, ceiling or self.policy.study_epsilon_ceiling)

    def feature_count(self, spec: StudySpec) -> int:
        """How many inputs the study's model has (the same at every site)."""
        return len(feature_names(spec))

    # --- steps --------------------------------------------------------------------------------------

    def _intact(self) -> None:
        """No round runs while the governance database and the audit chain disagree (ledger rows deleted or
        edited, the database replaced, entries forged past the head): the budget could not be trusted."""
        try:
            self.governance.require_intact()
        except GovernanceInconsistent:
            # What disagrees (which ledger rows, which audit entries and their kinds) stays at the site, where
            # `site audit verify` lists it: the coordinator only learns that this site runs nothing until then.
            raise Refusal(
                RefusalCode.GOVERNANCE_INCONSISTENT,
                f"site {self.config.site_id}'s governance database does not agree with its audit chain; it runs no "
                "round until its data steward has restored them (`twinfed site audit verify` at the site lists why).",
            ) from None

    def _witnessed(self, outcome: RoundOutcome) -> RoundOutcome:
        """The answer names the site's audit head (its hash) as it stands after the round's entries: the
        consortium keeps it, so a chain later rewritten (even by someone with the site's key) no longer matches
        what it saw. Not its number: the difference between two rounds' numbers would count the events between
        them, consent withdrawals included, however few."""
        head = self.governance.audit.latest()
        if head is not None:
            outcome.answer = outcome.answer.model_copy(update={"audit_hash": head.hash})
        return outcome

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

    def _private_enough(self, spec: StudySpec) -> None:
        """A non-private study runs only where the site's policy explicitly allows it."""
        if not spec.privacy.private and not self.policy.allow_non_private:
            raise Refusal(RefusalCode.NOT_PRIVATE, f"study '{spec.study.id}': {NON_PRIVATE_REFUSED}.")

    def _counted(
        self, plan: _Plan, release_key: str, metrics: dict[str, float | int]
    ) -> tuple[dict[str, float | int], list[str]]:
        """The training-set size with the other metrics, if it may leave: at or above the floor, and not
        differing from an earlier release of the same study by less than the floor."""
        kept, suppressed = suppress_small_counts(metrics, COUNT_METRICS, self.policy.min_cell_count)
        if "num-examples" in kept:
            reason = self.governance.disclosures.check_and_record(
                plan.spec.study.id,
                plan.study_hash,
                "train",
                release_key,
                {frozenset({"train"}): int(kept["num-examples"])},
                self.policy.min_cell_count,
            )
            if reason is not None:
                kept.pop("num-examples")
                suppressed.append("num-examples")
        return kept, suppressed

    def dataset(self, spec: StudySpec, digest: str, withdrawn: set[int] | None = None) -> StudyDataset:
        """The study's dataset at this site as a round builds it (consent and withdrawals applied; reused
        while its inputs are unchanged). Raises CohortError when the database cannot give it."""
        return cached_dataset(
            self.config.omop.url,
            spec,
            digest,
            split_key=self.config.split_key(),
            schema=self.config.omop.schema_name,
            withdrawn=self.governance.withdrawals.person_ids() if withdrawn is None else withdrawn,
        )

    def _data(self, spec: StudySpec, digest: str) -> _Plan:
        withdrawn = self.governance.withdrawals.person_ids()
        try:
            dataset = self.dataset(spec, digest, withdrawn)
        except CohortError as exc:
            raise Refusal(
                RefusalCode.SITE_ERROR, f"the cohort cannot be built at {self.config.site_id}: {exc}"
            ) from None
        if len(dataset.person_ids) < self.policy.min_cohort_size:
            raise Refusal(
                RefusalCode.COHORT_TOO_SMALL,
                f"the cohort at {self.config.site_id} is smaller than the site's minimum of "
                f"{self.policy.min_cohort_size} patients: {self._why_small(spec, digest, dataset)}",
            )
        # What consent state this round applied: the site's withdrawals and the count excluded by consent
        # records, hashed with the site key so the value proves the state without revealing anyone.
        consent = hmac.new(
            self.config.split_key(),
            f"{sorted(withdrawn)}|{dataset.excluded_by_consent}".encode(),
            hashlib.sha256,
        ).hexdigest()
        return _Plan(spec, digest, dataset, consent)

    def _why_small(self, spec: StudySpec, digest: str, dataset: StudyDataset) -> str:
        """The attrition sentence a refusal may carry: counts only as the cell-count floor allows (none below it,
        none from which one below it follows) and only when none differs by less than the floor from what an
        earlier refusal of this study said; otherwise just the criterion that removed the most."""
        floor = self.policy.min_cell_count
        top = most_removed(dataset.attrition)
        if top is None:
            return "no inclusion criterion removed anyone; the site has too few patients of the cohort's kind."
        display = render_attrition(
            dataset.attrition, floor, name_most_removed=True, cohort_below=self.policy.min_cohort_size
        )
        first, last = display.steps[0], display.steps[-1]
        top_shown = display.steps[dataset.attrition.steps.index(top)].removed_persons
        counts = {
            frozenset({name}): int(value)
            for name, value in (("cohort-start", first.persons), ("cohort-end", last.persons), ("top", top_shown))
            if value.isdigit()
        }
        unchanged = self.governance.disclosures.check_and_record(
            spec.study.id, digest, "attrition", f"refusal:{dataset.snapshot_hash[:16]}", counts, floor
        )
        if counts and unchanged is None:
            return display.sentence
        return f"the criterion that removed the most patients was '{top.criterion}'."

    def _model(self, spec: StudySpec, dataset: StudyDataset, global_state: dict[str, torch.Tensor]) -> torch.nn.Module:
        model = build_model(spec.model, len(dataset.feature_names), seed=spec.training.seed)
        try:
            model.load_state_dict(global_state)
        except RuntimeError as exc:
            raise Refusal(
                RefusalCode.SITE_ERROR,
                f"the global model does not fit this site's {len(dataset.feature_names)} features: {exc}",
            ) from None
        return model

    @staticmethod
    def _at_site(spec: StudySpec, model: torch.nn.Module, dataset: StudyDataset) -> torch.nn.Module:
        """The global model with this site's own calibration on top (the trajectory kind's conformal step,
        from the calibration patients kept out of training); other kinds as they are."""
        if dataset.targets is None or not (dataset.split == CALIBRATION).any():
            return model
        calibration = dataset.subset(CALIBRATION)
        return kind_of(spec.model).at_site(spec.model, model, (calibration.features, calibration.targets))

    @staticmethod
    def _targets(spec: StudySpec, data: StudyDataset):
        """What the study's twin kind learns from, per patient of `data`."""
        try:
            if data.targets is not None:  # cut from the patients' series with the cohort (the trajectory kind)
                return data.targets
            return kind_of(spec.model).targets_of(spec.model, data.labels, data.event_days)
        except ValueError as exc:
            raise Refusal(
                RefusalCode.SITE_ERROR, f"the cohort's outcomes do not fit the study's model: {exc}"
            ) from None

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
        later. Here the next round is assumed to cost what the study's last training round here cost:
        cohorts change little between rounds, and a larger one would cost slightly less, so this errs on the
        safe side. A retry of a round whose reservation survived a crash is let through: its budget is held;
        so is a retry of a round already trained, whose kept update is re-sent without spending anything.
        The ceiling is the study's whole budget (training and evaluation) and the projection composes
        every release made so far, evaluations included. A non-private study has no budget to check.
        """
        if not spec.privacy.private:
            return
        ledger = self.governance.ledger
        lineage = spec.study.id
        reservations = [
            r for r in ledger.reservations(lineage=lineage) if r.status != RELEASED and r.purpose != NON_PRIVATE
        ]
        if any(r.study_hash == digest and r.round_key == round_key for r in reservations):
            return  # held (reserved) or spent (committed: the kept update is re-sent at no cost)
        study_ceiling = min(spec.epsilon_budget() or 0.0, self.policy.study_epsilon_ceiling)
        spent, site_spent = ledger.spent(lineage), ledger.site_spent()
        trained = [r for r in reservations if r.purpose == TRAIN]
        if trained:
            last = trained[-1]
            events = [r.event for r in reservations] + [last.event]
            delta = min(r.delta for r in reservations)
            projected = ledger.epsilon(events, delta, last.accountant)
            training_alone = ledger.epsilon([r.event for r in trained] + [last.event], delta, last.accountant)
            if training_alone > float(spec.privacy.target_epsilon):
                raise Refusal(
                    RefusalCode.BUDGET,
                    f"study '{spec.study.id}' has spent its training budget at {self.config.site_id} (every "
                    "version of it approved here shares one budget): another "
                    f"round like the last would take training to epsilon {training_alone:.3f}, above its "
                    f"{spec.privacy.target_epsilon:g}.",
                )
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
        self._private_enough(spec)
        self._secure_enough(instruction)
        self._budget_left(spec, digest, instruction.round_key)
        plan = self._data(spec, digest)
        train = plan.dataset.subset("train")
        n_train = len(train.person_ids)
        if n_train == 0:
            raise Refusal(
                RefusalCode.COHORT_TOO_SMALL,
                f"the study's split leaves no training examples at {self.config.site_id} (its evaluation.split).",
            )
        model = self._model(spec, train, global_state)
        if not spec.privacy.private:
            return self._train_non_private(instruction, spec, digest, plan, train, model, global_state, started)
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
        job = _Round(instruction, spec, digest, plan, train, model, global_state, started)
        return self._leased(
            job,
            lambda: self.governance.ledger.reserve(
                digest,
                instruction.round_key,
                event,
                delta,
                spec.privacy.accountant,
                spec.epsilon_budget(),
                TRAIN,
                purpose_ceiling=spec.privacy.target_epsilon,
                lineage=spec.study.id,
            ),
            self._train_reserved,
        )

    def _leased(
        self, job: _Round, reserve: Callable[[], Reservation], body: Callable[[_Round, Reservation], RoundOutcome]
    ) -> RoundOutcome:
        """Reserve the round's budget, then run `body` holding the reservation's lease (renewed while it runs,
        let go of when it ends): a second message for the same round meanwhile is refused, not trained."""
        try:
            reservation = reserve()
        except RoundAlreadyTrained as exc:
            return self._resend(job.digest, job.instruction, exc)
        except RoundInProgress as exc:
            raise Refusal(RefusalCode.IN_PROGRESS, exc.reason) from None
        except BudgetRefused as exc:
            raise Refusal(RefusalCode.BUDGET, exc.reason) from None
        with self.governance.ledger.holding(reservation):
            return body(job, reservation)

    def _train_reserved(self, job: _Round, reservation: Reservation) -> RoundOutcome:
        """The round once its budget is reserved and its lease held: train, commit, release the update."""
        instruction, spec, digest, plan, train, model, global_state, started = job.parts()
        sigma, delta = reservation.event.noise_multiplier, reservation.delta
        sample_rate, steps_per_round = reservation.event.sample_rate, reservation.event.steps
        n_train = len(train.person_ids)
        # The accountant restored for training: every other round of this study that counts (committed, or
        # reserved by a crashed attempt); this round's own reservation is the one being trained now.
        prior_history = [
            r.event
            for r in self.governance.ledger.reservations(lineage=spec.study.id)
            if r.id != reservation.id and r.status != RELEASED and r.purpose != NON_PRIVATE
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
            self._targets(spec, train),
            training=spec.training,
            privacy=spec.privacy,
            noise_multiplier=sigma,
            delta=delta,
            accountant_history=[(e.noise_multiplier, e.sample_rate, e.steps) for e in prior_history],
            global_state=global_state,
            seed=spec.training.seed + instruction.server_round,
            objective=objective_of(spec.model),
        )
        epsilon = self.governance.ledger.commit(
            reservation, PrivacyEvent(noise_multiplier=sigma, sample_rate=sample_rate, steps=result.steps)
        )
        metrics, suppressed = self._counted(
            plan,
            instruction.round_key,
            {"num-examples": result.num_examples, "epsilon": epsilon, COMPUTE_METRIC: _since(started)},
        )
        ceiling = min(spec.epsilon_budget() or 0.0, self.policy.study_epsilon_ceiling)
        by_purpose = self.governance.ledger.spent_by_purpose(spec.study.id)
        return self._release_update(
            instruction,
            digest,
            plan,
            result,
            metrics,
            suppressed,
            audit={"epsilon_after": epsilon, "epsilon_ceiling": ceiling},
            answer={
                "epsilon_spent": epsilon,
                "epsilon_ceiling": ceiling,
                "epsilon_training": by_purpose[TRAIN],
                "epsilon_evaluation": by_purpose[EVALUATE],
            },
        )

    def _release_update(
        self,
        instruction: RoundInstruction,
        digest: str,
        plan: _Plan,
        result: TrainResult,
        metrics: dict[str, float | int],
        suppressed: list[str],
        *,
        audit: dict[str, object],
        answer: dict[str, object],
    ) -> RoundOutcome:
        """A trained round's update leaves: audited with exactly what left, kept for a retry, answered."""
        period = None
        if self.policy.disclose_data_period and plan.dataset.index_s is not None:
            period = data_period(plan.dataset.index_s[plan.dataset.split == "train"], self.policy.min_cell_count)
        self.governance.audit.append(
            "round-trained",
            {
                "study_hash": digest,
                "round": instruction.round_key,
                **audit,
                "train_loss_kept_at_site": result.train_loss,
                "left_the_site": {
                    "tensors": {name: list(t.shape) for name, t in result.state_dict.items()},
                    "update_norm": result.update_norm,
                    "metrics": metrics,
                    "suppressed": suppressed,
                    "data_period": period,
                },
            },
        )
        reply = SiteAnswer(
            site_id=self.config.site_id,
            status=SiteStatus.TRAINED,
            suppressed=",".join(suppressed) or None,
            cohort_snapshot=plan.dataset.snapshot_hash,
            consent_snapshot=plan.consent_snapshot,
            data_period=period,
            **answer,
        )
        self.releases.save(
            digest,
            instruction.round_key,
            Release(result.state_dict, metrics, reply.model_dump(mode="json"), num_examples=result.num_examples),
        )
        return RoundOutcome(
            reply, result.state_dict, metrics, local_train_loss=result.train_loss, train_examples=result.num_examples
        )

    def _train_non_private(
        self,
        instruction: RoundInstruction,
        spec: StudySpec,
        digest: str,
        plan: _Plan,
        train: StudyDataset,
        model: torch.nn.Module,
        global_state: dict[str, torch.Tensor],
        started: float,
    ) -> RoundOutcome:
        """A round of a study with privacy mode none, at a site whose policy allows it: plain training.

        The ledger gets a row for it (purpose non-private, no epsilon), so the steward's overview says the
        study ran here without DP; the answer, the receipt and the model card say so too.
        """
        steps = schedule(len(train), spec.training)[1]
        event = PrivacyEvent(noise_multiplier=0.0, sample_rate=1.0, steps=steps)
        delta = spec.privacy.target_delta or self.policy.max_delta
        job = _Round(instruction, spec, digest, plan, train, model, global_state, started)
        return self._leased(
            job,
            lambda: self.governance.ledger.reserve(
                digest,
                instruction.round_key,
                event,
                delta,
                spec.privacy.accountant,
                1.0,
                NON_PRIVATE,
                lineage=spec.study.id,
            ),
            self._train_plain_reserved,
        )

    def _train_plain_reserved(self, job: _Round, reservation: Reservation) -> RoundOutcome:
        """A non-private round once reserved and leased: plain training, commit, release the update."""
        instruction, spec, digest, plan, train, model, global_state, started = job.parts()
        self.governance.membership.record(digest, instruction.round_key, (int(p) for p in train.person_ids))
        self.governance.audit.append(
            "round-started",
            {
                "study_hash": digest,
                "study_id": spec.study.id,
                "round": instruction.round_key,
                "differentially_private": False,
                "cohort_snapshot": plan.dataset.snapshot_hash,
                "consent_snapshot": plan.consent_snapshot,
                "train_examples": len(train),
            },
        )
        result = train_plain(
            model,
            train.features,
            self._targets(spec, train),
            training=spec.training,
            global_state=global_state,
            seed=spec.training.seed + instruction.server_round,
            objective=objective_of(spec.model),
        )
        self.governance.ledger.commit(reservation)
        metrics, suppressed = self._counted(
            plan, instruction.round_key, {"num-examples": result.num_examples, COMPUTE_METRIC: _since(started)}
        )
        return self._release_update(
            instruction,
            digest,
            plan,
            result,
            metrics,
            suppressed,
            audit={"differentially_private": False},
            answer={"differentially_private": False},
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
        self._private_enough(spec)
        part, key = instruction.part, instruction.evaluation_key
        plan = self._data(spec, digest)
        if part == "test" and instruction.stage == "outcomes":
            save_global_model(self.config.base_dir / "models", digest, instruction.round_key, global_state)
        kept = self.releases.load(digest, key)
        if kept is not None and kept.evaluation is not None:
            return self._resend_evaluation(digest, instruction, kept)
        data = plan.dataset.subset(part)
        if len(data) == 0:
            raise Refusal(
                RefusalCode.COHORT_TOO_SMALL,
                f"the study's split leaves no {part} examples at {self.config.site_id} (its evaluation.split, e.g. "
                "a temporal split whose period lies after this site's data).",
            )
        model = self._at_site(spec, self._model(spec, data, global_state), plan.dataset)
        if spec.privacy.private and self.policy.evaluation_release == "dp":
            release = self._dp_evaluation(spec, digest, instruction, plan, data, model)
        elif instruction.stage == "scores":  # exact aggregates need no strata: nothing leaves at this stage
            release = EvaluationRelease(part=part, mode=ReleaseMode.EXACT, stage="scores")
        else:
            self._exact_releases_left(spec, digest, part)
            release = exact_release(
                model,
                data,
                spec,
                part,
                floor=self.policy.min_cell_count,
                register=self.governance.disclosures,
                study_hash=digest,
                release_key=key,
            )
        by_purpose = self.governance.ledger.spent_by_purpose(spec.study.id) if spec.privacy.private else None
        answer = SiteAnswer(
            site_id=self.config.site_id,
            status=SiteStatus.EVALUATED,
            epsilon_spent=by_purpose["total"] if by_purpose else None,
            epsilon_ceiling=min(spec.epsilon_budget(), self.policy.study_epsilon_ceiling) if by_purpose else None,
            epsilon_training=by_purpose[TRAIN] if by_purpose else None,
            epsilon_evaluation=by_purpose[EVALUATE] if by_purpose else None,
            differentially_private=spec.privacy.private,
            suppressed=release.withheld,
            cohort_snapshot=plan.dataset.snapshot_hash,
            consent_snapshot=plan.consent_snapshot,
        )
        metrics = {COMPUTE_METRIC: _since(started)}
        self.governance.audit.append(
            "evaluated",
            {
                "study_hash": digest,
                "round": key,
                "part": part,
                "cohort_snapshot": plan.dataset.snapshot_hash,
                "epsilon_after": answer.epsilon_spent,
                "left_the_site": {"evaluation": release.model_dump(mode="json", exclude_none=True), "metrics": metrics},
            },
        )
        kept = Release({}, metrics, answer.model_dump(mode="json"), evaluation=release.model_dump(mode="json"))
        self.releases.save(digest, key, kept)
        return RoundOutcome(answer, None, metrics, evaluation=release)

    def _dp_evaluation(
        self,
        spec: StudySpec,
        digest: str,
        instruction: RoundInstruction,
        plan: _Plan,
        data: StudyDataset,
        model: torch.nn.Module,
    ) -> EvaluationRelease:
        """Reserve the release's epsilon, count and noise the histograms, commit: the ledger never lags."""
        key, part, stage = instruction.evaluation_key, instruction.part, instruction.stage
        strata = None if stage == "scores" else self._strata(spec, instruction)
        n_train = int((plan.dataset.split == "train").sum())
        delta = self._delta(spec, max(n_train, len(data)))
        try:
            sigma = evaluation_noise(spec, delta, stage)
            check_privacy_honest(sigma, 1.0, delta, len(data), self.policy.min_noise_multiplier)
        except NotPrivateError as exc:
            raise Refusal(RefusalCode.NOT_PRIVATE, f"the evaluation release: {exc}") from None
        event = PrivacyEvent(noise_multiplier=sigma, sample_rate=1.0, steps=1)
        ledger = self.governance.ledger
        try:
            reservation = ledger.reserve(
                digest,
                key,
                event,
                delta,
                spec.privacy.accountant,
                spec.epsilon_budget(),
                EVALUATE,
                purpose_ceiling=spec.evaluation.epsilon,
                lineage=spec.study.id,
            )
        except RoundAlreadyTrained as exc:  # committed, but its copy was lost: never released twice
            raise Refusal(RefusalCode.ALREADY_TRAINED, str(exc)) from None
        except RoundInProgress as exc:
            raise Refusal(RefusalCode.IN_PROGRESS, exc.reason) from None
        except BudgetRefused as exc:
            raise Refusal(RefusalCode.BUDGET, exc.reason) from None
        with ledger.holding(reservation):
            if strata is None:
                release = dp_score_release(model, data, part, sigma, spec)
            else:
                overall, subgroups = outcome_noise(sigma, spec)
                release = dp_release(model, data, strata, part, overall, spec, subgroups)
            ledger.commit(reservation)
        alone = ledger.epsilon([event], delta, spec.privacy.accountant)
        return release.model_copy(update={"epsilon": alone})

    def _strata(self, spec: StudySpec, instruction: RoundInstruction) -> Strata:
        """The study's fixed strata, or the adaptive ones the coordinator placed (checked: they cannot change
        the release's guarantee, which holds for any strata, but they must be strata of this study)."""
        if spec.evaluation.strata == "fixed":
            return Strata.fixed(spec.evaluation)
        if instruction.score_edges is None:
            raise Refusal(
                RefusalCode.POLICY,
                "the study's strata are adaptive and the coordinator sent none with this evaluation message.",
            )
        try:
            return Strata.checked(instruction.score_edges, spec.evaluation.threshold)
        except ValueError as exc:
            raise Refusal(RefusalCode.POLICY, f"the strata the coordinator sent are not usable: {exc}.") from None

    def _exact_releases_left(self, spec: StudySpec, digest: str, part: str) -> None:
        """Exact releases have no epsilon to run out of, so their number is bounded by the study's plan: a
        coordinator asking for more (each with a model of its choosing) is refused."""
        planned = spec.evaluation_releases(part)
        done = len(self.governance.disclosures.released(spec.study.id, digest, part))
        if done >= planned:
            raise Refusal(
                RefusalCode.BUDGET,
                f"study '{spec.study.id}' planned {planned} evaluation release(s) of its {part} part and "
                f"{self.config.site_id} has made them; another one is refused.",
            )

    def _resend_evaluation(self, digest: str, instruction: RoundInstruction, kept: Release) -> RoundOutcome:
        """The same evaluation asked again (a resumed coordinator): the release already made, at no cost."""
        release = EvaluationRelease.model_validate(kept.evaluation)
        self.governance.audit.append(
            "evaluation-resent",
            {
                "study_hash": digest,
                "round": instruction.evaluation_key,
                "note": "the coordinator asked again for an evaluation already released; the same release was "
                "re-sent, no new privacy budget was spent",
                "left_the_site": {"evaluation": release.model_dump(mode="json", exclude_none=True)},
            },
        )
        return RoundOutcome(SiteAnswer.model_validate(kept.answer), None, dict(kept.metrics), evaluation=release)

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
        reason = refusal.reason
        try:
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
        except Exception as exc:  # the audit log itself is broken (its key gone, its database down): still answer
            reason = f"{reason} (the refusal could not be written to the site's audit log: {exc})"
        answer = SiteAnswer(site_id=self.config.site_id, status=SiteStatus.REFUSED, code=refusal.code, reason=reason)
        return self._witnessed(RoundOutcome(answer))


def _since(started: float) -> float:
    """Seconds since `started` (time.perf_counter), to the millisecond."""
    return round(time.perf_counter() - started, 3)
