"""The coordinator's round loop over Flower's Grid: send, wait, account for every site, aggregate, record.

We drive the Grid ourselves instead of `Strategy.start()` because the coordinator's duties go beyond
aggregation: every site gets a receipt each round (a refusal with its reason is an answer, not a
failure), the study stops with a report (not a hang) when fewer than `min_sites` sites trained, the
state is checkpointed after every round so a killed coordinator resumes, and the site's answers feed
the model card. Replies are polled at a short interval rather than Grid.send_and_receive's fixed 3 s,
because that sleep alone would dominate a round on a fast network.

A run may hold one site out (leave-one-site-out, TRIPOD type 3 external validation): before its first
training round the coordinator asks every node it does not know yet which site it is, with the admission
query a secure round starts with (checks only: nothing is reserved or spent at any site). The held-out
site is then sent neither training nor validation (the study's model is chosen on the training sites'
validation parts), and the test evaluation of the chosen model is asked of it alone. A node whose site is
not known (it did not answer that query) is not sent training either: it could be the held-out site.
Receipts say all of this in their notes.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from pydantic import BaseModel

from federation.common.flower import shorten_object_pull_backoff
from federation.contract import StudySpec, study_hash
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
from federation.contract.receipts import Participation, RoundReceipt, SiteReceipt, append_receipt
from federation.contract.spec import ROBUST_STRATEGIES, SECURE_AGGREGATION_MIN_SITES
from federation.contract.strata import Strata, adaptive_strata
from federation.coordinator.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from federation.coordinator.secure_aggregation import run_secure_round
from federation.coordinator.strategies import AggregationError, SiteUpdate, make_aggregator
from federation.twins import build_model, kind_of
from federation.twins.pooling import pool_scores

log = logging.getLogger("twinfed.coordinator")

INSTRUCTION_KEY = "instruction"
ANSWER_KEY = "answer"
EVALUATION_KEY = "evaluation"
POLL_SECONDS = 0.1
# What a site reports as its own work in a round (checks, cohort, training or evaluation), in seconds.
COMPUTE_METRIC = "compute-seconds"
# SecAgg+ weighs each update by its site's training examples, scaled by the largest count (max_weight).
# A site under its cell-count floor withholds its count; such a count is small, and this bound covers it.
WITHHELD_COUNT_BOUND = 1000
SECURE_AGGREGATE = "secure aggregate"  # the label of the one mean update a secure round produces

Weights = dict[str, np.ndarray]


class StudyStopped(RuntimeError):
    """The study cannot go on (too few sites); the report says why."""


@dataclass
class RunResult:
    status: str  # "completed" | "stopped"
    reason: str
    completed_rounds: int
    weights: Weights  # the study's model: the selected round's (best validation) or the last round's
    history: list[dict[str, object]] = field(default_factory=list)
    evaluation: dict[str, object] | None = None  # the pooled test evaluation of that model (PooledEvaluation)
    selected_round: int | None = None
    selection: str = ""  # how the model was chosen, in a sentence
    held_out_site: str | None = None  # leave-one-site-out: the site that did not train and alone was tested


@dataclass
class Selection:
    """Model selection on the validation part: the best round so far and how long since it improved."""

    round: int | None = None
    weights: Weights | None = None
    score: float | None = None
    stale_rounds: int = 0

    def offer(self, server_round: int, weights: Weights, score: float | None) -> None:
        if score is not None and (self.score is None or score > self.score):
            self.round, self.weights, self.score, self.stale_rounds = server_round, weights, score, 0
        else:
            self.stale_rounds += 1


def initial_weights(spec: StudySpec) -> Weights:
    model = build_model(spec.model, len(feature_names(spec)), seed=spec.training.seed)
    return {name: tensor.detach().cpu().numpy().copy() for name, tensor in model.state_dict().items()}


def _record(weights: Weights) -> ArrayRecord:
    return ArrayRecord({name: torch.from_numpy(np.ascontiguousarray(value)) for name, value in weights.items()})


class StudyRunner:
    """Runs one study over the sites connected to the Grid, writing receipts and checkpoints to `folder`."""

    def __init__(
        self,
        grid: Grid,
        spec: StudySpec,
        run_name: str,
        folder: Path,
        *,
        resume: bool = False,
        on_progress: Callable[[str], None] | None = None,
        node_wait_seconds: float = 120.0,
        held_out_site: str | None = None,
    ) -> None:
        self.grid = grid
        self.spec = spec
        self.digest = study_hash(spec)
        self.run_name = run_name
        self.folder = folder
        self.resume = resume
        self.say = on_progress or (lambda text: log.info(text))
        self.node_wait_seconds = node_wait_seconds
        self.aggregator = make_aggregator(spec.federation)
        self.kind = kind_of(spec.model)
        self.receipts_path = folder / "receipts.jsonl"
        self.known_sites: dict[int, tuple[str | None, int]] = {}  # node -> (site id, last round it answered)
        # SecAgg+ from the first round when the study asks for it; from the next round on when a site's
        # policy requires it (that site refuses a plain round with code needs-secure-aggregation).
        self.secure = spec.federation.secure_aggregation
        # Leave-one-site-out: the site (by its own id) that neither trains nor validates, and alone is tested;
        # its node(s) are learnt from the answers to the admission query sent before training.
        self.held_out_site = held_out_site or None
        self.held_out_nodes: set[int] = set()
        self._waited_for_held_out = False

    # --- the loop ---------------------------------------------------------------------------------

    def run(self) -> RunResult:
        if not shorten_object_pull_backoff():
            log.warning("this Flower retries a reply's arrays after 1 s at first; rounds may take a second longer")
        weights, first_round, history, selection = self._start()
        rounds = self.spec.training.rounds
        evaluation = self.spec.evaluation
        patience = evaluation.early_stopping_patience
        completed = first_round - 1
        stopped_early = ""
        for server_round in range(first_round, rounds + 1):
            round_started = time.monotonic()
            connected = self._nodes(self._held_out_wait())
            held_out = self._identify(server_round, connected)
            nodes = self._participants(connected)
            secure = self.secure
            train = self._train_secure if secure else self._train
            trained, train_receipt = train(server_round, nodes, weights)
            self._note_held_out(train_receipt, held_out)
            trained_sites = train_receipt.count(Participation.TRAINED)
            switched = not secure and self._switch_to_secure_if_asked(train_receipt)
            if switched and trained_sites < self.spec.federation.min_sites:
                # Too few without the sites that require SecAgg+: this round again, securely. Sites that
                # trained re-send the update they kept (their ledger holds the round: nothing is spent twice).
                train_receipt.note += " Round run again with SecAgg+."
                append_receipt(self.receipts_path, train_receipt)
                self.say(f"Round {server_round}: run again with SecAgg+.")
                secure = True
                trained, train_receipt = self._train_secure(server_round, nodes, weights)
                self._note_held_out(train_receipt, held_out)
                trained_sites = train_receipt.count(Participation.TRAINED)
            if trained_sites < self.spec.federation.min_sites or not trained:
                reason = (
                    f"round {server_round}: only {trained_sites} site(s) trained, the study needs "
                    f"{self.spec.federation.min_sites}. "
                    + (f"{train_receipt.note} " if train_receipt.note else "")
                    + _refusal_summary(train_receipt)
                )
                return self._stop(train_receipt, reason, server_round, weights, history)
            try:
                weights, rejected = self.aggregator.aggregate_with_report(weights, trained)
            except AggregationError as exc:
                reason = f"round {server_round}: the updates could not be aggregated: {exc}"
                return self._stop(train_receipt, reason, server_round, weights, history)
            if SECURE_AGGREGATE in rejected:
                reason = (
                    f"round {server_round}: the securely aggregated mean is not usable: {rejected[SECURE_AGGREGATE]}"
                )
                return self._stop(train_receipt, reason, server_round, weights, history)
            for receipt in train_receipt.sites:
                if receipt.label in rejected:
                    receipt.status = Participation.REJECTED
                    receipt.reason = rejected[receipt.label]
            train_receipt.aggregated = True
            _label_non_private(train_receipt)
            append_receipt(self.receipts_path, train_receipt)
            row: dict[str, object] = {"round": server_round}
            receipts = [train_receipt]
            if evaluation.split.has_validation:
                exchanges, pooled = self._evaluate(server_round, self._nodes(), weights, "validation")
                receipts += exchanges
                row["validation"] = pooled.model_dump(mode="json")
                selection.offer(server_round, weights, self.kind.selection_score(pooled))
            if evaluation.every_round:
                exchanges, pooled = self._evaluate(server_round, self._nodes(), weights, "test")
                receipts += exchanges
                row["test"] = pooled.model_dump(mode="json")
            row.update(self._train_row(train_receipt))
            row["secure_aggregation"] = secure
            row.update(_timing(time.monotonic() - round_started, *receipts))
            history.append(row)
            completed = server_round
            save_checkpoint(
                self.folder,
                Checkpoint(
                    self.digest,
                    self.run_name,
                    server_round,
                    weights,
                    self.aggregator.state_dict(),
                    history,
                    selection=selection.__dict__,
                ),
            )
            self.say(self._progress_line(server_round, rounds, train_receipt, row))
            if patience is not None and selection.stale_rounds >= patience and server_round < rounds:
                stopped_early = (
                    f"early stopping after round {server_round}: the pooled validation {self._metric} did not "
                    f"improve for {patience} round(s)"
                )
                self.say(f"Training ends: {stopped_early}.")
                break
        return self._finish(weights, completed, history, selection, stopped_early)

    def _finish(
        self, weights: Weights, completed: int, history: list[dict[str, object]], selection: Selection, early: str
    ) -> RunResult:
        """Choose the study's model and release its test evaluation (once: a resumed run is re-sent the same)."""
        rounds = self.spec.training.rounds
        if self.spec.evaluation.split.has_validation and selection.round is not None:
            chosen, model = selection.round, selection.weights
            how = (
                f"round {chosen}'s model, the best pooled validation {self._metric} ({selection.score:.3f}) of "
                f"{completed}"
            )
        else:
            chosen, model = completed, weights
            how = f"the last round's model (round {completed})"
            if self.spec.evaluation.split.has_validation:
                how += f": no round had a pooled validation {self._metric} to choose by"
        test = next((row.get("test") for row in history if row["round"] == chosen and row.get("test")), None)
        how += "."
        if self.held_out_site is not None:
            chosen_on = " and chosen on the training sites' validation parts" if selection.round is not None else ""
            how += (
                f" Leave-one-site-out: the model was trained without site {self.held_out_site}{chosen_on}; its test "
                f"evaluation is asked of {self.held_out_site} alone, whose data it never saw."
            )
        if test is None and chosen:
            nodes = self._nodes(self._held_out_wait(final=True))
            unanswered = self._identify(chosen, nodes)
            if self.held_out_site is not None and not self._participants(nodes, "test"):
                missing = self._held_out_missing(chosen, nodes, unanswered)
                how += " " + missing
                self.say(f"Test evaluation of round {chosen}'s model: not asked. {missing}")
                reason = early or f"all {rounds} rounds completed"
                return RunResult("completed", reason, completed, model, history, None, chosen, how, self.held_out_site)
            _, pooled = self._evaluate(chosen, nodes, model, "test")
            test = pooled.model_dump(mode="json")
        where = f"at held-out site {self.held_out_site}" if self.held_out_site is not None else "pooled"
        self.say(f"Test evaluation of round {chosen}'s model: {where} {self._headline(test)}")
        reason = early or f"all {rounds} rounds completed"
        return RunResult("completed", reason, completed, model, history, test, chosen, how, self.held_out_site)

    def _stop(
        self, receipt: RoundReceipt, reason: str, server_round: int, weights: Weights, history: list[dict[str, object]]
    ) -> RunResult:
        receipt.note = "stopped: " + reason
        append_receipt(self.receipts_path, receipt)
        self.say("Study stopped. " + reason)
        return RunResult(
            "stopped",
            reason,
            server_round - 1,
            weights,
            history,
            selection="not evaluated: the study stopped before its last round, so no test release was asked for.",
            held_out_site=self.held_out_site,
        )

    def _start(self) -> tuple[Weights, int, list[dict[str, object]], Selection]:
        checkpoint = load_checkpoint(self.folder, self.digest) if self.resume else None
        if checkpoint is None:
            if (self.folder / "checkpoint.pt").exists() and not self.resume:
                raise StudyStopped(
                    f"a run named '{self.run_name}' of this study already exists in {self.folder}; resume it "
                    "(twinfed study run --resume) or start another with a new --name."
                )
            self.folder.mkdir(parents=True, exist_ok=True)
            self.say(f"Study {self.spec.study.id} ({self.digest[:12]}), run '{self.run_name}': starting at round 1.")
            if self.held_out_site is not None:
                self.say(
                    f"Leave-one-site-out: site {self.held_out_site} is held out: it is not sent training or "
                    "validation, and the chosen model's test evaluation is asked of it alone."
                )
            return initial_weights(self.spec), 1, [], Selection()
        self.aggregator.load_state_dict(checkpoint.aggregator_state)
        self.say(
            f"Resuming run '{self.run_name}' after round {checkpoint.completed_round} (checkpoint in {self.folder})."
        )
        selection = Selection(**checkpoint.selection) if checkpoint.selection else Selection()
        return checkpoint.weights, checkpoint.completed_round + 1, list(checkpoint.history), selection

    def _nodes(self, extra: int = 0) -> list[int]:
        """The connected sites; waits (bounded) until at least `min_sites` (plus `extra`) are there."""
        deadline = time.monotonic() + self.node_wait_seconds
        while True:
            nodes = sorted(self.grid.get_node_ids())
            if len(nodes) >= self.spec.federation.min_sites + extra or time.monotonic() > deadline:
                return nodes
            time.sleep(0.5)

    # --- a held-out site (leave-one-site-out) -----------------------------------------------------

    def _held_out_wait(self, final: bool = False) -> int:
        """How many sites beyond `min_sites` to wait for: the held-out one too, while its node is unknown
        (once before training and once before the test evaluation, not every round)."""
        if self.held_out_site is None or self.held_out_nodes:
            return 0
        if final or not self._waited_for_held_out:
            self._waited_for_held_out = True
            return 1
        return 0

    def _identify(self, server_round: int, nodes: list[int]) -> list[SiteReceipt]:
        """Learn which site each connected node is, when a site is held out, before it could be sent training.

        The nodes not known yet get the admission query (the site's checks of the round: study, approval,
        policy, budget, cohort; nothing reserved, trained or spent); every answer names its site, refusals
        included. Returns the receipts that belong in the round's train receipt: the held-out site's answer
        and those of nodes whose site is still unknown (they are not sent training this round)."""
        if self.held_out_site is None:
            return []
        unknown = [node for node in nodes if node not in self.known_sites]
        if not unknown:
            return []
        replies, seconds, _ = self._exchange("query", server_round, unknown, None)
        receipts = []
        for node in unknown:
            receipt = self._site_receipt(node, replies.get(node), seconds.get(node))[0]
            self._remember(receipt, server_round)
            if receipt.site_id == self.held_out_site and node in self.known_sites:
                self.held_out_nodes.add(node)
                answer = f"its answer: {receipt.code}: {receipt.reason}" if receipt.reason else "it is ready"
                receipt.reason = (
                    f"held out (leave-one-site-out): not sent training or validation; asked which site it is by "
                    f"an admission query (checks only, nothing reserved or spent), {answer}"
                )
                receipts.append(receipt)
            elif node not in self.known_sites:
                receipt.reason = (
                    f"not sent this round's training: asked which site it is (a site is held out), it did not say "
                    f"({receipt.reason}); it could be the held-out site"
                )
                receipts.append(receipt)
        return receipts

    def _participants(self, nodes: list[int], part: str | None = None) -> list[int]:
        """Who an exchange goes to: every node, or with a held-out site its node(s) for the test part, and for
        training and validation the nodes known to be other sites."""
        if self.held_out_site is None:
            return nodes
        if part == "test":
            return [node for node in nodes if node in self.held_out_nodes]
        return [node for node in nodes if node in self.known_sites and node not in self.held_out_nodes]

    def _held_out_note(self, part: str | None = None) -> str:
        site = self.held_out_site
        if site is None:
            return ""
        if not self.held_out_nodes:
            return (
                f"Leave-one-site-out: held-out site {site} has not answered (not connected, or not answering); "
                "nodes whose site is not known are not sent training."
            )
        nodes = ", ".join(str(n) for n in sorted(self.held_out_nodes))
        if part == "test":
            return f"Leave-one-site-out: asked of held-out site {site} (node {nodes}) alone, whose data no round used."
        what = "validation" if part == "validation" else "training"
        return f"Leave-one-site-out: held-out site {site} (node {nodes}) is not sent {what}."

    def _note_held_out(self, receipt: RoundReceipt, held_out: list[SiteReceipt]) -> None:
        """A train receipt names the held-out site (and any node not sent training because its site is unknown)."""
        if self.held_out_site is None:
            return
        receipt.sites.extend(held_out)
        note = self._held_out_note()
        receipt.note = f"{receipt.note} {note}".strip() if receipt.note else note

    def _held_out_missing(self, server_round: int, nodes: list[int], unanswered: list[SiteReceipt]) -> str:
        """The test evaluation cannot be asked: the held-out site is not connected (or never said which node it
        is; `unanswered`: the nodes that did not say). Receipted, never silent."""
        site = self.held_out_site
        if self.held_out_nodes:
            why = f"held-out site {site} answered earlier and is not connected now"
        else:
            why = f"held-out site {site} is not among the answers of the {len(nodes)} connected site(s)"
        sentence = f"No external validation: {why}, so the test evaluation was not asked of anyone."
        now = dt.datetime.now(dt.UTC)
        receipt = RoundReceipt(
            run_name=self.run_name,
            server_round=server_round,
            phase="evaluate",
            started_at=now,
            finished_at=now,
            required_sites=self.spec.federation.min_sites,
            sites=[*self._absent(server_round, nodes, "test"), *unanswered],
            part="test",
            note=sentence,
        )
        append_receipt(self.receipts_path, receipt)
        return sentence

    # --- one exchange -----------------------------------------------------------------------------

    def _instruction(self, server_round: int, **evaluation) -> RoundInstruction:
        """The round's instruction; `evaluation`: part, stage and score_edges of an evaluation message."""
        return RoundInstruction.for_study(
            self.spec, self.run_name, server_round, secure_aggregation=self.secure, **evaluation
        )

    def _exchange(
        self, phase: str, server_round: int, nodes: list[int], weights: Weights | None, **evaluation
    ) -> tuple[dict[int, Message], dict[int, float], dt.datetime]:
        """One message per node (the instruction, and the global weights unless `weights` is None)."""
        started = dt.datetime.now(dt.UTC)
        instruction = self._instruction(server_round, **evaluation).to_config_record()
        timeout = self.spec.federation.round_timeout_seconds
        messages = [
            Message(
                RecordDict({INSTRUCTION_KEY: instruction, **({} if weights is None else {"arrays": _record(weights)})}),
                dst_node_id=node,
                message_type=phase,
                group_id=str(server_round),
                ttl=timeout,
            )
            for node in nodes
        ]
        replies, seconds = self._send(messages, timeout)
        return replies, seconds, started

    def _send(self, messages: list[Message], timeout: float) -> tuple[dict[int, Message], dict[int, float]]:
        """Push `messages` and collect their replies until all came or `timeout` passed (by node, with seconds)."""
        sent_at = time.monotonic()
        nodes = [message.metadata.dst_node_id for message in messages]
        pending = {mid: node for mid, node in zip(self.grid.push_messages(messages), nodes, strict=True)}
        replies: dict[int, Message] = {}
        seconds: dict[int, float] = {}
        while pending and time.monotonic() - sent_at < timeout:
            for reply in self.grid.pull_messages(list(pending)):
                node = pending.pop(reply.metadata.reply_to_message_id, None)
                if node is not None:
                    replies[node] = reply
                    seconds[node] = time.monotonic() - sent_at
            if pending:
                time.sleep(POLL_SECONDS)
        return replies, seconds

    def _site_receipt(
        self, node: int, reply: Message | None, seconds: float | None
    ) -> tuple[SiteReceipt, Message | None]:
        if reply is None:
            return SiteReceipt(
                node_id=node,
                site_id=self.known_sites.get(node, (None, 0))[0],
                status=Participation.TIMED_OUT,
                reason=f"no answer within {self.spec.federation.round_timeout_seconds:g} s",
            ), None
        if reply.has_error():
            gone = reply.error.code == ErrorCode.NODE_UNAVAILABLE
            failed = SiteReceipt(
                node_id=node,
                site_id=self.known_sites.get(node, (None, 0))[0],
                status=Participation.DISCONNECTED if gone else Participation.FAILED,
                reason=(
                    f"the site disconnected before answering ({reply.error.reason})"
                    if gone
                    else f"the site's app failed: {reply.error.reason}"
                ),
                seconds=seconds,
            )
            return failed, None
        try:
            record = reply.content.config_records.get(ANSWER_KEY)
            answer = SiteAnswer.from_config_record(record if isinstance(record, ConfigRecord) else None, ANSWER_KEY)
        except ProtocolError as exc:
            return SiteReceipt(node_id=node, status=Participation.FAILED, reason=str(exc), seconds=seconds), None
        metrics = reply.content.metric_records.get("metrics")
        values = {k: float(v) for k, v in (metrics or {}).items() if isinstance(v, int | float)}
        evaluation = None
        if EVALUATION_KEY in reply.content.config_records:
            try:
                evaluation = EvaluationRelease.from_config_record(
                    reply.content.config_records[EVALUATION_KEY], EVALUATION_KEY
                )
            except ProtocolError as exc:
                return SiteReceipt(node_id=node, status=Participation.FAILED, reason=str(exc), seconds=seconds), None
        status = {
            SiteStatus.READY: Participation.READY,
            SiteStatus.TRAINED: Participation.TRAINED,
            SiteStatus.EVALUATED: Participation.EVALUATED,
            SiteStatus.REFUSED: Participation.REFUSED,
        }[answer.status]
        receipt = SiteReceipt(
            node_id=node,
            site_id=answer.site_id,
            status=status,
            code=answer.code.value if answer.code else None,
            reason=answer.reason,
            epsilon_spent=answer.epsilon_spent,
            epsilon_ceiling=answer.epsilon_ceiling,
            epsilon_training=answer.epsilon_training,
            epsilon_evaluation=answer.epsilon_evaluation,
            differentially_private=answer.differentially_private,
            evaluation=evaluation,
            num_examples=int(values["num-examples"]) if "num-examples" in values else None,
            metrics=values,
            cohort_snapshot=answer.cohort_snapshot,
            consent_snapshot=answer.consent_snapshot,
            audit_hash=answer.audit_hash,
            data_period=answer.data_period,
            seconds=seconds,
        )
        return receipt, reply

    def _train(self, server_round: int, nodes: list[int], weights: Weights) -> tuple[list[SiteUpdate], RoundReceipt]:
        replies, seconds, started = self._exchange("train", server_round, nodes, weights)
        receipts, updates = self._absent(server_round, nodes), []
        for node in nodes:
            receipt, reply = self._site_receipt(node, replies.get(node), seconds.get(node))
            receipts.append(receipt)
            self._remember(receipt, server_round)
            if receipt.status == Participation.TRAINED and reply is not None:
                arrays = reply.content.array_records.get("arrays")
                if arrays is None:
                    receipt.status, receipt.reason = Participation.REJECTED, "the site trained but sent no weights"
                    continue
                update = {name: t.detach().cpu().numpy() for name, t in arrays.to_torch_state_dict().items()}
                updates.append(SiteUpdate(receipt.label, update, receipt.num_examples))
        return updates, self._round_receipt(server_round, "train", started, receipts)

    def _train_secure(
        self, server_round: int, nodes: list[int], weights: Weights
    ) -> tuple[list[SiteUpdate], RoundReceipt]:
        """A SecAgg+ round: ask who is ready, run the protocol with them, receipt every site's part.

        The one update it returns is the weighted mean the protocol revealed (global weights plus the mean
        update), weighted by the sum of the trained sites' counts; the study's aggregator then treats it
        as FedAvg would treat that mean (FedAdam/FedYogi take their pseudo-gradient from it).
        """
        replies, seconds, started = self._exchange("query", server_round, nodes, None)
        receipts, ready = self._absent(server_round, nodes), {}
        for node in nodes:
            receipt = self._site_receipt(node, replies.get(node), seconds.get(node))[0]
            self._remember(receipt, server_round)
            if receipt.status == Participation.READY:
                ready[node] = receipt
            else:
                receipts.append(receipt)
        needed = max(self.spec.federation.min_sites, SECURE_AGGREGATION_MIN_SITES)
        updates: list[SiteUpdate] = []
        note = ""
        if len(ready) < needed:
            note = (
                f"secure aggregation needs {needed} ready sites and {len(ready)} were; nothing was trained "
                "(the ready sites spent no budget)."
            )
            for receipt in ready.values():
                receipt.reason = "ready; the round did not start: too few sites were ready for secure aggregation"
                receipts.append(receipt)
        else:
            counts = [r.num_examples for r in ready.values()]
            max_weight = max([c for c in counts if c is not None] + ([WITHHELD_COUNT_BOUND] if None in counts else []))
            outcome = run_secure_round(
                self._send,
                sorted(ready),
                weights,
                self._instruction(server_round).to_config_record(),
                server_round,
                max_weight,
                self.spec.federation.round_timeout_seconds,
            )
            for node in sorted(ready):
                if node in outcome.answers:
                    receipt = self._site_receipt(node, outcome.answers[node], outcome.seconds.get(node))[0]
                    # the site's own work in this round includes its admission checks (cohort included)
                    admission = ready[node].metrics.get(COMPUTE_METRIC, 0.0)
                    receipt.metrics["admission-" + COMPUTE_METRIC] = admission
                    receipt.metrics[COMPUTE_METRIC] = receipt.metrics.get(COMPUTE_METRIC, 0.0) + admission
                else:
                    receipt = ready[node].model_copy(
                        update={
                            "status": Participation.FAILED,
                            "reason": outcome.dropped.get(node, "dropped out of the secure aggregation"),
                        }
                    )
                receipts.append(receipt)
                self._remember(receipt, server_round)
            if outcome.halted:
                note = outcome.halted
            elif outcome.mean_update is not None:
                trained = [r for r in receipts if r.status == Participation.TRAINED]
                total = sum(r.num_examples or 0 for r in trained) or None
                mean = {name: weights[name] + outcome.mean_update[name].astype(weights[name].dtype) for name in weights}
                updates.append(SiteUpdate(SECURE_AGGREGATE, mean, total))
                clipped = sum(int(r.metrics.get("secagg-clipped-values", 0)) for r in trained)
                note = (
                    f"secure aggregation (SecAgg+) of {len(trained)} sites' updates: only their weighted mean was seen"
                )
                if clipped:
                    note += (
                        f"; {clipped} update values were outside the protocol's clipping range and were clipped, "
                        "so the mean is approximate"
                    )
        return updates, self._round_receipt(server_round, "train", started, receipts, secure=True, note=note)

    def _switch_to_secure_if_asked(self, receipt: RoundReceipt) -> bool:
        """A site whose policy requires secure aggregation refused a plain round: run SecAgg+ from now on.

        Returns whether the run switched (never with a strategy that needs each site's update).
        """
        asking = [s.label for s in receipt.sites if s.code == RefusalCode.NEEDS_SECURE_AGGREGATION.value]
        if self.secure or not asking:
            return False
        if self.spec.federation.strategy in ROBUST_STRATEGIES:
            receipt.note = (
                f"{', '.join(asking)} require secure aggregation, which strategy '{self.spec.federation.strategy}' "
                "cannot use (it needs each update); they stay out of training."
            )
            return False
        self.secure = True
        receipt.note = f"{', '.join(asking)} require secure aggregation: the next rounds use SecAgg+."
        self.say(f"Round {receipt.server_round}: {receipt.note}")
        return True

    def _evaluate(
        self, server_round: int, nodes: list[int], weights: Weights, part: str
    ) -> tuple[list[RoundReceipt], BaseModel]:
        """Ask every site for its release on `part` (validation or test) and pool what they released.

        With adaptive strata, first the scores' distribution (no outcomes) from every site: the strata are
        cut at the pooled distribution's quantiles and sent with the outcome stage. With a held-out site,
        the test part is asked of it alone and the validation part of the other sites."""
        nodes = self._participants(nodes, part)
        edges, receipts, pooled_scores = None, [], None
        if self.spec.evaluation.strata == "adaptive":
            receipt, released = self._evaluation_exchange(server_round, nodes, weights, part, "scores")
            receipts.append(receipt)
            pooled_scores = pool_scores(released)
            if pooled_scores is not None:
                strata = adaptive_strata(pooled_scores, self.spec.evaluation)
                edges = list(strata.edges)
                receipt.note = (
                    f"strata placed at the pooled score distribution's quantiles: {', '.join(strata.labels())}"
                )
            else:
                strata = Strata.fixed(self.spec.evaluation)
                edges = list(strata.edges)
                receipt.note = "no site released a score distribution: the study's fixed strata are used"
            append_receipt(self.receipts_path, receipt)
        receipt, released = self._evaluation_exchange(server_round, nodes, weights, part, "outcomes", edges)
        usable, misshapen = [], []
        for site, release in released:
            try:
                if release.mode == ReleaseMode.DP:
                    self.kind.check_histograms(self.spec.model, release)
                usable.append((site, release))
            except ValueError as exc:
                misshapen.append(f"{site} ({exc})")
        pooled = self.kind.pool(self.spec, usable, seed=server_round, scores=pooled_scores)
        receipt.note = pooled.method
        if self.held_out_site is not None:
            receipt.note += " " + self._held_out_note(part)
        if misshapen:
            receipt.note += " Left out, not releases of this study's kind: " + "; ".join(misshapen) + "."
        _label_non_private(receipt)
        append_receipt(self.receipts_path, receipt)
        return [*receipts, receipt], pooled

    def _evaluation_exchange(
        self,
        server_round: int,
        nodes: list[int],
        weights: Weights,
        part: str,
        stage: str,
        edges: list[float] | None = None,
    ) -> tuple[RoundReceipt, list[tuple[str, EvaluationRelease]]]:
        replies, seconds, started = self._exchange(
            "evaluate", server_round, nodes, weights, part=part, stage=stage, score_edges=edges
        )
        receipts = self._absent(server_round, nodes, part)
        for node in nodes:
            receipt = self._site_receipt(node, replies.get(node), seconds.get(node))[0]
            receipts.append(receipt)
            self._remember(receipt, server_round)
        released = [(r.label, r.evaluation) for r in receipts if r.status == Participation.EVALUATED and r.evaluation]
        phase = "evaluate" if stage == "outcomes" else "strata"
        return self._round_receipt(server_round, phase, started, receipts, part=part), released

    def _round_receipt(
        self,
        server_round: int,
        phase: str,
        started: dt.datetime,
        sites: list[SiteReceipt],
        *,
        secure: bool = False,
        note: str = "",
        part: str | None = None,
    ) -> RoundReceipt:
        return RoundReceipt(
            run_name=self.run_name,
            server_round=server_round,
            phase=phase,
            started_at=started,
            finished_at=dt.datetime.now(dt.UTC),
            required_sites=self.spec.federation.min_sites,
            sites=sites,
            secure_aggregation=secure,
            part=part,
            note=note,
        )

    @property
    def _metric(self) -> str:
        """The pooled metric that picks the study's model, as people name it."""
        return self.kind.selection_label

    def _headline(self, pooled: dict | None) -> str:
        return self.kind.headline(pooled) if pooled else "n/a"

    def _progress_line(self, server_round: int, rounds: int, receipt: RoundReceipt, row: dict) -> str:
        parts = [f"Round {server_round}/{rounds}: {receipt.summary()}"]
        if row.get("validation"):
            parts.append(f"pooled validation {self._headline(row['validation'])}")
        if row.get("test"):
            parts.append(f"pooled test {self._headline(row['test'])}")
        return "; ".join(parts)

    def _remember(self, receipt: SiteReceipt, server_round: int) -> None:
        answered = receipt.status not in (Participation.DISCONNECTED, Participation.TIMED_OUT)
        if receipt.site_id is not None and answered:
            self.known_sites[receipt.node_id] = (receipt.site_id, server_round)

    def _absent(self, server_round: int, nodes: list[int], part: str | None = None) -> list[SiteReceipt]:
        """Receipts for sites that answered earlier in this run and are not connected now: never silent.

        With a held-out site, those of its role only: the held-out site for its test part, the others else."""
        held_out = self.held_out_site is not None and part == "test"
        return [
            SiteReceipt(
                node_id=node,
                site_id=site_id,
                status=Participation.DISCONNECTED,
                reason=f"answered in round {last}; not connected when round {server_round} started",
            )
            for node, (site_id, last) in sorted(self.known_sites.items())
            if node not in nodes and (node in self.held_out_nodes) == held_out
        ]

    @staticmethod
    def _train_row(receipt: RoundReceipt) -> dict[str, object]:
        return {
            "seconds": (receipt.finished_at - receipt.started_at).total_seconds(),
            "slowest_site_seconds": max((s.seconds or 0.0 for s in receipt.sites), default=0.0),
            "epsilon": {s.label: s.epsilon_spent for s in receipt.sites if s.epsilon_spent is not None},
            "participation": {s.label: s.status.value for s in receipt.sites},
        }


