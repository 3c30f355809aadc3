"""How a patient twin's answer is shown: a table per signal for the terminal, and a plot (recorded values,
forecast median, 80% and 95% intervals, each scenario's median overlaid)."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from site_node.patient_twin.query import TwinAnswer


def _value(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"


def tables(answer: TwinAnswer) -> list[Table]:
    """One table per signal: last recorded value, then per step ahead the median and both intervals, and each
    scenario's median with its change."""
    out = []
    for index, signal in enumerate(answer.factual.signals):
        recorded = [v for v in signal.history if v is not None]
        since = "" if signal.last_measured_hours_ago is None else f", {signal.last_measured_hours_ago:.0f} h ago"
        last = f"last recorded {_value(recorded[-1])} {signal.unit}{since}" if recorded else "not recorded lately"
        table = Table(title=f"{signal.signal} ({last})", title_justify="left")
        for column in ("hours ahead", "median", "80% interval", "95% interval"):
            table.add_column(column)
        for scenario in answer.scenarios:
            table.add_column(f"{scenario.scenario}: median (change)")
        for step, hours in enumerate(signal.ahead_hours):
            low80, high80 = signal.interval_80[step]
            low95, high95 = signal.interval_95[step]
            cells = [f"+{hours:g}", _value(signal.median[step]), f"{_value(low80)}-{_value(high80)}",
                     f"{_value(low95)}-{_value(high95)}"]  # fmt: skip
            for scenario in answer.scenarios:
                other = scenario.signals[index]
                change = scenario.median_change[signal.signal][step]
                cells.append(f"{_value(other.median[step])} ({change:+.3g})")
            table.add_row(*cells)
        out.append(table)
    return out


def summary(answer: TwinAnswer) -> str:
    risks = "; ".join(f"{s.scenario} {s.event_risk:.1%}" for s in answer.scenarios)
    return (
        f"Patient {answer.person_key[:12]} (keyed) at {answer.decision_time.isoformat(timespec='minutes')} "
        f"({answer.decision_hours_after_index:g} h after admission), study {answer.study_id}: {answer.event}; "
        f"risk {answer.factual.event_risk:.1%}" + (f" ({risks} under the scenarios)" if risks else "") + "."
    )


def plot(answer: TwinAnswer, path: Path) -> Path:
    """The twin's figure: one panel per signal. Drawn on a bare Figure (no pyplot, no GUI backend): pyplot's
    import alone is a second of a cold query."""
    from matplotlib.figure import Figure

    signals = answer.factual.signals
    columns = min(3, len(signals))
    rows = -(-len(signals) // columns)
    figure = Figure(figsize=(4.2 * columns, 3.0 * rows))
    axes = figure.subplots(rows, columns, squeeze=False)
    colours = ["tab:red", "tab:purple", "tab:brown", "tab:olive", "tab:cyan"]
    for index, signal in enumerate(signals):
        axis = axes[index // columns][index % columns]
        seen = [(h, v) for h, v in zip(signal.history_hours, signal.history, strict=True) if v is not None]
        if seen:
            axis.plot(*zip(*seen, strict=True), "o", color="black", markersize=4, label="recorded")
        ahead = signal.ahead_hours
        for band, alpha, label in ((signal.interval_95, 0.15, "95%"), (signal.interval_80, 0.3, "80%")):
            axis.fill_between(ahead, [b[0] for b in band], [b[1] for b in band], color="tab:blue", alpha=alpha,
                              label=label)  # fmt: skip
        axis.plot(ahead, signal.median, color="tab:blue", label="forecast")
        for number, scenario in enumerate(answer.scenarios):
            axis.plot(ahead, scenario.signals[index].median, "--", color=colours[number % len(colours)],
                      label=scenario.scenario)  # fmt: skip
        axis.axvline(0.0, color="grey", linewidth=0.8)
        axis.set_title(f"{signal.signal} ({signal.unit})" if signal.unit else signal.signal, fontsize=9)
        axis.set_xlabel("hours from the decision time", fontsize=8)
        if index == 0:
            axis.legend(fontsize=6)
    for index in range(len(signals), rows * columns):
        axes[index // columns][index % columns].axis("off")
    figure.suptitle(summary(answer), fontsize=7, wrap=True)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path
