"""Server-side deadlines: a caller that stalls cannot hold the node.

A synchronous gRPC handler blocks in ``next(request_iterator)`` for as long as the caller
keeps the stream open and silent, and no client deadline helps when the caller is the one
stalling. :class:`ReceiveDeadline` reads the request stream on a helper thread and hands the
messages over through a one-slot box, so the handler waits at most until the deadline and
then raises :class:`TimeoutError` (DEADLINE_EXCEEDED, with a message naming the bound).
Ending the call wakes the helper thread, which then stops.

Sending is bounded by :class:`SendDeadline`: a timer that cancels the call when the caller
has not taken the whole reply in time (a caller that stops reading would otherwise hold the
handler in gRPC's flow control).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

Message = TypeVar("Message")


class ReceiveDeadline(Generic[Message]):
    """An iterator over ``requests`` that raises :class:`TimeoutError` once ``timeout_s``
    (counted from construction) has passed, naming ``what`` and ``setting``. Call
    :meth:`close` when done with it (the handler's ``finally``)."""

    def __init__(
        self, requests: Iterator[Message], timeout_s: float, what: str, setting: str
    ) -> None:
        self._requests = requests
        self._deadline = time.monotonic() + timeout_s
        self._timeout_s = timeout_s
        self._what = what
        self._setting = setting
        self._cond = threading.Condition()
        self._box: list[Message] = []  # at most one message: the reader waits for room
        self._ended = False  # the stream ended (or failed: see _error)
        self._error: BaseException | None = None
        self._closed = False
        self._reader = threading.Thread(target=self._read, name="receive-deadline", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for message in self._requests:
                with self._cond:
                    while self._box and not self._closed:
                        self._cond.wait()
                    if self._closed:
                        return
                    self._box.append(message)
                    self._cond.notify_all()
        except BaseException as error:  # the call ended under us: the handler sees why
            with self._cond:
                self._error = error
        finally:
            with self._cond:
                self._ended = True
                self._cond.notify_all()

    def __iter__(self) -> ReceiveDeadline[Message]:
        return self

    def __next__(self) -> Message:
        with self._cond:
            while not self._box:
                if self._ended:
                    if self._error is not None:
                        raise self._error
                    raise StopIteration
                remaining = self._deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"{self._what} did not arrive within {self._setting} = "
                        f"{self._timeout_s:g} s; the node dropped the call"
                    )
                self._cond.wait(remaining)
            message = self._box.pop()
            self._cond.notify_all()
            return message

    def renew(self, timeout_s: float, what: str, setting: str) -> None:
        """Wait for what comes next under a new deadline, ``timeout_s`` from now."""
        with self._cond:
            self._deadline = time.monotonic() + timeout_s
            self._timeout_s, self._what, self._setting = timeout_s, what, setting

    def close(self) -> None:
        """Stop handing messages over; the reader thread ends when the call does."""
        with self._cond:
            self._closed = True
            self._box.clear()
            self._cond.notify_all()


class SendDeadline:
    """Calls ``cancel`` unless :meth:`stop` is called within ``timeout_s``."""

    def __init__(self, timeout_s: float, cancel: Callable[[], None]) -> None:
        self._timer = threading.Timer(timeout_s, cancel)
        self._timer.daemon = True
        self._timer.start()

    def stop(self) -> None:
        self._timer.cancel()
