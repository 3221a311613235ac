"""Human-readable views of round results and artifacts (rich tables)."""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from tapestry.consortium.v1 import consortium_pb2 as pb

STAGE_NAMES = {
    pb.ROUND_STAGE_NODE_STARTED: "started",
    pb.ROUND_STAGE_NODE_CONTRIBUTED: "contributed",
    pb.ROUND_STAGE_NODE_FAILED: "FAILED",
    pb.ROUND_STAGE_INTEGRATED: "integrated",
    pb.ROUND_STAGE_COMMITTED: "committed",
}


def progress_line(event: pb.RoundProgress) -> str:
    who = event.node_id or f"round {event.round_num}"
    return f"  · {who}: {STAGE_NAMES.get(event.stage, '?')} — {event.detail}"


def round_table(result: pb.ConsortiumRoundResult) -> Table:
    table = Table(title=f"Round {result.round_num}", title_justify="left")
    for column in ("node", "outcome", "weight", "quality", "tokens", "loss", "reason"):
        table.add_column(column)
    contributions = {c.node_id: c for c in result.contributions}
    rows: list[tuple[str, str]] = [(n, "accepted") for n in result.accepted_nodes]
    rows += [(n, "rejected") for n in result.rejected_nodes]
    rows += [(n, "failed") for n in result.failed_nodes]
    for node_id, outcome in rows:
        c = contributions.get(node_id)
        weight = result.contribution_weights.get(node_id)
        reason = result.rejection_reasons.get(node_id) or result.failed_nodes.get(node_id, "")
        table.add_row(
            node_id,
            outcome,
            f"{weight:.4f}" if weight is not None else "-",
            _quality(result, node_id),
            str(c.token_count) if c else "-",
            f"{c.metrics['loss']:.4f}" if c and "loss" in c.metrics else "-",
            reason,
        )
    took = result.finished_at.ToNanoseconds() - result.started_at.ToNanoseconds()
    table.caption = (
        f"base {result.previous_base_sha256[:16]} -> {result.shared_base_sha256[:16]}"
        f"  ({took / 1e9:.2f} s)"
    )
    table.caption_justify = "left"
    return table


def _quality(result: pb.ConsortiumRoundResult, node_id: str) -> str:
    """The score the policy weighed; marked when it differs from the node's own report."""
    reported = {c.node_id: c.quality_score for c in result.contributions}.get(node_id)
    weighed = result.quality_scores.get(node_id, reported)
    if weighed is None:
        return "-"
    if reported is not None and reported != weighed:
        return f"{weighed:.2f} (reported {reported:.2f})"
    return f"{weighed:.2f}"


def artifacts_table(artifacts: Sequence[pb.SovereignModelArtifact]) -> Table:
    table = Table(
        title="Retained sovereign artifacts (weights stay on each node)", title_justify="left"
    )
    for column in ("node", "jurisdiction", "round", "stage", "loss", "sha256", "bytes"):
        table.add_column(column)
    for a in artifacts:
        table.add_row(
            a.node_id,
            a.jurisdiction,
            str(a.round_num),
            a.stage,
            f"{a.metrics['loss']:.4f}" if "loss" in a.metrics else "-",
            a.model_state_sha256[:16],
            str(a.model_state_bytes),
        )
    return table


def rounds_table(rounds: Sequence[pb.ConsortiumRoundResult]) -> Table:
    table = Table(title="Committed rounds", title_justify="left")
    for column in ("round", "accepted", "rejected", "failed", "base after"):
        table.add_column(column)
    for r in rounds:
        table.add_row(
            str(r.round_num),
            ", ".join(r.accepted_nodes) or "-",
            ", ".join(r.rejected_nodes) or "-",
            ", ".join(r.failed_nodes) or "-",
            r.shared_base_sha256[:16],
        )
    return table


def console() -> Console:
    # A wide, plain console: output also goes to CI logs and pipes.
    return Console(width=160, highlight=False)
