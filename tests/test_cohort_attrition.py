"""The cohort's attrition table, the study's split, and what of the table may leave the site.

On a real hospital (700 synthetic patients loaded by the ETL): every build records each inclusion
criterion in order with the patients and visits it kept, the split is the one the study declares (random
in its shares, temporal by index date), and `twinfed site cohort` shows it all at the site. Under a
cell-count floor, no shown count lets anyone work out a hidden one.
"""

from __future__ import annotations

import datetime as dt
import itertools
import shutil
import sqlite3
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml
from sqlalchemy import text
from typer.testing import CliRunner

from federation.contract import study_hash
from federation.contract.spec import EvaluationSpec, RandomSplit, TemporalSplit
from omop_etl.database import open_engine
from site_node.cohort import StudyDataset, build_dataset
from site_node.cohort.attrition import (
    STEP_ORDER,
    Attrition,
    AttritionStep,
    PartCount,
    attrition_sentence,
    most_removed,
    render_attrition,
)
from site_node.cohort.omop_source import OmopSource
from site_node.cohort.selection import select_cohort
from site_node.config import load_site_config
from site_node.participation import SiteNode
from tests.etl_helpers import load
from tests.site_helpers import EXAMPLE_STUDY, fresh_site, study
from twinfed.cli import app

NO_CONDITION = [name for name in STEP_ORDER if name != "condition"]


@pytest.fixture(scope="module")
def hospital(prepared_site: Path) -> tuple[str, bytes]:
    """(OMOP URL, split key) of the prepared hospital; read only."""
    config = load_site_config(prepared_site / "site.yaml")
    return config.omop.url, config.split_key()


def _build(hospital: tuple[str, bytes], spec=None, **options) -> StudyDataset:
    url, key = hospital
    return build_dataset(url, spec or study(), split_key=key, **options)


def _with_split(split: RandomSplit | TemporalSplit):
    base = study()
    return base.model_copy(update={"evaluation": EvaluationSpec(split=split)})


# --- the table of a real build --------------------------------------------------------------------


def test_every_build_records_its_attrition_in_order(hospital):
    ds = _build(hospital)
    steps = ds.attrition.steps
    assert [s.name for s in steps] == NO_CONDITION  # the example study has no condition requirement
    assert steps[0].removed_persons is None and steps[0].persons > len(ds)
    for before, after in itertools.pairwise(steps):
        assert after.persons <= before.persons and after.examples <= before.examples
        assert after.removed_persons == before.persons - after.persons
        assert after.removed_examples == before.examples - after.examples
    assert all(s.examples >= s.persons for s in steps)
    one = ds.attrition.step("one-per-person")
    assert one.examples == one.persons and one.removed_persons == 0
    assert ds.attrition.persons == steps[-1].persons == steps[-1].examples == len(ds)
    assert ds.attrition.step("consent").removed_persons == ds.excluded_by_consent > 0
    assert ds.attrition.step("one-per-person").persons == ds.cohort_size
    # the parts the study cuts (80/20, no validation), adding up to the dataset
    assert [(p.part, p.persons) for p in ds.attrition.parts] == [
        ("train", int((ds.split == "train").sum())),
        ("test", int((ds.split == "test").sum())),
    ]
    assert sum(p.persons for p in ds.attrition.parts) == len(ds)
    # the training part carries the whole cohort's table
    assert ds.subset("train").attrition == ds.attrition


def test_a_condition_requirement_is_its_own_step(hospital):
    heart_failure = study(cohort={"condition_concept_ids": [316139, 4229440]})
    ds = _build(hospital, heart_failure)
    assert [s.name for s in ds.attrition.steps] == list(STEP_ORDER)
    condition = ds.attrition.step("condition")
    assert condition.removed_persons > 0 and "316139, 4229440" in condition.criterion
    assert ds.attrition.persons == len(ds)


