"""The data steward's policy file: strict validation with errors naming file and setting; small-count suppression."""

from __future__ import annotations

import pytest

from site_node.governance import PolicyError, SitePolicy, load_policy, suppress_small_counts


def _write(tmp_path, text: str):
    path = tmp_path / "policy.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_a_valid_policy_file_is_read(tmp_path):
    path = _write(
        tmp_path,
        "require_dp: true\nmin_noise_multiplier: 0.8\nmax_delta: 1.0e-6\nstudy_epsilon_ceiling: 4\n"
        "site_epsilon_ceiling: 12\nmin_cohort_size: 250\nmin_cell_count: 11\nrequire_secure_aggregation: true\n",
    )
    policy = load_policy(path)
    assert policy == SitePolicy(
        min_noise_multiplier=0.8,
        max_delta=1e-6,
        study_epsilon_ceiling=4,
        site_epsilon_ceiling=12,
        min_cohort_size=250,
        min_cell_count=11,
        require_secure_aggregation=True,
    )


def test_an_empty_policy_file_means_the_conservative_defaults(tmp_path):
    policy = load_policy(_write(tmp_path, ""))
    assert policy.require_dp and policy.min_noise_multiplier == 0.5 and policy.site_epsilon_ceiling == 30.0


def test_a_misspelt_setting_is_refused_naming_file_and_setting(tmp_path):
    path = _write(tmp_path, "site_epsilon_ceilng: 5\n")
    with pytest.raises(PolicyError) as error:
        load_policy(path)
    message = str(error.value)
    assert str(path) in message
    assert "'site_epsilon_ceilng' is not a policy setting" in message
    assert "site_epsilon_ceiling" in message  # the list of real settings helps the steward spot the typo


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("min_cell_count: ten\n", "min_cell_count"),
        ("max_delta: 0.5e0\nstudy_epsilon_ceiling: -1\n", "study_epsilon_ceiling"),
        ("max_delta: 2\n", "max_delta"),
        ("min_noise_multiplier: -0.1\n", "min_noise_multiplier"),
        ("require_dp: maybe\n", "require_dp"),
    ],
)
def test_an_invalid_value_is_refused_naming_file_and_setting(tmp_path, text, field):
    path = _write(tmp_path, text)
    with pytest.raises(PolicyError) as error:
        load_policy(path)
    assert str(path) in str(error.value)
    assert f"{field}:" in str(error.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("- 1\n- 2\n", "is a mapping"), ("a: [1\n", "not valid YAML")],
)
def test_a_file_that_is_not_a_mapping_of_settings_is_refused(tmp_path, text, expected):
    path = _write(tmp_path, text)
    with pytest.raises(PolicyError, match=expected) as error:
        load_policy(path)
    assert str(path) in str(error.value)


def test_a_missing_policy_file_is_named(tmp_path):
    with pytest.raises(PolicyError, match="no such policy file") as error:
        load_policy(tmp_path / "absent.yaml")
    assert "absent.yaml" in str(error.value)


def test_counts_below_the_cell_floor_are_suppressed_and_reported():
    metrics = {"num-examples": 9, "num-positive": 3, "num-negative": 0, "num-tested": 10, "loss": 0.5, "epsilon": 2.0}
    kept, suppressed = suppress_small_counts(
        metrics, ["num-examples", "num-positive", "num-negative", "num-tested"], 10
    )
    assert kept == {"num-negative": 0, "num-tested": 10, "loss": 0.5, "epsilon": 2.0}
    assert suppressed == ["num-examples", "num-positive"]


def test_non_count_metrics_pass_whatever_their_value():
    kept, suppressed = suppress_small_counts({"auc": 0.7, "loss": 3.0}, ["num-examples"], 10)
    assert kept == {"auc": 0.7, "loss": 3.0} and suppressed == []


def test_a_count_that_is_not_a_number_is_suppressed_rather_than_sent():
    kept, suppressed = suppress_small_counts({"num-examples": float("nan")}, ["num-examples"], 10)
    assert kept == {} and suppressed == ["num-examples"]
