"""The same settings and seed give byte-identical files, whatever the number of worker processes."""

from __future__ import annotations

import hashlib

import pytest

from synthetic import SynthConfig, generate_consortium
from synthetic.consortium import OutputDirectoryNotEmpty


def _digest(folder) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def test_same_seed_same_bytes_and_other_seed_other_data(tmp_path):
    config = SynthConfig(sites=2, patients_per_site=60, seed=3)
    first, second, other = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    generate_consortium(config, first, workers=1)
    generate_consortium(config, second, workers=2)
    generate_consortium(config.model_copy(update={"seed": 4}), other, workers=1)
    digest = _digest(first)
    assert len(digest) >= 2 * 11 + 2 + 1  # 10 NDJSON + manifest per site, 2 ground truths, index
    assert digest == _digest(second)
    other_digest = _digest(other)
    patient_file = "aster-university/fhir/Patient.ndjson"
    assert other_digest[patient_file] != digest[patient_file]


def test_more_sites_than_profiles_get_distinct_deterministic_hospitals():
    config = SynthConfig(sites=7, patients_per_site=10, seed=1)
    profiles = config.site_profiles()
    assert len({p.site_id for p in profiles}) == 7
    assert [p.model_dump() for p in profiles] == [p.model_dump() for p in config.site_profiles()]
    assert profiles[3].kind == profiles[0].kind and profiles[3].age_mean != profiles[0].age_mean


def test_refuses_to_write_into_a_foreign_folder_and_replaces_its_own_only_with_force(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(OutputDirectoryNotEmpty, match="not written by 'twinfed synth'"):
        generate_consortium(SynthConfig(sites=1, patients_per_site=10), foreign, workers=1)
    assert (foreign / "notes.txt").read_text() == "keep me"

    own = tmp_path / "own"
    generate_consortium(SynthConfig(sites=1, patients_per_site=10), own, workers=1)
    with pytest.raises(OutputDirectoryNotEmpty, match="--force"):
        generate_consortium(SynthConfig(sites=1, patients_per_site=10), own, workers=1)
    generate_consortium(SynthConfig(sites=1, patients_per_site=12), own, workers=1, force=True)
    assert (own / "aster-university" / "fhir" / "Patient.ndjson").read_text().count("\n") >= 12
