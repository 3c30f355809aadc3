"""How a patient twin's answer is shown: a table per signal for the terminal, and a plot (recorded values,
forecast median, 80% and 95% intervals, each scenario's median overlaid)."""

from __future__ import annotations

import multiprocessing
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING

from rich.table import Table

if TYPE_CHECKING:
    from site_node.patient_twin.answer import TwinAnswer


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
        f"({round(answer.decision_hours_after_index, 1):g} h after admission), study {answer.study_id}: "
        f"{answer.event}; "
        f"risk {answer.factual.event_risk:.1%}" + (f" ({risks} under the scenarios)" if risks else "") + "."
    )


def warnings(answer: TwinAnswer) -> list[str]:
    """One sentence per plan that sets a treatment against the hospitals' practice (answer.PRACTICE_BOUNDS)."""
    return [f"Outside practice: the {plan.scenario} plan {', and '.join(plan.outside_practice)}."
            for plan in (answer.factual, *answer.scenarios) if plan.outside_practice]  # fmt: skip


def plot(answer: TwinAnswer, path: Path) -> Path:
    """The twin's figure: one panel per signal. Drawn on a bare Figure (no pyplot, no GUI backend: pyplot's
    import alone is a second of a cold query), with fixed margins and the title wrapped beforehand:
    matplotlib's tight layout and wrapped text lay every label out again, a third of the drawing time."""
    import textwrap

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
            outside = " (outside practice)" if scenario.outside_practice else ""
            axis.plot(ahead, scenario.signals[index].median, "--", color=colours[number % len(colours)],
                      label=scenario.scenario + outside)  # fmt: skip
        axis.axvline(0.0, color="grey", linewidth=0.8)
        axis.set_title(f"{signal.signal} ({signal.unit})" if signal.unit else signal.signal, fontsize=9)
        axis.set_xlabel("hours from the decision time", fontsize=8)
        if index == 0:
            axis.legend(fontsize=6)
    for index in range(len(signals), rows * columns):
        axes[index // columns][index % columns].axis("off")
    figure.suptitle(textwrap.fill(summary(answer), width=int(34 * columns)), fontsize=7)
    title = 0.42 / figure.get_figheight()  # inches of the title's three lines, as a share of the figure
    figure.subplots_adjust(left=0.08, right=0.98, bottom=0.6 / figure.get_figheight(), top=1.0 - title - 0.1 / rows,
                           wspace=0.28, hspace=0.55)  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    path.chmod(0o600)  # a patient's figure: readable by the site's account only, like the answer itself
    return path


class Plotter:
    """Draws the twin's figures in a second process, started first: the process imports matplotlib (half a
    second) while this one imports the rest and reads the patient's events, and draws while this one prints
    the tables, so a cold query on two cores does not wait for both one after the other. Where a process
    cannot be forked (not Linux), the figures are drawn here, in turn.

    Use as a context manager; `draw` hands over an answer, `wait` returns its figure's path once written.
    `start=False` (batch mode, which draws nothing) forks nothing."""

    def __init__(self, start: bool = True) -> None:
        self._pending: list[Path] = []
        self._connection: Connection | None = None
        self._process = None
        if start and "fork" in multiprocessing.get_all_start_methods():
            context = multiprocessing.get_context("fork")
            self._connection, child = context.Pipe()
            self._process = context.Process(target=_draw_answers, args=(child,), daemon=True)
            self._process.start()
            child.close()

    def __enter__(self) -> Plotter:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._process is not None and self._connection is not None:
            self._connection.send(None)
            self._process.join(timeout=30)
            self._connection.close()

    def draw(self, answer: TwinAnswer, path: Path) -> None:
        if self._connection is None:
            plot(answer, path)
        else:
            self._connection.send((answer.model_dump_json(), str(path)))
        self._pending.append(path)

    def wait(self) -> Path:
        """The path of the oldest figure handed over, once written; a drawing that failed raises here."""
        path = self._pending.pop(0)
        if self._connection is not None:
            failure = self._connection.recv()
            if failure:
                raise RuntimeError(f"the twin's figure {path} could not be drawn: {failure}")
        return path


def _draw_answers(connection: Connection) -> None:
    """The plotting process: matplotlib and the answer's model first, then every answer it is handed, until
    told to stop."""
    import matplotlib.figure  # noqa: F401 (imported while the parent answers)

    from site_node.patient_twin.answer import TwinAnswer

    while (job := connection.recv()) is not None:
        text, where = job
        try:
            plot(TwinAnswer.model_validate_json(text), Path(where))
        except Exception as exc:
            connection.send(f"{exc.__class__.__name__}: {exc}")
        else:
            connection.send("")
