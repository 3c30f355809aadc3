"""Generate every hospital of a synthetic consortium, in parallel worker processes, and index the result."""

from __future__ import annotations

import multiprocessing
import os
import queue as queue_module
import shutil
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import orjson

from synthetic.config import SynthConfig
from synthetic.site import ProgressSink, SiteResult, generate_site

INDEX_FILE = "consortium.json"
GENERATOR_VERSION = "2"


class OutputDirectoryNotEmpty(RuntimeError):
    """The output folder holds files that a run would mix with or overwrite."""


@dataclass
class ConsortiumResult:
    out_dir: Path
    sites: list[SiteResult]
    seconds: float

    @property
    def index_file(self) -> Path:
        return self.out_dir / INDEX_FILE


def _prepare_output(out_dir: Path, force: bool) -> None:
    if not out_dir.exists() or not any(out_dir.iterdir()):
        out_dir.mkdir(parents=True, exist_ok=True)
        return
    index = out_dir / INDEX_FILE
    if not index.exists():
        raise OutputDirectoryNotEmpty(
            f"{out_dir} is not empty and was not written by 'twinfed synth'; choose an empty or new folder."
        )
    if not force:
        raise OutputDirectoryNotEmpty(f"{out_dir} already holds a synthetic consortium; pass --force to replace it.")
    previous = orjson.loads(index.read_bytes())
    for site in previous.get("sites", []):
        shutil.rmtree(out_dir / site["site_id"], ignore_errors=True)
    for name in ("ground-truth", "report"):
        shutil.rmtree(out_dir / name, ignore_errors=True)
    index.unlink()


class _QueueSink:
    """Forwards a worker's progress to the parent process (picklable, unlike a closure)."""

    def __init__(self, queue) -> None:
        self.queue = queue

    def __call__(self, site_id: str, stage: str, fraction: float) -> None:
        self.queue.put((site_id, stage, fraction))


def generate_consortium(
    config: SynthConfig,
    out_dir: Path,
    *,
    workers: int | None = None,
    force: bool = False,
    on_progress: ProgressSink | None = None,
) -> ConsortiumResult:
    """Generate all sites of `config` into `out_dir` and write `consortium.json`.

    Sites are independent (each has its own random streams), so they run in parallel and the output
    does not depend on the number of workers. `on_progress(site_id, stage, fraction)` is called in this
    process as sites advance.
    """
    began = time.perf_counter()
    _prepare_output(out_dir, force)
    profiles = config.site_profiles()
    workers = max(1, min(workers or os.cpu_count() or 1, len(profiles)))
    results: dict[str, SiteResult] = {}
    if workers == 1:
        for index, profile in enumerate(profiles):
            results[profile.site_id] = generate_site(profile, config, index, out_dir, on_progress)
    else:
        context = multiprocessing.get_context("spawn")
        with context.Manager() as manager, ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            queue = manager.Queue()
            sink = _QueueSink(queue) if on_progress else None
            pending = {
                pool.submit(generate_site, profile, config, index, out_dir, sink)
                for index, profile in enumerate(profiles)
            }
            while pending:
                done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                _drain(queue, on_progress)
                for future in done:
                    result = future.result()
                    results[result.site_id] = result
            _drain(queue, on_progress)
    ordered = [results[p.site_id] for p in profiles]
    index = {
        "generator": "twinfed synth",
        "generator_version": GENERATOR_VERSION,
        "config": config.model_dump(mode="json", exclude={"profiles"}),
        "sites": [
            {
                "site_id": r.site_id,
                "name": r.name,
                "fhir_export": str(r.export_dir.relative_to(out_dir)),
                "ground_truth": str(r.ground_truth_file.relative_to(out_dir)),
                "patients": r.patients,
                "inpatient_stays": r.stays,
                "lines_by_resource_type": r.lines_by_type,
                "injected_defects": r.defects,
                "patients_denying_research": r.denying_consent,
            }
            for r in ordered
        ],
        "profiles": [p.model_dump(mode="json") for p in profiles],
    }
    (out_dir / INDEX_FILE).write_bytes(orjson.dumps(index, option=orjson.OPT_INDENT_2))
    return ConsortiumResult(out_dir=out_dir, sites=ordered, seconds=time.perf_counter() - began)


def _drain(queue, on_progress: ProgressSink | None) -> None:
    while on_progress is not None:
        try:
            site_id, stage, fraction = queue.get_nowait()
        except queue_module.Empty:
            return
        on_progress(site_id, stage, fraction)
