"""Pieces of the model card every kind's section uses: estimates as text, site releases, plots as images."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Callable, Sequence

from federation.twins.pooling import MIN_EVENTS, MIN_PATIENTS, SiteRelease, SubgroupResult


def estimate_text(estimate: dict | None, digits: int = 3) -> str:
    """A stored estimate ({value, low, high, note}) as '0.712 (0.660-0.760)', or why there is none."""
    if not estimate or estimate.get("value") is None:
        return (estimate or {}).get("note") or "not estimable"
    interval = (
        f" ({estimate['low']:.{digits}f}-{estimate['high']:.{digits}f})" if estimate.get("low") is not None else ""
    )
    return f"{estimate['value']:.{digits}f}{interval}"


def metric_rows(pooled, names: dict[str, str], digits: int = 3) -> str:
    """Table rows of a pooled evaluation's estimates, one per metric, labelled for people."""
    return "".join(
        f"<tr><td>{html.escape(label)}</td><td>{html.escape(getattr(pooled, name).text(digits))}</td></tr>"
        for name, label in names.items()
    )


def epsilon_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def period_text(period: str | None) -> str:
    """A site's disclosed data period ("2016-03/2024-11", see site_node.governance.data_period) in words."""
    if not period:
        return "period not disclosed"
    start, _, end = period.partition("/")
    return f"index dates {start} to {end}"


def releases_html(sites: Sequence[SiteRelease]) -> str:
    """How each site's evaluation left it (DP, exact under the floor, withheld), as a table."""
    esc = html.escape
    rows = "".join(
        f"<tr><td>{esc(s.site)}</td><td>{esc(s.mode.value)}</td><td>{epsilon_text(s.epsilon)}</td>"
        f"<td>{'-' if s.noise_sd is None else f'{s.noise_sd:.2f}'}</td>"
        f"<td>{esc(s.withheld or '-')}</td><td>{esc(s.withheld_reason or '')}</td></tr>"
        for s in sites
    )
    return f"""<h3>How each site's evaluation left it</h3><table><tr><th>site</th><th>release</th>
<th>epsilon of this release</th><th>noise s.d. per count</th><th>withheld</th><th>why</th></tr>{rows}</table>"""


def subgroups_html(subgroups: Sequence[SubgroupResult], metric: str, calibration: str) -> str:
    """Performance by sex, age band and site (TRIPOD), with what could not be shown and why."""
    if not subgroups:
        return "<h3>Subgroups</h3><p>No subgroup was released.</p>"
    esc = html.escape
    names = {"sex": "sex", "age": "age band", "site": "site"}
    rows = "".join(
        f"<tr><td>{esc(names.get(s.group, s.group))}</td><td>{esc(s.label)}</td>"
        f"<td>{esc(s.patients.text(0))}</td><td>{esc(s.with_outcome.text(0))}</td>"
        f"<td>{esc(s.metric.text(3))}</td><td>{esc(s.calibration.text(2))}</td></tr>"
        for s in subgroups
    )
    return f"""<h3>Subgroups (pooled test)</h3><table><tr><th>by</th><th>subgroup</th><th>patients (noisy)</th>
<th>with the outcome (noisy)</th><th>{esc(metric)} (95% interval)</th><th>{esc(calibration)}</th></tr>{rows}</table>
<p>Sex and age band from each site's subgroup histograms (their own share of the release's budget); each site
from its own release alone. A subgroup with fewer than {MIN_PATIENTS} patients or {MIN_EVENTS} with the outcome
(counted with noise) is not shown.</p>"""


def png(draw: Callable, size: tuple[float, float] = (5.0, 3.8)) -> str:
    """A figure drawn by `draw(figure)` as a base64 PNG (matplotlib, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure = plt.figure(figsize=size)
    try:
        draw(figure)
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=100)
    finally:
        plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def image(encoded: str, alt: str, width: str = "48%") -> str:
    return (
        f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}" style="width:{width}">' if encoded else ""
    )


def calibration_png(points: Sequence[tuple[float, float]], xlabel: str, ylabel: str, title: str = "") -> str:
    """Predicted against observed, one point per risk group, with the diagonal of perfect calibration."""

    def draw(figure) -> None:
        axis = figure.add_subplot(1, 1, 1)
        axis.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect calibration")
        axis.plot([p for p, _ in points], [o for _, o in points], marker="o", label="pooled test strata")
        top = max([p for p, _ in points] + [o for _, o in points] + [0.1])
        axis.set_xlim(0, min(1.0, top * 1.15))
        axis.set_ylim(0, min(1.0, top * 1.15))
        axis.set(title=title or "Calibration (test)", xlabel=xlabel, ylabel=ylabel)
        axis.legend(fontsize=7)

    return png(draw)
