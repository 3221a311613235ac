"""The round's validation stage: the members evaluate the integrated candidate before it is
committed (:mod:`~tapestry.training.consortium.governance.acceptance` decides on their
numbers). Off unless the coordinator is given an acceptance policy: the proof of concept
commits whatever the weighted deltas give.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol, TypeGuard, runtime_checkable

import torch

from tapestry.training.consortium.governance.acceptance import (
    AcceptancePolicy,
    Attempt,
    Validation,
    validate,
)
from tapestry.training.consortium.messages import MemberEvaluation, ModelState
from tapestry.training.consortium.tensors import (
    Snapshot,
    clone_state,
    known_digest,
    state_digest,
)


@runtime_checkable
class StepEvaluator(Protocol):
    """A member that evaluates a step toward the candidate from the parts it is made of (a
    remote member: it sends the candidate once, and the member computes each step from the
    base it holds, with :func:`step`). It must only read ``base`` and ``candidate``."""

    node_id: str

    def evaluate_step(
        self, round_num: int, base: ModelState, candidate: ModelState, scale: float
    ) -> MemberEvaluation | None: ...


@runtime_checkable
class Evaluator(Protocol):
    """A member that can evaluate a round's candidate on its held-out split."""

    node_id: str

    def evaluate_candidate(
        self, round_num: int, candidate_state: Mapping[str, torch.Tensor]
    ) -> MemberEvaluation | None: ...


def step(base: ModelState, candidate: ModelState, scale: float) -> ModelState:
    """``base + scale·(candidate - base)``, tensor by tensor in the base's dtype; the
    candidate itself (its very tensors) at scale 1. A tensor that is not floating (a
    buffer of indices or flags, which no step moves) is the candidate's as it is."""
    if scale == 1.0:
        return candidate
    return {
        name: (
            base[name] + (candidate[name] - base[name]) * scale
            if candidate[name].is_floating_point()
            else candidate[name]
        )
        for name in candidate
    }


Without = Callable[[str], ModelState | None]
"""The candidate integrated without one member's contribution (``None``: it cannot be)."""


def validate_candidate(
    policy: AcceptancePolicy,
    members: Sequence[object],
    round_num: int,
    base: ModelState,
    candidate: ModelState,
    quorum: int = 1,
    *,
    copies: bool = True,
    drops: Sequence[str] = (),
    without: Without | None = None,
) -> tuple[Validation, ModelState | None]:
    """Ask every member that can (a :class:`StepEvaluator`, all at once, or an
    :class:`Evaluator`, in turn) to evaluate each step tried; the validation and the state
    to commit (``None``: the base stays as it is). A member whose evaluation raises, names
    another member, or that has no held-out split does not count (as one that did not
    answer); at least ``quorum`` must answer each step. ``base`` and ``candidate`` may be
    :class:`~tapestry.training.consortium.tensors.Snapshot` s, so a remote member's proxy
    need not hash them again. With the policy's ``drop_one``, ``without`` builds the
    candidate without each of ``drops`` in turn, evaluated in full; the one committed is
    built again, and must be the very state the members judged.

    With ``copies`` (the coordinator's ``copy_states``) the members are handed a copy of
    each step, never the candidate that is committed: a member that edits it in place
    (the full step is the candidate's very tensors) does not count, and the next member
    gets a fresh copy, so no member changes what is committed or what the others judge.
    Without it the members must only read what they are handed."""
    judged: dict[str, str] = {}  # dropped member -> the digest of the candidate judged

    def evaluate_without(node_id: str, scale: float) -> list[MemberEvaluation]:
        state = without(node_id) if without is not None else None
        if state is None:
            return []
        judged[node_id] = state_digest(state)
        snapshot = Snapshot(state, sha256=judged[node_id])
        return _evaluations(members, round_num, base, snapshot, scale, copies)

    outcome = validate(
        policy,
        lambda scale: _evaluations(members, round_num, base, candidate, scale, copies),
        max(quorum, 1),
        drops=drops,
        evaluate_without=evaluate_without,
    )
    if outcome.scale is None:
        return outcome, None
    if not outcome.dropped:
        return outcome, step(base, candidate, outcome.scale)
    state = without(outcome.dropped) if without is not None else None
    if state is None or state_digest(state) != judged[outcome.dropped]:
        raise RuntimeError(
            f"the candidate without {outcome.dropped!r} came out differently when built "
            "again: it is not committed unjudged"
        )
    return outcome, step(base, state, outcome.scale)


