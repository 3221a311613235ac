"""The evidence's own sections of ``report.html``: the N+1 matrix, the strategies, the
poisoned member and the checks, as plain escaped tables."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from html import escape
from typing import Any


def evidence_sections(evidence: Mapping[str, Any]) -> str:
    nodes: Mapping[str, str] = evidence["nodes"]
    places = list(nodes.values())
    cross = evidence["cross_eval"]
    names = {"base": "shared base (final)", "round0": "base of round 0"}
    rows = [
        [names.get(row, f"sovereign {row}"), *(f"{losses[p]:.4f}" for p in places),
         f"{sum(losses[p] for p in places) / len(places):.4f}"]
        for row, losses in cross.items()
    ]  # fmt: skip
    parts = [
        "<h2>Every model on every jurisdiction's held-out split (N+1)</h2>",
        "<p>Scored by the evidence script with the nodes' loss on the splits the nodes "
        "build (the base's last row above, too: no node has measured it yet). The sovereign "
        "models are the ones the nodes stored in the last round.</p>",
        _table(["model", *places, "mean"], rows),
    ]
    if "strategies" in evidence:
        strategies = evidence["strategies"]
        parts += [
            "<h2>Integration strategies at equal rounds</h2>",
            f"<p>{escape(evidence.get('strategies_note', ''))}</p>",
            _table(
                ["strategy", "rounds", *places, "mean"],
                [
                    [
                        name,
                        str(s["rounds"]),
                        *(f"{s['base_heldout_loss'][p]:.4f}" for p in places),
                        f"{s['mean_heldout_loss']:.4f}",
                    ]
                    for name, s in strategies.items()
                ],  # fmt: skip
            ),
        ]
    if "poisoning" in evidence:
        p = evidence["poisoning"]
        parts += [
            "<h2>A hostile member</h2>",
            f"<p>{escape(p['hostile_node'])} sends {escape(p['hostile_delta'])} for "
            f"{p['rounds']} rounds; relative norm bound off; clipping at "
            f"{p['clip_delta_norm']:.3f} (the honest median delta norm of round 1).</p>",
            _table(
                [
                    "integration",
                    "mean held-out loss",
                    "without the hostile member",
                    "harm",
                    "worst round's harm",
                ],
                [
                    [
                        name,
                        f"{r['mean_heldout_loss']:.4f}",
                        f"{r['clean_mean_heldout_loss']:.4f}",
                        f"{r['harm']:+.4f}",
                        f"{r['worst_harm']:+.4f}",
                    ]
                    for name, r in p["runs"].items()
                ],  # fmt: skip
            ),
        ]
    parts += _governance(evidence, places)
    checks = evidence.get("checks", {})
    parts += [
        "<h2>Claims</h2>",
        _table(["claim", "holds"], [[k, str(v)] for k, v in checks.items()]),
    ]
    return "\n".join(parts) + "\n"


def _governance(evidence: Mapping[str, Any], places: Sequence[str]) -> list[str]:
    """What validation did per round (and the rounds without it), and the reversed member
    under self-reported quality, measured quality and validation."""
    v = evidence["validation"]
    unvalidated = v.get("unvalidated")
    rows = [
        [
            str(row["round"]),
            row["fallback"],
            *(f"{row['measured_change'][p]:+.4f}" for p in places),
            f"{v['mean_per_round'][row['round']]:.4f}",
            f"{unvalidated['mean_per_round'][row['round']]:.4f}" if unvalidated else "",
        ]
        for row in v["rounds"]
    ]
    rises = v["rises_past_tolerance"]
    parts = [
        "<h2>Member-validated commit</h2>",
        f"<p>Rule {escape(v['rule'])}, tolerance {v['tolerance']:g} nats. The change of each "
        "round's base on each split is the evidence's own score, not the members' word. "
        + (
            "No jurisdiction's loss rose past the tolerance in any round."
            if not rises
            else "Rises past the tolerance: "
            + escape(
                "; ".join(f"round {x['round']} {x['jurisdiction']} {x['rise']:+.4f}" for x in rises)
            )
        )
        + "</p>",
        _table(["round", "what validation did", *places, "mean", "mean without validation"], rows),
    ]
    if "reversed_member" in evidence:
        rm = evidence["reversed_member"]
        parts += [
            "<h2>The reversed member: measured against claimed quality</h2>",
            f"<p>{escape(rm['hostile_node'])} sends {escape(rm['hostile_delta'])}, claiming "
            f"quality {rm['claimed_quality']:g}, for {rm['rounds']} rounds; reference corpus "
            f"{escape(rm['reference_corpus'])}. Its weight per round and the honest members' "
            "mean held-out loss.</p>",
            _table(
                [
                    "quality",
                    "its weight per round",
                    "mean held-out loss",
                    "without it",
                    "harm",
                    "worst round's harm",
                ],
                [
                    [
                        name,
                        ", ".join(f"{x['hostile_weight']:.3f}" for x in r["per_round"]),
                        f"{r['mean_heldout_loss']:.4f}",
                        f"{r['clean_mean_heldout_loss']:.4f}",
                        f"{r['harm']:+.4f}",
                        f"{r['worst_harm']:+.4f}",
                    ]
                    for name, r in rm["runs"].items()
                ],
            ),  # fmt: skip
        ]
    return parts


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(_cell(c, i == 0) for i, c in enumerate(row)) + "</tr>\n" for row in rows
    )
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody></table>"


def _cell(text: str, first: bool) -> str:
    kind = ' class="text"' if first else ""
    return f"<td{kind}>{escape(text)}</td>"
