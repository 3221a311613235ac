"""The report's PNG: four panels drawn with matplotlib's Agg renderer.

A ``Figure`` with its own Agg canvas, never ``pyplot``: no global figure state, no GUI
backend chosen from the environment, safe to call from any thread. Each node keeps one
colour across the panels.
"""

from __future__ import annotations

import io

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from tapestry.observe.report_data import ReportData, Series

NO_EVALUATION = "no held-out evaluation recorded"
NO_ROUNDS = "no rounds recorded"
OUTCOME_COLOURS = {"accepted": "#2e7d32", "rejected": "#f9a825", "failed": "#c62828"}


def render_png(data: ReportData, dpi: int = 100) -> bytes:
    """The four panels as PNG bytes (about 1200 x 900 pixels at the default ``dpi``)."""
    figure = Figure(figsize=(12, 9), layout="constrained")
    FigureCanvasAgg(figure)
    colours = {label: f"C{i % 10}" for i, label in enumerate(data.labels)}
    base, sovereign, weights, outcomes = figure.subplots(2, 2).flat
    _lines(
        base,
        data.base_loss,
        colours,
        "Held-out loss of the shared base, per jurisdiction",
        "base in force after round",
    )
    _lines(
        sovereign,
        data.sovereign_loss,
        colours,
        "Held-out loss of each sovereign model",
        "round",
    )
    _weights(weights, data, colours)
    _outcomes(outcomes, data)
    figure.suptitle(_title(data))
    out = io.BytesIO()
    figure.savefig(out, format="png", dpi=dpi)
    return out.getvalue()


def _title(data: ReportData) -> str:
    if not data.rows:
        return f"Tapestry consortium: {NO_ROUNDS}"
    return f"Tapestry consortium: rounds {data.rounds[0]}–{data.rounds[-1]}"


def _lines(axes: Axes, series: Series, colours: dict[str, str], title: str, xlabel: str) -> None:
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel("loss (nats per token)")
    if not series:
        _say(axes, NO_EVALUATION)
        return
    for label, by_round in series.items():
        rounds = sorted(by_round)
        axes.plot(
            rounds, [by_round[r] for r in rounds], marker="o", label=label, color=colours[label]
        )
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.legend(fontsize="small")
    axes.grid(alpha=0.3)


def _weights(axes: Axes, data: ReportData, colours: dict[str, str]) -> None:
    axes.set_title("Weight of each node in the shared base, per round")
    axes.set_xlabel("round")
    axes.set_ylabel("weight")
    if not data.weights:
        _say(axes, "no node was given weight" if data.rows else NO_ROUNDS)
        return
    rounds = data.rounds
    bottom = [0.0] * len(rounds)
    for label in data.labels:
        by_round = data.weights.get(label)
        if not by_round:
            continue
        heights = [by_round.get(r, 0.0) for r in rounds]
        axes.bar(rounds, heights, bottom=bottom, label=label, color=colours[label])
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    axes.set_ylim(0, 1.05)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.legend(fontsize="small")


def _outcomes(axes: Axes, data: ReportData) -> None:
    axes.set_title("Nodes accepted, rejected and failed, per round")
    axes.set_xlabel("round")
    axes.set_ylabel("nodes")
    if not data.rows:
        _say(axes, NO_ROUNDS)
        return
    rounds = data.rounds
    bottom = [0] * len(rounds)
    for outcome, colour in OUTCOME_COLOURS.items():
        heights = [getattr(row, outcome) for row in data.rows]
        axes.bar(rounds, heights, bottom=bottom, label=outcome, color=colour)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    for row, top in zip(data.rows, bottom, strict=True):
        if row.outcome != "committed":  # aborted rounds and rollbacks are named on the bar
            axes.annotate(
                row.outcome, (row.round_num, top), ha="center", va="bottom", fontsize="x-small"
            )
    axes.set_ylim(0, max(bottom) * 1.2 + 1)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes.legend(fontsize="small")


def _say(axes: Axes, text: str) -> None:
    axes.text(0.5, 0.5, text, ha="center", va="center", transform=axes.transAxes, color="grey")
    axes.set_xticks([])
    axes.set_yticks([])