def _timing(wall: float, *receipts: RoundReceipt) -> dict[str, float]:
    """A round's wall time, the slowest site's own work in each exchange, and what is left: coordination.

    Coordination is everything that is not a site computing: transport, Flower's scheduling, starting
    the ClientApp, aggregation. Sites that report no compute time count as 0 s of it.
    """
    compute = sum(max((s.metrics.get(COMPUTE_METRIC, 0.0) for s in r.sites), default=0.0) for r in receipts)
    return {"round_seconds": wall, "slowest_compute_seconds": compute, "coordination_seconds": wall - compute}


def _refusal_summary(receipt: RoundReceipt) -> str:
    parts = [
        f"{s.label}: {s.status.value}" + (f" ({s.code}: {s.reason})" if s.reason else "")
        for s in receipt.sites
        if s.status != Participation.TRAINED
    ]
    return "; ".join(parts) if parts else "No site was connected."


def _label_non_private(receipt: RoundReceipt) -> None:
    """A receipt of a round that a site ran without DP says so, in its note."""
    plain = [s.label for s in receipt.sites if not s.differentially_private and s.status == Participation.TRAINED]
    plain += [s.label for s in receipt.sites if not s.differentially_private and s.status == Participation.EVALUATED]
    if plain:
        receipt.note = (receipt.note + " " if receipt.note else "") + (
            f"NOT DIFFERENTIALLY PRIVATE at {', '.join(sorted(set(plain)))} (the study's privacy mode is none)."
        )
