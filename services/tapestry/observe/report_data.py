"""What ``tapestry report`` shows, computed from the round journal alone (no network, no
plotting), so the numbers can be checked on a recorded journal.

Two readings to keep straight:

- **Base loss.** In round *r* each node evaluates the base it *received*, the base in force
  after round *r − 1*, before training on it. So the base's held-out loss is keyed by the
  round whose commit produced that base: round 1's evaluations measure the initial base
  (round 0); the base after the newest round is measured by the next round.
- **Sovereign loss.** The node's new sovereign model of round *r*, trained from that base,
  measured on the same held-out split: keyed by *r*.

A node appears under its jurisdiction (from the round's artifacts), or as
``jurisdiction (node)`` when several nodes share one, or by its node id when no round says.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.observe.heldout import heldout_losses

Series = dict[str, dict[int, float]]  # label -> round -> value


@dataclass(frozen=True)
class RoundRow:
    """One journal entry: what happened, counted."""

    round_num: int
    outcome: str  # "committed", "aborted", or "rollback to N"
    accepted: int
    rejected: int
    failed: int
    base_after: str  # the digest of the base in force after the round
    seconds: float | None  # None: no start or finish time recorded


@dataclass(frozen=True)
class Reason:
    """Why a node did not count in a round: its rejection or failure reason."""

    round_num: int
    node: str
    outcome: str  # "rejected" or "failed"
    reason: str


@dataclass
class ReportData:
    rows: list[RoundRow] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)  # every node's label, in first-seen order
    base_loss: Series = field(default_factory=dict)  # keyed by the base's round (see module)
    sovereign_loss: Series = field(default_factory=dict)
    train_loss: Series = field(default_factory=dict)
    weights: Series = field(default_factory=dict)  # only rounds that weighed the node
    reasons: list[Reason] = field(default_factory=list)

    @property
    def rounds(self) -> list[int]:
        return [row.round_num for row in self.rows]

    @property
    def has_evaluation(self) -> bool:
        return bool(self.base_loss or self.sovereign_loss)


def report_data(rounds: Sequence[pb.ConsortiumRoundResult]) -> ReportData:
    """Everything the report shows, from the journal's rounds (any order)."""
    ordered = sorted(rounds, key=lambda r: r.round_num)
    label = _labeller(ordered)
    data = ReportData()
    for result in ordered:
        r = result.round_num
        data.rows.append(_row(result))
        for node in _nodes(result):
            if label(node) not in data.labels:
                data.labels.append(label(node))
        for node, weight in result.contribution_weights.items():
            data.weights.setdefault(label(node), {})[r] = weight
        for contribution in result.contributions:
            name = label(contribution.node_id)
            if "loss" in contribution.metrics:
                data.train_loss.setdefault(name, {})[r] = contribution.metrics["loss"]
            losses = heldout_losses(contribution)
            if losses is not None:
                data.base_loss.setdefault(name, {})[r - 1] = losses.base
                data.sovereign_loss.setdefault(name, {})[r] = losses.sovereign
        for node in result.rejected_nodes:
            reason = result.rejection_reasons.get(node, "")
            data.reasons.append(Reason(r, label(node), "rejected", reason))
        for node, reason in sorted(result.failed_nodes.items()):
            data.reasons.append(Reason(r, label(node), "failed", reason))
    return data


def _row(result: pb.ConsortiumRoundResult) -> RoundRow:
    if result.HasField("rolled_back_to"):
        outcome = f"rollback to {result.rolled_back_to}"
    else:
        outcome = "aborted" if result.aborted_reason else "committed"
    seconds = None
    if result.HasField("started_at") and result.HasField("finished_at"):
        nanos = result.finished_at.ToNanoseconds() - result.started_at.ToNanoseconds()
        seconds = nanos / 1e9
    return RoundRow(
        result.round_num,
        outcome,
        len(result.accepted_nodes),
        len(result.rejected_nodes),
        len(result.failed_nodes),
        result.shared_base_sha256,
        seconds,
    )


def _nodes(result: pb.ConsortiumRoundResult) -> list[str]:
    """Every node the round names, in a stable order: contributors, then failures."""
    named = [c.node_id for c in result.contributions]
    named += [*result.accepted_nodes, *result.rejected_nodes, *sorted(result.failed_nodes)]
    return list(dict.fromkeys(named))


def _labeller(rounds: Sequence[pb.ConsortiumRoundResult]) -> _Label:
    jurisdiction: dict[str, str] = {}
    for result in rounds:
        for artifact in result.artifacts:
            if artifact.jurisdiction:
                jurisdiction[artifact.node_id] = artifact.jurisdiction
    shared = {j for j in jurisdiction.values() if list(jurisdiction.values()).count(j) > 1}
    return _Label(jurisdiction, shared)


@dataclass(frozen=True)
class _Label:
    jurisdiction: dict[str, str]
    shared: set[str]

    def __call__(self, node: str) -> str:
        place = self.jurisdiction.get(node)
        if place is None:
            return node
        return f"{place} ({node})" if place in self.shared else place
