"""The Flower ServerApp the coordinator's SuperLink runs for a study (`twinfed study run` submits it).

Run configuration (set by `twinfed study run`): `study` is the study's canonical JSON, base64-encoded
(TOML-safe, and the hash every site recomputes); `run-name` names the run so that a resumed run keeps
its checkpoint and its round keys (a site reuses a crashed round's privacy reservation on retry);
`resume` continues from the last completed round; `held-out-site` (a site id, empty for none) holds that
site out of training and validation and asks the chosen model's test evaluation of it alone
(leave-one-site-out: `twinfed study run/simulate --leave-one-site-out` submit one variant of the study per
site with it). Outputs go to $TWINFED_COORDINATOR_DIR/studies/<study-id>/<run-name>/: receipts.jsonl,
checkpoint.pt, model-card.json and model-card.html.
"""

from __future__ import annotations

import base64
import logging
import os
from pathlib import Path

import orjson
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from federation.common.flower import quiet_by_default
from federation.contract import parse_study
from federation.coordinator.model_card import write_model_card
from federation.coordinator.runner import StudyRunner, StudyStopped
from federation.deploy.deployment import COORDINATOR_DIR_ENV, CoordinatorLayout
from federation.deploy.link_instance import GuardedGrid, LinkInstance, RunSuperseded

quiet_by_default()
DEFAULT_COORDINATOR_DIR = Path.home() / ".local" / "share" / "twinfed" / "coordinator"

log = logging.getLogger("twinfed.coordinator")
app = ServerApp()


def encode_study(canonical_json: bytes) -> str:
    return base64.urlsafe_b64encode(canonical_json).decode("ascii")


def decode_study(value: str):
    try:
        data = orjson.loads(base64.urlsafe_b64decode(value.encode("ascii")))
    except (ValueError, orjson.JSONDecodeError) as exc:
        raise ValueError(
            f"the run's 'study' setting is not an encoded study ({exc}); submit it with `twinfed study run`"
        ) from None
    return parse_study(data, source="submitted study")


def coordinator_dir() -> Path:
    return Path(os.environ.get(COORDINATOR_DIR_ENV) or DEFAULT_COORDINATOR_DIR)


def run_folder(study_id: str, run_name: str) -> Path:
    return coordinator_dir() / "studies" / study_id / run_name


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = context.run_config
    spec = decode_study(str(config.get("study", "")))
    run_name = str(config.get("run-name") or spec.study.id)
    folder = run_folder(spec.study.id, run_name)
    held_out = str(config.get("held-out-site", "") or "").strip() or None
    print(f"twinfed coordinator: study {spec.study.id}, run '{run_name}', output in {folder}", flush=True)
    instance = LinkInstance.from_environment(CoordinatorLayout(coordinator_dir()).keys.superlink_dir)
    if instance is not None:
        instance.check()
        grid = GuardedGrid(grid, instance)  # type: ignore[assignment]
    runner = StudyRunner(
        grid,
        spec,
        run_name,
        folder,
        resume=bool(config.get("resume", False)),
        on_progress=lambda text: print(text, flush=True),
        node_wait_seconds=float(config.get("node-wait-seconds", 120.0)),
        held_out_site=held_out,
    )
    try:
        result = runner.run()
    except RunSuperseded as superseded:
        print(f"Study run stopped: {superseded}.", flush=True)
        raise
    except StudyStopped as stopped:
        print(f"Study not run: {stopped}", flush=True)
        raise
    card = write_model_card(folder, spec, result)
    print(f"Study {result.status}: {result.reason}. Model card: {card}", flush=True)
