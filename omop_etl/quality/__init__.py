"""Data-quality checks of an OMOP CDM v5.4 database, after the OHDSI DataQualityDashboard (`twinfed dq`).

One front door: `run_checks(engine, schema)` returns a `DqReport` (pydantic; `model_dump_json()` is the
JSON report) and `write_html(report, path)` writes the self-contained HTML view. Check types, Kahn
categories and thresholds come from the bundled DQD data files (see README.md and thresholds.py).
"""

from omop_etl.quality.checks import (
    CategorySummary,
    CheckResult,
    ConceptCoverage,
    DqReport,
    Status,
    run_checks,
)
from omop_etl.quality.report import render_html, write_html

__all__ = [
    "CategorySummary",
    "CheckResult",
    "ConceptCoverage",
    "DqReport",
    "Status",
    "render_html",
    "run_checks",
    "write_html",
]
