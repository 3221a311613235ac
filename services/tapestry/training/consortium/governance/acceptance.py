"""Member-validated commit: whether the members' own evaluations accept a round's candidate
base, and the fallback when they do not.

After the deltas are integrated, each member evaluates the candidate on its held-out split
(the evaluation it already runs) and reports the loss of the base it started from and of
the candidate. The round's :class:`AcceptanceRule` decides on those numbers:

- ``no_regression`` (the default): no member's loss rises by more than ``tolerance`` nats;
- ``mean_improves``: the members' mean change is below zero;
- ``majority_improves``: more than half the members' losses fall.

A rejected candidate is not committed. The fallback shortens the step, ``base + s·(candidate
- base)`` for s = 1/2, 1/4, … (:attr:`AcceptancePolicy.max_halvings` times), each evaluated
the same way; the first accepted step is committed. Otherwise the round aborts with the
base bitwise unchanged, except in two cases:

- **a lone objection** (under ``no_regression``, whose objections are its verdict). When a
  single member alone objects to the full step and is still the only objector to every
  shortened one, the full candidate is committed over it and its objection recorded;
- **drop one** (:attr:`AcceptancePolicy.drop_one`, off by default). The round integrates
  again without each accepted contribution in turn (the policy weighing the others), and
  the members evaluate each of those candidates in full. Of the ones accepted, the one
  whose members' mean change is lowest is committed: the contribution whose removal most
  helps is left out, and recorded as dropped. A candidate's only objection being the
  dropped member's own does not refuse it (under ``no_regression``): a member cannot keep
  its own delta in by objecting to its removal. Off by default because it costs one
  candidate per accepted member, sent to every member, and because a member that holds the
  full candidate and one without a contribution can tell that contribution's weighted
  delta: the consortium turns it on knowing that.

So under the default rule one lying member (its evaluations are its own word) can:
- make the round try shorter steps (at most ``max_halvings`` more evaluations);
- shrink the committed step to any of them, by objecting to the longer ones only.

It cannot veto the round: objecting to every step commits the full candidate over it,
provided another member answered each step (the only member that evaluated is no lone
objector: its objection stands). Nor can it hide a rise that another member reports, since
a flattering evaluation does not remove that member's objection. Two members objecting
together can abort a round.

This module decides; it evaluates nothing. Who asks the members and how they answer is the
caller's (the services' validation phase).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch-free at run time: the consortium file's settings import this
    from tapestry.training.consortium.messages import MemberEvaluation

DEFAULT_TOLERANCE = 0.01
"""Nats a member's held-out loss may rise under ``no_regression`` before it objects."""
DEFAULT_MAX_HALVINGS = 3
MAX_HALVINGS = 10
"""At most 2**-10 of the step: past that a shorter step is no step."""
MAX_TOLERANCE = 10.0


class AcceptanceRule(StrEnum):
    NO_REGRESSION = "no_regression"
    MEAN_IMPROVES = "mean_improves"
    MAJORITY_IMPROVES = "majority_improves"


@dataclass(frozen=True)
class Verdict:
    """The rule's decision on one candidate: accepted or not, the members whose loss rose
    past the tolerance (objections, recorded whatever the rule), and why, in words."""

    accepted: bool
    objections: tuple[str, ...]
    reason: str


@dataclass(frozen=True)
class AcceptancePolicy:
    """The acceptance rule a consortium commits by, recorded with each round."""

    rule: AcceptanceRule = AcceptanceRule.NO_REGRESSION
    tolerance: float = DEFAULT_TOLERANCE
    max_halvings: int = DEFAULT_MAX_HALVINGS
    drop_one: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "rule", AcceptanceRule(self.rule))
        if not isinstance(self.drop_one, bool):
            raise ValueError(f"drop_one {self.drop_one!r} must be true or false")
        tolerance, halvings = self.tolerance, self.max_halvings
        if (
            isinstance(tolerance, bool)
            or not isinstance(tolerance, int | float)
            or not (0.0 <= tolerance <= MAX_TOLERANCE and math.isfinite(tolerance))
        ):
            raise ValueError(f"tolerance {tolerance!r} must be in [0, {MAX_TOLERANCE:g}] nats")
        # an integer: it counts the steps tried (and is recorded as one)
        if (
            isinstance(halvings, bool)
            or not isinstance(halvings, int)
            or not 0 <= halvings <= MAX_HALVINGS
        ):
            raise ValueError(f"max_halvings {self.max_halvings!r} must be in [0, {MAX_HALVINGS}]")

    def judge(self, evaluations: Sequence[MemberEvaluation], quorum: int = 1) -> Verdict:
        """The rule applied to one candidate's evaluations (one per member, checked); fewer
        than ``quorum`` of them decide nothing (a member that did not answer in time counts
        as the round's quorum rules say)."""
        ids = [e.node_id for e in evaluations]
        if len(set(ids)) != len(ids):
            raise ValueError("one evaluation per member: a member was counted twice")
        if not evaluations or len(evaluations) < quorum:
            return Verdict(
                False,
                (),
                f"{len(evaluations)} members evaluated the candidate; at least "
                f"{max(quorum, 1)} must",
            )
        objections = tuple(e.node_id for e in evaluations if e.change > self.tolerance)
        changes = [e.change for e in evaluations]
        if self.rule is AcceptanceRule.NO_REGRESSION:
            if not objections:
                return Verdict(True, (), f"no held-out loss rose by more than {self.tolerance:g}")
            rises = ", ".join(
                f"{e.node_id} +{e.change:.4g}" for e in evaluations if e.node_id in objections
            )
            return Verdict(
                False, objections, f"held-out loss rose past {self.tolerance:g}: {rises}"
            )
        if self.rule is AcceptanceRule.MEAN_IMPROVES:
            mean = math.fsum(changes) / len(changes)
            return Verdict(mean < 0, objections, f"mean held-out change {mean:+.4g}")
        better = sum(1 for change in changes if change < 0)
        return Verdict(
            2 * better > len(changes),
            objections,
            f"{better} of {len(changes)} held-out losses fell",
        )


