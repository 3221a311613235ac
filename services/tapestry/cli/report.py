"""Human-readable views of round progress, round results and artifacts (rich tables).

Every view fits an 80-column terminal: digests are cut to :data:`DIGEST_CHARS` hex
characters, counts and sizes are abbreviated, and long text (rejection reasons, node lists)
wraps inside its column. Text that came from a peer is shown as plain text, never as rich
markup.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TextIO

from google.protobuf.timestamp_pb2 import Timestamp
from rich import box
from rich.console import Console, Group
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.observe.report_data import policy_line

WIDTH = 80  # columns when the output is not a terminal (pipes, CI logs)
DIGEST_CHARS = 12  # enough to tell bases apart by eye; JSON output has the full digests

STAGE_NAMES = {
    pb.ROUND_STAGE_NODE_STARTED: "started",
    pb.ROUND_STAGE_NODE_CONTRIBUTED: "contributed",
    pb.ROUND_STAGE_NODE_FAILED: "FAILED",
    pb.ROUND_STAGE_INTEGRATED: "integrated",
    pb.ROUND_STAGE_COMMITTED: "committed",
    pb.ROUND_STAGE_ABORTED: "ABORTED",
    pb.ROUND_STAGE_ROLLED_BACK: "rolled back",
    pb.ROUND_STAGE_NODE_PROGRESS: "progress",
    pb.ROUND_STAGE_VALIDATED: "validated",
}
PHASE_NAMES = {
    pb.CYCLE_PHASE_SENDING_BASE: "sending base",
    pb.CYCLE_PHASE_BASE_RECEIVED: "base received",
    pb.CYCLE_PHASE_TRAINING: "training",
    pb.CYCLE_PHASE_SENDING_DELTA: "sending delta",
    pb.CYCLE_PHASE_DELTA_RECEIVED: "delta received",
}


def console(file: TextIO | None = None) -> Console:
    """A plain console: on a terminal rich measures its width; elsewhere it is 80."""
    stream = file if file is not None else sys.stdout
    width = None if stream.isatty() else WIDTH
    return Console(file=file, width=width, highlight=False)


def progress_line(event: pb.RoundProgress) -> Text:
    who = event.node_id or f"round {event.round_num}"
    if event.stage == pb.ROUND_STAGE_NODE_PROGRESS and event.HasField("progress"):
        return Text(f"  · {who}: {progress_text(event.progress)}")
    return Text(f"  · {who}: {STAGE_NAMES.get(event.stage, '?')} — {event.detail}")


def progress_text(progress: pb.CycleProgress) -> str:
    """A node's progress from its numbers: ``training step 3/12, loss 5.4321``,
    ``base received (2 tensors, 65.0 KiB)``."""
    name = PHASE_NAMES.get(progress.phase, "?")
    if progress.phase == pb.CYCLE_PHASE_TRAINING:
        loss = f", loss {progress.loss:.4f}" if progress.HasField("loss") else ""
        return f"{name} step {progress.step}/{progress.total_steps}{loss}"
    if progress.phase in TRANSFER_PHASES:
        return f"{name} ({transfer_text(progress)})"
    if progress.state_bytes or progress.tensor_count:
        return f"{name} ({progress.tensor_count} tensors, {size(progress.state_bytes)})"
    return name


TRANSFER_PHASES = (pb.CYCLE_PHASE_SENDING_BASE, pb.CYCLE_PHASE_SENDING_DELTA)


def transfer_text(progress: pb.CycleProgress) -> str:
    """How far a state's stream has got: ``12.0 MiB of 95.4 MiB, 45.2 MB/s, 1 resumed``."""
    done = size(progress.state_bytes)
    of = f" of {size(progress.total_bytes)}" if progress.total_bytes else ""
    resumed = f", {progress.resumes} resumed" if progress.resumes else ""
    return f"{done}{of}, {progress.bytes_per_s / 1e6:.1f} MB/s{resumed}"


def _table(title: str, *columns: str, fixed: Sequence[str] = ()) -> Table:
    """A table whose ``fixed`` columns never wrap; the others wrap (long words fold)."""
    # No side edges and one space of padding between columns: room goes to the content.
    table = Table(
        title=title,
        title_justify="left",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        collapse_padding=True,
    )
    for column in columns:
        table.add_column(column, overflow="fold", no_wrap=column in fixed)
    return table


