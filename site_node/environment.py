"""Site-node specific environment checks (training library and the OMOP database connection).

The checks of what the database holds (OMOP tables, vocabulary, rows, secret) are in site_node.omop_check.
"""

from __future__ import annotations

import importlib.metadata

from federation.common.diagnostics import Check
from omop_etl.database import DatabaseUnavailable, check_database, missing_sqlite_file


def torch_check() -> Check:
    """PyTorch is present; report its version, build and thread count (training speed depends on them)."""
    try:
        version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return Check("torch", "fail", "PyTorch is not installed; install it first (see docs/hospital-it.md).")
    import torch

    return Check(
        "torch",
        "ok",
        f"{version}, {torch.get_num_threads()} CPU threads"
        + (", CUDA available" if torch.cuda.is_available() else ", CPU only"),
    )


def warm_runtime_check() -> Check:
    """Whether `twinfed site start` can use its warm ClientApp runtime with the installed Flower."""
    from site_node.flower_runtime import FlowerInternalsError, check_flower, flower_version

    try:
        check_flower()
    except FlowerInternalsError as exc:
        return Check("warm runtime", "warn", str(exc))
    return Check(
        "warm runtime",
        "ok",
        f"Flower {flower_version()} has what `twinfed site start` (--isolation process) uses to keep torch and "
        "the site code loaded between rounds",
    )


def database_check(url: str) -> Check:
    """The database answers and this user may create tables (a SQLite path that does not exist is named,
    not created: connecting would leave an empty database file behind)."""
    absent = missing_sqlite_file(url)
    if absent is not None:
        return Check(
            "database",
            "fail",
            f"There is no database file {absent}. Check the --db URL: sqlite:///omop.sqlite is a file in the "
            "current folder, sqlite:////srv/omop.sqlite an absolute path.",
        )
    try:
        result = check_database(url)
    except DatabaseUnavailable as exc:
        return Check("database", "fail", str(exc))
    if not result.can_create_tables:
        # A site node only reads OMOP (its cohort index is a temporary table), so a read-only account on an
        # existing OMOP database is right; loading with twinfed etl or creating the schema needs CREATE.
        return Check(
            "database",
            "warn",
            f"{result.url}: connected ({result.dialect} {result.server_version}); this user may not create tables. "
            "That is enough for a site node reading an existing OMOP database (it needs SELECT on the CDM tables, "
            "and TEMPORARY on PostgreSQL); `twinfed etl` and `twinfed omop init` need CREATE on the schema.",
        )
    return Check(
        "database",
        "ok",
        f"{result.url}: {result.dialect} {result.server_version}, can create tables, "
        f"{result.round_trip_ms:.0f} ms to connect",
    )