@dataclass(frozen=True)
class Attempt:
    """One candidate tried: the step's scale (1 is the full candidate), the members'
    evaluations of it, the verdict on them, and the contribution it was integrated without
    (``""``: none; drop one)."""

    scale: float
    verdict: Verdict
    evaluations: tuple[MemberEvaluation, ...] = ()
    dropped: str = ""

    @property
    def mean_change(self) -> float:
        """The members' mean change of held-out loss (``inf`` without evaluations)."""
        changes = [e.change for e in self.evaluations]
        return math.fsum(changes) / len(changes) if changes else math.inf


@dataclass(frozen=True)
class Validation:
    """What validation decided under ``policy``: the scale committed (``None``: abort, the
    base unchanged), every attempt in order, the objection committed over (a lone
    objector's id, or the dropped member's own), how many evaluations each step needed
    (``quorum``), and the contribution the committed candidate leaves out (``""``: none)."""

    scale: float | None
    attempts: tuple[Attempt, ...]
    committed_over: tuple[str, ...] = field(default=())
    policy: AcceptancePolicy = field(default_factory=lambda: AcceptancePolicy())
    quorum: int = 1
    dropped: str = ""

    @property
    def reason(self) -> str:
        """One line for the round's record."""
        last = self.attempts[-1]
        if self.scale is None:
            return f"not committed: {last.verdict.reason} (after {len(self.attempts)} tries)"
        if self.dropped:
            chosen = next(a for a in self.attempts if a.dropped == self.dropped)
            return (
                f"committed without {self.dropped}'s contribution, the removal that helps "
                f"most: {chosen.verdict.reason}"
            )
        if self.committed_over:
            return (
                f"committed over the lone objection of {self.committed_over[0]} "
                f"({self.attempts[0].verdict.reason})"
            )
        return f"committed at step {self.scale:g}: {last.verdict.reason}"


Evaluate = Callable[[float], Sequence["MemberEvaluation"]]
"""The members' evaluations of ``base + scale·(candidate - base)``."""

EvaluateWithout = Callable[[str], Sequence["MemberEvaluation"]]
"""The members' evaluations of the candidate integrated without one member's contribution."""


def validate(
    policy: AcceptancePolicy,
    evaluate: Evaluate,
    quorum: int = 1,
    *,
    drops: Sequence[str] = (),
    evaluate_without: EvaluateWithout | None = None,
) -> Validation:
    """Try the full candidate, then each shorter step, then (with ``drop_one``) the
    candidate without each of ``drops`` in turn, as the module says; ``evaluate`` is asked
    once per step tried, ``evaluate_without`` once per contribution dropped, and each
    candidate needs ``quorum`` evaluations. ``drops`` are the accepted contributions whose
    removal leaves a round the policy can integrate, in the nodes' order."""
    attempts: list[Attempt] = []
    for halving in range(policy.max_halvings + 1):
        scale = 0.5**halving
        evaluations = tuple(evaluate(scale))
        verdict = policy.judge(evaluations, quorum)
        attempts.append(Attempt(scale, verdict, evaluations))
        if verdict.accepted:
            return Validation(scale, tuple(attempts), policy=policy, quorum=quorum)
    # Under no_regression the objections are the verdict: one member alone, the same one
    # every time, cannot hold the round (the other rules decide on all the members' numbers
    # together, so no one member's objection is what rejected it). Alone means against
    # others: at every step another member answered and did not object; the only member
    # that evaluated is the round's only evidence, not a lone objector.
    first = attempts[0].verdict.objections
    lone = (
        policy.rule is AcceptanceRule.NO_REGRESSION
        and len(first) == 1
        and all(a.verdict.objections == first and len(a.evaluations) > 1 for a in attempts)
    )
    if lone:
        return Validation(1.0, tuple(attempts), first, policy, quorum)
    if policy.drop_one and evaluate_without is not None:
        for node_id in drops:
            evaluations = tuple(evaluate_without(node_id))
            verdict = policy.judge(evaluations, quorum)
            attempts.append(Attempt(1.0, verdict, evaluations, node_id))
        chosen = _best_drop(policy, attempts)
        if chosen is not None:
            over = chosen.verdict.objections if not chosen.verdict.accepted else ()
            return Validation(1.0, tuple(attempts), over, policy, quorum, chosen.dropped)
    return Validation(None, tuple(attempts), policy=policy, quorum=quorum)


def _best_drop(policy: AcceptancePolicy, attempts: Sequence[Attempt]) -> Attempt | None:
    """The acceptable candidate without one contribution whose members' mean change is
    lowest (the first of equals); acceptable: accepted, or under ``no_regression`` objected
    to by the dropped member alone, with another member answering."""

    def acceptable(attempt: Attempt) -> bool:
        verdict = attempt.verdict
        return verdict.accepted or (
            policy.rule is AcceptanceRule.NO_REGRESSION
            and verdict.objections == (attempt.dropped,)
            and len(attempt.evaluations) > 1
        )

    candidates = [a for a in attempts if a.dropped and acceptable(a)]
    return min(candidates, key=lambda a: a.mean_change, default=None)
