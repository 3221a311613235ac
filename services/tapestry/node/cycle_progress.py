"""Run a node's training while its reply stream reports progress: the cycle runs on a
thread of its own and hands each report it makes (throttled) to the servicer's stream.

A gRPC reply stream can only send from the generator that serves the call, and the core
node reports from the thread that trains, so the two meet at a queue. The throttle bounds
the queue as it bounds the wire: at most one training report per interval and at most
``max_reports`` in all (:class:`~tapestry.training.consortium.progress.ProgressThrottle`).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Generator
from typing import Generic, TypeVar

from tapestry.training.consortium.progress import (
    CycleProgress,
    ProgressCallback,
    ProgressThrottle,
    throttled,
)

Result = TypeVar("Result")


class _Ended(Generic[Result]):
    """The cycle's end: its result, or what it raised."""

    def __init__(self, result: Result | None, error: BaseException | None) -> None:
        self.result = result
        self.error = error


def reporting(
    cycle: Callable[[ProgressCallback], Result], throttle: ProgressThrottle
) -> Generator[CycleProgress, None, Result]:
    """Yields the reports ``cycle(on_progress)`` makes that ``throttle`` passes, as they
    come, then returns its result (or raises what it raised).

    However the caller leaves (the generator closed because the call was cancelled, say),
    this waits for the cycle to end: a node runs one cycle at a time, and training is not
    stopped half-way (under ``torchrun`` the other ranks would wait on rank 0 for ever)."""
    items: queue.SimpleQueue[CycleProgress | _Ended[Result]] = queue.SimpleQueue()

    def work() -> None:
        try:
            items.put(_Ended(cycle(throttled(items.put, throttle)), None))
        except BaseException as error:  # handed to the caller's thread, raised there
            items.put(_Ended(None, error))

    worker = threading.Thread(target=work, name="cycle", daemon=True)
    worker.start()
    try:
        while True:
            item = items.get()
            if not isinstance(item, _Ended):
                yield item
                continue
            if item.error is not None:
                raise item.error
            return item.result  # type: ignore[return-value]  # set when error is None
    finally:
        worker.join()
