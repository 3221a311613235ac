"""The report's PNG, drawn with matplotlib's Agg renderer.

A ``Figure`` with its own Agg canvas, never ``pyplot``: no global figure state, no GUI
backend chosen from the environment, safe to call from any thread.

Top: one panel per jurisdiction answering "does the shared base beat my own model?": on
one axis, the held-out loss of the shared base after round *r* and of the model the
jurisdiction trained alone in round *r*, both on its own held-out split. Bottom: each node's
weight per round (a node keeps its colour there and in its panel's own-model line), and the
nodes accepted, rejected and failed per round. Legends sit outside the axes they explain,
so they never cover a bar or a point.
"""

from __future__ import annotations

import io
import math

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure, SubFigure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from tapestry.observe.report_data import NO_ROUNDS, ReportData

NO_EVALUATION = "no held-out evaluation recorded"
OUTCOME_COLOURS = {"accepted": "#2e7d32", "rejected": "#f9a825", "failed": "#c62828"}
BASE_COLOUR = "#222222"
BASE_LABEL = "shared base after round r"
OWN_LABEL = "own model of round r"
LOSS_QUESTION = "Does the shared base beat each jurisdiction's own model?"
PANELS_PER_ROW = 3  # each wide enough for its verdict line
# Inches: a row of jurisdiction panels, and the row of bar charts below them.
LOSS_ROW_HEIGHT = 3.4
BARS_HEIGHT = 4.0
WIDTH = 13.0
MAX_ROUND_TICKS = 16


def render_png(data: ReportData, dpi: int = 100) -> bytes:
    """The figure as PNG bytes (1300 pixels wide at the default ``dpi``)."""
    out = io.BytesIO()
    build_figure(data).savefig(out, format="png", dpi=dpi)
    return out.getvalue()


def build_figure(data: ReportData) -> Figure:
    """The report's figure, laid out and not yet rendered."""
    panels = [label for label in data.labels if label in _evaluated(data)]
    rows = max(1, math.ceil(len(panels) / PANELS_PER_ROW))
    figure = Figure(figsize=(WIDTH, rows * LOSS_ROW_HEIGHT + BARS_HEIGHT), layout="constrained")
    FigureCanvasAgg(figure)
    heights = [rows * LOSS_ROW_HEIGHT, BARS_HEIGHT]
    losses, bars = figure.subfigures(2, 1, squeeze=False, height_ratios=heights).flat
    colours = {label: f"C{i % 10}" for i, label in enumerate(data.labels)}
    _losses(losses, data, panels, colours)
    weights, outcomes = bars.subplots(1, 2)
    _weights(weights, data, colours)
    _outcomes(outcomes, data)
    figure.suptitle(title(data), fontsize="large")
    return figure


def title(data: ReportData) -> str:
    """The figure's heading: the consortium and its rounds, then its model and policy."""
    about = data.about
    name = f"consortium {about.consortium_id}" if about.consortium_id else "consortium"
    lines = [f"Tapestry {name}: {data.span}"]
    if about.model:
        lines.append(f"model {about.model}")
    lines += [
        f"policy, rounds {rounds}: {line}" if len(about.policies) > 1 else f"policy: {line}"
        for rounds, line in about.policies
    ]
    return "\n".join(lines)


def _evaluated(data: ReportData) -> set[str]:
    return {*data.base_loss, *data.sovereign_loss}


def _losses(panel: SubFigure, data: ReportData, labels: list[str], colours: dict[str, str]) -> None:
    panel.suptitle(
        f"{LOSS_QUESTION} Held-out loss on the jurisdiction's own split (lower is better)",
        fontsize="medium",
    )
    if not labels:
        _say(panel.subplots(), NO_EVALUATION)
        return
    columns = min(len(labels), PANELS_PER_ROW)
    grid = panel.subplots(-(-len(labels) // columns), columns, sharex=True, squeeze=False)
    for axes in grid.flat[len(labels) :]:
        axes.set_visible(False)
    for axes, label in zip(grid.flat, labels, strict=False):
        _jurisdiction(axes, label, data, colours[label])
    handles = [
        Line2D([], [], color=BASE_COLOUR, marker="o", label=BASE_LABEL),
        Line2D([], [], color="grey", marker="s", linestyle="--", label=f"{OWN_LABEL} (its colour)"),
    ]
    panel.legend(handles=handles, loc="outside lower center", ncols=2, fontsize="small")


def _jurisdiction(axes: Axes, label: str, data: ReportData, colour: str) -> None:
    """One jurisdiction: the base and its own model on one axis, keyed by round."""
    base = data.base_loss.get(label, {})
    own = data.sovereign_loss.get(label, {})
    for series, style in ((base, {"color": BASE_COLOUR, "marker": "o", "label": BASE_LABEL}),
                          (own, {"color": colour, "marker": "s", "linestyle": "--",
                                 "label": OWN_LABEL})):  # fmt: skip
        rounds = sorted(series)
        axes.plot(rounds, [series[r] for r in rounds], **style)  # type: ignore[arg-type]
    axes.set_title(f"{label}\n{verdict(base, own)}", fontsize="small")
    axes.set_xlabel("round r")
    axes.set_ylabel("loss (nats per token)")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)


def verdict(base: dict[int, float], own: dict[int, float]) -> str:
    """The newest round with both losses, and which model predicts the split better."""
    both = sorted(set(base) & set(own))
    if not both:
        return "no round with both yet (a base is measured in the next round)"
    r = both[-1]
    shown = f"{base[r]:.3f}", f"{own[r]:.3f}"  # judged as shown: no winner by a rounding
    if shown[0] == shown[1]:
        winner = "a tie"
    else:
        winner = "base better" if base[r] < own[r] else "own better"
    return f"round {r}: base {shown[0]} vs own {shown[1]}, {winner}"


def _outside_legend(axes: Axes) -> None:
    """The legend to the right of the axes, clear of what they plot."""
    axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


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
    _round_ticks(axes, rounds)
    _outside_legend(axes)


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
    _round_ticks(axes, rounds)
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    _outside_legend(axes)


def _round_ticks(axes: Axes, rounds: list[int]) -> None:
    """A tick under every bar while they are few; whole rounds only, always."""
    if len(rounds) <= MAX_ROUND_TICKS:
        axes.set_xticks(rounds)
    else:
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))


def _say(axes: Axes, text: str) -> None:
    axes.text(0.5, 0.5, text, ha="center", va="center", transform=axes.transAxes, color="grey")
    axes.set_xticks([])
    axes.set_yticks([])
