"""What a round reports while it runs: the core emits these, in-process or behind a service.

A sink is any callable taking a :class:`RoundEvent`. The coordinator calls it from the
threads its nodes run on, one call at a time (it serialises them), so a sink need not be
thread-safe; it should return quickly, since the node that reported waits for it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from tapestry.training.consortium.progress import CycleProgress


class RoundStage(StrEnum):
    """Where a round, or one node in it, has got to."""

    NODE_STARTED = "node_started"  # the node was handed the base
    # Its contribution arrived and passed every check; a delta the node still holds (a
    # remote node's) is checked when it is fetched, after the policy accepted it.
    NODE_CONTRIBUTED = "node_contributed"
    NODE_FAILED = "node_failed"  # its cycle raised, or its contribution was refused
    INTEGRATED = "integrated"  # the policy decided and the new base is computed
    COMMITTED = "committed"  # the commit step succeeded and the coordinator moved on
    ABORTED = "aborted"  # quorum not met: recorded by the commit step, the base unchanged
    ROLLED_BACK = "rolled_back"  # an operator's rollback was committed: an earlier base is back
    NODE_PROGRESS = "node_progress"  # the node's cycle moved on: ``progress`` has the numbers
    VALIDATED = "validated"  # the members evaluated the candidate: ``detail`` says the verdict


@dataclass(frozen=True)
class RoundEvent:
    """One step of round ``round_num``; ``node_id`` is empty for round-wide stages;
    ``progress`` is set on ``NODE_PROGRESS`` events only."""

    round_num: int
    stage: RoundStage
    node_id: str = ""
    detail: str = ""
    progress: CycleProgress | None = None


EventSink = Callable[[RoundEvent], None]

log = logging.getLogger(__name__)


class Reporter:
    """Sends a round's events to the caller's sink, one call at a time. Reporting never
    decides a round: a sink that raises is logged and not called again this round."""

    def __init__(self, round_num: int, sink: EventSink | None) -> None:
        self.round_num = round_num
        self._sink = sink
        self._lock = threading.Lock()

    def __call__(
        self,
        stage: RoundStage,
        node_id: str,
        detail: str,
        *,
        progress: CycleProgress | None = None,
    ) -> None:
        if self._sink is None:
            return
        with self._lock:
            if self._sink is None:
                return
            try:
                self._sink(RoundEvent(self.round_num, stage, node_id, detail, progress))
            except Exception:
                log.exception("round %d: the event sink failed; no more events", self.round_num)
                self._sink = None
