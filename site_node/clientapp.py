"""The Flower ClientApp a hospital's SuperNode runs: train and evaluate handlers over `SiteNode`.

The SuperNode is started with `--node-config 'site-config="/path/site.yaml"'`; that file names the OMOP
database, the governance database and the policy. Each handler answers every message, refusals
included, with a `SiteAnswer` record, so the coordinator can write a participation receipt instead of
waiting for a reply that will never come.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from federation.protocol import RoundInstruction
from site_node.config import load_site_config
from site_node.participation import RoundOutcome, SiteNode

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

SITE_CONFIG_KEY = "site-config"
INSTRUCTION_KEY = "instruction"
ANSWER_KEY = "answer"

app = ClientApp()


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
    return Message(content, reply_to=msg)


def _instruction(msg: Message) -> RoundInstruction:
    record = msg.content.config_records.get(INSTRUCTION_KEY)
    return RoundInstruction.from_config_record(record if isinstance(record, ConfigRecord) else None, INSTRUCTION_KEY)


@app.train()
def train(msg: Message, context: Context) -> Message:
    site = site_for(context)
    outcome = site.train(_instruction(msg), msg.content["arrays"].to_torch_state_dict())
    return _reply(msg, outcome)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    site = site_for(context)
    outcome = site.evaluate(_instruction(msg), msg.content["arrays"].to_torch_state_dict())
    return _reply(msg, outcome)
