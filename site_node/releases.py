"""The updates and evaluations this site has released, kept so a retried round is answered without
training (or spending) again; and the latest global model of each study, for scoring at the site.

When the coordinator dies after a site trained a round but before it aggregated, a resumed study sends
the same round again. Training it again would spend the round's privacy budget a second time; refusing
would stall the study. Sending the very update that already left costs nothing more (it is the same
release), so the site keeps each released update until the study is over, under its site folder.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported where a file is read or written: a cold twin query digests numpy weights
    import torch


@dataclass
class Release:
    state_dict: dict[str, torch.Tensor]
    metrics: dict[str, float | int]
    answer: dict[str, object]  # the SiteAnswer fields sent with it
    num_examples: int | None = None  # the exact count it was trained on (a secure round weighs it by that)
    evaluation: dict[str, object] | None = None  # an evaluation release (contract.protocol.EvaluationRelease)


class ReleasedUpdates:
    """One file per (study, round key): written before the round's budget is committed."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _path(self, study_hash: str, round_key: str) -> Path:
        safe = round_key.replace("/", "_").replace(":", "_")
        return self.folder / study_hash[:16] / f"{safe}.pt"

    def save(self, study_hash: str, round_key: str, release: Release) -> None:
        path = self._path(study_hash, round_key)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        import torch

        torch.save(
            {
                "state_dict": release.state_dict,
                "metrics": release.metrics,
                "answer": release.answer,
                "num_examples": release.num_examples,
                "evaluation": release.evaluation,
            },
            temporary,
        )
        os.replace(temporary, path)

    def load(self, study_hash: str, round_key: str) -> Release | None:
        path = self._path(study_hash, round_key)
        if not path.exists():
            return None
        import torch

        data = torch.load(path, weights_only=True)
        return Release(
            data["state_dict"], data["metrics"], data["answer"], data.get("num_examples"), data.get("evaluation")
        )


LATEST_MODEL = "latest.pt"


def save_global_model(folder: Path, study_hash: str, round_key: str, state: dict[str, torch.Tensor]) -> Path:
    """Keep the global model the coordinator sent for evaluation: the latest one is what `twinfed site score`
    applies to this site's patients (the coordinator evaluates the study's model last)."""
    import torch

    path = global_model_file(folder, study_hash)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save({"study_hash": study_hash, "round": round_key, "state_dict": dict(state)}, temporary)
    os.replace(temporary, path)
    return path


def global_model_file(folder: Path, study_hash: str) -> Path:
    """Where the latest global model of a study is kept (it may not exist yet)."""
    return folder / study_hash[:16] / LATEST_MODEL


def load_global_model(folder: Path, study_hash: str) -> tuple[str, dict[str, torch.Tensor]] | None:
    """(round key, weights) of the latest global model kept for the study, or None."""
    path = global_model_file(folder, study_hash)
    if not path.exists():
        return None
    import torch

    data = torch.load(path, weights_only=True)
    return data["round"], data["state_dict"]


class WeightsUnreadable(ValueError):
    """A weights file given by hand cannot be read; the message names it and why."""


def study_weights(
    model_file: Path | None, folder: Path, study_hash: str
) -> tuple[str, dict[str, torch.Tensor]] | None:
    """(where they came from, weights) of a study's model: the file given by hand (a model card's
    final-model.pt), else the latest global model this site keeps for the study; None when it keeps none.
    Raises WeightsUnreadable for a given file that cannot be read."""
    if model_file is not None:
        import torch

        try:
            return str(model_file), torch.load(model_file, weights_only=True)
        except (OSError, RuntimeError, ValueError) as exc:
            raise WeightsUnreadable(f"{model_file}: cannot read the model weights: {exc}") from None
    kept = load_global_model(folder, study_hash)
    if kept is None:
        return None
    return f"global model of round {kept[0]} (kept at this site)", kept[1]


def weights_digest(state: dict[str, torch.Tensor] | dict[str, np.ndarray]) -> str:
    """SHA-256 of a model's weights (names and float32 values, in name order): the same weights give the
    same digest whatever file they came from, as tensors or as numpy arrays. Reports name the model by it;
    the patient twin keys its kept calibration and its numpy copy of the weights by it."""
    digest = hashlib.sha256()
    for name in sorted(state):
        value = state[name]
        array = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
        digest.update(name.encode())
        digest.update(array.astype("<f4").tobytes())
    return digest.hexdigest()
