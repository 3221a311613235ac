"""What ``tapestry report`` shows, computed from the round journal alone (no network, no
plotting), so the numbers can be checked on a recorded journal.

Two readings to keep straight:

- **Base loss.** In round *r* each node evaluates the base it *received*, the base in force
  after round *r − 1*, before training on it. So the base's held-out loss is keyed by the
  round whose commit produced that base: round 1's evaluations measure the initial base
  (round 0); the base after the newest round is measured by the next round.
- **Sovereign loss.** The node's new sovereign model of round *r*, trained from that base,
  measured on the same held-out split: keyed by *r*.

Read together, the two answer the report's question per jurisdiction: does the shared base
after round *r* (everyone's round-*r* work integrated) predict the jurisdiction's held-out
text better than the model it trained alone in round *r*?

A node appears under its jurisdiction (from the round's artifacts), or as
``jurisdiction (node)`` when several nodes share one, or by its node id when no round says.

The page is headed by what the rounds were of (:class:`About`): the consortium and its
model, from the coordinator's identity (``consortium.json`` in its data directory, or what
a client learns over the wire), and the policy each round recorded.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.observe.heldout import heldout_losses
from tapestry.training.consortium.models.spec import ARCHITECTURE_FIELDS
from tapestry.wire.codec import strategy_from_proto

Series = dict[str, dict[int, float]]  # label -> round -> value
NO_ROUNDS = "no rounds recorded"


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


@dataclass(frozen=True)
class About:
    """What the rounds were of: the consortium, its model and the policies that decided
    them. ``None`` where the source does not say (a journal without its identity file, a
    plaintext connection, which names no consortium)."""

    consortium_id: str | None = None
    model: str | None = None  # e.g. "gpt: vocab 256, hidden 64, 2 layers, ..."
    policies: list[tuple[str, str]] = field(default_factory=list)  # (rounds, policy line)


@dataclass
class ReportData:
    about: About = field(default_factory=About)
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
    def span(self) -> str:
        """``rounds 1–5``, ``round 1`` or :data:`NO_ROUNDS`."""
        if not self.rows:
            return NO_ROUNDS
        first, last = self.rounds[0], self.rounds[-1]
        return f"rounds {first}–{last}" if first != last else f"round {first}"

    @property
    def has_evaluation(self) -> bool:
        return bool(self.base_loss or self.sovereign_loss)


def report_data(
    rounds: Sequence[pb.ConsortiumRoundResult], identity: Mapping[str, Any] | None = None
) -> ReportData:
    """Everything the report shows, from the journal's rounds (any order) and the
    coordinator's ``identity`` (``consortium_id`` and ``model``, as in its data directory's
    ``consortium.json``; either may be missing)."""
    ordered = sorted(rounds, key=lambda r: r.round_num)
    label = _labeller(ordered)
    identity = identity or {}
    model = identity.get("model")
    data = ReportData(
        About(
            identity.get("consortium_id"),
            model_line(model) if isinstance(model, Mapping) else None,
            _policies(ordered),
        )
    )
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


_WEIGHTINGS = {
    pb.CONTRIBUTION_WEIGHTING_QUALITY: "quality",
    pb.CONTRIBUTION_WEIGHTING_EQUAL: "equal",
}


def policy_line(policy: pb.ContributionPolicy) -> str:
    """A round's policy in a few words: ``quality weighting, floor 0.75, cap 0.5, fedavg``
    (the strategy as the core describes it; ``?`` for one this build does not know)."""
    try:
        strategy = strategy_from_proto(policy).describe()
    except ValueError:
        strategy = "?"
    return (
        f"{_WEIGHTINGS.get(policy.weighting, '?')} weighting, floor {policy.quality_floor:g}, "
        f"cap {policy.max_node_weight:g}, {strategy}"
    )


def _policies(rounds: Sequence[pb.ConsortiumRoundResult]) -> list[tuple[str, str]]:
    """Each run of rounds recorded under one policy: ``("1–5", line)``, in round order."""
    runs: list[tuple[int, int, str]] = []
    for result in rounds:
        if not result.HasField("policy"):
            continue
        line = policy_line(result.policy)
        if runs and runs[-1][2] == line:
            runs[-1] = (runs[-1][0], result.round_num, line)
        else:
            runs.append((result.round_num, result.round_num, line))
    return [(f"{a}–{b}" if a != b else f"{a}", line) for a, b, line in runs]


def model_line(model: Mapping[str, Any]) -> str:
    """A model spec in a few words, from the fields its architecture reads (as the
    consortium file names them): ``gpt: vocab 256, hidden 64, 2 layers, 2 heads, context
    128, tied embeddings``; ``hf-causal-lm: llama, vocab 32000``."""
    architecture = str(model.get("architecture", "tiny-causal"))
    parts = []
    hf_config = model.get("hf_config")
    if isinstance(hf_config, str) and hf_config:
        hf_config = json.loads(hf_config)
    if isinstance(hf_config, Mapping) and "model_type" in hf_config:
        parts.append(str(hf_config["model_type"]))
    for name, text in (
        ("vocab_size", "vocab {}"),
        ("hidden_size", "hidden {}"),
        ("n_layers", "{} layers"),
        ("n_heads", "{} heads"),
        ("context_length", "context {}"),
    ):
        if model.get(name) is not None:
            parts.append(text.format(model[name]))
    if model.get("tie_embeddings") is not None:
        parts.append("tied embeddings" if model["tie_embeddings"] else "untied embeddings")
    return f"{architecture}: {', '.join(parts)}" if parts else architecture


def served_model(spec: pb.ModelSpec) -> dict[str, Any]:
    """A served model spec (``GetBase``'s header) as the consortium file names it: the
    architecture and the fields it reads, for :func:`model_line`."""
    used = ARCHITECTURE_FIELDS.get(spec.architecture, ())
    return {"architecture": spec.architecture, **{name: getattr(spec, name) for name in used}}
