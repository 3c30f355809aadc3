"""The updates this site has released, kept so a retried round is answered without training again.

When the coordinator dies after a site trained a round but before it aggregated, a resumed study sends
the same round again. Training it again would spend the round's privacy budget a second time; refusing
would stall the study. Sending the very update that already left costs nothing more (it is the same
release), so the site keeps each released update until the study is over, under its site folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class Release:
    state_dict: dict[str, torch.Tensor]
    metrics: dict[str, float | int]
    answer: dict[str, object]  # the SiteAnswer fields sent with it
    num_examples: int | None = None  # the exact count it was trained on (a secure round weighs it by that)


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
        torch.save(
            {
                "state_dict": release.state_dict,
                "metrics": release.metrics,
                "answer": release.answer,
                "num_examples": release.num_examples,
            },
            temporary,
        )
        os.replace(temporary, path)

    def load(self, study_hash: str, round_key: str) -> Release | None:
        path = self._path(study_hash, round_key)
        if not path.exists():
            return None
        data = torch.load(path, weights_only=True)
        return Release(data["state_dict"], data["metrics"], data["answer"], data.get("num_examples"))