def test_an_age_band_that_removes_most_is_named(hospital):
    old = _build(hospital, study(cohort={"min_age": 85}))
    top = most_removed(old.attrition)
    assert top is not None and top.name == "age" and top.criterion == "aged 85 or over at the index"
    assert top.removed_persons == max(s.removed_persons or 0 for s in old.attrition.steps)
    sentence = attrition_sentence(old.attrition, 10)
    assert "the criterion that removed the most was 'aged 85 or over at the index'" in sentence
    assert sentence.startswith(f"{old.attrition.steps[0].persons} patients had visits of kind 9201 (inpatient)")
    # the example study as it is: the first visits are mostly adults; consent or the stay length lead instead
    assert most_removed(_build(hospital).attrition).name != "age"


# --- the study's split ----------------------------------------------------------------------------


def test_a_random_split_keeps_the_studys_shares(hospital):
    ds = _build(hospital, _with_split(RandomSplit(train=0.6, validation=0.2, test=0.2)))
    shares = {part: float((ds.split == part).mean()) for part in ("train", "validation", "test")}
    assert shares == pytest.approx({"train": 0.6, "validation": 0.2, "test": 0.2}, abs=0.08), (shares, len(ds))
    assert [p.part for p in ds.attrition.parts] == ["train", "validation", "test"]
    default = _build(hospital)
    assert "validation" not in set(default.split) and len(default.subset("validation")) == 0


def test_a_patient_keeps_their_part_when_other_patients_are_added(hospital, tmp_path):
    """The same hospital before a third of its patients were loaded: everyone there is in the same part."""
    url, key = hospital
    earlier = tmp_path / "earlier.sqlite"
    source = sqlite3.connect(url.removeprefix("sqlite:///"))
    copy = sqlite3.connect(earlier)
    source.backup(copy)
    source.close()
    copy.execute("DELETE FROM visit_occurrence WHERE person_id % 3 = 0")
    copy.commit()
    copy.close()
    spec = _with_split(RandomSplit(train=0.7, validation=0.1, test=0.2))
    before = build_dataset(f"sqlite:///{earlier}", spec, split_key=key)
    after = _build(hospital, spec)
    parts_after = dict(zip(after.person_ids.tolist(), after.split.tolist(), strict=True))
    assert len(after) > len(before) > 100
    assert all(
        parts_after[p] == part for p, part in zip(before.person_ids.tolist(), before.split.tolist(), strict=True)
    )


def _index_dates(hospital: tuple[str, bytes], spec) -> dict[int, dt.date]:
    """Each example's index date, worked out here from the cohort's index time in seconds."""
    url, key = hospital
    with OmopSource.open(url) as source:
        examples = select_cohort(source, spec.cohort, spec.outcome, key).examples
    epoch = dt.datetime(1970, 1, 1)
    return {
        int(p): (epoch + dt.timedelta(seconds=float(s))).date()
        for p, s in zip(examples["person_id"], examples["index_s"], strict=True)
    }


