"""The canonical study hash: what a data steward approves.

Two files that mean the same study (different key order, comments, defaults written out or left out)
have the same hash; any change that could change what is computed, including the version of the twin
code that computes it, gives a new hash, which the site has not approved.
"""

from __future__ import annotations

import hashlib
import importlib.metadata

import orjson

from federation.contract.spec import StudySpec

# Bump when the meaning of a study field or the feature/model code changes in a way that changes results.
TWIN_CODE_VERSION = "twin-code-2"


def twin_code_version() -> str:
    """The code version that enters the hash: our own contract version and the installed twinfed release."""
    try:
        release = importlib.metadata.version("twinfed")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree without install
        release = "source"
    return f"{TWIN_CODE_VERSION}+twinfed-{release}"


def canonical_json(spec: StudySpec) -> bytes:
    """The normalised study: every default written out, keys sorted, no whitespace."""
    return orjson.dumps(spec.model_dump(mode="json"), option=orjson.OPT_SORT_KEYS)


def study_hash(spec: StudySpec, code_version: str | None = None) -> str:
    """SHA-256 (hex) over the normalised study and the twin code version."""
    digest = hashlib.sha256()
    digest.update((code_version or twin_code_version()).encode("utf-8"))
    digest.update(b"\n")
    digest.update(canonical_json(spec))
    return digest.hexdigest()
