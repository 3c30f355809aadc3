"""Where the workplace's shared reference data lives (real Synthea bundles, OHDSI DQD results), for tests
that check twinfed against data it did not generate.

The data sit beside the checkout (`../shared`), or at `TWINFED_SHARED_DIR`; a clean clone elsewhere (CI
clones into a temporary folder) finds them at the workplace's fixed place. A test whose data are nowhere
skips and says where it looked, except under CI=true, where it fails: CI must run them, as it must run the
PostgreSQL tests.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKPLACE_SHARED = Path("/work/shared")


def shared_dir() -> Path | None:
    """The first shared folder that exists: TWINFED_SHARED_DIR, beside the checkout, the workplace's."""
    candidates = [Path(os.environ["TWINFED_SHARED_DIR"])] if os.environ.get("TWINFED_SHARED_DIR") else []
    candidates += [ROOT.parent / "shared", WORKPLACE_SHARED]
    return next((path for path in candidates if path.is_dir()), None)


def shared_path(*parts: str) -> Path:
    """A path inside the shared folder (it may not exist; `require` skips a test when it does not)."""
    base = shared_dir()
    return (base if base is not None else ROOT.parent / "shared").joinpath(*parts)


def require(path: Path) -> Path:
    """The path, when the shared data are on this machine; otherwise skip the calling test naming the path
    (a developer's machine without them), or fail it under CI=true (CI must check twinfed on them)."""
    if not path.exists():
        reason = f"the shared reference data are not at {path} (set TWINFED_SHARED_DIR to their folder)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true requires the tests on shared reference data to run, but {reason}")
        pytest.skip(reason)
    return path
