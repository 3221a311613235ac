"""What a node's cycle must be to count in a round: its contribution passes
:func:`check_contribution` against the coordinator's own base, its artifact is this node's
and this round's, and everything it says is within :mod:`tapestry.limits`. Anything else is
a :class:`Refused` with the reason, kept (bounded) in the round's result and journal."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from tapestry.limits import (
    MAX_REASON_CHARS,
    MAX_STATE_BYTES,
    MAX_TOKEN_COUNT,
)
from tapestry.training.consortium.governance.checks import (
    bounded_text,
    evaluation_problem,
    metrics_problem,
    name_problem,
    quoted,
)
from tapestry.training.consortium.messages import (
    ConsortiumNode,
    SovereignContribution,
    SovereignCycleResult,
    SovereignModelArtifact,
)
from tapestry.training.consortium.tensors import state_mismatch


class InvalidContribution(ValueError):
    """A contribution that cannot be integrated; the message says what and where."""


def check_contribution(
    contribution: SovereignContribution,
    base: Mapping[str, torch.Tensor],
    *,
    node_id: str,
    round_num: int,
) -> None:
    """Refuse a contribution that speaks for another node or round, whose numbers are out of
    bounds (:mod:`~tapestry.limits`: token count, metrics, held-out
    evaluation), or whose delta does not match the base key for key (same keys, shapes,
    dtypes) or holds NaN/Inf."""
    if not isinstance(contribution, SovereignContribution):
        raise InvalidContribution(
            f"expected a SovereignContribution, got {type(contribution).__name__}"
        )
    if contribution.node_id != node_id:
        raise InvalidContribution(
            f"contribution claims node_id {quoted(contribution.node_id)} but came from {node_id!r}"
        )
    if contribution.round_num != round_num:
        raise InvalidContribution(
            f"contribution is for round {contribution.round_num}, expected round {round_num}"
        )
    count = contribution.token_count
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= MAX_TOKEN_COUNT:
        raise InvalidContribution(
            f"token_count must be an integer in [0, MAX_TOKEN_COUNT = {MAX_TOKEN_COUNT}]"
        )
    score = contribution.quality_score
    if isinstance(score, bool) or not isinstance(score, int | float):
        raise InvalidContribution(f"quality_score is a {type(score).__name__}, not a number")
    problem = metrics_problem(contribution.metrics) or evaluation_problem(contribution.evaluation)
    if problem is not None:
        raise InvalidContribution(problem)
    problem = state_mismatch(contribution.weight_delta, base, what="delta", against="the base")
    if problem is not None:
        raise InvalidContribution(problem)


def describe_failure(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


class Refused(Exception):
    """Why a node's cycle cannot count, cut to :data:`MAX_REASON_CHARS` (a node's own error
    text included: it is kept in the round's result and journal)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = bounded_text(reason, MAX_REASON_CHARS)


def admit(
    outcome: object, base: Mapping[str, torch.Tensor], node: ConsortiumNode, round_num: int
) -> SovereignCycleResult:
    """The node's cycle result, or :class:`Refused` with the reason it cannot count."""
    if isinstance(outcome, BaseException):
        raise Refused(describe_failure(outcome))
    if not isinstance(outcome, SovereignCycleResult):
        raise Refused(
            f"invalid contribution: run_sovereign_cycle returned "
            f"{type(outcome).__name__}, not a SovereignCycleResult"
        )
    try:
        check_contribution(outcome.contribution, base, node_id=node.node_id, round_num=round_num)
    except ValueError as error:
        raise Refused(f"invalid contribution: {error}") from None
    problem = artifact_problem(outcome.artifact, node, round_num)
    if problem is not None:
        raise Refused(f"invalid artifact: {problem}")
    return outcome


def artifact_problem(
    artifact: SovereignModelArtifact, node: ConsortiumNode, round_num: int
) -> str | None:
    """Why the artifact a node says it keeps is not this node's, this round's, or within
    bounds; None when it is."""
    if artifact.node_id != node.node_id:
        return f"it claims node_id {quoted(artifact.node_id)} but came from {node.node_id!r}"
    jurisdiction = getattr(node, "jurisdiction", None)  # the member's, where the node has one
    if jurisdiction is not None and artifact.jurisdiction != jurisdiction:
        return f"it claims jurisdiction {quoted(artifact.jurisdiction)}, not {jurisdiction!r}"
    if artifact.round_num != round_num:
        return f"it is for round {artifact.round_num}, expected round {round_num}"
    size = artifact.model_state_bytes
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= MAX_STATE_BYTES:
        return f"model_state_bytes must be an integer in [0, MAX_STATE_BYTES = {MAX_STATE_BYTES}]"
    return name_problem("stage", artifact.stage) or metrics_problem(artifact.metrics)
