"""Bad input on the command line never crashes: each finding of the "no traceback" issue, through the real
loaders and the real `twinfed` command.

Every case here crashed, hung or was accepted before the fix: a deeply nested study (RecursionError), a
10 MB study with 2 million concept ids (a minute and 1.5 GB), `max_grad_norm: .inf` (accepted, then every
round refused), a withdrawal of an id past BIGINT (OverflowError) or of a person who is not in OMOP
(reported as recorded, which leaves the real patient in), a study title that rich read as markup.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml
from sqlalchemy import func, insert, select
from typer.testing import CliRunner

from federation.contract import StudyError, load_study
from omop_etl.database import open_engine
from omop_etl.schema import create_cdm
from site_node.config import SiteConfigError, load_site_config, write_site_folder
from site_node.governance import PolicyError, load_policy
from twinfed import cli

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_STUDY = ROOT / "configs" / "study-inpatient-mortality.yaml"
runner = CliRunner()


def _run(*args: str):
    return runner.invoke(cli.app, list(args))


def _example() -> dict:
    return yaml.safe_load(EXAMPLE_STUDY.read_text(encoding="utf-8"))


def _study_file(tmp_path: Path, raw: dict, name: str = "study.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def _no_crash(result) -> None:
    """Exited on its own terms (not an exception caught by the runner), without a traceback."""
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output and "locals" not in result.output


# --- study files: nesting, size, list lengths --------------------------------------------------------------


def test_a_deeply_nested_study_is_refused_with_a_sentence(tmp_path):
    path = tmp_path / "nested.yaml"
    path.write_text("study: " + "[" * 5000 + "]" * 5000 + "\n", encoding="utf-8")
    with pytest.raises(StudyError, match=r"nested.yaml.*nested.*deeper than 20"):
        load_study(path)
    result = _run("study", "check", str(path))
    _no_crash(result)
    assert result.exit_code == 2 and "nested.yaml" in result.output and "RecursionError" not in result.output


def test_a_huge_study_is_refused_by_its_size_before_it_is_read(tmp_path):
    raw = _example()
    path = tmp_path / "huge.yaml"
    text = yaml.safe_dump(raw, sort_keys=False)
    ids = ", ".join(str(100 + i % 900) for i in range(2_000_000))
    path.write_text(text + f"\nextra_ids: [{ids}]\n", encoding="utf-8")
    size = path.stat().st_size
    assert size > 9_000_000
    with pytest.raises(StudyError) as caught:
        load_study(path)
    message = str(caught.value)
    assert "huge.yaml" in message and f"{size:,} bytes" in message and "1,048,576 bytes" in message
    result = _run("study", "check", str(path))
    _no_crash(result)
    assert result.exit_code == 2 and "1,048,576 bytes" in result.output


def test_a_concept_list_past_its_limit_is_refused_naming_the_field(tmp_path):
    raw = _example()
    raw["covariates"]["occurrences"][0]["concept_ids"] = list(range(1, 10_002))
    with pytest.raises(StudyError, match=r"covariates\.occurrences\.0\.concept_ids: .*10,000 concept ids.*10,001"):
        load_study(_study_file(tmp_path, raw))


def test_many_aliases_cannot_blow_a_small_file_up(tmp_path):
    """'Billion laughs': each line doubles the last, so 30 lines would stand for a billion nodes."""
    lines = ["a0: &a0 [1, 1]"] + [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}]" for i in range(1, 30)]
    path = tmp_path / "laughs.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(StudyError, match=r"laughs.yaml.*values"):
        load_study(path)
    with pytest.raises(PolicyError, match=r"laughs.yaml"):
        load_policy(path)


@pytest.mark.parametrize("concept_id", [0, -5, 2**31, 10**30])
def test_concept_ids_are_omop_concept_ids(tmp_path, concept_id):
    raw = _example()
    raw["covariates"]["values"][0]["concept_ids"] = [concept_id]
    with pytest.raises(StudyError, match=r"covariates\.values\.0\.concept_ids\.0: .*concept id"):
        load_study(_study_file(tmp_path, raw))


def test_a_repeated_key_is_refused_not_silently_the_last(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text("study_epsilon_ceiling: 2\nstudy_epsilon_ceiling: 50\n", encoding="utf-8")
    with pytest.raises(PolicyError, match=r"policy.yaml.*'study_epsilon_ceiling' appears twice"):
        load_policy(path)


def test_a_title_is_printed_as_written_not_read_as_markup(tmp_path):
    raw = _example()
    raw["study"]["title"] = "[/oops] risk [bold]x"
    result = _run("study", "check", str(_study_file(tmp_path, raw)))
    _no_crash(result)
    assert result.exit_code == 0, result.output
    assert "[/oops] risk [bold]x" in result.output


# --- floats that must be finite ------------------------------------------------------------------------------

NON_FINITE_STUDY = [
    (("privacy", "max_grad_norm"), float("inf")),
    (("privacy", "max_grad_norm"), float("nan")),
    (("cohort", "min_visit_hours"), float("inf")),
    (("outcome", "prediction_hours"), float("inf")),
    (("outcome", "window_days"), float("inf")),
    (("federation", "round_timeout_seconds"), float("inf")),
    (("federation", "server_learning_rate"), float("nan")),
]


def test_max_grad_norm_inf_is_refused_by_study_check(tmp_path):
    raw = _example()
    raw["privacy"]["max_grad_norm"] = float("inf")
    path = _study_file(tmp_path, raw)
    assert "max_grad_norm: .inf" in path.read_text()
    result = _run("study", "check", str(path))
    _no_crash(result)
    assert result.exit_code == 2
    assert "privacy.max_grad_norm" in result.output and "finite" in result.output


@pytest.mark.parametrize(("where", "value"), NON_FINITE_STUDY)
def test_every_study_float_must_be_finite(tmp_path, where, value):
    raw = _example()
    raw.setdefault(where[0], {})[where[1]] = value
    with pytest.raises(StudyError, match=rf"{where[0]}\.{where[1]}: .*finite"):
        load_study(_study_file(tmp_path, raw))


def test_a_window_bound_must_be_finite(tmp_path):
    raw = _example()
    raw["covariates"]["occurrences"][0]["window"] = {"start_hours": float("-inf"), "end_hours": 0}
    with pytest.raises(StudyError, match=r"covariates\.occurrences\.0\.window\.start_hours: .*finite"):
        load_study(_study_file(tmp_path, raw))


def test_the_clipping_bound_has_a_sane_ceiling(tmp_path):
    raw = _example()
    raw["privacy"]["max_grad_norm"] = 1e300
    with pytest.raises(StudyError, match=r"privacy\.max_grad_norm"):
        load_study(_study_file(tmp_path, raw))


@pytest.mark.parametrize(
    ("setting", "value"),
    [("study_epsilon_ceiling", ".inf"), ("site_epsilon_ceiling", ".nan"), ("min_noise_multiplier", ".inf")],
)
def test_every_policy_float_must_be_finite(tmp_path, setting, value):
    path = tmp_path / "policy.yaml"
    path.write_text(f"{setting}: {value}\n", encoding="utf-8")
    with pytest.raises(PolicyError, match=rf"(?s)policy.yaml.*{setting}: .*finite"):
        load_policy(path)


# --- policy and site files: size and nesting ----------------------------------------------------------------


def test_an_oversized_policy_is_refused_naming_its_size(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text("# " + "x" * 200_000 + "\nmin_cell_count: 10\n", encoding="utf-8")
    with pytest.raises(PolicyError, match=r"policy.yaml is 200,\d{3} bytes; a policy file may be at most 65,536"):
        load_policy(path)


def test_a_nested_policy_is_refused(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text("min_cell_count: " + "{a: " * 3000 + "1" + "}" * 3000 + "\n", encoding="utf-8")
    with pytest.raises(PolicyError, match=r"policy.yaml.*nested"):
        load_policy(path)


def _site_file(tmp_path: Path, **changes) -> Path:
    secret = tmp_path / "site.secret"
    secret.write_text("ab" * 32, encoding="ascii")
    site = write_site_folder(tmp_path / "site", "north-clinic", "sqlite:///omop.sqlite", secret, {})
    if changes:
        raw = yaml.safe_load(site.read_text(encoding="utf-8"))
        raw.update(changes)
        site.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return site


def test_an_oversized_or_nested_site_file_is_refused(tmp_path):
    site = _site_file(tmp_path)
    site.write_text(site.read_text() + "# " + "y" * 100_000 + "\n", encoding="utf-8")
    too_big = r"site.yaml is 100,\d{3} bytes; a site configuration file may be at most 65,536"
    with pytest.raises(SiteConfigError, match=too_big):
        load_site_config(site)
    site.write_text("site_id: " + "[" * 3000 + "]" * 3000 + "\n", encoding="utf-8")
    with pytest.raises(SiteConfigError, match=r"site.yaml.*nested"):
        load_site_config(site)


def test_a_site_path_with_a_nul_byte_is_a_sentence(tmp_path):
    with pytest.raises(SiteConfigError, match=r"site.yaml.*policy"):
        load_site_config(_site_file(tmp_path, policy="policy\0.yaml"))


def test_a_schema_name_that_is_not_a_plain_identifier_is_refused(tmp_path):
    """Schema names go into SQL as identifiers (CREATE SCHEMA): the site file may not smuggle SQL in."""
    with pytest.raises(SiteConfigError, match=r"site.yaml.*governance_schema"):
        load_site_config(_site_file(tmp_path, governance_schema='gov"; DROP TABLE person; --'))
    (tmp_path / "ok").mkdir()
    assert load_site_config(_site_file(tmp_path / "ok", governance_schema="site_gov")).governance_schema == "site_gov"


# --- consent withdraw ----------------------------------------------------------------------------------------


@pytest.fixture
def small_site(tmp_path) -> Path:
    """A site whose OMOP database holds two people, 1001 and 1002: enough to tell a typo from a patient."""
    omop = tmp_path / "omop.sqlite"
    engine = open_engine(f"sqlite:///{omop}")
    metadata = create_cdm(engine)
    with engine.begin() as connection:
        connection.execute(
            insert(metadata.tables["person"]),
            [
                {"person_id": pid, "gender_concept_id": 8507, "year_of_birth": 1950, "race_concept_id": 0}
                | {"ethnicity_concept_id": 0}
                for pid in (1001, 1002)
            ],
        )
    engine.dispose()
    secret = tmp_path / "site.secret"
    secret.write_text("ab" * 32, encoding="ascii")
    return write_site_folder(tmp_path / "site", "north-clinic", f"sqlite:///{omop}", secret, {})


def _withdrawn(site: Path) -> set[int]:
    from site_node.participation import SiteNode

    return SiteNode(load_site_config(site)).governance.withdrawals.person_ids()


def _consent_audit_entries(site: Path) -> int:
    """How many consent-withdrawn entries the audit log holds: a refusal must add none."""
    from site_node.participation import SiteNode

    store = SiteNode(load_site_config(site)).governance.store
    table = store.tables["audit"]
    with store.engine.connect() as connection:
        return connection.execute(
            select(func.count()).select_from(table).where(table.c.kind == "consent-withdrawn")
        ).scalar_one()


@pytest.mark.parametrize("person_id", [str(2**63), str(10**30)])
def test_withdraw_refuses_an_id_past_bigint(small_site, person_id):
    result = _run("site", "consent", "withdraw", person_id, "--site-config", str(small_site), "--by", "J. Doe")
    _no_crash(result)
    assert result.exit_code == 2, result.output
    assert "OverflowError" not in result.output
    assert "person_id" in result.output and "Nothing was recorded" in result.output
    assert _withdrawn(small_site) == set()


def test_withdraw_refuses_a_person_who_is_not_in_omop(small_site):
    result = _run("site", "consent", "withdraw", "1010", "--site-config", str(small_site), "--by", "J. Doe")
    _no_crash(result)
    assert result.exit_code == 2, result.output
    assert "1010" in result.output and "Nothing was recorded" in result.output
    assert "person table" in result.output, "the refusal says where the right id is found"
    assert "Recorded" not in result.output
    assert _withdrawn(small_site) == set() and _consent_audit_entries(small_site) == 0


def test_withdraw_records_a_person_who_is_in_omop(small_site):
    result = _run("site", "consent", "withdraw", "1001", "--site-config", str(small_site), "--by", "J. Doe")
    assert result.exit_code == 0, result.output
    assert "Recorded: person 1001" in result.output
    assert _withdrawn(small_site) == {1001}
    again = _run("site", "consent", "withdraw", "1001", "--site-config", str(small_site), "--by", "someone")
    assert again.exit_code == 0 and "already" in again.output
    assert _withdrawn(small_site) == {1001}


def test_withdraw_says_so_when_the_omop_database_is_not_there(tmp_path):
    secret = tmp_path / "site.secret"
    secret.write_text("ab" * 32, encoding="ascii")
    site = write_site_folder(tmp_path / "site", "north-clinic", "sqlite:///missing/omop.sqlite", secret, {})
    result = _run("site", "consent", "withdraw", "1001", "--site-config", str(site), "--by", "J. Doe")
    _no_crash(result)
    assert result.exit_code == 2 and "Nothing was recorded" in result.output
    assert _withdrawn(site) == set()


# --- the top-level command: one sentence, --debug for the traceback -----------------------------------------


def _explode(*args, **kwargs):
    raise RuntimeError("secret-value-from-a-local 4711")


def _main(monkeypatch, capsys, argv: list[str]) -> tuple[int, str]:
    import federation.contract

    monkeypatch.setattr(federation.contract, "load_study", _explode)
    monkeypatch.setattr(sys, "argv", ["twinfed", *argv])
    with pytest.raises(SystemExit) as caught:
        cli.main()
    captured = capsys.readouterr()
    return caught.value.code, captured.out + captured.err


def test_an_unexpected_error_is_one_sentence_not_a_traceback(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("TWINFED_DEBUG", raising=False)
    code, output = _main(monkeypatch, capsys, ["study", "check", str(EXAMPLE_STUDY)])
    assert code == cli.EXIT_INTERNAL_ERROR != 0
    assert "Traceback" not in output and "secret-value-from-a-local" not in output and "locals" not in output
    assert "twinfed study check" in output and "RuntimeError" in output
    assert "--debug" in output and "report" in output
    assert len(output.strip().splitlines()) <= 3, output  # one sentence, however the terminal wraps it


@pytest.mark.parametrize("how", ["option", "env"])
def test_debug_shows_the_traceback(monkeypatch, capsys, how):
    monkeypatch.delenv("TWINFED_DEBUG", raising=False)
    argv = ["study", "check", str(EXAMPLE_STUDY)]
    if how == "option":
        argv = ["--debug", *argv]
    else:
        monkeypatch.setenv("TWINFED_DEBUG", "1")
    code, output = _main(monkeypatch, capsys, argv)
    assert code == cli.EXIT_INTERNAL_ERROR
    assert "Traceback" in output and "secret-value-from-a-local" in output
    assert "locals" not in output, "even --debug prints no local variables (they can hold patient data)"


def test_pretty_exceptions_with_locals_are_off_and_debug_is_documented():
    assert cli.app.pretty_exceptions_show_locals is False
    result = _run("--help")
    assert result.exit_code == 0 and "--debug" in result.output and "TWINFED_DEBUG" in result.output