def _row(table: Table, *cells: str) -> None:
    table.add_row(*(Text(cell) for cell in cells))


def round_table(result: pb.ConsortiumRoundResult) -> Group:
    """One row per node, then why each rejected or failed node did not count (reasons are
    long: they get whole lines rather than a narrow column). ``loss`` is the node's mean
    training loss; ``held-out`` its held-out loss of the incoming base -> of its new
    sovereign model."""
    table = _table(
        f"Round {result.round_num}",
        "node",
        "outcome",
        "weight",
        "quality",
        "tokens",
        "loss",
        "held-out",
        fixed=("held-out",),
    )
    contributions = {c.node_id: c for c in result.contributions}
    rows: list[tuple[str, str]] = [(n, "accepted") for n in result.accepted_nodes]
    rows += [(n, "rejected") for n in result.rejected_nodes]
    rows += [(n, "failed") for n in result.failed_nodes]
    counted = {n for n, _ in rows}  # an aborted round weighs nobody: its nodes only answered
    rows += [(c.node_id, "answered") for c in result.contributions if c.node_id not in counted]
    reasons: list[Padding] = []
    for node_id, outcome in rows:
        c = contributions.get(node_id)
        weight = result.contribution_weights.get(node_id)
        reason = result.rejection_reasons.get(node_id) or result.failed_nodes.get(node_id, "")
        _row(
            table,
            node_id,
            outcome,
            f"{weight:.4f}" if weight is not None else "-",
            _quality(result, node_id),
            count(c.token_count) if c else "-",
            f"{c.metrics['loss']:.4f}" if c and "loss" in c.metrics else "-",
            heldout_change(c.evaluation) if c and c.HasField("evaluation") else "-",
        )
        if reason:
            # Indented as a whole, so wrapped lines stay clear of the next node's.
            reasons.append(Padding(Text(f"{node_id} {outcome}: {reason}"), (0, 0, 0, 2)))
    caption = f"base {short(result.previous_base_sha256)} -> {short(result.shared_base_sha256)}"
    if result.HasField("started_at") and result.HasField("finished_at"):
        took = result.finished_at.ToNanoseconds() - result.started_at.ToNanoseconds()
        caption += f" in {took / 1e9:.2f} s"
    if result.HasField("policy"):
        caption += f"\npolicy: {policy_line(result.policy)}"
    if result.quality_sources:
        caption += f"\n{quality_line(result)}"
    if result.aborted_reason:
        caption += f"\nABORTED: {result.aborted_reason}"
    if result.HasField("rolled_back_to"):
        caption += f"\nROLLBACK: the base of round {result.rolled_back_to} restored"
    if result.HasField("validation"):
        caption += "\n" + "\n".join(validation_lines(result.validation))
    if result.operator:
        caption += f"\ntriggered by {result.operator}"
    table.caption = Text(caption)
    table.caption_justify = "left"
    return Group(table, *reasons)


# Where a weighed score came from, in words and in a word (pb.QualitySource).
QUALITY_SOURCES: dict[int, tuple[str, str]] = {
    pb.QUALITY_SOURCE_EVALUATED: ("evaluated by the other members", "evaluated"),
    pb.QUALITY_SOURCE_MEASURED: ("measured against the reference corpus", "measured"),
    pb.QUALITY_SOURCE_ASSESSED: ("assessed by the consortium", "assessed"),
    pb.QUALITY_SOURCE_SELF_REPORTED: ("self-reported", "self"),
}


def _sources(result: pb.ConsortiumRoundResult) -> dict[int, list[str]]:
    """The nodes whose score came from each source, in the order of QUALITY_SOURCES (an
    unknown source, from a newer coordinator, last), each in the result's node order."""
    order = [c.node_id for c in result.contributions]
    order += sorted(n for n in result.quality_sources if n not in order)
    found: dict[int, list[str]] = {source: [] for source in QUALITY_SOURCES}
    for node_id in order:
        if node_id in result.quality_sources:
            found.setdefault(result.quality_sources[node_id], []).append(node_id)
    return {source: nodes for source, nodes in found.items() if nodes}


def quality_line(result: pb.ConsortiumRoundResult) -> str:
    """Where each weighed score came from: ``quality: measured against the reference
    corpus (vn, ch); a member's own claim in brackets where it differs``."""
    parts = [
        f"{QUALITY_SOURCES.get(source, ('?', '?'))[0]} ({', '.join(nodes)})"
        for source, nodes in _sources(result).items()
    ]
    return f"quality: {'; '.join(parts)}; a member's own claim in brackets where it differs"