def test_a_temporal_split_puts_every_example_in_its_period(hospital):
    dates = _index_dates(hospital, study())
    ordered = sorted(dates.values())
    validation_from, test_from = ordered[len(ordered) // 2], ordered[3 * len(ordered) // 4]
    assert validation_from < test_from
    ds = _build(hospital, _with_split(TemporalSplit(validation_from=validation_from, test_from=test_from)))
    for person, part in zip(ds.person_ids.tolist(), ds.split.tolist(), strict=True):
        day = dates[person]
        expected = "train" if day < validation_from else "validation" if day < test_from else "test"
        assert part == expected, (person, day, part)
    assert {p.part: p.persons for p in ds.attrition.parts} == {
        part: int((ds.split == part).sum()) for part in ("train", "validation", "test")
    }
    assert all(p.persons > 0 for p in ds.attrition.parts)


def test_a_temporal_split_after_the_sites_data_gives_an_empty_test_part(hospital):
    last = max(_index_dates(hospital, study()).values())
    ds = _build(hospital, _with_split(TemporalSplit(test_from=last + dt.timedelta(days=1))))
    assert set(ds.split) == {"train"}
    test = ds.subset("test")
    assert len(test) == 0 and test.features.shape == (0, ds.features.shape[1])
    assert [(p.part, p.persons) for p in ds.attrition.parts] == [("train", len(ds)), ("test", 0)]


# --- what may leave: the floor ----------------------------------------------------------------------


def _table(counts: list[tuple[int, int]], parts: dict[str, int] | None = None) -> Attrition:
    """An attrition table from (persons, examples) per step, in STEP_ORDER without the condition."""
    table = Attrition()
    steps = []
    for i, (persons, examples) in enumerate(counts):
        before = counts[i - 1] if i else None
        steps.append(
            AttritionStep(
                name=NO_CONDITION[i],
                criterion=NO_CONDITION[i],
                persons=persons,
                examples=examples,
                removed_persons=None if before is None else before[0] - persons,
                removed_examples=None if before is None else before[1] - examples,
            )
        )
    parts = parts or {}
    return table.model_copy(
        update={"steps": tuple(steps), "parts": tuple(PartCount(part=k, persons=v) for k, v in parts.items())}
    )


def _cells(display) -> dict[tuple[str, int | str], str]:
    cells = {}
    for i, s in enumerate(display.steps):
        cells |= {("persons", i): s.persons, ("examples", i): s.examples}
        if i:
            cells |= {("removed_persons", i): s.removed_persons, ("removed_examples", i): s.removed_examples}
    return cells | {("part", p.part): p.persons for p in display.parts}


def _subtractions_reveal_nothing(table: Attrition, display) -> None:
    """No equation of the table (before = after + removed; parts add up) has exactly one hidden count."""
    cells = _cells(display)
    n = len(table.steps)
    equations = [[("persons", i - 1), ("persons", i), ("removed_persons", i)] for i in range(1, n)]
    equations += [[("examples", i - 1), ("examples", i), ("removed_examples", i)] for i in range(1, n)]
    if table.parts:
        equations.append([("persons", n - 1)] + [("part", p.part) for p in table.parts])
    for equation in equations:
        hidden = [c for c in equation if not cells[c].isdigit()]
        assert len(hidden) != 1, (equation, [cells[c] for c in equation])


def test_small_counts_are_hidden_and_so_is_a_count_that_would_give_one_away():
    # 500 patients, the age band removes 5: 500 and 495 shown together would say it
    table = _table(
        [(500, 700), (500, 700), (495, 693), (400, 560), (380, 530), (380, 380), (360, 360)],
        {"train": 290, "test": 70},
    )
    display = render_attrition(table, 10)
    age = display.steps[2]
    assert age.removed_persons == "<10" and age.removed_examples == "<10"
    assert ">=10" in (display.steps[1].persons, age.persons)  # one of the two is withheld
    _subtractions_reveal_nothing(table, display)
    # what nothing ties to a small count is shown as it is, zeros included (they reveal no one)
    assert display.steps[0].persons == "500" and display.steps[1].removed_persons == "0"
    assert [p.persons for p in display.parts] == ["290", "70"] and display.steps[-1].persons == "360"
    # withholding stops spreading at the next removed counts: the rest of the table is shown
    assert (display.steps[3].persons, display.steps[3].examples) == ("400", "560")
    assert display.steps[3].removed_persons == ">=10" and display.steps[4].removed_persons == "20"
    # every shown count is true, and every hidden one is said to be what it is (below or at/above the floor)
    true = {("persons", i): s.persons for i, s in enumerate(table.steps)}
    for key, shown in _cells(display).items():
        if key in true and shown.isdigit():
            assert int(shown) == true[key]
        if key in true and shown == "<10":
            assert 0 < true[key] < 10
        if key in true and shown == ">=10":
            assert true[key] >= 10


def test_a_small_part_is_hidden_with_another_part():
    counts = [(300, 400), (300, 400), (250, 330), (240, 320), (240, 318), (240, 240), (231, 231)]
    table = _table(counts, {"train": 223, "test": 8})
    display = render_attrition(table, 10)
    shown = {p.part: p.persons for p in display.parts}
    assert shown["test"] == "<10" and not (shown["train"].isdigit() and display.steps[-1].persons.isdigit())
    _subtractions_reveal_nothing(table, display)


def test_bounds_cannot_pin_a_hidden_count():
    """18 left, then 9 removed and 9 remain: two counts below 10 that add up to 18 can only be 9 and 9."""
    table = _table([(40, 60), (40, 60), (18, 25), (18, 25), (18, 25), (18, 18), (9, 9)])
    display = render_attrition(table, 10)
    assert display.steps[-1].persons == "<10" and display.steps[-1].removed_persons == "<10"
    assert display.steps[-2].persons != "18"  # shown, it would give both away


def test_a_cohort_below_the_floor_leaves_as_a_sentence_without_small_counts(hospital):
    floor = 20
    tiny = _build(hospital, study(cohort={"min_age": 95}))
    assert 0 < len(tiny) < floor, len(tiny)  # the synthetic hospital has a few very old patients
    sentence = attrition_sentence(tiny.attrition, floor, cohort_below=50)
    counts = [(s.persons, s.examples, s.removed_persons, s.removed_examples) for s in tiny.attrition.steps]
    small = {n for row in counts for n in row if n and n < floor}
    assert small and f"<{floor} remain after every criterion" in sentence, sentence
    words = sentence.replace("(", " ").replace(")", " ").replace(";", " ").split()
    assert not small & {int(w) for w in words if w.isdigit()}, sentence
    assert "'aged 95 or over at the index'" in sentence
    # at the site, the table is complete
    assert tiny.attrition.persons == len(tiny)


# --- twinfed site cohort ----------------------------------------------------------------------------


def test_site_cohort_prints_the_attrition_and_audits_the_look(prepared_site, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # one line per criterion, so each can be found whole
    site = fresh_site(prepared_site, tmp_path / "site")
    study_file = tmp_path / "study.yaml"
    shutil.copy(EXAMPLE_STUDY, study_file)
    command = ["site", "cohort", str(study_file), "-s", str(site), "--by", "steward"]
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 0, result.output
    node = SiteNode(load_site_config(site))
    ds = build_dataset(node.config.omop.url, study(), split_key=node.config.split_key())
    for step in ds.attrition.steps:
        assert step.criterion in result.output and f"{step.persons:,}" in result.output
    for part in ds.attrition.parts:
        assert part.part in result.output
    assert "A refusal may say outside the site:" in result.output
    (entry,) = node.governance.audit.entries("cohort-inspected")
    assert entry.payload["study_hash"] == study_hash(study()) and entry.payload["by"] == "steward"
    assert entry.payload["examples"] == len(ds)
    assert entry.payload["parts"] == {"train": len(ds.subset("train")), "test": len(ds.subset("test"))}
    assert not {"person_id", "person_ids"} & set(entry.payload)
    assert node.governance.audit.verify().ok
    node.governance.close()


def test_site_cohort_names_an_empty_part_and_a_small_cohort(prepared_site, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    site = fresh_site(prepared_site, tmp_path / "site", min_cohort_size=100_000)
    raw = yaml.safe_load(EXAMPLE_STUDY.read_text())
    raw["evaluation"] = {"split": {"kind": "temporal", "test_from": "2100-01-01"}}
    study_file = tmp_path / "study.yaml"
    study_file.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["site", "cohort", str(study_file), "-s", str(site)])
    assert result.exit_code == 0, result.output
    assert "the test part is empty here" in result.output
    assert "below this site's minimum of 100000" in result.output


def test_site_cohort_help_says_what_it_does(monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    result = CliRunner().invoke(app, ["site", "cohort", "--help"])
    assert result.exit_code == 0, result.output
    assert "show its attrition" in result.output and "nothing leaves" in result.output


# --- PostgreSQL ----------------------------------------------------------------------------------------


@pytest.mark.postgres
def test_the_same_hospital_on_postgresql_has_the_same_attrition(prepared_site, medium_consortium, pg_url, hospital):
    config = load_site_config(prepared_site / "site.yaml")
    schema = f"attrition_{uuid.uuid4().hex[:8]}"
    try:
        load([medium_consortium / "aster-university" / "fhir"], pg_url, config.secret_file, schema=schema)
        on_postgres = build_dataset(pg_url, study(), split_key=config.split_key(), schema=schema)
    finally:
        engine = open_engine(pg_url)
        with engine.begin() as connection:
            connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        engine.dispose()
    on_sqlite = _build(hospital)
    assert on_postgres.attrition == on_sqlite.attrition
    np.testing.assert_array_equal(on_postgres.split, on_sqlite.split)
