"""`twinfed study simulate`: the real study in Flower's simulation engine (Ray), with simulated sites.

One run of 4 simulated sites over one OMOP database, 2 rounds, end to end: every site trained in every
round and released its evaluation of the final model under its own site id, the receipts and the model
card say so, each site's governance database recorded the approval by "simulation" and its own privacy
spending, the report has time and memory per round, and the SuperLink the flwr CLI started is gone afterwards.

The example study runs with secure aggregation (SecAgg+), so this is also where its result is checked
against plain aggregation: the model the coordinator ends with equals the example-weighted mean of the
updates the sites released in the last round (each site keeps what it released), within the
protocol's quantisation step.

Leave one site out (`--leave-one-site-out`) runs with the three synthetic hospitals each in its own OMOP
database, the usual set-up where it is a real external validation: three variants, each its own run; in each,
the held-out site trains in no round and releases no validation, its test evaluation is the only one of the
variant, and the report lists every site with its metric (or why there is none).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from federation.contract.receipts import Participation, read_receipts
from federation.local.simulation import REPORT_FILE
from site_node.config import load_site_config
from site_node.participation import SiteNode
from tests.process_helpers import FLOWER_ENV, TWINFED, processes_mentioning, simulate_on_site
from tests.site_helpers import EXAMPLE_STUDY, load_site_omop

SITES = 4
ROUNDS = 2


@pytest.mark.timeout(300)
def test_simulated_study_runs_the_real_apps_end_to_end(prepared_site: Path, tmp_path: Path):
    out = tmp_path / "simulation"
    done = simulate_on_site(EXAMPLE_STUDY, prepared_site, out, SITES, ROUNDS)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert not processes_mentioning(str(out)), "the local simulation SuperLink was left running"

    run = out / "studies" / "inpatient-mortality-24h" / "simulation"
    site_ids = {f"sim-{i:03d}" for i in range(1, SITES + 1)}
    receipts = read_receipts(run / "receipts.jsonl")
    # the study evaluates once, the final model on every site's test part: a DP release of the scores places
    # the strata, then a DP release of the outcome histograms over them
    assert [(r.server_round, r.phase, r.part) for r in receipts] == [
        (1, "train", None), (2, "train", None), (2, "strata", "test"), (2, "evaluate", "test")
    ]  # fmt: skip
    for receipt in receipts:
        expected = Participation.TRAINED if receipt.phase == "train" else Participation.EVALUATED
        assert {s.site_id for s in receipt.sites} == site_ids
        assert {s.status for s in receipt.sites} == {expected}, receipt.summary()

    train_receipts = [r for r in receipts if r.phase == "train"]
    assert all(r.secure_aggregation and "SecAgg+" in r.note for r in train_receipts)

    card = json.loads((run / "model-card.json").read_text())
    assert card["run"]["status"] == "completed"
    assert len(card["history"]) == ROUNDS
    assert set(card["history"][-1]["epsilon"]) == site_ids
    assert (run / "model-card.html").exists()

    report = json.loads((run / REPORT_FILE).read_text())
    assert report["simulated_sites"] == SITES and report["status"] == "completed"
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    for row in report["rounds"]:
        assert row["trained_sites"] == SITES
        assert row["seconds"] > 0 and row["slowest_site_seconds"] > 0
        assert row["peak_pss_mib"] > 0 and row["peak_rss_mib"] >= row["peak_pss_mib"]
    assert "not model quality" in " ".join(done.stdout.split())

    listing = yaml.safe_load((out / "sites" / "sites.yaml").read_text())
    plain = _released_mean(listing, card["study"]["hash"][:16], f"simulation_{ROUNDS}")
    final = torch.load(run / "checkpoint.pt", weights_only=False)["weights"]
    for name, expected in plain.items():
        difference = (torch.as_tensor(final[name]).double() - expected).abs().max().item()
        assert difference < 1e-5, f"{name}: SecAgg+ mean differs from the plain mean by {difference}"
    secrets = set()
    for index, site_file in enumerate(listing):
        node = SiteNode(load_site_config(Path(site_file)))
        assert node.config.site_id == f"sim-{index + 1:03d}"
        secrets.add(node.config.split_key())
        entries = node.governance.audit.entries()
        assert any(e.kind == "approved" and e.payload["by"] == "simulation" for e in entries)
        assert sum(e.kind == "round-trained" for e in entries) == ROUNDS
        assert node.governance.audit.verify().ok
    assert len(secrets) == SITES, "every simulated site has its own split key"


def _released_mean(listing: list[str], spec_hash_prefix: str, round_key: str) -> dict[str, torch.Tensor]:
    """The plain FedAvg of what the sites released in one round: the mean weighted by training examples."""
    releases = [
        torch.load(path, weights_only=True)
        for site_file in listing
        for path in (Path(site_file).parent / "released" / spec_hash_prefix).glob(f"{round_key}.pt")
    ]
    assert len(releases) == SITES, "every simulated site kept the update it released"
    total = sum(r["num_examples"] for r in releases)
    return {
        name: sum(r["state_dict"][name].double() * r["num_examples"] for r in releases) / total
        for name in releases[0]["state_dict"]
    }


@pytest.fixture(scope="module")
def three_hospitals(prepared_site: Path, medium_consortium: Path, tmp_path_factory) -> list[tuple[str, str]]:
    """(OMOP URL, secret file) of each synthetic hospital loaded by the ETL, each its own database."""
    site = yaml.safe_load((prepared_site / "site.yaml").read_text())
    hospitals = [(site["omop"]["url"], site["secret_file"])]
    root = tmp_path_factory.mktemp("hospitals")
    for name in ("birchwood-general", "cedar-valley"):
        url, secret = load_site_omop(medium_consortium, name, root / name)
        hospitals.append((url, str(secret)))
    return hospitals


@pytest.mark.timeout(600)
def test_leave_one_site_out_holds_each_hospital_out_of_its_own_variant(three_hospitals, prepared_site, tmp_path):
    raw = yaml.safe_load(EXAMPLE_STUDY.read_text())
    raw["training"].update({"rounds": ROUNDS, "local_epochs": 1})
    raw["federation"].update({"min_sites": 2, "secure_aggregation": False})  # two sites train in each variant
    raw["evaluation"]["split"] = {"kind": "random", "train": 0.6, "validation": 0.2, "test": 0.2}
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump(raw), encoding="utf-8")
    policy = yaml.safe_load((prepared_site / "policy.yaml").read_text())
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump({**policy, "min_cell_count": 1}), encoding="utf-8")
    out = tmp_path / "loso"
    databases = [arg for url, secret in three_hospitals for arg in ("--omop", url, "--secret", secret)]
    done = subprocess.run(
        [TWINFED, "study", "simulate", str(study), "--sites", "3", "--leave-one-site-out", *databases,
         "--policy", str(tmp_path / "policy.yaml"), "--out", str(out)],
        env=FLOWER_ENV, capture_output=True, text=True, timeout=580, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-3000:]
    assert not processes_mentioning(str(out)), "a local simulation SuperLink was left running"
    printed = " ".join(done.stdout.split())
    assert "trains in 2 of them" in printed and "external validation (TRIPOD type 3)" in printed

    sites = ["sim-001", "sim-002", "sim-003"]
    report = json.loads(
        (out / "studies" / "inpatient-mortality-24h" / "leave-one-site-out" / "loso-report.json").read_text()
    )
    assert [row["held_out_site"] for row in report["sites"]] == sites
    assert report["shared_databases"] is False and report["metric"] == "AUROC"
    listing = yaml.safe_load((out / "sites" / "sites.yaml").read_text())
    nodes = {site: SiteNode(load_site_config(Path(file))) for site, file in zip(sites, listing, strict=True)}
    for (url, _), row in zip(three_hospitals, report["sites"], strict=True):
        site, others = row["held_out_site"], set(sites) - {row["held_out_site"]}
        assert row["variant_id"] == f"inpatient-mortality-24h.without-{site}" and row["database"] == url
        assert row["evaluated"] and row["training_sites"] == sorted(others) and row["held_out_trained_rounds"] == 0
        assert row["metric"]["value"] is not None or row["reason"], row
        assert row["internal_validation"] is not None

        run = out / "studies" / row["variant_id"] / "simulation"
        receipts = read_receipts(run / "receipts.jsonl")
        train = [r for r in receipts if r.phase == "train"]
        assert [r.server_round for r in train] == list(range(1, ROUNDS + 1))
        for receipt in train:
            assert {s.site_id for s in receipt.sites if s.status == Participation.TRAINED} == others, receipt.summary()
            assert all(s.status != Participation.TRAINED for s in receipt.sites if s.site_id == site)
        assert all(s.site_id in others for r in receipts if r.part == "validation" for s in r.sites)
        tests = [r for r in receipts if r.part == "test"]
        assert [r.phase for r in tests] == ["strata", "evaluate"], "one test evaluation, the chosen model's"
        assert all([(s.site_id, s.status) for s in r.sites] == [(site, Participation.EVALUATED)] for r in tests)
        card = json.loads((run / "model-card.json").read_text())
        assert card["evaluation"]["held_out_site"] == site and card["sites"][site]["rounds_trained"] == 0

        digest = card["study"]["hash"]
        for name, node in nodes.items():
            trained = [e for e in node.governance.audit.entries() if e.kind == "round-trained"]
            assert sum(e.payload["study_hash"] == digest for e in trained) == (0 if name == site else ROUNDS)
    for node in nodes.values():
        assert sum(e.kind == "approved" for e in node.governance.audit.entries()) == 3, "every variant approved"
        assert node.governance.audit.verify().ok


PATIENT_TWIN_STUDY = Path(__file__).resolve().parents[1] / "configs" / "study-patient-twin-example.yaml"


@pytest.mark.timeout(300)
def test_a_patient_twin_study_runs_federated_end_to_end(prepared_site: Path, tmp_path: Path):
    """The trajectory kind through the real apps: 3 simulated sites, SecAgg+, 2 rounds, a smaller network."""
    spec = yaml.safe_load(PATIENT_TWIN_STUDY.read_text())
    spec["model"].update(hidden=8, windows_per_patient=2)
    study_file = tmp_path / "patient-twin.yaml"
    study_file.write_text(yaml.safe_dump(spec), encoding="utf-8")
    out = tmp_path / "simulation"
    done = simulate_on_site(study_file, prepared_site, out, 3, 2)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = out / "studies" / "inpatient-patient-twin" / "simulation"
    receipts = read_receipts(run / "receipts.jsonl")
    trained = [r for r in receipts if r.phase == "train"]
    assert len(trained) == 2 and all(r.secure_aggregation for r in trained)
    assert all(s.status == Participation.TRAINED for r in trained for s in r.sites)
    card = json.loads((run / "model-card.json").read_text())
    assert card["run"]["status"] == "completed" and card["model"]["kind"] == "trajectory"
    metrics = card["metrics"]
    for name in ("held_out_coverage_80", "held_out_coverage_95", "held_out_forecast_mae"):
        assert metrics[name]["value"] is not None, name
    assert "Forecasts (pooled, test)" in (run / "model-card.html").read_text(encoding="utf-8")
    assert "forecast MAE" in done.stdout