def _quality(result: pb.ConsortiumRoundResult, node_id: str) -> str:
    """The score the policy weighed; marked when it differs from the node's own report."""
    reported = {c.node_id: c.quality_score for c in result.contributions}.get(node_id)
    weighed = result.quality_scores.get(node_id, reported)
    if weighed is None:
        return "-"
    if reported is not None and reported != weighed:
        return f"{weighed:.2f} (self {reported:.2f})"
    return f"{weighed:.2f}"


def members_table(members: Sequence[pb.MemberSession]) -> Table:
    """The members and their sessions, in 80 columns: times in UTC (month-day and time),
    "-" where never; the version as protocol/release; the address without gRPC's
    ``ipv4:``/``ipv6:`` prefix."""
    table = _table(
        "Members (each node dials the coordinator and holds one session; times UTC)",
        "node",
        "session",
        "since",
        "last seen",
        "version",
        "address",
        fixed=("node", "session", "since", "last seen", "version"),
    )
    for m in members:
        state = "connected" if m.connected else ("never" if not m.HasField("since") else "ended")
        _row(
            table,
            m.node_id,
            state,
            _when(m.since) if m.HasField("since") else "-",
            _when(m.last_seen) if m.HasField("last_seen") else "-",
            f"{m.protocol_version}/{m.release}" if m.protocol_version else "-",
            m.address.removeprefix("ipv4:").removeprefix("ipv6:") or "-",
        )
    ended = [m for m in members if not m.connected and m.ended_reason]
    if ended:
        table.caption = "; ".join(f"{m.node_id}: {m.ended_reason}" for m in ended)
    return table


def _when(stamp: Timestamp) -> str:
    return stamp.ToDatetime().strftime("%m-%d %H:%M:%S")


def artifacts_table(artifacts: Sequence[pb.SovereignModelArtifact]) -> Table:
    table = _table(
        "Retained sovereign artifacts (weights stay on each node)",
        "node",
        "jurisdiction",
        "round",
        "stage",
        "loss",
        "sha256",
        "size",
        fixed=("round", "sha256", "size"),
    )
    for a in artifacts:
        _row(
            table,
            a.node_id,
            a.jurisdiction,
            str(a.round_num),
            a.stage.replace("_", " "),  # wraps between words in a narrow column
            f"{a.metrics['loss']:.4f}" if "loss" in a.metrics else "-",
            short(a.model_state_sha256),
            size(a.model_state_bytes),
        )
    return table


def rounds_table(rounds: Sequence[pb.ConsortiumRoundResult]) -> Table:
    table = _table(
        "Committed rounds",
        "round",
        "started (UTC)",
        "accepted",
        "rejected",
        "failed",
        "base after",
        fixed=("round", "started (UTC)", "base after"),
    )
    for r in rounds:
        started = (
            r.started_at.ToDatetime().strftime("%Y-%m-%d %H:%M:%S")
            if r.HasField("started_at")
            else "-"
        )
        _row(
            table,
            str(r.round_num),
            started,
            _accepted(r),
            ", ".join(r.rejected_nodes) or "-",
            ", ".join(r.failed_nodes) or "-",
            short(r.shared_base_sha256),
        )
    return table


def heldout_table(rounds: Sequence[pb.ConsortiumRoundResult]) -> Table | None:
    """One row per node per round that carries a held-out evaluation: the loss (nats per
    token) and perplexity of the incoming base and of the node's new sovereign model on the
    node's own held-out split. ``None`` when no round carries one."""
    table = _table(
        "Held-out evaluation: the base before training, each node's own model after",
        "round",
        "node",
        "base loss",
        "own loss",
        "base ppl",
        "own ppl",
        "tokens",
        fixed=("round", "base loss", "own loss", "base ppl", "own ppl", "tokens"),
    )
    for r in rounds:
        for c in r.contributions:
            if not c.HasField("evaluation"):
                continue
            e = c.evaluation
            _row(
                table,
                str(r.round_num),
                c.node_id,
                f"{e.base_loss:.4f}",
                f"{e.sovereign_loss:.4f}",
                f"{e.base_perplexity:.5g}",
                f"{e.sovereign_perplexity:.5g}",
                count(e.tokens),
            )
    return table if table.row_count else None


