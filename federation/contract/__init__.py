"""The study contract shared by coordinator and sites: the spec, how to read it, and its canonical hash."""

from federation.contract.hashing import canonical_json, study_hash, twin_code_version
from federation.contract.loading import StudyError, load_study, parse_study
from federation.contract.spec import StudySpec

__all__ = ["StudyError", "StudySpec", "canonical_json", "load_study", "parse_study", "study_hash", "twin_code_version"]
