"""The synthetic consortium several benchmarks start from: generated, each hospital loaded by the ETL."""

from __future__ import annotations

import shutil
from pathlib import Path

EXAMPLE_STUDY = Path(__file__).resolve().parents[1] / "configs" / "study-inpatient-mortality.yaml"


def loaded_consortium(output: Path, patients: int, seed: int = 7, sites: int = 3) -> dict[str, object]:
    """{"spec": the example study, "sites": {site: StudyDataset}} for a fresh consortium under `output`."""
    from federation.contract import load_study
    from omop_etl.load.pipeline import EtlSettings, run_etl
    from site_node.cohort import build_dataset
    from site_node.config import derive_split_key
    from synthetic import SynthConfig, generate_consortium

    shutil.rmtree(output, ignore_errors=True)
    output.mkdir(parents=True)
    consortium = output / "consortium"
    generate_consortium(SynthConfig(sites=sites, patients_per_site=patients, seed=seed), consortium)
    spec = load_study(EXAMPLE_STUDY)
    datasets = {}
    for site_dir in sorted(p for p in consortium.iterdir() if (p / "fhir").is_dir()):
        url = f"sqlite:///{output / (site_dir.name + '.sqlite')}"
        secret = output / f"{site_dir.name}.secret"
        run_etl([site_dir / "fhir"], EtlSettings(db_url=url, secret_file=secret))
        datasets[site_dir.name] = build_dataset(url, spec, split_key=derive_split_key(secret))
    return {"spec": spec, "sites": datasets}
