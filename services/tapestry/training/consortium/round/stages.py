"""The stages of a round, each a function of what the stage before it gave::

    collect ──▶ decide (headers first: fetch only the accepted deltas) ──▶ integrate

:mod:`.coordinator` runs them in this order and then commits. No stage changes the
coordinator; each returns what the next one needs, and the deltas are let go as soon as they
are integrated.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from tapestry.training.consortium.deferred import DeferredState
from tapestry.training.consortium.governance.admission import (
    Refused,
    admit,
    check_contribution,
    describe_failure,
)
from tapestry.training.consortium.governance.measured import QualitySource
from tapestry.training.consortium.governance.policy import ContributionPolicy, PolicyDecision
from tapestry.training.consortium.messages import (
    ConsortiumNode,
    ModelState,
    SovereignContribution,
    SovereignCycleResult,
    SovereignModelArtifact,
)
from tapestry.training.consortium.round.events import Reporter, RoundStage
from tapestry.training.consortium.round.relay import run_cycle
from tapestry.training.consortium.strategies.base import Strategy
from tapestry.training.consortium.tensors import all_finite, state_norm

OVERFLOW = (
    "integrating the accepted deltas made the base non-finite (overflow, in the base or the "
    "strategy's state), so nothing was integrated this round"
)

DROPPED = "left out by the members' validation: the round is committed without it"
"""The reason a contribution gets when validation's drop-one fallback commits without it."""

NOT_ACCEPTED = "the members did not accept the candidate"
"""The start of the reason every counted node of a round gets when the members' validation
commits no step (the validation's own reason follows, after a colon)."""


@dataclass(frozen=True)
class Collected:
    """Every node's cycle, checked on arrival: the contributions and artifacts of the nodes
    that passed, the reason of each that failed."""

    node_ids: list[str]
    contributions: dict[str, SovereignContribution]
    artifacts: dict[str, SovereignModelArtifact]
    failed: dict[str, str]


@dataclass(frozen=True)
class Decided:
    """The policy's decision over the contributions still standing once every accepted delta
    is here (a delta that failed its checks on arrival failed its node, and the policy
    decided again)."""

    decision: PolicyDecision
    contributions: dict[str, SovereignContribution]  # the accepted ones, deltas and all
    received: dict[str, SovereignContribution]  # every one standing, its delta emptied
    failed: dict[str, str]  # in the nodes' order
    scores: dict[str, float]
    sources: dict[str, QualitySource]  # where each score came from
    norms: dict[str, float] | None
    aborted_reason: str
    accepted: list[str]
    rejected: list[str]


@dataclass(frozen=True)
class Integration:
    """What the accepted deltas made: the new base (``None``: unchanged) and the strategy's
    state after it, with who finally counts."""

    new_state: ModelState | None
    strategy_state: ModelState | None
    accepted: list[str]
    rejected: list[str]
    weights: dict[str, float]
    rejection_reasons: dict[str, str]


def collect(
    nodes: Sequence[ConsortiumNode],
    round_num: int,
    snapshot: ModelState,
    base: Mapping[str, torch.Tensor],
    report: Reporter,
) -> Collected:
    """Every node's cycle in parallel on ``snapshot``, each checked against ``base`` and
    reported as soon as it ends (a node that fails at once is reported at once)."""
    outcomes: list[SovereignCycleResult | Refused] = []
    if nodes:
        with ThreadPoolExecutor(max_workers=len(nodes)) as pool:
            outcomes = list(pool.map(lambda n: _cycle(n, round_num, snapshot, base, report), nodes))
    contributions: dict[str, SovereignContribution] = {}
    artifacts: dict[str, SovereignModelArtifact] = {}
    failed: dict[str, str] = {}
    for node, outcome in zip(nodes, outcomes, strict=True):
        if isinstance(outcome, Refused):
            failed[node.node_id] = outcome.reason
        else:
            contributions[node.node_id] = outcome.contribution
            artifacts[node.node_id] = outcome.artifact
    return Collected([node.node_id for node in nodes], contributions, artifacts, failed)