def probe_round(
    policy: AcceptancePolicy,
    members: Sequence[object],
    round_num: int,
    base: ModelState,
    candidate: ModelState,
    probed: Sequence[str],
    without: Without,
    quorum: int = 1,
    *,
    copies: bool = True,
) -> tuple[Attempt, ...]:
    """The round's probes (:attr:`AcceptancePolicy.measure`): the members' evaluations of
    ``candidate``, then of the candidate ``without`` each of ``probed`` in turn (one that
    cannot be built is not probed), each judged by the rule for the record."""
    probes = []
    for node_id in ["", *probed]:
        state = without(node_id) if node_id else candidate
        if state is None:
            continue
        snapshot = state if node_id == "" else Snapshot(state, sha256=state_digest(state))
        evaluations = tuple(_evaluations(members, round_num, base, snapshot, 1.0, copies))
        probes.append(Attempt(1.0, policy.judge(evaluations, quorum), evaluations, node_id))
    return tuple(probes)


def _evaluations(
    members: Sequence[object],
    round_num: int,
    base: ModelState,
    candidate: ModelState,
    scale: float,
    copies: bool,
) -> list[MemberEvaluation]:
    """The members' evaluations of the step of ``scale`` toward ``candidate``: the remote
    members at once, each on its own side; the in-process ones in turn, each handed its own
    copy (see :func:`validate_candidate`). Each counted evaluation names the state judged:
    a remote member's must name the step's digest (it computes the step itself), and an
    in-process member's is given it. So the committed step's evaluations name the base it
    becomes, and ``ledger verify`` can tie them to it."""
    remote = [member for member in members if isinstance(member, StepEvaluator)]
    evaluators = [
        member
        for member in members
        if isinstance(member, Evaluator) and not isinstance(member, StepEvaluator)
    ]
    with ThreadPoolExecutor(max(len(remote), 1), thread_name_prefix="evaluate") as pool:
        asked = [
            (member, pool.submit(member.evaluate_step, round_num, base, candidate, scale))
            for member in remote
        ]
        answers = [answer for answer in map(_answer, asked) if answer is not None]
    state = step(base, candidate, scale)
    digest = known_digest(state)
    answers = [a for a in answers if a.state_sha256 == digest]  # judged another state
    if not evaluators:
        return answers
    given = clone_state(state) if copies else state
    for member in evaluators:
        try:
            answer: object = member.evaluate_candidate(round_num, given)
        except Exception:  # a member's failure must not sink the round
            answer = None
        if copies and any(not torch.equal(given[name], state[name]) for name in state):
            given = clone_state(state)  # it judged something else: not counted
            continue
        if _judged(answer, member, digest):
            answers.append(dataclasses.replace(answer, state_sha256=digest))
    return answers


def _judged(answer: object, member: object, digest: str) -> TypeGuard[MemberEvaluation]:
    """Whether ``answer`` is ``member``'s own evaluation of the state ``digest`` names (or
    of one it does not name: an in-process member need not hash what it was handed)."""
    return (
        isinstance(answer, MemberEvaluation)
        and answer.node_id == getattr(member, "node_id", None)
        and answer.state_sha256 in ("", digest)
    )


def _answer(asked: tuple[object, Future[MemberEvaluation | None]]) -> MemberEvaluation | None:
    """A remote member's evaluation, when it gave one of its own: one that raised (did not
    answer in time, refused) or names another member does not count."""
    member, future = asked
    try:
        answer = future.result()
    except Exception:  # a member's failure must not sink the round
        return None
    if isinstance(answer, MemberEvaluation) and answer.node_id == getattr(member, "node_id", None):
        return answer
    return None
