"""The coordinator's side of node progress: checks each report a node makes during its cycle
and passes it, throttled, to the round's events as ``NODE_PROGRESS``.

A node reports progress when its ``run_sovereign_cycle`` takes a keyword-only
``on_progress`` (:class:`~tapestry.training.consortium.node.SovereignTrainingNode` and the
remote proxy do); any other node runs as before, without progress.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

from tapestry.training.consortium.events import Reporter, RoundStage
from tapestry.training.consortium.limits import progress_problem
from tapestry.training.consortium.messages import ModelState, SovereignCycleResult
from tapestry.training.consortium.progress import CycleProgress, ProgressThrottle

if TYPE_CHECKING:
    from tapestry.training.consortium.coordinator import ConsortiumNode


class InvalidProgress(ValueError):
    """A node reported progress whose numbers are out of range (:func:`progress_problem`);
    raised into the node's cycle, which fails the node with this reason."""


def reports_progress(node: ConsortiumNode) -> bool:
    """Whether ``node.run_sovereign_cycle`` takes a keyword ``on_progress``."""
    try:
        parameters = inspect.signature(node.run_sovereign_cycle).parameters
    except (TypeError, ValueError):  # a callable without a signature: no progress
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


def run_cycle(
    node: ConsortiumNode, round_num: int, base_state: ModelState, report: Reporter
) -> SovereignCycleResult:
    """``node``'s cycle, its progress (where it reports any) relayed to ``report``."""
    if not reports_progress(node):
        return node.run_sovereign_cycle(round_num, base_state)
    relay = ProgressRelay(node.node_id, report, ProgressThrottle())
    cycle = node.run_sovereign_cycle
    result: SovereignCycleResult = cycle(round_num, base_state, on_progress=relay)  # type: ignore[call-arg]
    return result
