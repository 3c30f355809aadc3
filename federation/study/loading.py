"""Reading a study file, with errors that name the file, the field and the rule it broke."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from federation.study.spec import StudySpec


class StudyError(ValueError):
    """A study file cannot be read or is not a valid study; the message says where and why."""


def _location(loc: tuple) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def parse_study(data: object, source: str = "<study>") -> StudySpec:
    """Validate already-parsed YAML/JSON data as a study."""
    if not isinstance(data, dict):
        raise StudyError(f"{source}: a study file must be a mapping with 'study', 'covariates', 'outcome', 'privacy'")
    try:
        return StudySpec.model_validate(data)
    except ValidationError as exc:
        problems = [f"{_location(err['loc'])}: {err['msg']}" for err in exc.errors()]
        raise StudyError(f"{source}: the study is not valid:\n  - " + "\n  - ".join(problems)) from None


def load_study(path: Path) -> StudySpec:
    """Read and validate a study YAML file."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StudyError(f"{path}: no such study file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise StudyError(f"{path}: cannot read the study file: {exc}") from None
    except yaml.YAMLError as exc:
        raise StudyError(f"{path}: not valid YAML: {exc}") from None
    return parse_study(data, str(path))
