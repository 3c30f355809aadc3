"""The Flower ClientApp a hospital's SuperNode runs: train and evaluate handlers over `SiteNode`.

The SuperNode is started with `--node-config 'site-config="/path/site.yaml"'`; that file names the OMOP
database, the governance database and the policy. Each handler answers every message, refusals
included, with a `SiteAnswer` record, so the coordinator can write a participation receipt instead of
waiting for a reply that will never come.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from federation.common.flower import quiet_by_default
from federation.contract.protocol import RoundInstruction, SiteStatus
from federation.contract.secure_aggregation import (
    clipping_range,
    fitres_content,
    global_weights_from_fitins,
    is_secure_training_message,
)
from site_node.config import load_site_config
from site_node.participation import RoundOutcome, SiteNode

quiet_by_default()

SITE_CONFIG_KEY = "site-config"
INSTRUCTION_KEY = "instruction"
ANSWER_KEY = "answer"
EVALUATION_KEY = "evaluation"


def secure_aggregation_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's SecAgg+ client side (`secaggplus_mod`) for the messages of a secure round, and only those.

    Flower's mod expects every train message to be a SecAgg+ stage; plain rounds pass straight through.
    In the stage where the site trains, the mod masks the update our train handler returns and keeps
    the other records (the site's answer and metrics) as they are; the clear weight it would leave in
    the reply is replaced by the count the site discloses anyway (0 when under the cell-count floor).
    """
    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, context)
    reply = secaggplus_mod(msg, context, call_next)
    if "fitres.num_examples" in reply.content.metric_records:
        metrics = reply.content.metric_records.get("metrics")
        disclosed = metrics.get("num-examples", 0) if metrics is not None else 0
        reply.content.metric_records["fitres.num_examples"] = MetricRecord({"num_examples": int(disclosed)})
    return reply


app = ClientApp(mods=[secure_aggregation_mod])


@lru_cache(maxsize=4)
def _site(config_path: str) -> SiteNode:
    """One SiteNode per site file and process: a long-lived ClientApp process reuses its connections."""
    return SiteNode(load_site_config(Path(config_path)))


def site_for(context: Context) -> SiteNode:
    """The site this node is: its `site-config` node setting (a deployed SuperNode) or, in Flower's
    simulation, where virtual nodes only get a partition id, that entry of the run's `simulation-sites`
    list (written by `twinfed study simulate`)."""
    path = context.node_config.get(SITE_CONFIG_KEY)
    if not path and context.run_config.get("simulation-sites") and "partition-id" in context.node_config:
        from site_node.simulated_sites import site_file_for_partition

        path = site_file_for_partition(
            str(context.run_config["simulation-sites"]), int(context.node_config["partition-id"])
        )
    if not path:
        raise ValueError(
            f"this SuperNode was started without --node-config '{SITE_CONFIG_KEY}=\"/path/site.yaml\"'; "
            "it cannot know which hospital's data and policy to use."
        )
    return _site(str(path))


def _reply(msg: Message, outcome: RoundOutcome) -> Message:
    content = RecordDict({ANSWER_KEY: outcome.answer.to_config_record(), "metrics": MetricRecord(outcome.metrics)})
    if outcome.state_dict is not None:
        content["arrays"] = ArrayRecord(outcome.state_dict)
    if outcome.evaluation is not None:
        content[EVALUATION_KEY] = outcome.evaluation.to_config_record()
    return Message(content, reply_to=msg)


def _instruction(msg: Message) -> RoundInstruction:
    record = msg.content.config_records.get(INSTRUCTION_KEY)
    return RoundInstruction.from_config_record(record if isinstance(record, ConfigRecord) else None, INSTRUCTION_KEY)


@app.query()
def admit(msg: Message, context: Context) -> Message:
    """A secure round's first question: would this site train it? (Checks only; nothing is reserved.)"""
    return _reply(msg, site_for(context).admit(_instruction(msg)))


@app.train()
def train(msg: Message, context: Context) -> Message:
    site = site_for(context)
    if is_secure_training_message(msg.content):
        return _train_secure(msg, context, site)
    outcome = site.train(_instruction(msg), msg.content["arrays"].to_torch_state_dict())
    return _reply(msg, outcome)


def _train_secure(msg: Message, context: Context, site: SiteNode) -> Message:
    """Train inside SecAgg+: the update (trained minus global weights) goes to the mod to be masked.

    A site that refuses here (its budget went to another study since it said it was ready) contributes
    a zero update of weight 0, which leaves the sum unchanged, and says why in its answer, as always.
    """
    fields, arrays = global_weights_from_fitins(msg.content)
    instruction = RoundInstruction.model_validate(fields)
    global_state = {name: torch.from_numpy(np.array(array)) for name, array in arrays.items()}
    outcome = site.train(instruction, global_state)
    if outcome.answer.status == SiteStatus.TRAINED and outcome.state_dict is not None:
        update = [outcome.state_dict[name].detach().cpu().numpy() - arrays[name] for name in arrays]
        weight = int(outcome.train_examples or 0)
        limit = clipping_range(context.state)
        outcome.metrics["secagg-clipped-values"] = int(sum(int((np.abs(u) > limit).sum()) for u in update))
    else:
        update = [np.zeros_like(array) for array in arrays.values()]
        weight = 0
    content = fitres_content(update, weight)
    content[ANSWER_KEY] = outcome.answer.to_config_record()
    content["metrics"] = MetricRecord(outcome.metrics)
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    site = site_for(context)
    outcome = site.evaluate(_instruction(msg), msg.content["arrays"].to_torch_state_dict())
    return _reply(msg, outcome)
