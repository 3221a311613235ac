"""The report as files: ``report.png`` and one self-contained ``report.html``.

The page needs nothing but itself: the PNG is embedded as a ``data:`` URI, the style is
inline, and nothing is loaded from anywhere (no script, no font, no external link), so it
can be mailed, archived or opened inside a closed network. Every text that came from a
peer (node ids, reasons) is HTML-escaped. The page opens with what the rounds were of (the
consortium, its model, the policy), and its tables carry the numbers behind each panel.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from html import escape
from pathlib import Path
from typing import Any

from tapestry.atomic_files import write_bytes, write_text
from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.observe.report_data import NO_ROUNDS, ReportData, Series, report_data
from tapestry.observe.report_figure import LOSS_QUESTION, NO_EVALUATION, render_png

PNG_NAME = "report.png"
HTML_NAME = "report.html"
DIGEST_CHARS = 12
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
img { max-width: 100%; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: right; }
th:first-child, td.text { text-align: left; }
p.none { color: #777; font-style: italic; }
dl#about { display: grid; grid-template-columns: max-content auto; gap: 0.2em 1em; }
dl#about dt { font-weight: bold; }
dl#about dd { margin: 0; }
"""
UNKNOWN_CONSORTIUM = "not named (the journal has no consortium.json, or the connection no CA)"
UNKNOWN_MODEL = "not recorded"


def write_report(
    rounds: Sequence[pb.ConsortiumRoundResult],
    out_dir: Path,
    identity: Mapping[str, Any] | None = None,
) -> list[Path]:
    """Write ``out_dir/report.png`` and ``out_dir/report.html`` (each atomically) from the
    journal's rounds and the coordinator's ``identity`` (see
    :func:`~tapestry.observe.report_data.report_data`); returns their paths."""
    data = report_data(rounds, identity)
    png = render_png(data)
    paths = [out_dir / PNG_NAME, out_dir / HTML_NAME]
    write_bytes(paths[0], png)
    write_text(paths[1], render_html(data, png))
    return paths


def render_html(data: ReportData, png: bytes) -> str:
    image = base64.b64encode(png).decode("ascii")
    name = data.about.consortium_id
    heading = (
        f"Tapestry consortium {name}: {data.span}" if name else f"Tapestry consortium: {data.span}"
    )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{escape(heading)}</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>{escape(heading)}</h1>",
        _about(data),
        f'<img alt="the charts of the tables below" src="data:image/png;base64,{image}">',
        "<h2>Rounds</h2>",
        _rounds_table(data),
        f"<h2>{escape(LOSS_QUESTION)}</h2>",
        "<p>Held-out loss (nats per token) on each jurisdiction's own held-out split: of the "
        "shared base in force after round N, and of the model the jurisdiction trained alone "
        "in round N. Lower is better.</p>",
        "<h3>The shared base</h3>",
        "<p>Row N: the base in force after round N, measured by each node on its held-out "
        "split at the start of round N+1, before training on it.</p>",
        _series_table("base-loss", data.base_loss, data.labels, "base after round", 4),
        "<h3>Each jurisdiction's own model</h3>",
        "<p>Row N: each node's sovereign model trained in round N, on the same split.</p>",
        _series_table("sovereign-loss", data.sovereign_loss, data.labels, "round", 4),
        "<h2>Training loss of each node</h2>",
        _series_table("train-loss", data.train_loss, data.labels, "round", 4, "no training"),
        "<h2>Weight of each node in the shared base</h2>",
        _series_table("weights", data.weights, data.labels, "round", 4, "no weights"),
        "<h2>Rejected and failed nodes</h2>",
        _reasons_table(data),
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _about(data: ReportData) -> str:
    """The consortium, its model and the policy of its rounds, as a definition list."""
    about = data.about
    policies = [
        f"rounds {rounds}: {line}" if len(about.policies) > 1 else line
        for rounds, line in about.policies
    ]
    items = [
        ("consortium", [about.consortium_id or UNKNOWN_CONSORTIUM]),
        ("model", [about.model or UNKNOWN_MODEL]),
        ("policy", policies or [NO_ROUNDS]),
    ]
    body = "".join(
        f"<dt>{term}</dt>" + "".join(f"<dd>{escape(text)}</dd>" for text in texts)
        for term, texts in items
    )
    return f'<dl id="about">{body}</dl>'


def _table(table_id: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Cells are given as plain text and escaped here; a first-column cell or one that is
    not a number is aligned as text."""
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(_cell(c, i == 0) for i, c in enumerate(row)) + "</tr>\n" for row in rows
    )
    return (
        f'<table id="{table_id}">\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody></table>'
    )


def _cell(text: str, first: bool) -> str:
    numeric = text.replace(".", "", 1).replace("-", "", 1).isdigit()
    kind = "" if numeric and not first else ' class="text"'
    return f"<td{kind}>{escape(text)}</td>"


def _rounds_table(data: ReportData) -> str:
    if not data.rows:
        return f'<p class="none">{NO_ROUNDS}</p>'
    header = ["round", "outcome", "accepted", "rejected", "failed", "seconds", "base after"]
    rows = [
        [
            str(row.round_num),
            row.outcome,
            str(row.accepted),
            str(row.rejected),
            str(row.failed),
            f"{row.seconds:.2f}" if row.seconds is not None else "",
            row.base_after[:DIGEST_CHARS],
        ]
        for row in data.rows
    ]
    return _table("rounds", header, rows)


def _series_table(
    table_id: str,
    series: Series,
    labels: Sequence[str],
    key_name: str,
    places: int,
    none: str = NO_EVALUATION,
) -> str:
    """One row per round that has a value, one column per label; "" where it has none."""
    if not series:
        return f'<p class="none" id="{table_id}">{escape(none)}</p>'
    columns = [label for label in labels if label in series]
    keys = sorted({key for by_round in series.values() for key in by_round})
    rows = [
        [str(key)] + [f"{series[c][key]:.{places}f}" if key in series[c] else "" for c in columns]
        for key in keys
    ]
    return _table(table_id, [key_name, *columns], rows)


def _reasons_table(data: ReportData) -> str:
    if not data.reasons:
        return '<p class="none" id="reasons">none</p>'
    rows = [[str(r.round_num), r.node, r.outcome, r.reason] for r in data.reasons]
    return _table("reasons", ["round", "node", "outcome", "reason"], rows)