def quality_table(rounds: Sequence[pb.ConsortiumRoundResult]) -> Table | None:
    """One row per node per round that records where its scores came from: the weight it
    got, the score the policy weighed, that score's source (``measured`` against the
    reference corpus, ``assessed`` by the consortium, or ``self``-reported) and what the
    member claimed. ``None`` when no round records a source (rounds from before sources
    were recorded, rollbacks)."""
    table = _table(
        "Quality weighed: the score, where it came from, and the member's own claim",
        "round",
        "node",
        "weight",
        "weighed",
        "source",
        "claimed",
        fixed=("round", "weight", "weighed", "source", "claimed"),
    )
    for r in rounds:
        claims = {c.node_id: c.quality_score for c in r.contributions}
        for source, nodes in _sources(r).items():
            for node_id in nodes:
                weight = r.contribution_weights.get(node_id)
                claim = claims.get(node_id)
                _row(
                    table,
                    str(r.round_num),
                    node_id,
                    f"{weight:.4f}" if weight is not None else "-",
                    f"{r.quality_scores.get(node_id, 0.0):.2f}",
                    QUALITY_SOURCES.get(source, ("?", "?"))[1],
                    f"{claim:.2f}" if claim is not None else "-",
                )
    return table if table.row_count else None


def heldout_change(evaluation: pb.HeldOutEvaluation) -> str:
    """``base -> sovereign`` held-out loss, e.g. ``5.545 -> 3.210``."""
    return f"{evaluation.base_loss:.3f} -> {evaluation.sovereign_loss:.3f}"


def _accepted(r: pb.ConsortiumRoundResult) -> str:
    """The accepted nodes, or what the round was when no node could be: a rollback; with
    the members' validation's verdict where it shortened the step, committed over an
    objection, or refused the candidate."""
    if r.HasField("rolled_back_to"):
        return f"rollback to {r.rolled_back_to}"
    accepted = ", ".join(r.accepted_nodes) or "-"
    if not r.HasField("validation"):
        return accepted
    validation = r.validation
    if not validation.HasField("committed_scale"):
        return "- (the members refused it)"
    if validation.dropped:
        return f"{accepted} (without {validation.dropped})"
    if validation.committed_over:
        return f"{accepted} (over {', '.join(validation.committed_over)})"
    if validation.committed_scale != 1.0:
        return f"{accepted} (step {validation.committed_scale:g})"
    return accepted


def validation_lines(validation: pb.RoundValidation) -> list[str]:
    """The members' validation in words: the rule, then each step with its verdict."""
    lines = [f"validation ({validation.rule}, tolerance {validation.tolerance:g}): "
             f"{validation.reason}"]  # fmt: skip
    if validation.probes:
        probed = ", ".join(p.dropped for p in validation.probes if p.dropped)
        lines.append(f"  probed without each of {probed}: the scores evaluated")
    for attempt in validation.attempts:
        verdict = "accepted" if attempt.accepted else "refused"
        objections = f", objections: {', '.join(attempt.objections)}" if attempt.objections else ""
        what = f"without {attempt.dropped}" if attempt.dropped else f"step {attempt.scale:g}"
        lines.append(f"  {what}: {verdict}{objections}")
    return lines


def rollback_line(result: pb.ConsortiumRoundResult) -> str:
    """One line saying what a rollback did."""
    return (
        f"Round {result.round_num} rolled the base back to round {result.rolled_back_to}'s: "
        f"base {short(result.previous_base_sha256)} -> {short(result.shared_base_sha256)}"
        + (f", by {result.operator}" if result.operator else "")
    )


def short(digest: str) -> str:
    return digest[:DIGEST_CHARS] or "-"


def count(n: int) -> str:
    """A count in at most 6 characters or so: 999999, then 1.2M, 3.4G."""
    if n < 1_000_000:
        return str(n)
    if n < 1_000_000_000:
        return f"{n / 1e6:.1f}M"
    return f"{n / 1e9:.1f}G"


def size(nbytes: int) -> str:
    """Bytes in binary units: 512 B, 17.3 KiB, 1.5 GiB."""
    if nbytes < 1024:
        return f"{nbytes} B"
    value = float(nbytes)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024:
            return f"{value:.1f} {unit}"
    return f"{value / 1024:.1f} TiB"
