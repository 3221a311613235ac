"""What a round reports while it runs: the core emits these, in-process or behind a service.

A sink is any callable taking a :class:`RoundEvent`. The coordinator calls it from the
threads its nodes run on, one call at a time (it serialises them), so a sink need not be
thread-safe; it should return quickly, since the node that reported waits for it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum


class RoundStage(StrEnum):
    """Where a round, or one node in it, has got to."""

    NODE_STARTED = "node_started"  # the node was handed the base
    NODE_CONTRIBUTED = "node_contributed"  # its contribution arrived and passed every check
    NODE_FAILED = "node_failed"  # its cycle raised, or its contribution was refused
    INTEGRATED = "integrated"  # the policy decided and the new base is computed
    COMMITTED = "committed"  # the commit step succeeded and the coordinator moved on
    ABORTED = "aborted"  # quorum not met: recorded by the commit step, the base unchanged


@dataclass(frozen=True)
class RoundEvent:
    """One step of round ``round_num``; ``node_id`` is empty for round-wide stages."""

    round_num: int
    stage: RoundStage
    node_id: str = ""
    detail: str = ""


EventSink = Callable[[RoundEvent], None]
