"""The coordinator's durable state: after every completed round, everything needed to go on from there.

A coordinator killed mid-study resumes from the last completed round: the global weights, the
aggregator's own state (FedAdam's moments...), the metrics so far, the best round on the validation part
(its weights too) and which round comes next. The file
is written to a temporary name and renamed into place, so a kill during the write leaves the previous
checkpoint intact, never a half-written one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

CHECKPOINT_NAME = "checkpoint.pt"


class CheckpointMismatch(RuntimeError):
    """A checkpoint belongs to another study (a different hash) and must not be resumed from."""


@dataclass
class Checkpoint:
    study_hash: str
    run_name: str
    completed_round: int
    weights: dict[str, np.ndarray]
    aggregator_state: dict[str, object]
    history: list[dict[str, object]] = field(default_factory=list)  # per-round summary rows for the report
    # model selection on the validation part: the best round, its weights and score, rounds since it improved
    selection: dict[str, object] | None = None


def save_checkpoint(folder: Path, checkpoint: Checkpoint) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / CHECKPOINT_NAME
    temporary = folder / f".{CHECKPOINT_NAME}.{os.getpid()}.tmp"
    torch.save(checkpoint.__dict__, temporary)
    with temporary.open("rb") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, target)
    return target


def load_checkpoint(folder: Path, study_hash: str) -> Checkpoint | None:
    """The last completed round of this study's run in `folder`, or None when there is none."""
    path = folder / CHECKPOINT_NAME
    if not path.exists():
        return None
    data = torch.load(path, weights_only=False)
    if data["study_hash"] != study_hash:
        raise CheckpointMismatch(
            f"{path} belongs to study {data['study_hash'][:12]}, not {study_hash[:12]}: the study file changed. "
            "Start a new run (another --name) instead of resuming this one."
        )
    return Checkpoint(**data)
