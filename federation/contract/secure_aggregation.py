"""The wire format of a secure (SecAgg+) round, as both sides read it.

The coordinator runs Flower's SecAggPlusWorkflow (federation.coordinator.secure_aggregation); a site's
ClientApp hands the protocol's stages to Flower's secaggplus_mod and, in the stage where it trains, reads
the global weights from the legacy FitIns layout and answers in the FitRes layout the mod masks. These
are the pieces of that layout both sides must agree on, so a site never imports coordinator code.
"""

from __future__ import annotations

import numpy as np
from flwr.app import RecordDict
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE
from flwr.compat.common import recorddict_compat as compat

TENSOR_NAMES_KEY = "twinfed-tensor-names"  # fitins config: the state_dict names of the arrays, in order
CLIPPING_RANGE = 8.0  # Flower's default; updates are far inside it (a site counts any value outside)


def is_secure_training_message(content: RecordDict) -> bool:
    """True for the SecAgg+ stage in which a site trains (the workflow's FitIns plus the stage record)."""
    configs = content.config_records.get(RECORD_KEY_CONFIGS)
    return configs is not None and "fitins.config" in content.config_records


def global_weights_from_fitins(content: RecordDict) -> tuple[dict[str, object], dict[str, np.ndarray]]:
    """The instruction fields and the named global weights a secure training message carries."""
    fitins = compat.recorddict_to_fitins(content, keep_input=True)
    config = dict(fitins.config)
    names = str(config.pop(TENSOR_NAMES_KEY, "")).split(",")
    arrays = parameters_to_ndarrays(fitins.parameters)
    if len(names) != len(arrays):
        raise ValueError(f"the secure round sent {len(arrays)} arrays for {len(names)} tensor names")
    return config, dict(zip(names, arrays, strict=True))


def fitres_content(update: list[np.ndarray], num_examples: int) -> RecordDict:
    """The legacy FitRes layout Flower's secaggplus_mod masks: the update and the weight it carries."""
    return compat.fitres_to_recorddict(
        FitRes(Status(Code.OK, ""), ndarrays_to_parameters(update), num_examples, {}), keep_input=True
    )


def clipping_range(context_state: RecordDict) -> float:
    """The clipping range this round's setup stage gave the site (kept in the ClientApp's context state)."""
    state = context_state.config_records.get(RECORD_KEY_STATE)
    value = state.get("clipping_range") if state is not None else None
    return float(value) if isinstance(value, int | float) and value > 0 else CLIPPING_RANGE
