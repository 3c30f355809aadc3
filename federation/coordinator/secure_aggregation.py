"""One training round under SecAgg+: the coordinator learns the weighted mean of the sites' updates, not one.

Flower implements SecAgg+ (Bell et al., CCS 2020) as `SecAggPlusWorkflow` on its legacy server layer:
four exchanges per round (setup: public keys; share keys: encrypted key shares; collect masked
vectors: each site trains and uploads its update quantised and masked; unmask: shares that remove the
masks from the sum, and rebuild those of a site that dropped out). We use that implementation as it
is, and give it two things of ours:

* the sites to run with: the ones that answered our admission query with "ready" (approval, policy,
  budget and cohort checked before any key is made, so refusals are receipts, not protocol failures);
* a Grid that is the runner's own (our polling and round timeout) and that keeps every site's answer
  to the training stage, so receipts, epsilon and snapshot hashes work as in a plain round.

What a site sends to be masked is its update, trained weights minus the global weights, not the
weights: updates are small, so the protocol's fixed clipping range (quantisation to +/-8) holds with
room to spare and the quantisation step (16 / 2**22, about 4e-6) is what limits the agreement with a
plain mean. The mean is weighted by each site's training examples, which SecAgg+ masks too (the
weights are folded into the masked vector); `max_weight` is the largest count the sites reported, so
every weight is at most 1 and quantised finely.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common import FitIns, FitRes, Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.logger import LOGGER_NAME
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey

from federation.contract.secure_aggregation import CLIPPING_RANGE, TENSOR_NAMES_KEY

Weights = dict[str, np.ndarray]
# The runner's way to send messages and collect replies: (messages, timeout) -> (replies by node, seconds)
Exchange = Callable[[list[Message], float], tuple[dict[int, Message], dict[int, float]]]

# SecAgg+ shares each key among all the round's sites and rebuilds a dropped site's masks from two
# thirds of them: one site in three may drop out after the keys are shared.
NUM_SHARES = 1.0
RECONSTRUCTION_THRESHOLD = 2 / 3
STAGES = ("setup", "share_keys", "collect_masked_vectors", "unmask")


class _SelectedSites(Strategy):
    """The legacy Strategy the workflow asks two things: which sites train (ours, decided already), and
    what to do with the unmasked mean (keep it; the study's own aggregator takes it from there)."""

    def __init__(self, proxies: list[ClientProxy], fitins: FitIns) -> None:
        self.proxies = proxies  # the workflow reads only their node_id
        self.fitins = fitins
        self.mean: Parameters | None = None

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: ClientManager):
        return [(proxy, self.fitins) for proxy in self.proxies]

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures: list):
        self.mean = results[0][1].parameters if results else None
        return self.mean, {}

    def initialize_parameters(self, client_manager: ClientManager):
        return None

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: ClientManager):
        return []

    def aggregate_evaluate(self, server_round: int, results: list, failures: list):
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters):
        return None


@dataclass
class SecureRound:
    """What one secure round produced: the mean update (None if the protocol halted) and every site's part."""

    mean_update: Weights | None
    answers: dict[int, Message] = field(default_factory=dict)  # replies to the training stage, by node
    seconds: dict[int, float] = field(default_factory=dict)  # when each training-stage reply came
    dropped: dict[int, str] = field(default_factory=dict)  # node -> the stage it dropped out in, and why
    halted: str | None = None


class _RecordingGrid:
    """The Grid the workflow sees: sends through the runner's exchange, remembers who answered what."""

    def __init__(self, exchange: Exchange, timeout: float, result: SecureRound) -> None:
        self.exchange = exchange
        self.timeout = timeout
        self.result = result
        self.stage = 0

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        name = STAGES[min(self.stage, len(STAGES) - 1)]
        self.stage += 1
        replies, seconds = self.exchange(messages, self.timeout)
        for message in messages:
            node = message.metadata.dst_node_id
            reply = replies.get(node)
            if reply is None:
                self.result.dropped.setdefault(node, f"no answer within {self.timeout:g} s in the {name} stage")
            elif reply.has_error():
                self.result.dropped.setdefault(node, f"{name} stage: {reply.error.reason}")
            elif name == "collect_masked_vectors":
                self.result.answers[node] = reply
                self.result.seconds[node] = seconds.get(node, 0.0)
        return list(replies.values())


@contextlib.contextmanager
def _quiet_flower() -> Iterator[None]:
    """The workflow logs its legacy bookkeeping at INFO ("sampled 3 clients (out of 0)": it has no client
    manager, we chose the sites); the round's progress line and receipt say what happened instead."""
    logger = logging.getLogger(LOGGER_NAME)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def run_secure_round(
    exchange: Exchange,
    nodes: list[int],
    global_weights: Weights,
    instruction: ConfigRecord,
    server_round: int,
    max_weight: float,
    timeout: float,
) -> SecureRound:
    """Run SecAgg+ with `nodes` over one round; the mean update comes back in `global_weights`' names."""
    names = list(global_weights)
    config = {**dict(instruction), TENSOR_NAMES_KEY: ",".join(names)}
    parameters = ndarrays_to_parameters([np.ascontiguousarray(global_weights[name]) for name in names])
    result = SecureRound(mean_update=None)
    grid = _RecordingGrid(exchange, timeout, result)
    proxies = [GridClientProxy(node, grid, run_id=0) for node in nodes]  # type: ignore[arg-type]
    strategy = _SelectedSites(proxies, FitIns(parameters, config))
    state = RecordDict(
        {
            MAIN_PARAMS_RECORD: compat.parameters_to_arrayrecord(parameters, keep_input=True),
            MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round}),
        }
    )
    context = LegacyContext(
        Context(run_id=0, node_id=0, node_config={}, state=state, run_config={}),
        config=ServerConfig(num_rounds=1),
        strategy=strategy,
    )
    workflow = SecAggPlusWorkflow(
        NUM_SHARES,
        RECONSTRUCTION_THRESHOLD,
        max_weight=max(float(max_weight), 1.0),
        clipping_range=CLIPPING_RANGE,
        timeout=timeout,
    )
    try:
        with _quiet_flower():
            workflow(grid, context)  # type: ignore[arg-type]
    except (ZeroDivisionError, ValueError, KeyError) as exc:
        # ZeroDivisionError: every site that reached the training stage contributed weight 0 (refused).
        result.halted = f"the secure aggregation could not complete: {type(exc).__name__}: {exc}"
        return result
    if strategy.mean is None:
        result.halted = (
            "the secure aggregation halted: too few sites were left in a stage to remove the masks "
            "(SecAgg+ needs two thirds of each site's neighbours)"
        )
        return result
    arrays = parameters_to_ndarrays(strategy.mean)
    result.mean_update = {name: np.asarray(array, dtype=np.float64) for name, array in zip(names, arrays, strict=True)}
    return result
