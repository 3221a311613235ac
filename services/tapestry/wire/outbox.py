"""What one side of a session sends and receives.

:class:`Outbox`: what it sends, in the order gRPC takes it: control messages (an
exchange's end, a describe) ahead of data (tensor chunks), data bounded so a sender waits
for the wire instead of filling memory, and one :meth:`Outbox.close` that wakes everyone.

Both ends of a member's session use it: the coordinator's handler yields
:meth:`Outbox.messages` as the session's reply stream, the node hands the same iterator to
its ``OpenSession`` call. :class:`Inbox`: what one exchange on a session receives, bounded
the same way, so a reader that outruns its consumer waits (and the peer with it, through
gRPC's flow control) instead of buffering.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from tapestry.limits import SESSION_CONTROL_MESSAGES

Message = TypeVar("Message")

# Data messages (each at most a chunk, 1 MiB by default) queued before a sender waits: what
# a session holds in memory beyond gRPC's own window.
DATA_MESSAGES = 4


class OutboxClosed(Exception):
    """The session is over: nothing more is sent."""


class OutboxFull(Exception):
    """The peer has not taken the control messages queued for it: it does not read its
    session, which its holder then ends."""


class Outbox(Generic[Message]):
    """Sent in this order: each exchange's latest acknowledgement (:meth:`ack`, one per
    exchange, replaced while it waits), control messages (:meth:`control`, at most
    ``control_messages`` waiting), numbered messages (:meth:`numbered`, bounded by their
    sender: :mod:`tapestry.wire.numbering`), then data (:meth:`data`, ``data_messages``)."""

    def __init__(
        self, data_messages: int = DATA_MESSAGES, control_messages: int = SESSION_CONTROL_MESSAGES
    ) -> None:
        self._cond = threading.Condition()
        self._acks: dict[int, Message] = {}
        self._control: deque[Message] = deque()
        # each with what to tell when it leaves (tapestry.wire.numbering)
        self._numbered: deque[tuple[Message, Callable[[Message], None] | None]] = deque()
        self._data: deque[Message] = deque()
        self._capacity = data_messages
        self._control_capacity = control_messages
        self._closed = False

    def control(self, message: Message) -> None:
        """Queue ``message`` ahead of any data, without waiting (an exchange's end, a
        describe: a few per exchange). Raises :class:`OutboxClosed` once closed, and
        :class:`OutboxFull` while ``control_messages`` wait to be taken already."""
        with self._cond:
            if self._closed:
                raise OutboxClosed
            if len(self._control) >= self._control_capacity:
                raise OutboxFull(
                    f"{len(self._control)} control messages wait for it (SESSION_CONTROL_MESSAGES)"
                )
            self._control.append(message)
            self._cond.notify_all()

    def ack(self, key: int, message: Message) -> None:
        """Queue ``message`` as exchange ``key``'s acknowledgement, replacing one of it that
        still waits (acknowledgements are cumulative: the latest says all). Dropped once
        closed."""
        with self._cond:
            if not self._closed:
                self._acks[key] = message
                self._cond.notify_all()

    def numbered(self, message: Message, left: Callable[[Message], None] | None = None) -> None:
        """Queue a numbered message after those already queued, without waiting: its
        sender bounds how many it keeps unacknowledged. ``left(message)`` is called as
        :meth:`messages` hands it on, before the peer can have it. Raises
        :class:`OutboxClosed`."""
        with self._cond:
            if self._closed:
                raise OutboxClosed
            self._numbered.append((message, left))
            self._cond.notify_all()

    def data(
        self, message: Message, deadline: float | None = None, gone: threading.Event | None = None
    ) -> None:
        """Queue ``message`` after the data already queued, waiting for room until the
        monotonic ``deadline`` (then :class:`TimeoutError`) or until ``gone`` is set (then
        :class:`OutboxClosed`, as when the outbox closes)."""
        with self._cond:
            while len(self._data) >= self._capacity and not self._closed:
                if gone is not None and gone.is_set():
                    raise OutboxClosed
                wait = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
                if wait <= 0:
                    raise TimeoutError("the peer did not take the session's messages in time")
                self._cond.wait(wait)
            if self._closed or (gone is not None and gone.is_set()):
                raise OutboxClosed
            self._data.append(message)
            self._cond.notify_all()

    def close(self) -> None:
        """Drop what is queued and end :meth:`messages`; later sends raise."""
        with self._cond:
            self._closed = True
            self._acks.clear()
            self._control.clear()
            self._numbered.clear()
            self._data.clear()
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    def messages(self) -> Iterator[Message]:
        """What to send, in the order the class says, until :meth:`close`."""
        while True:
            left = None
            with self._cond:
                while not (
                    self._acks or self._control or self._numbered or self._data or self._closed
                ):
                    self._cond.wait()
                if self._closed:
                    return
                if self._acks:
                    message = self._acks.pop(next(iter(self._acks)))
                elif self._control:
                    message = self._control.popleft()
                elif self._numbered:
                    message, left = self._numbered.popleft()
                else:
                    message = self._data.popleft()
                self._cond.notify_all()
            if left is not None:  # outside the lock: its sender's lock comes first
                left(message)
            yield message


class Inbox(Generic[Message]):
    """One exchange's messages in order, at most ``capacity`` waiting, then the error that
    ended it (if any)."""

    def __init__(self, capacity: int = DATA_MESSAGES) -> None:
        self._cond = threading.Condition()
        self._items: deque[Message] = deque()
        self._capacity = capacity
        self._error: BaseException | None = None

    def put(self, item: Message) -> bool:
        """Queue ``item``, waiting while ``capacity`` wait to be taken; ``False`` (dropped)
        once the exchange is over."""
        with self._cond:
            while len(self._items) >= self._capacity and self._error is None:
                self._cond.wait()
            if self._error is not None:
                return False
            self._items.append(item)
            self._cond.notify_all()
            return True

    def take(self, deadline: float | None = None) -> Message:
        """The next message; once none is left, the error that ended the exchange is
        raised; :class:`TimeoutError` at the monotonic ``deadline``."""
        with self._cond:
            while not self._items:
                if self._error is not None:
                    raise self._error
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError("nothing arrived in time")
                self._cond.wait(remaining)
            item = self._items.popleft()
            self._cond.notify_all()
            return item

    def fail(self, error: BaseException, *, discard: bool) -> None:
        """End the exchange with ``error`` (the first one given stays): what is queued is
        still taken first, unless ``discard``."""
        with self._cond:
            if self._error is None:
                self._error = error
            if discard:
                self._items.clear()
            self._cond.notify_all()
