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
  whose members' median change is lowest is committed: the contribution whose removal
  most helps is left out, and recorded as dropped. When none is accepted, the round tries
  the shorter steps toward the one whose median change is lowest, as for its own
  candidate, and commits the first accepted. The median, not the mean: one liar's number
  (down to -700 nats) would choose a mean, and so which honest member is left out. A
  candidate's only objection being the dropped member's own does not refuse it (under
  ``no_regression``): a member cannot keep its own delta in by objecting to its removal.
  Off by default because it costs one candidate per accepted member, sent to every
  member, and because a member that holds the full candidate and one without a
  contribution can tell that contribution's weighted delta: the consortium turns it on
  knowing that.

**Quality evaluated** (:attr:`AcceptancePolicy.measure`, off by default). Before the rule
decides, the members evaluate the candidate and, for each contribution the policy accepted,
the candidate integrated without it (the others' weights scaled up to sum to 1): the
round's *probes*. What the other members' held-out losses do without a contribution is what
it measurably does to them; its own member's word about itself is not counted. In a
consortium of jurisdictions each delta mostly helps its own, so the others' numbers can
show harm, not help: a member's **harm** is the median, over the *other* members, of how
much lower their loss is without its contribution, and its score is
``exp(-max(0, harm) / harm_scale)`` (1 for a contribution the others are no better
without, 1/e for one whose removal makes them ``harm_scale`` nats better, 0.1 nats by
default; :func:`evaluated_scores`). The policy then weighs the members by those scores (the
quality source ``evaluated``), and the rule judges the candidate that gives. It costs one
candidate per accepted member each round, sent to every member, and shows each member
every accepted contribution's weighted delta (the difference of two probes): a consortium
turns it on knowing that. With three members each median is over two numbers, so a single
liar can zero another member's score at will: that member is refused, and when the round
without it raises its loss, it objects alone and the lone-objection rule commits over it.
With four or more, one liar cannot move a median past the honest members' numbers (a
consortium file refuses ``measure_quality`` with fewer than four members).

So under the default rule one lying member (its evaluations are its own word) can:
- make the round try shorter steps (at most ``max_halvings`` more evaluations);
- shrink the committed step to any of them, by objecting to the longer ones only.

It cannot veto the round: objecting to every step commits the full candidate over it,
provided another member answered each step (the only member that evaluated is no lone
objector: its objection stands). Nor can it hide a rise that another member reports, since
a flattering evaluation does not remove that member's objection. Two members objecting
together can abort a round. With ``drop_one``, once another member objects too (so the
fallback runs), it can also refuse every candidate without one member but the one without
itself (its objection there is excused); which of the candidates left is committed follows
the median of all the members' numbers, not its own.

