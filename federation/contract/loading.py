"""Reading a study file, with errors that name the file, the field and the rule it broke.

A study comes from outside the hospital and is checked (`twinfed study check`, `twinfed site approve`)
by people who need an answer in seconds, so the file is bounded before it is parsed (federation.common
.yaml_files): at most `STUDY_FILE.max_bytes`, 20 levels deep, 250,000 values. The example study is
3.5 KB, 5 levels and about 230 values.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from federation.common.validation import describe
from federation.common.yaml_files import YamlLimits, read_yaml_file
from federation.contract.spec import StudySpec

STUDY_FILE = YamlLimits(
    what="a study file",
    max_bytes=2**20,
    max_depth=20,
    max_values=250_000,
    hint="a study names concepts and settings, not data; for a large concept set list its ancestor concepts "
    "(occurrence and condition concepts take in their descendants when the vocabulary has them)",
)
# A study with many wrong fields shows this many, then says how many more: the first ones are the fix.


class StudyError(ValueError):
    """A study file cannot be read or is not a valid study; the message says where and why."""


def parse_study(data: object, source: str = "<study>") -> StudySpec:
    """Validate already-parsed YAML/JSON data as a study."""
    if not isinstance(data, dict):
        raise StudyError(f"{source}: a study file must be a mapping with 'study', 'covariates', 'outcome', 'privacy'")
    try:
        return StudySpec.model_validate(data)
    except ValidationError as exc:
        problems = describe(exc, StudySpec, "study")
        raise StudyError(f"{source}: the study is not valid:\n  - " + "\n  - ".join(problems)) from None


def load_study(path: Path) -> StudySpec:
    """Read and validate a study YAML file (bounded in size, depth and values before it is parsed)."""
    return parse_study(read_yaml_file(Path(path), STUDY_FILE, StudyError), str(path))
