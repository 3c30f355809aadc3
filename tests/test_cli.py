"""The `twinfed` command as hospital IT meets it: help everywhere, clear refusals, working doctor checks."""

from __future__ import annotations

import socket

import orjson
import pytest
from typer.testing import CliRunner

from twinfed.cli import app

runner = CliRunner()


@pytest.mark.parametrize(
    "args",
    [[], ["synth"], ["inspect"], ["site"], ["site", "doctor"], ["coordinator"], ["coordinator", "doctor"]],
)
def test_every_command_has_help(args):
    result = runner.invoke(app, [*args, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("twinfed ")


def test_synth_writes_a_consortium_and_inspect_summarises_it(tmp_path):
    out = tmp_path / "consortium"
    result = runner.invoke(app, ["synth", "--sites", "2", "--patients", "40", "--seed", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "aster-university" in result.output and "birchwood-general" in result.output
    assert (out / "report" / "index.html").is_file()
    assert (out / "report" / "drug_response.png").is_file()

    summary = tmp_path / "summary.json"
    result = runner.invoke(app, ["inspect", str(out), "--json", str(summary)])
    assert result.exit_code == 0, result.output
    data = orjson.loads(summary.read_bytes())
    assert [s["label"] for s in data] == ["aster-university", "birchwood-general"]
    truth = orjson.loads((out / "ground-truth" / "aster-university.json").read_bytes())
    malformed = sum(1 for d in truth["defects"]["records"] if d["kind"] == "malformed_json")
    duplicates = sum(1 for d in truth["defects"]["records"] if d["kind"] == "duplicate")
    assert data[0]["patients"] == 40
    assert data[0]["malformed_lines"] == malformed
    assert data[0]["duplicate_ids"] == duplicates
    units = {c["code"]: c["units"] for c in data[1]["observation_codes"]}
    assert set(units["2345-7"]) == {"mmol/L"}


def test_synth_refuses_to_overwrite_without_force(tmp_path):
    out = tmp_path / "c"
    args = ["synth", "--sites", "1", "--patients", "10", "--out", str(out), "--no-report"]
    assert runner.invoke(app, args).exit_code == 0
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "--force" in result.output
    assert runner.invoke(app, [*args, "--force"]).exit_code == 0


def test_synth_rejects_a_bad_profile_file_naming_the_site_and_field(tmp_path):
    profiles = tmp_path / "sites.yaml"
    profiles.write_text(
        "sites:\n  - site_id: north-clinic\n    name: North\n    kind: academic\n    city: X\n    country: NL\n"
        "    age_mean: 60\n    age_sd: 10\n    admission_rate_per_year: 0.2\n    case_mix: {sepsis: 1.0}\n"
        "    vitals_every_hours: 0.1\n    labs_every_hours: 24\n"
    )
    result = runner.invoke(app, ["synth", "--profiles", str(profiles), "--out", str(tmp_path / "o"), "--sites", "1"])
    assert result.exit_code == 2
    assert "north-clinic" in result.output and "vitals_every_hours" in result.output and "sites.yaml" in result.output


def test_synth_accepts_a_valid_profile_file(tmp_path):
    profiles = tmp_path / "sites.yaml"
    profiles.write_text(
        "- site_id: north-clinic\n  name: North Clinic\n  kind: community\n  city: Groningen\n  country: NL\n"
        "  age_mean: 58\n  age_sd: 15\n  admission_rate_per_year: 0.2\n  case_mix: {pneumonia: 2, sepsis: 1}\n"
        "  vitals_every_hours: 4\n  labs_every_hours: 24\n  units: {glucose: mmol/L}\n"
    )
    out = tmp_path / "o"
    result = runner.invoke(
        app,
        ["synth", "--profiles", str(profiles), "--out", str(out), "--sites", "1", "--patients", "30", "--no-report"],
    )
    assert result.exit_code == 0, result.output
    assert (out / "north-clinic" / "fhir" / "Patient.ndjson").is_file()


def test_inspect_says_what_to_do_when_there_is_no_export(tmp_path):
    result = runner.invoke(app, ["inspect", str(tmp_path)])
    assert result.exit_code == 2
    assert "No FHIR NDJSON files" in result.output


def test_site_doctor_checks_the_local_environment_and_a_sqlite_database(tmp_path):
    from tests.foreign_omop import build_foreign_omop

    build_foreign_omop(f"sqlite:///{tmp_path / 'omop.sqlite'}", persons=40)  # the doctor checks the OMOP content too
    result = runner.invoke(app, ["site", "doctor", "--db", f"sqlite:///{tmp_path / 'omop.sqlite'}"])
    assert result.exit_code == 0, result.output
    for expected in ("torch", "opacus", "fhir.resources", "flwr", "warm runtime", "database", "sqlite", "OMOP tables"):
        assert expected in result.output


def test_site_doctor_fails_with_an_actionable_message_for_an_unreachable_database():
    result = runner.invoke(app, ["site", "doctor", "--db", "postgresql://nobody:secret@127.0.0.1:9/none"])
    assert result.exit_code == 1
    assert "Cannot connect" in result.output and "secret" not in result.output


def test_coordinator_doctor_reports_a_busy_port():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = runner.invoke(app, ["coordinator", "doctor", "--port", str(port)])
    assert result.exit_code == 1
    assert f"127.0.0.1:{port}" in result.output and "flower-superlink" in result.output
