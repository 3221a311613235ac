"""Exchanges that survive a dropped connection: every message of an exchange is numbered,
kept by its sender until the peer acknowledges it, and sent again after a reconnection from
the first one the peer did not get. So a base or a delta cut mid-stream resumes from the
last chunk that arrived instead of from byte zero, and the receiver takes each message
exactly once, in order: a resumed state is bit-identical to an uninterrupted one (its
trailer's digest checks that, as for any state).

A session may hold several connections ("lanes", ``[link] streams``): message ``seq`` of an
exchange travels on lane ``(seq - 1) % lanes``, and each lane's reader hands its message on
only in its turn (when every earlier one of the exchange was handed on). Each lane keeps its
order, so a lane's next message is at most ``lanes`` ahead of the exchange's next one: a
receiver holds no reordering buffer, one message per lane at most, and a lane that runs
ahead waits in gRPC's flow control.

Both ends of a member's session keep one :class:`Numbering` per peer, outliving its
sessions. A sender keeps at most ``retain_bytes`` of unacknowledged messages per exchange
and waits past that: what a resumable transfer costs in memory, on top of the flow-control
window it also bounds. An acknowledgement frees only what has left for the peer, so that
budget also bounds what waits on a lane the peer does not read. A receiver acknowledges
every :data:`ACK_EVERY` messages it takes off the wire.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from tapestry.wire.outbox import Outbox, OutboxClosed

# A receiver acknowledges every second message it takes (and an exchange's last at once);
# an acknowledgement still waiting to be sent is replaced by the next (Outbox.ack), so a
# busy link carries fewer of them.
ACK_EVERY = 2
# Exchanges the peer opened that this side closed, remembered so that their late messages on
# other lanes are dropped instead of awaited (a session runs one cycle per round).
REMEMBERED_CLOSED = 1024
# Whatever a sender's share of the budget, it may keep at least this many of its messages
# unacknowledged: twice what two messages between acknowledgements hold, so a sender never
# waits on every acknowledgement. A sender that does not say its messages' size keeps at
# least four of the largest chunks (MAX_CHUNK_BYTES = 4 MiB).
RETAIN_MESSAGES = 4
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
    handing: int = 0  # the peer's message being handed on now (its seq), 0: none
    left: int = 0  # the highest of ours taken off a lane's outbox: the most the peer can have


class Numbering(Generic[Message]):
    """The numbered exchanges with one peer. ``ack(exchange_id, count)`` makes an
    acknowledgement-only message."""

    def __init__(
        self,
        ack: Callable[[int, int], Message],
        retain_bytes: int,
        message_bytes: int | None = None,
        *,
        peer_opens: bool = False,
    ) -> None:
        """``message_bytes``, when given, is what each kept message counts for (the sender's
        chunk size, an upper bound: protobuf sizes a message by encoding it, which costs
        about as much as the copy it would bound); without, each is sized exactly.
        ``peer_opens``: the peer opens exchanges (a node's cycles), so a message of one not
        open yet may be ahead of its opening on another lane."""
        self._make_ack = ack
        # the floor is the sender's own messages, not the largest possible: a share of the
        # budget per member then stays within it, for as many members as a 1 MiB chunk allows
        floor = RETAIN_MESSAGES * message_bytes if message_bytes else MIN_RETAIN_BYTES
        self.retain_bytes = max(retain_bytes, floor)
        self._message_bytes = message_bytes
        self._peer_opens = peer_opens
        self._cond = threading.Condition()
        self._exchanges: dict[int, _Sending[Message]] = {}
        self._closed: deque[int] = deque(maxlen=REMEMBERED_CLOSED)
        self._outboxes: Sequence[Outbox[Message]] | None = None

    # -- exchanges ---------------------------------------------------------------------------

    def open(self, exchange_id: int) -> None:
        with self._cond:
            self._exchanges.setdefault(exchange_id, _Sending())
            with contextlib.suppress(ValueError):  # an id used again after a restart
                self._closed.remove(exchange_id)
            self._cond.notify_all()  # a message of it may wait on another lane

    def close(self, exchange_id: int) -> None:
        """Forget the exchange: its kept messages are let go, its late ones dropped."""
        with self._cond:
            self._exchanges.pop(exchange_id, None)
            self._closed.append(exchange_id)
            self._cond.notify_all()

    def __contains__(self, exchange_id: int) -> bool:
        with self._cond:
            return exchange_id in self._exchanges

    def untouched(self, exchange_id: int) -> bool:
        """Whether the peer shows no sign of the exchange: nothing of it received from the
        peer, and the peer acknowledged none of ours (none sent yet, or all kept from the
        first). A peer that does not hold such an exchange never began it, and it can start
        again; one that acknowledged every message sent (nothing kept) took it all."""
        with self._cond:
            sending = self._exchanges.get(exchange_id)
            return (
                sending is not None
                and sending.received == 0
                and (sending.next_seq == 1 or (bool(sending.kept) and sending.kept[0][0].seq == 1))
            )

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
            # Queued in number order: the exchange's lock is held until it is on its lane.
            if self._outboxes is not None:
                with contextlib.suppress(OutboxClosed):  # sent again on the next session
                    _lane_of(message, self._outboxes).numbered(message, self._left)

    def acknowledged(self, exchange_id: int, count: int) -> None:
        """The peer took our messages of ``exchange_id`` up to ``count``: let them go, up to
        the last that left for it. A peer that acknowledges what it cannot have (still
        queued for a lane it does not read) frees nothing: what is kept bounds what waits
        to be sent too."""
        with self._cond:
            sending = self._exchanges.get(exchange_id)
            if sending is None:
                return
            self._drop_acknowledged(sending, min(count, sending.left))
            self._cond.notify_all()

    def _left(self, message: Message) -> None:
        """``message`` is handed to the wire: the peer may acknowledge it from now on."""
        with self._cond:
            sending = self._exchanges.get(message.exchange_id)
            if sending is not None and message.seq > sending.left:
                sending.left = message.seq

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

    def take(
        self,
        message: NumberedMessage,
        hand_on: Callable[[], None],
        *,
        lane: int = 0,
        lanes: int = 1,
        ack_now: bool = False,
        gone: threading.Event | None = None,
    ) -> bool:
        """Hand ``message`` (numbered, arrived on ``lane`` of ``lanes``) on in its turn:
        waits until every earlier message of its exchange was handed on, then calls
        ``hand_on`` (one at a time per exchange). ``False``, without calling it, for a
        message already taken (sent again after a reconnection), of an exchange closed or
        unknown, or once ``gone`` (the session of ``lane`` ended: it is sent again on the
        next). A message on the wrong lane, or further ahead than its lane allows, raises
        :class:`OutOfOrder`. Every :data:`ACK_EVERY` taken (or at once, ``ack_now``: an
        exchange's last message), an acknowledgement is queued."""
        key, seq = message.exchange_id, message.seq
        with self._cond:
            while True:
                sending = self._exchanges.get(key)
                if sending is None and not self._awaits_opening(key, seq, lanes):
                    return False
                if sending is not None:
                    if seq <= sending.received:
                        return False
                    if (seq - 1) % lanes != lane or seq > sending.received + lanes:
                        raise OutOfOrder(
                            f"message {seq} of exchange {key} on lane {lane} of {lanes}, "
                            f"after {sending.received}"
                        )
                    if seq == sending.received + 1 and not sending.handing:
                        sending.handing = seq
                        break
                if gone is not None and gone.is_set():
                    return False
                self._cond.wait(0.5)
        try:
            hand_on()
        finally:
            self._taken(sending, key, ack_now)
        return True

    def _awaits_opening(self, key: int, seq: int, lanes: int) -> bool:
        """Whether a message of exchange ``key``, not open, waits for its opening: one the
        peer opens, not closed here, whose first message may still be on another lane."""
        return self._peer_opens and 1 < seq <= lanes and key not in self._closed

    def _taken(self, sending: _Sending[Message], key: int, ack_now: bool) -> None:
        ack = None
        with self._cond:
            sending.received, sending.handing = sending.handing, 0
            sending.unacked += 1
            outboxes = self._outboxes
            if (ack_now or sending.unacked >= ACK_EVERY) and outboxes is not None:
                sending.unacked = 0
                ack = self._make_ack(key, sending.received)
            self._cond.notify_all()
        if ack is not None and outboxes is not None:
            outboxes[0].ack(key, ack)

    # -- sessions ----------------------------------------------------------------------------

    def attach(self, outboxes: Sequence[Outbox[Message]], peer: Iterable[tuple[int, int]]) -> None:
        """A new session, its lanes' ``outboxes`` (the first also carries acknowledgements):
        every kept message the peer has not received (``peer``: its ``(exchange,
        received)``; an exchange it does not list has received none) is queued again, in
        order, on its lane, ahead of anything sent after."""
        received = dict(peer)
        with self._cond:
            self._outboxes = outboxes
            self._closed.clear()  # a new session carries nothing of theirs
            for exchange_id, sending in self._exchanges.items():
                self._drop_acknowledged(sending, received.get(exchange_id, 0))
                with contextlib.suppress(OutboxClosed):  # that session is already over
                    for message, _ in sending.kept:
                        _lane_of(message, outboxes).numbered(message, self._left)

    @staticmethod
    def _drop_acknowledged(sending: _Sending[Message], count: int) -> None:
        while sending.kept and sending.kept[0][0].seq <= count:
            sending.kept_bytes -= sending.kept.popleft()[1]

    def detach(self, outbox: Outbox[Message]) -> None:
        """The session whose first lane is ``outbox`` ended: send nothing more until the
        next attaches."""
        with self._cond:
            if self._outboxes is not None and self._outboxes[0] is outbox:
                self._outboxes = None
            self._cond.notify_all()


def _lane_of(message: NumberedMessage, outboxes: Sequence[Outbox[Message]]) -> Outbox[Message]:
    return outboxes[(message.seq - 1) % len(outboxes)]