def _cycle(
    node: ConsortiumNode,
    round_num: int,
    snapshot: ModelState,
    base: Mapping[str, torch.Tensor],
    report: Reporter,
) -> SovereignCycleResult | Refused:
    report(RoundStage.NODE_STARTED, node.node_id, "training from the round's base")
    try:
        outcome: object = run_cycle(node, round_num, snapshot, report)
    except Exception as error:  # a node's failure must not sink the round
        outcome = error
    try:
        checked = admit(outcome, base, node, round_num)
    except Refused as refusal:
        delta = getattr(getattr(outcome, "contribution", None), "weight_delta", None)
        if isinstance(delta, DeferredState):
            delta.release()  # refused on its header: its delta is not wanted
        report(RoundStage.NODE_FAILED, node.node_id, refusal.reason)
        return refusal
    report(RoundStage.NODE_CONTRIBUTED, node.node_id, _contributed(checked.contribution))
    return checked


def _contributed(c: SovereignContribution) -> str:
    loss = c.metrics.get("loss")
    heldout = c.evaluation
    return (
        (f"loss {loss:.4f}, " if loss is not None else "")
        + (
            f"held-out {heldout.base_loss:.4f} -> {heldout.sovereign_loss:.4f}, "
            if heldout is not None
            else ""
        )
        + f"quality {c.quality_score:.2f}, {c.token_count} tokens"
    )


def decide(
    collected: Collected,
    policy: ContributionPolicy,
    assessed_quality: Mapping[str, float],
    quorum: int,
    base: Mapping[str, torch.Tensor],
    report: Reporter,
    measure: Measure | None = None,
) -> Decided:
    """Weigh the contributions on their headers and fetch the deltas the policy accepts, so
    a rejected delta never crosses the wire; a fetched delta that fails its checks fails its
    node and the policy decides again. A policy that weighs norms measures them from the
    bytes, never a node's claim: every delta is fetched first. So with ``measure`` (quality
    measured from the deltas, :mod:`~tapestry.training.consortium.governance.measured`),
    whose scores then replace both the assessed and the self-reported ones."""
    node_ids = collected.node_ids
    contributions = dict(collected.contributions)
    failed = dict(collected.failed)
    deferred = {
        n: c.weight_delta
        for n, c in contributions.items()
        if isinstance(c.weight_delta, DeferredState)
    }

    def fetch(wanted: Sequence[str]) -> None:
        for node_id, problem in _fetch(wanted, deferred, contributions, base).items():
            del contributions[node_id]
            failed[node_id] = problem
            report(RoundStage.NODE_FAILED, node_id, problem)

    try:
        measured: Mapping[str, float] | None = None
        if policy.needs_delta_norms or measure is not None:
            fetch(list(deferred))
        if measure is not None:
            measured = measure({n: c.weight_delta for n, c in contributions.items()})
        while True:
            scores, sources = weighed_scores(contributions, assessed_quality, measured)
            norms = (
                {n: state_norm(c.weight_delta) for n, c in contributions.items()}
                if policy.needs_delta_norms
                else None
            )
            aborted_reason = quorum_problem(len(contributions), len(node_ids), quorum)
            # An aborted round consults no policy: nobody is weighed, nobody accepted.
            decision = PolicyDecision({}) if aborted_reason else policy.decide(scores, norms)
            wanted = [
                n
                for n in node_ids
                if n in decision.weights and n in deferred and not deferred[n].fetched
            ]
            if not wanted:
                break
            fetch(wanted)
    finally:
        for delta in deferred.values():
            delta.release()  # not wanted (a no-op for those fetched)
    accepted = [n for n in node_ids if n in decision.weights]
    rejected = [
        n
        for n in node_ids
        if n in contributions and n not in decision.weights and not aborted_reason
    ]
    return Decided(
        decision,
        {n: contributions[n] for n in accepted},  # the others' deltas are let go here
        _received(contributions),
        {n: failed[n] for n in node_ids if n in failed},
        scores,
        sources,
        norms,
        aborted_reason,
        accepted,
        rejected,
    )


