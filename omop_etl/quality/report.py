"""A self-contained HTML view of a data-quality report, for data stewards who do not read JSON.

One file, inline CSS, no JavaScript and nothing fetched from the network: hospital machines are often
offline and a report must open the same way years later. Every value is HTML-escaped.
"""

from __future__ import annotations

import html
from pathlib import Path

from omop_etl.quality.checks import CheckResult, DqReport, Status

_STATUS_LABEL = {
    Status.FAILED: "failed",
    Status.ERROR: "error",
    Status.PASSED: "passed",
    Status.NOT_APPLICABLE: "n/a",
}

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2rem; color: #1d2433; }
h1 { font-size: 1.5rem; margin-bottom: 0.2rem; }
h2 { font-size: 1.15rem; margin-top: 2rem; }
.meta { color: #5a6275; font-size: 0.9rem; }
table { border-collapse: collapse; margin-top: 0.6rem; font-size: 0.88rem; }
th, td { border: 1px solid #d5d9e2; padding: 0.3rem 0.55rem; text-align: left; vertical-align: top; }
th { background: #eef1f6; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.failed td { background: #fde8e8; }
tr.error td { background: #fff1d6; }
tr.passed td { background: #eaf7ee; }
tr.not_applicable td { background: #f4f5f7; color: #6b7280; }
.badge { font-weight: 600; padding: 0.05rem 0.4rem; border-radius: 0.3rem; white-space: nowrap; }
.badge.failed { background: #c81e1e; color: #fff; }
.badge.error { background: #b45309; color: #fff; }
.badge.passed { background: #1f7a3f; color: #fff; }
.badge.not_applicable { background: #9ca3af; color: #fff; }
.verdict { font-size: 1.05rem; font-weight: 600; margin: 1rem 0; }
.verdict.ok { color: #1f7a3f; }
.verdict.bad { color: #c81e1e; }
ul.warnings li { color: #b45309; }
code { font-size: 0.85rem; }
"""


def _e(value: object) -> str:
    return html.escape("" if value is None else str(value))


def _pct(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def _row(result: CheckResult) -> str:
    status = result.status.value
    concept = ""
    if result.concept_id is not None:
        concept = f"{result.concept_id}" + (f" {_e(result.concept_name)}" if result.concept_name else "")
        if result.unit_concept_id is not None:
            concept += f" / unit {result.unit_concept_id}"
    category = result.kahn_category + (f" / {result.kahn_subcategory}" if result.kahn_subcategory else "")
    violated = "" if result.violated_rows is None else f"{result.violated_rows:,}"
    denominator = "" if result.denominator_rows is None else f"{result.denominator_rows:,}"
    return (
        f'<tr class="{status}">'
        f'<td><span class="badge {status}">{_STATUS_LABEL[result.status]}</span></td>'
        f"<td>{_e(result.name)}<br><code>{_e(result.check_type)}</code></td>"
        f"<td>{_e(category)}</td>"
        f"<td><code>{_e(result.table)}{'.' + _e(result.field) if result.field else ''}</code></td>"
        f"<td>{concept}</td>"
        f'<td class="num">{violated}</td>'
        f'<td class="num">{denominator}</td>'
        f'<td class="num">{_pct(result.pct_violated)}</td>'
        f'<td class="num">{result.threshold:g}% <small>({_e(result.threshold_source)})</small></td>'
        f"<td>{_e(result.explanation)}</td>"
        "</tr>"
    )


def render_html(report: DqReport) -> str:
    """The report as one HTML document (summary per Kahn category, then every check, failures first)."""
    counts = report.counts
    verdict = (
        '<p class="verdict ok">All applicable checks passed.</p>'
        if report.ok
        else f'<p class="verdict bad">{counts["failed"]} check(s) failed'
        + (f" and {counts['error']} could not run" if counts["error"] else "")
        + ".</p>"
    )
    summary_rows = "\n".join(
        f"<tr><td>{_e(s.category)}</td><td class='num'>{s.passed}</td><td class='num'>{s.failed}</td>"
        f"<td class='num'>{s.not_applicable}</td><td class='num'>{s.error}</td></tr>"
        for s in report.summary
    )
    summary_rows += (
        f"<tr><th>Total</th><th class='num'>{counts['passed']}</th><th class='num'>{counts['failed']}</th>"
        f"<th class='num'>{counts['not_applicable']}</th><th class='num'>{counts['error']}</th></tr>"
    )
    warnings = ""
    if report.warnings:
        warnings = "<h2>Warnings</h2><ul class='warnings'>" + "".join(f"<li>{_e(w)}</li>" for w in report.warnings)
        warnings += "</ul>"
    coverage = ""
    if report.coverage:
        coverage = (
            "<h2>Mapping coverage</h2><p class='meta'>Share of records whose main concept is a valid standard "
            "concept (not 0, not non-standard, present in the vocabulary).</p><table><tr><th>Table.field</th>"
            "<th>Records</th><th>Concept 0</th><th>Non-standard</th><th>Not in vocabulary</th><th>% standard</th></tr>"
        )
        coverage += "".join(
            f"<tr><td><code>{_e(c.table)}.{_e(c.field)}</code></td><td class='num'>{c.rows:,}</td>"
            f"<td class='num'>{c.concept_zero:,}</td><td class='num'>{c.non_standard:,}</td>"
            f"<td class='num'>{c.not_in_vocabulary:,}</td><td class='num'>{c.pct_standard:.2f}</td></tr>"
            for c in report.coverage
        )
        coverage += "</table>"
    rows = "\n".join(_row(result) for result in report.sorted_results())
    schema = f", schema <code>{_e(report.cdm_schema)}</code>" if report.cdm_schema else ""
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>twinfed data-quality report</title>
<style>{_CSS}</style>
</head>
<body>
<h1>twinfed data-quality report</h1>
<p class="meta">Database <code>{_e(report.database)}</code>{schema} &middot; OMOP CDM v{_e(report.cdm_version)}
&middot; checks and thresholds of OHDSI DataQualityDashboard v{_e(report.dqd_version)}
&middot; run {_e(report.started_at.strftime("%Y-%m-%d %H:%M UTC"))} ({report.duration_s:.1f} s)</p>
{verdict}
<h2>Summary by Kahn category</h2>
<table>
<tr><th>Category</th><th>Passed</th><th>Failed</th><th>Not applicable</th><th>Error</th></tr>
{summary_rows}
</table>
{warnings}
{coverage}
<h2>Checks</h2>
<p class="meta">A check fails when the percentage of violating rows is above its threshold, or, for a 0%
threshold, when any row violates it. "n/a": the table, field or concept has no data to check.</p>
<table>
<tr><th>Status</th><th>Check</th><th>Kahn category</th><th>Table.field</th><th>Concept</th>
<th>Violating rows</th><th>Rows checked</th><th>% violating</th><th>Threshold</th><th>What it means</th></tr>
{rows}
</table>
</body>
</html>
"""


def write_html(report: DqReport, path: Path) -> Path:
    """Write the HTML view of `report` to `path` (parent folders are created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(report), encoding="utf-8")
    return path