This module decides; it evaluates nothing. Who asks the members and how they answer is the
caller's (the services' validation phase).
"""

from __future__ import annotations

import math
import statistics
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
DEFAULT_HARM_SCALE = 0.1
"""Nats of harm to the other members that cut an evaluated score to 1/e."""


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
    measure: bool = False
    harm_scale: float = DEFAULT_HARM_SCALE

    def __post_init__(self) -> None:
        object.__setattr__(self, "rule", AcceptanceRule(self.rule))
        for name in ("drop_one", "measure"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} {getattr(self, name)!r} must be true or false")
        scale = self.harm_scale
        if (
            isinstance(scale, bool)
            or not isinstance(scale, int | float)
            or not (0.0 < scale <= MAX_TOLERANCE and math.isfinite(scale))
        ):
            raise ValueError(f"harm_scale {scale!r} must be in (0, {MAX_TOLERANCE:g}] nats")
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
    def median_change(self) -> float:
        """The members' median change of held-out loss (``inf`` without evaluations): one
        member's number, however large, moves it no further than the others' numbers."""
        changes = [e.change for e in self.evaluations]
        return statistics.median(changes) if changes else math.inf


@dataclass(frozen=True)
class Validation:
    """What validation decided under ``policy``: the scale committed (``None``: abort, the
    base unchanged), every attempt in order, the objection committed over (a lone
    objector's id, or the dropped member's own), how many evaluations each step needed
    (``quorum``), the contribution the committed candidate leaves out (``""``: none), and
    the probes its members' scores were evaluated from (:attr:`AcceptancePolicy.measure`:
    the round's first candidate, then one without each contribution)."""

    scale: float | None
    attempts: tuple[Attempt, ...]
    committed_over: tuple[str, ...] = field(default=())
    policy: AcceptancePolicy = field(default_factory=lambda: AcceptancePolicy())
    quorum: int = 1
    dropped: str = ""
    probes: tuple[Attempt, ...] = ()

    @property
    def reason(self) -> str:
        """One line for the round's record."""
        if not self.attempts:
            return "not committed: the policy weighs no contribution by its evaluated score"
        last = self.attempts[-1]
        if self.scale is None:
            return f"not committed: {last.verdict.reason} (after {len(self.attempts)} tries)"
        if self.dropped:
            at = f" at step {self.scale:g}" if self.scale != 1.0 else ""
            chosen = next(
                a for a in self.attempts if (a.dropped, a.scale) == (self.dropped, self.scale)
            )
            return (
                f"committed without {self.dropped}'s contribution{at}, the removal that helps "
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

EvaluateWithout = Callable[[str, float], Sequence["MemberEvaluation"]]
"""The members' evaluations of the step of a scale toward the candidate integrated without
one member's contribution."""


def validate(
    policy: AcceptancePolicy,
    evaluate: Evaluate,
    quorum: int = 1,
    *,
    drops: Sequence[str] = (),
    evaluate_without: EvaluateWithout | None = None,
) -> Validation:
    """Try the full candidate, then each shorter step, then (with ``drop_one``) the
    candidate without each of ``drops`` in turn and the shorter steps toward the nearest of
    them, as the module says; ``evaluate`` and ``evaluate_without`` are asked once per step
    tried, and each needs ``quorum`` evaluations. ``drops`` are the accepted contributions whose
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
        return _drop_one(policy, evaluate_without, quorum, drops, attempts)
    return Validation(None, tuple(attempts), policy=policy, quorum=quorum)


def _drop_one(
    policy: AcceptancePolicy,
    evaluate_without: EvaluateWithout,
    quorum: int,
    drops: Sequence[str],
    attempts: list[Attempt],
) -> Validation:
    """The drop-one fallback after ``attempts``: each candidate without one of ``drops``,
    the acceptable one whose median change is lowest committed; when none is acceptable,
    the shorter steps toward the one whose median change is lowest, as for the round's candidate
    (no lone objection is committed over there: it had its turn)."""
    tried = []
    for node_id in drops:
        evaluations = tuple(evaluate_without(node_id, 1.0))
        tried.append(Attempt(1.0, policy.judge(evaluations, quorum), evaluations, node_id))
    attempts += tried
    chosen = _best_drop(policy, tried)
    nearest = min((a for a in tried if a.evaluations), key=lambda a: a.median_change, default=None)
    for halving in range(1, policy.max_halvings + 1):
        if chosen is not None or nearest is None:
            break
        scale = 0.5**halving
        evaluations = tuple(evaluate_without(nearest.dropped, scale))
        step = Attempt(scale, policy.judge(evaluations, quorum), evaluations, nearest.dropped)
        attempts.append(step)
        chosen = _best_drop(policy, [step])
    if chosen is None:
        return Validation(None, tuple(attempts), policy=policy, quorum=quorum)
    over = chosen.verdict.objections if not chosen.verdict.accepted else ()
    return Validation(chosen.scale, tuple(attempts), over, policy, quorum, chosen.dropped)


def _best_drop(policy: AcceptancePolicy, attempts: Sequence[Attempt]) -> Attempt | None:
    """The acceptable candidate without one contribution whose members' median change is
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
    return min(candidates, key=lambda a: a.median_change, default=None)


def evaluated_scores(probes: Sequence[Attempt], harm_scale: float) -> dict[str, float]:
    """Each probed member's score in (0, 1] from the round's ``probes`` (the first the
    candidate, each next one the candidate without its ``dropped`` member):
    ``exp(-max(0, harm) / harm_scale)``, its harm the median over the other members that
    evaluated both of their loss with it minus their loss without it (0 when no other did).
    The round and ``ledger verify`` both score with this."""
    if not probes:
        return {}
    full = {e.node_id: e.candidate_loss for e in probes[0].evaluations}
    scores = {}
    for probe in probes[1:]:
        harms = [
            full[e.node_id] - e.candidate_loss
            for e in probe.evaluations
            if e.node_id != probe.dropped and e.node_id in full
        ]
        harm = statistics.median(harms) if harms else 0.0
        scores[probe.dropped] = math.exp(-max(0.0, harm) / harm_scale)
    return scores