def weighed_scores(
    contributions: Mapping[str, SovereignContribution],
    assessed: Mapping[str, float],
    measured: Mapping[str, float] | None,
) -> tuple[dict[str, float], dict[str, QualitySource]]:
    """The score the policy weighs each member by and where it came from: measured where
    the round measured (a member it could not measure scores 0), else the consortium's
    assessment where it has one, else what the member said."""
    if measured is not None:
        return (
            {n: measured.get(n, 0.0) for n in contributions},
            dict.fromkeys(contributions, QualitySource.MEASURED),
        )
    scores = {n: assessed.get(n, c.quality_score) for n, c in contributions.items()}
    sources = {
        n: QualitySource.ASSESSED if n in assessed else QualitySource.SELF_REPORTED
        for n in contributions
    }
    return scores, sources


Measure = Callable[[Mapping[str, Mapping[str, torch.Tensor]]], Mapping[str, float]]
"""Each member's quality from its delta (every delta fetched and checked)."""


def quorum_problem(contributed: int, members: int, quorum: int) -> str:
    """Why ``contributed`` of ``members`` nodes fall short of ``quorum``; ``""`` when they
    do not."""
    if contributed >= quorum:
        return ""
    return (
        f"quorum not met: {contributed} of {members} node(s) contributed and min_nodes "
        f"is {quorum}; nothing was integrated and the base is unchanged"
    )


def _fetch(
    wanted: Sequence[str],
    deferred: Mapping[str, DeferredState],
    contributions: Mapping[str, SovereignContribution],
    base: Mapping[str, torch.Tensor],
) -> dict[str, str]:
    """Fetch the ``wanted`` deferred deltas in parallel and check each as :func:`admit`
    checks a delta that came with its header; the reason of each node whose delta cannot be
    fetched or fails a check."""

    def fetch(node_id: str) -> str | None:
        contribution = contributions[node_id]
        try:
            deferred[node_id].fetch()
            check_contribution(
                contribution, base, node_id=node_id, round_num=contribution.round_num
            )
        except ValueError as error:
            return Refused(f"invalid contribution: {error}").reason
        except Exception as error:  # a node's failure must not sink the round
            return Refused(describe_failure(error)).reason
        return None

    if not wanted:
        return {}
    with ThreadPoolExecutor(max_workers=len(wanted)) as pool:
        problems = list(pool.map(fetch, wanted))
    return {n: p for n, p in zip(wanted, problems, strict=True) if p is not None}


def _received(
    contributions: Mapping[str, SovereignContribution],
) -> dict[str, SovereignContribution]:
    """Every standing contribution's metadata, its delta emptied (and its digest kept)."""
    return {
        n: dataclasses.replace(
            c, weight_delta={}, weight_delta_sha256=c.weight_delta_sha256 or _digest(c)
        )
        for n, c in contributions.items()
    }


def decision_without(
    policy: ContributionPolicy,
    decision: PolicyDecision,
    scores: Mapping[str, float],
    norms: Mapping[str, float] | None,
    node_id: str,
    quorum: int,
) -> PolicyDecision | None:
    """``decision`` as the policy makes it again over the contributions it accepted but
    ``node_id``'s (drop one), which is rejected as :data:`DROPPED`, in the order of
    ``scores``; ``None`` when it weighs fewer than ``quorum`` of them (or none). The round
    and ``ledger verify`` both decide with this."""
    rest = [n for n in scores if n in decision.weights and n != node_id]
    again = policy.decide(
        {n: scores[n] for n in rest}, {n: norms[n] for n in rest} if norms is not None else None
    )
    if len(again.weights) < max(quorum, 1):
        return None
    reasons = {**decision.rejection_reasons, **again.rejection_reasons, node_id: DROPPED}
    return PolicyDecision(again.weights, reasons)


