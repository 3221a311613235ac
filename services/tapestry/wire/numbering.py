"""Exchanges that survive a dropped connection: every message of an exchange is numbered,
kept by its sender until the peer acknowledges it, and sent again after a reconnection from
the first one the peer did not get. So a base or a delta cut mid-stream resumes from the
last chunk that arrived instead of from byte zero, and the receiver takes each message
exactly once, in order: a resumed state is bit-identical to an uninterrupted one (its
trailer's digest checks that, as for any state).

Both ends of a member's session keep one :class:`Numbering` per peer, outliving its
sessions. A sender keeps at most ``retain_bytes`` of unacknowledged messages per exchange
and waits past that: what a resumable transfer costs in memory, on top of the flow-control
window it also bounds. A receiver acknowledges every :data:`ACK_EVERY` messages it takes
off the wire.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from tapestry.wire.outbox import Outbox, OutboxClosed

# A receiver acknowledges every second message it takes (and an exchange's last at once);
# an acknowledgement still waiting to be sent is replaced by the next (Outbox.ack), so a
# busy link carries fewer of them.
ACK_EVERY = 2
# Whatever a sender's share of the budget, it may keep at least this much unacknowledged:
# four of the largest chunks (MAX_CHUNK_BYTES = 4 MiB), twice what two messages between
# acknowledgements can hold, so a sender never waits on every acknowledgement.
MIN_RETAIN_BYTES = 16 << 20


class NumberedMessage(Protocol):
    exchange_id: int
    seq: int
    ack: int

    def ByteSize(self) -> int: ...  # noqa: N802 - protobuf's name


Message = TypeVar("Message", bound=NumberedMessage)


class OutOfOrder(ValueError):
    """A numbered message that is neither the next one nor one already taken."""


@dataclass
class _Sending(Generic[Message]):
    next_seq: int = 1
    kept: deque[tuple[Message, int]] = field(default_factory=deque)  # (message, its size)
    kept_bytes: int = 0
    received: int = 0  # the peer's messages of this exchange taken, in order
    unacked: int = 0  # of those, taken since our last acknowledgement


class Numbering(Generic[Message]):
    """The numbered exchanges with one peer. ``ack(exchange_id, count)`` makes an
    acknowledgement-only message."""

    def __init__(
        self,
        ack: Callable[[int, int], Message],
        retain_bytes: int,
        message_bytes: int | None = None,
    ) -> None:
        """``message_bytes``, when given, is what each kept message counts for (the sender's
        chunk size, an upper bound: protobuf sizes a message by encoding it, which costs
        about as much as the copy it would bound); without, each is sized exactly."""
        self._make_ack = ack
        self.retain_bytes = max(retain_bytes, MIN_RETAIN_BYTES)
        self._message_bytes = message_bytes
        self._cond = threading.Condition()
        self._exchanges: dict[int, _Sending[Message]] = {}
        self._outbox: Outbox[Message] | None = None

    # -- exchanges ---------------------------------------------------------------------------

    def open(self, exchange_id: int) -> None:
        with self._cond:
            self._exchanges.setdefault(exchange_id, _Sending())

    def close(self, exchange_id: int) -> None:
        """Forget the exchange: its kept messages are let go."""
        with self._cond:
            self._exchanges.pop(exchange_id, None)
            self._cond.notify_all()

    def __contains__(self, exchange_id: int) -> bool:
        with self._cond:
            return exchange_id in self._exchanges

    def states(self) -> list[tuple[int, int]]:
        """``(exchange, messages received)`` of every open exchange: what a reconnection
        tells the peer."""
        with self._cond:
            return [(key, sending.received) for key, sending in self._exchanges.items()]

    # -- sending -----------------------------------------------------------------------------

    def send(
        self,
        message: Message,
        *,
        deadline: float | None = None,
        gone: threading.Event | None = None,
    ) -> None:
        """Number ``message`` (its ``exchange_id`` set), keep it until acknowledged, and
        queue it on the session now attached (while none is, it waits to be sent again on
        the next). Waits while the exchange keeps :attr:`retain_bytes` unacknowledged, until
        the monotonic ``deadline`` (:class:`TimeoutError`) or ``gone`` is set
        (:class:`OutboxClosed`). An exchange already closed raises :class:`OutboxClosed`."""
        size = self._message_bytes or message.ByteSize()
        with self._cond:
            while True:
                sending = self._exchanges.get(message.exchange_id)
                if sending is None or (gone is not None and gone.is_set()):
                    raise OutboxClosed
                if not sending.kept or sending.kept_bytes + size <= self.retain_bytes:
                    break
                wait = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
                if wait <= 0:
                    raise TimeoutError("the peer did not acknowledge the exchange's messages")
                self._cond.wait(wait)
            message.seq = sending.next_seq
            message.ack = sending.received
            sending.unacked = 0
            sending.next_seq += 1
            sending.kept.append((message, size))
            sending.kept_bytes += size
            outbox = self._outbox
            # Queued in number order: the exchange's lock is held until it is on the outbox.
            if outbox is not None:
                with contextlib.suppress(OutboxClosed):  # sent again on the next session
                    outbox.numbered(message)

    def acknowledged(self, exchange_id: int, count: int) -> None:
        """The peer took our messages of ``exchange_id`` up to ``count``: let them go."""
        with self._cond:
            sending = self._exchanges.get(exchange_id)
            if sending is None:
                return
            self._drop_acknowledged(sending, count)
            self._cond.notify_all()

    def drained(
        self, exchange_id: int, timeout_s: float, gone: threading.Event | None = None
    ) -> bool:
        """Wait until the peer acknowledged every message of the exchange (or it closed),
        at most ``timeout_s`` or until ``gone`` is set; whether it did."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                sending = self._exchanges.get(exchange_id)
                if sending is None or not sending.kept:
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (gone is not None and gone.is_set()):
                    return False
                self._cond.wait(min(0.5, remaining))

    # -- receiving ---------------------------------------------------------------------------

    def take(self, message: NumberedMessage, *, ack_now: bool = False) -> bool:
        """Whether ``message`` (numbered, of an open exchange) is the next one to hand on:
        ``False`` for one already taken (sent again after a reconnection); a gap raises
        :class:`OutOfOrder`. Every :data:`ACK_EVERY` taken (or at once, ``ack_now``: an
        exchange's last message), an acknowledgement is queued."""
        ack = None
        with self._cond:
            sending = self._exchanges.get(message.exchange_id)
            if sending is None:
                return False
            if message.seq <= sending.received:
                return False
            if message.seq != sending.received + 1:
                raise OutOfOrder(
                    f"message {message.seq} of exchange {message.exchange_id} after "
                    f"{sending.received}"
                )
            sending.received += 1
            sending.unacked += 1
            if (ack_now or sending.unacked >= ACK_EVERY) and self._outbox is not None:
                sending.unacked = 0
                ack = self._make_ack(message.exchange_id, sending.received)
                outbox = self._outbox
        if ack is not None:
            outbox.ack(message.exchange_id, ack)
        return True

    # -- sessions ----------------------------------------------------------------------------

    def attach(self, outbox: Outbox[Message], peer: Iterable[tuple[int, int]]) -> None:
        """A new session: every kept message the peer has not received (``peer``: its
        ``(exchange, received)``; an exchange it does not list has received none) is queued
        again, in order, ahead of anything sent after."""
        received = dict(peer)
        with self._cond:
            self._outbox = outbox
            for exchange_id, sending in self._exchanges.items():
                self._drop_acknowledged(sending, received.get(exchange_id, 0))
                with contextlib.suppress(OutboxClosed):  # that session is already over
                    for message, _ in sending.kept:
                        outbox.numbered(message)

    @staticmethod
    def _drop_acknowledged(sending: _Sending[Message], count: int) -> None:
        while sending.kept and sending.kept[0][0].seq <= count:
            sending.kept_bytes -= sending.kept.popleft()[1]

    def detach(self, outbox: Outbox[Message]) -> None:
        """The session of ``outbox`` ended: send nothing more until the next attaches."""
        with self._cond:
            if self._outbox is outbox:
                self._outbox = None
            self._cond.notify_all()
