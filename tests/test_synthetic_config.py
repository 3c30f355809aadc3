"""Site profiles a consortium writes are validated with errors that name the file, site and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from synthetic.config import BUILTIN_PROFILES, SynthConfig, load_profiles

ROOT = Path(__file__).resolve().parents[1]


def test_the_example_profile_file_is_exactly_the_built_in_consortium():
    assert load_profiles(ROOT / "configs" / "synthetic-sites.yaml") == list(BUILTIN_PROFILES)


def test_unknown_fields_and_duplicate_sites_are_refused(tmp_path):
    base = BUILTIN_PROFILES[0].model_dump(mode="json")
    bad = tmp_path / "bad.yaml"
    import yaml

    bad.write_text(yaml.safe_dump([{**base, "vitals_every_minutes": 5}]))
    expected = r"bad\.yaml: site profile 'aster-university' is invalid: vitals_every_minutes"
    with pytest.raises(ValueError, match=expected):
        load_profiles(bad)
    with pytest.raises(ValueError, match="site_id values must be unique"):
        SynthConfig(profiles=[BUILTIN_PROFILES[0], BUILTIN_PROFILES[0]])
    empty = tmp_path / "empty.yaml"
    empty.write_text("sites: []\n")
    with pytest.raises(ValueError, match="expected a list of site profiles"):
        load_profiles(empty)


def test_a_case_mix_needs_a_positive_weight(tmp_path):
    base = BUILTIN_PROFILES[1].model_dump(mode="json")
    import yaml

    path = tmp_path / "mix.yaml"
    path.write_text(yaml.safe_dump([{**base, "case_mix": {"sepsis": 0}}]))
    with pytest.raises(ValueError, match="case_mix"):
        load_profiles(path)