def without(
    decided: Decided, policy: ContributionPolicy, node_id: str, quorum: int
) -> Decided | None:
    """``decided`` as the policy decides it again without ``node_id``'s contribution
    (:func:`decision_without`; ``None`` when the others are too few to integrate)."""
    again = decision_without(
        policy, decided.decision, decided.scores, decided.norms, node_id, quorum
    )
    if again is None:
        return None
    accepted = [n for n in decided.accepted if n in again.weights]
    return dataclasses.replace(
        decided,
        decision=again,
        accepted=accepted,
        rejected=[n for n in decided.received if n not in accepted],
    )


PROBED = "left out of a probe: the members' evaluations of the round without it"


def probe_without(decided: Decided, node_id: str) -> Decided | None:
    """``decided`` without ``node_id``'s contribution, the others' weights scaled up to sum
    to 1: a probe of what that contribution does, evaluated and never committed (so no
    policy decides it); ``None`` when no other contribution is accepted."""
    rest = {n: w for n, w in decided.decision.weights.items() if n != node_id}
    total = math.fsum(rest.values())
    if not rest or not total > 0.0:
        return None
    accepted = [n for n in decided.accepted if n in rest]
    reasons = {**decided.decision.rejection_reasons, node_id: PROBED}
    return dataclasses.replace(
        decided,
        decision=PolicyDecision({n: w / total for n, w in rest.items()}, reasons),
        accepted=accepted,
        rejected=[n for n in decided.received if n not in accepted],
    )


def reweighed(
    decided: Decided, policy: ContributionPolicy, evaluated: Mapping[str, float]
) -> Decided:
    """``decided`` as ``policy`` decides it again once the members ``evaluated`` scored are
    weighed by those scores (source ``evaluated``), the others by theirs as before. Scores
    and norms of the others do not change, so no contribution the first decision refused
    (its delta never fetched) can be accepted now."""
    scores = {**decided.scores, **evaluated}
    sources = {
        **decided.sources,
        **{n: QualitySource.EVALUATED for n in evaluated if n in decided.scores},
    }
    decision = policy.decide(scores, decided.norms)
    if any(n not in decided.accepted for n in decision.weights):
        raise RuntimeError("evaluated scores accepted a contribution the round did not fetch")
    accepted = [n for n in decided.accepted if n in decision.weights]
    return dataclasses.replace(
        decided,
        decision=decision,
        scores=scores,
        sources=sources,
        accepted=accepted,
        rejected=[n for n in decided.received if n not in accepted],
    )


def integrate(
    decided: Decided, strategy: Strategy, base: Mapping[str, torch.Tensor]
) -> Integration:
    """The accepted deltas combined by ``strategy`` into a new base. Finite deltas can still
    sum past the dtype's range: such a base (or strategy state) is never committed; nothing
    is integrated and the accepted nodes are rejected."""
    decision, accepted = decided.decision, decided.accepted
    if not accepted:
        reasons = {n: decision.rejection_reasons[n] for n in decided.rejected}
        return Integration(None, strategy.state, [], decided.rejected, {}, reasons)
    norms = decided.norms
    step = strategy.apply(
        base,
        [(decision.weights[n], decided.contributions[n].weight_delta) for n in accepted],
        delta_norms=[norms[n] for n in accepted] if norms is not None else None,
    )
    after = step.strategy_state
    if all_finite(step.state) and (after is None or all_finite(after)):
        weights = {n: decision.weights[n] for n in accepted}
        reasons = {n: decision.rejection_reasons[n] for n in decided.rejected}
        return Integration(step.state, after, accepted, decided.rejected, weights, reasons)
    rejected = list(decided.received)  # in the nodes' order
    reasons = {n: decision.rejection_reasons.get(n, OVERFLOW) for n in rejected}
    return Integration(None, strategy.state, [], rejected, {}, reasons)


def _digest(contribution: SovereignContribution) -> str:
    """The digest a fetched deferred delta arrived with (``""`` for any other delta)."""
    delta = contribution.weight_delta
    return delta.sha256 if isinstance(delta, DeferredState) else ""
