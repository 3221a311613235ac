"""The round's validation stage: the members evaluate the integrated candidate before it is
committed (:mod:`~tapestry.training.consortium.governance.acceptance` decides on their
numbers). Off unless the coordinator is given an acceptance policy: the proof of concept
commits whatever the weighted deltas give.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

import torch

from tapestry.training.consortium.governance.acceptance import (
    AcceptancePolicy,
    Validation,
    validate,
)
from tapestry.training.consortium.messages import MemberEvaluation, ModelState
from tapestry.training.consortium.tensors import clone_state


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


def validate_candidate(
    policy: AcceptancePolicy,
    members: Sequence[object],
    round_num: int,
    base: ModelState,
    candidate: ModelState,
    quorum: int = 1,
    *,
    copies: bool = True,
) -> tuple[Validation, ModelState | None]:
    """Ask every member that can (an :class:`Evaluator`) to evaluate each step tried; the
    validation and the state to commit (``None``: the base stays as it is). A member whose
    evaluation raises, names another member, or that has no held-out split does not count
    (as one that did not answer); at least ``quorum`` must answer each step.

    With ``copies`` (the coordinator's ``copy_states``) the members are handed a copy of
    each step, never the candidate that is committed: a member that edits it in place
    (the full step is the candidate's very tensors) does not count, and the next member
    gets a fresh copy, so no member changes what is committed or what the others judge.
    Without it the members must only read what they are handed."""
    evaluators = [member for member in members if isinstance(member, Evaluator)]

    def evaluate(scale: float) -> list[MemberEvaluation]:
        state = step(base, candidate, scale)
        given = clone_state(state) if copies else state
        answers = []
        for member in evaluators:
            try:
                answer: object = member.evaluate_candidate(round_num, given)
            except Exception:  # a member's failure must not sink the round
                answer = None
            if copies and any(not torch.equal(given[name], state[name]) for name in state):
                given = clone_state(state)  # it judged something else: not counted
                continue
            if isinstance(answer, MemberEvaluation) and answer.node_id == member.node_id:
                answers.append(answer)
        return answers

    outcome = validate(policy, evaluate, max(quorum, 1))
    if outcome.scale is None:
        return outcome, None
    return outcome, step(base, candidate, outcome.scale)
