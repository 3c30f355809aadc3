"""The load accounts for every record of the synthetic consortium, and its quarantine is exactly the
ground truth's defect list: every injected defect quarantined with the right rule, nothing else."""

from __future__ import annotations

from collections import Counter

import pytest
from sqlalchemy import text

from omop_etl.database import open_engine
from tests.etl_helpers import count, load
from tests.fhir_export import sites


@pytest.fixture(scope="module")
def loaded_sites(small_consortium, tmp_path_factory):
    """Each site of the small consortium loaded into its own SQLite database."""
    out = []
    for site_id, export_dir, truth in sites(small_consortium):
        folder = tmp_path_factory.mktemp(site_id)
        db = f"sqlite:///{folder / 'omop.sqlite'}"
        report = load([export_dir], db, folder / "secret")
        out.append((site_id, export_dir, truth, db, report, folder))
    return out


def test_every_record_is_accounted_for(loaded_sites):
    for site_id, _, truth, _, report, _ in loaded_sites:
        assert report.reconciles, site_id
        lines = sum(truth["export_files"].values())
        assert report.input.total == lines, site_id
        assert report.input.total == (
            report.loaded.total + report.quarantined.total + report.skipped.total + report.excluded.total
        )
        for resource_type, n in report.input.by_resource_type.items():
            parts = sum(
                getattr(report, s).by_resource_type.get(resource_type, 0)
                for s in ("loaded", "quarantined", "skipped", "excluded")
            )
            assert parts == n, (site_id, resource_type)


def test_quarantine_is_exactly_the_injected_defects(loaded_sites):
    for site_id, _, truth, db, report, _ in loaded_sites:
        engine = open_engine(db)
        with engine.connect() as connection:
            rows = connection.execute(text("SELECT file, position, rule FROM twinfed_quarantine")).all()
        engine.dispose()
        quarantined = {(f.rsplit("/", 1)[-1], position, rule) for f, position, rule in rows}
        injected = {(d["file"], d["line"], d["kind"]) for d in truth["defects"]["records"]}
        assert quarantined == injected, (
            f"{site_id}: quarantined but not injected {sorted(quarantined - injected)[:5]}; "
            f"injected but not quarantined {sorted(injected - quarantined)[:5]}"
        )
        assert report.quarantine_by_rule == dict(Counter(d["kind"] for d in truth["defects"]["records"]))


def test_loaded_records_reach_the_cdm_tables(loaded_sites):
    for site_id, _, truth, db, report, _ in loaded_sites:
        patients = len(truth["patients"])
        assert count(db, "person") == patients - sum(
            1 for d in truth["defects"]["records"] if d["resource_type"] == "Patient" and d["kind"] != "duplicate"
        )
        assert count(db, "death") == sum(1 for p in truth["patients"] if p["deceased"]), site_id
        assert count(db, "observation_period") > 0.9 * patients
        assert count(db, "cdm_source") == 1
        assert report.rows_by_table["measurement"] > report.loaded.by_resource_type["Observation"]  # BP gives two rows
        assert not report.unmapped_codes, f"{site_id}: synthetic codes are all in the bundled vocabulary"
        assert count(db, "measurement", where="WHERE measurement_concept_id = 0") == 0


def test_units_are_normalised_and_the_source_unit_kept(loaded_sites):
    by_site = {site_id: db for site_id, _, _, db, _, _ in loaded_sites}
    engine = open_engine(by_site["birchwood-general"])
    with engine.connect() as connection:
        units = connection.execute(
            text(
                "SELECT DISTINCT unit_concept_id, unit_source_value FROM measurement "
                "WHERE measurement_concept_id = 3004501"
            )
        ).all()
        median = connection.execute(
            text(
                "SELECT value_as_number FROM measurement WHERE measurement_concept_id = 3004501 "
                "ORDER BY value_as_number LIMIT 1 OFFSET "
                "(SELECT count(*) / 2 FROM measurement WHERE measurement_concept_id = 3004501)"
            )
        ).scalar()
    engine.dispose()
    assert units == [(8840, "mmol/L")], "glucose arrives in mmol/L and is stored in mg/dL"
    assert 70 < median < 250
    engine = open_engine(by_site["cedar-valley"])
    with engine.connect() as connection:
        temperatures = connection.execute(
            text(
                "SELECT min(value_as_number), max(value_as_number), min(unit_source_value), min(unit_concept_id) "
                "FROM measurement WHERE measurement_concept_id = 3020891"
            )
        ).one()
    engine.dispose()
    assert temperatures[0] >= 34 and temperatures[1] <= 43 and temperatures[2] == "[degF]" and temperatures[3] == 586323


def test_consent_registry_and_opt_out_exclusion(loaded_sites, tmp_path):
    _site_id, export_dir, truth, db, _, folder = loaded_sites[0]
    denying = {p["patient_id"] for p in truth["patients"] if p["consent"] in ("opt_out", "withdrawn")}
    assert count(db, "twinfed_consent", where="WHERE provision = 'deny' AND status = 'active'") == len(denying)
    excluded_db = f"sqlite:///{tmp_path / 'excluded.sqlite'}"
    report = load([export_dir], excluded_db, folder / "secret", exclude_opted_out=True)
    assert report.reconciles
    assert report.excluded.by_resource_type.get("Patient", 0) == len(denying)
    assert count(excluded_db, "person") == count(db, "person") - len(denying)
    assert report.excluded.total > len(denying), "their encounters and observations are excluded too"
    assert count(excluded_db, "twinfed_consent", where="WHERE provision = 'deny'") == len(denying), (
        "consents of excluded patients stay in the registry, so later loads keep excluding them"
    )
