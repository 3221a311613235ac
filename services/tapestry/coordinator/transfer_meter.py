"""How far a state on its way to or from a node has got, told as the cycle's progress: the
bytes so far of the total, the average rate since it began, and how many times the cycle
resumed after the node's session dropped (:mod:`tapestry.wire.numbering`). A report at most
every :data:`~tapestry.training.consortium.progress.DEFAULT_INTERVAL_S`, and the last."""

from __future__ import annotations

import time
from collections.abc import Callable

from tapestry.training.consortium.progress import (
    DEFAULT_INTERVAL_S,
    CyclePhase,
    CycleProgress,
    ProgressCallback,
)
from tapestry.wire.tensor_stream import ByteCount


class TransferMeter:
    """A :data:`~tapestry.wire.tensor_stream.ByteCount` for one state's stream: told each
    chunk's bytes (and passing them on to ``count``, a metric), it reports ``phase``
    progress to ``on_progress``; ``total`` is 0 where the size is not known ahead (an
    encoded delta), ``resumes()`` the cycle's resumes so far.

    A receiver counts what arrived, and its last report comes with the last byte. A sender
    counts what it handed on, which may still be on its way (up to the flow-control window
    and what a session keeps to send again): with ``sender`` its last report waits for
    :meth:`finish`, when the peer says it has everything."""

    def __init__(
        self,
        phase: CyclePhase,
        total: int,
        on_progress: ProgressCallback,
        resumes: Callable[[], int],
        count: ByteCount | None = None,
        *,
        sender: bool = False,
        interval_s: float = DEFAULT_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._phase = phase
        self._total = total
        self._on_progress = on_progress
        self._resumes = resumes
        self._count = count
        self._sender = sender
        self._finished = False
        self._interval_s = interval_s
        self._clock = clock
        self._began = self._reported = clock()
        self.done = 0
        self._report()

    def __call__(self, nbytes: int) -> None:
        if self._count is not None:
            self._count(nbytes)
        self.done += nbytes
        if self._finished:
            return
        if self._total and self.done >= self._total:
            if not self._sender:
                self.finish()
        elif self._clock() - self._reported >= self._interval_s:
            self._report()

    def finish(self) -> None:
        """The state is all there: its last report (once), everything counted."""
        if self._finished:
            return
        self._finished = True
        self.done = max(self.done, self._total)
        self._report()

    def _report(self) -> None:
        now = self._clock()
        self._reported = now
        elapsed = now - self._began
        self._on_progress(
            CycleProgress(
                self._phase,
                state_bytes=min(self.done, self._total) if self._total else self.done,
                total_bytes=self._total,
                bytes_per_s=self.done / elapsed if elapsed > 0 else 0.0,
                resumes=self._resumes(),
            )
        )
