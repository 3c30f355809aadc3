"""The study contract: sites approve a hash, so the hash must be stable for the same study and change
with anything that changes what is computed; bad study files are refused with the field named."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from federation.contract import StudyError, load_study, parse_study, study_hash
from federation.contract.protocol import ProtocolError, RefusalCode, RoundInstruction, SiteAnswer, SiteStatus
from twinfed.cli import app

EXAMPLE = Path(__file__).resolve().parents[1] / "configs" / "study-inpatient-mortality.yaml"


def _raw() -> dict:
    return yaml.safe_load(EXAMPLE.read_text())


def test_example_study_is_valid():
    spec = load_study(EXAMPLE)
    assert spec.outcome.kind == "death" and spec.privacy.target_epsilon == 3.0


def test_hash_ignores_key_order_and_written_out_defaults():
    raw = _raw()
    reordered = dict(reversed(list(raw.items())))
    explicit = _raw()
    explicit["training"]["proximal_mu"] = 0.0  # the default, written out
    explicit["cohort"]["max_age"] = None
    digests = {study_hash(parse_study(r)) for r in (raw, reordered, explicit)}
    assert len(digests) == 1


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("privacy", "target_epsilon", 8.0),
        ("cohort", "min_age", 65),
        ("training", "rounds", 6),
        ("model", "kind", "mlp"),
    ],
)
def test_any_change_changes_the_hash(section, key, value):
    changed = _raw()
    changed[section][key] = value
    assert study_hash(parse_study(changed)) != study_hash(parse_study(_raw()))


def test_code_version_is_part_of_the_hash():
    spec = load_study(EXAMPLE)
    assert study_hash(spec, code_version="twin-code-1+a") != study_hash(spec, code_version="twin-code-1+b")


def test_unknown_and_missing_fields_are_named(tmp_path):
    raw = _raw()
    raw["privacy"]["target_epsilonn"] = 3  # a typo must not fall back to a default
    del raw["outcome"]
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(StudyError) as caught:
        load_study(path)
    message = str(caught.value)
    assert str(path) in message and "privacy.target_epsilonn" in message and "outcome: Field required" in message


def test_covariate_window_after_prediction_time_is_refused():
    raw = _raw()
    raw["covariates"]["values"][0]["window"] = {"start_hours": 0, "end_hours": 48}
    with pytest.raises(StudyError, match="after the prediction time"):
        parse_study(raw)


def test_outcome_needs_its_parameters():
    raw = _raw()
    raw["outcome"] = {"kind": "long_stay"}
    with pytest.raises(StudyError, match="threshold_days"):
        parse_study(raw)


@pytest.mark.parametrize(
    ("federation", "message"),
    [
        ({"strategy": "median"}, "reveals only their sum"),
        ({"strategy": "trimmed_mean"}, "reveals only their sum"),
        ({"min_sites": 2}, "at least 3 sites"),
    ],
)
def test_secure_aggregation_refuses_what_it_cannot_do(federation, message):
    raw = _raw()
    raw["federation"].update({"secure_aggregation": True, "min_sites": 3, **federation})
    with pytest.raises(StudyError, match=message):
        parse_study(raw)
    raw["federation"]["secure_aggregation"] = False
    parse_study(raw)  # the same settings without secure aggregation are fine


def test_instruction_round_trips_and_carries_the_whole_study():
    spec = load_study(EXAMPLE)
    instruction = RoundInstruction.for_study(spec, run_id="run-7", server_round=3)
    back = RoundInstruction.from_config_record(instruction.to_config_record(), "instruction")
    assert back.study() == spec and back.study_hash == study_hash(spec) and back.round_key == "run-7:3"
    answer = SiteAnswer(site_id="a", status=SiteStatus.REFUSED, code=RefusalCode.BUDGET, reason="over budget")
    assert SiteAnswer.from_config_record(answer.to_config_record(), "answer") == answer
    with pytest.raises(ProtocolError, match="study_hash"):
        RoundInstruction.from_config_record(type(instruction.to_config_record())({"run_id": "x"}), "instruction")


def test_cli_check_and_hash(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["study", "hash", str(EXAMPLE)])
    assert result.exit_code == 0 and result.stdout.strip() == study_hash(load_study(EXAMPLE))
    result = runner.invoke(app, ["study", "check", str(EXAMPLE)])
    assert result.exit_code == 0 and "inpatient-mortality-24h" in result.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("study: {id: x}\n")
    result = runner.invoke(app, ["study", "check", str(bad)])
    assert result.exit_code == 2
