"""How far a node's cycle has got, as numbers: what the node reports while it trains, and the
throttle that keeps those reports few.

A node's training calls its progress callback once per optimiser step (cheap: one small
frozen dataclass). Whoever passes reports on, over the wire or to a round's event sink,
throttles them with :class:`ProgressThrottle`: people need a moving number, not every step,
and a member must not be able to flood the coordinator or its clients.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum


class CyclePhase(StrEnum):
    """Where one node's cycle has got to."""

    SENDING_BASE = "sending_base"  # marked by the coordinator: the base is streaming out
    BASE_RECEIVED = "base_received"  # the node holds the whole base
    TRAINING = "training"  # step of total_steps done; loss is the last step's
    SENDING_DELTA = "sending_delta"  # marked by the coordinator: the delta is streaming in
    DELTA_RECEIVED = "delta_received"  # marked by the coordinator: the delta is in, unchecked


TRANSFERS = (CyclePhase.SENDING_BASE, CyclePhase.SENDING_DELTA)
"""The phases in which a state is on its way: their reports say how far it has got."""


@dataclass(frozen=True)
class CycleProgress:
    """One progress report. ``step``/``total_steps``/``loss`` belong to training;
    ``state_bytes``/``tensor_count`` to the phases that move a state. While a state streams
    (:data:`TRANSFERS`), ``state_bytes`` of ``total_bytes`` have crossed so far, at
    ``bytes_per_s`` on average since it began, after ``resumes`` reconnections."""

    phase: CyclePhase
    step: int = 0
    total_steps: int = 0
    loss: float | None = None
    state_bytes: int = 0
    tensor_count: int = 0
    total_bytes: int = 0
    bytes_per_s: float = 0.0
    resumes: int = 0

    def describe(self) -> str:
        """The report for people, e.g. ``training step 3/12, loss 5.4321``."""
        if self.phase is CyclePhase.TRAINING:
            loss = "" if self.loss is None else f", loss {self.loss:.4f}"
            return f"training step {self.step}/{self.total_steps}{loss}"
        words = self.phase.value.replace("_", " ")
        if self.phase in (CyclePhase.BASE_RECEIVED, CyclePhase.DELTA_RECEIVED):
            return f"{words}: {self.tensor_count} tensors, {self.state_bytes} bytes"
        if self.phase in TRANSFERS and self.total_bytes:
            resumed = f", {self.resumes} resumed" if self.resumes else ""
            return (
                f"{words}: {self.state_bytes} of {self.total_bytes} bytes at "
                f"{self.bytes_per_s / 1e6:.1f} MB/s{resumed}"
            )
        return words

    @property
    def last_step(self) -> bool:
        """Whether this is the training report of the cycle's final step."""
        return self.phase is CyclePhase.TRAINING and self.step >= self.total_steps


ProgressCallback = Callable[[CycleProgress], None]
"""Told each report as it happens, on the thread that trains; it should return quickly."""

DEFAULT_INTERVAL_S = 0.5
"""Least time between two training reports that a throttle passes on."""


class ProgressThrottle:
    """Decides which reports to pass on: every report that is not a training step; the
    last training step always; otherwise a training step only ``interval_s`` after the last
    one passed and, with ``max_reports``, at least ``total_steps / max_reports`` steps after
    it, so however long a cycle trains it passes at most ``max_reports`` training reports
    plus its last step. Not thread-safe: one throttle per node and cycle."""

    def __init__(
        self,
        interval_s: float = DEFAULT_INTERVAL_S,
        *,
        max_reports: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not interval_s >= 0:
            raise ValueError(f"interval_s must be >= 0, got {interval_s}")
        if max_reports is not None and max_reports < 1:
            raise ValueError(f"max_reports must be >= 1, got {max_reports}")
        self.interval_s = interval_s
        self.max_reports = max_reports
        self._clock = clock
        self._passed_at: float | None = None  # when the last training report was passed
        self._passed_step = 0

    def admit(self, progress: CycleProgress) -> bool:
        """Whether to pass ``progress`` on (and, if so, remember that it was)."""
        if progress.phase is not CyclePhase.TRAINING:
            return True
        now = self._clock()
        if not progress.last_step:
            if self._passed_at is not None and now - self._passed_at < self.interval_s:
                return False
            if self.max_reports is not None:
                stride = math.ceil(progress.total_steps / self.max_reports)
                if self._passed_at is not None and progress.step < self._passed_step + stride:
                    return False
        self._passed_at, self._passed_step = now, progress.step
        return True


def throttled(callback: ProgressCallback, throttle: ProgressThrottle) -> ProgressCallback:
    """``callback``, told only the reports ``throttle`` passes."""

    def report(progress: CycleProgress) -> None:
        if throttle.admit(progress):
            callback(progress)

    return report
