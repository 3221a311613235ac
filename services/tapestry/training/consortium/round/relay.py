"""The coordinator's side of node progress: checks each report a node makes during its cycle
and passes it, throttled, to the round's events as ``NODE_PROGRESS``.

Every node the round runs is a :class:`~tapestry.training.consortium.messages.ConsortiumNode`,
whose cycle takes ``on_progress``; a proof-of-concept node whose cycle does not
(:class:`~tapestry.training.consortium.messages.PlainNode`) is adapted once, at the start of
the round, by :func:`as_consortium_node`, and runs without progress.
"""

from __future__ import annotations

import inspect
from typing import TypeGuard

from tapestry.training.consortium.governance.checks import progress_problem
from tapestry.training.consortium.messages import (
    ConsortiumNode,
    ModelState,
    PlainNode,
    SovereignCycleResult,
)
from tapestry.training.consortium.progress import CycleProgress, ProgressCallback, ProgressThrottle
from tapestry.training.consortium.round.events import Reporter, RoundStage


class InvalidProgress(ValueError):
    """A node reported progress whose numbers are out of range (:func:`progress_problem`);
    raised into the node's cycle, which fails the node with this reason."""


def reports_progress(node: ConsortiumNode | PlainNode) -> TypeGuard[ConsortiumNode]:
    """Whether ``node.run_sovereign_cycle`` takes a keyword ``on_progress``. Asked before
    any node's cycle starts, so it never raises: a cycle without a signature runs without
    progress, and one that cannot even be looked up fails in its own call, as the node's
    failure, not the round's."""
    try:
        parameters = inspect.signature(node.run_sovereign_cycle).parameters
    except Exception:  # a callable without a signature, or a node that raises when asked
        return False
    wanted = parameters.get("on_progress")
    return wanted is not None and wanted.kind in (
        inspect.Parameter.KEYWORD_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
    )


class ProgressRelay:
    """One node's progress in one round: each report is checked (a bad one raises
    :class:`InvalidProgress`), then throttled, then reported. Called on the thread that runs
    the node's cycle; the reporter serialises it with the other nodes' events."""

    def __init__(self, node_id: str, report: Reporter, throttle: ProgressThrottle) -> None:
        self.node_id = node_id
        self._report = report
        self._throttle = throttle

    def __call__(self, progress: CycleProgress) -> None:
        problem = progress_problem(progress)
        if problem is not None:
            raise InvalidProgress(problem)
        if self._throttle.admit(progress):
            self._report(
                RoundStage.NODE_PROGRESS, self.node_id, progress.describe(), progress=progress
            )


class _Silent:
    """A proof-of-concept node as a :class:`ConsortiumNode` that reports no progress."""

    def __init__(self, node: PlainNode) -> None:
        self.node_id = node.node_id
        self.plain = node

    def __getattr__(self, name: str) -> object:  # jurisdiction and the like, where it has them
        if name == "plain":  # not set yet (a copy being built): no node to ask
            raise AttributeError(name)
        return getattr(self.plain, name)

    def run_sovereign_cycle(
        self,
        round_num: int,
        base_state: ModelState,
        *,
        on_progress: ProgressCallback | None = None,
    ) -> SovereignCycleResult:
        return self.plain.run_sovereign_cycle(round_num, base_state)


def as_consortium_node(node: ConsortiumNode | PlainNode) -> ConsortiumNode:
    """``node`` itself where its cycle takes ``on_progress``; else the node adapted to run
    without progress."""
    return node if reports_progress(node) else _Silent(node)


def run_cycle(
    node: ConsortiumNode, round_num: int, base_state: ModelState, report: Reporter
) -> SovereignCycleResult:
    """``node``'s cycle, its progress relayed to ``report``."""
    relay = ProgressRelay(node.node_id, report, ProgressThrottle())
    return node.run_sovereign_cycle(round_num, base_state, on_progress=relay)
