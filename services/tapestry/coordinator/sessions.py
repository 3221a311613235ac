"""Members' sessions, as the coordinator holds them: a node dials out and holds one session,
over which the coordinator asks it to describe itself and runs its cycles.

A :class:`Session` is a :class:`~tapestry.coordinator.node_links.NodeLink`: its
``describe`` and ``cycle`` are exchanges multiplexed on the one stream, each with its own id
(``exchange_id``), its own bounded reply queue and its own deadline. Messages toward the node
go through an :class:`~tapestry.wire.outbox.Outbox` (control first, data bounded). When the
session ends, every exchange on it fails at once with the reason (UNAVAILABLE for a dropped
connection), which the round words as the node's failure.

A member that does not read loses its session once the control messages for it pile up
(:data:`~tapestry.limits.SESSION_CONTROL_MESSAGES`). The call of a session that ended is hung
up if it is still held after :data:`~tapestry.limits.SESSION_HANG_UP_S`.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import grpc

from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.coordinator.node_links import CycleCall, LinkError
from tapestry.limits import MAX_ERROR_DETAILS_CHARS, SESSION_HANG_UP_S
from tapestry.wire.outbox import Inbox, Outbox, OutboxClosed, OutboxFull

_CODES = {code.value[0]: code for code in grpc.StatusCode}
Reply = pb.DescribeResponse | pb.RunSovereignCycleResponse | pb.ExchangeEnd


def status_code(number: int) -> grpc.StatusCode:
    """The status code a peer's ``ExchangeEnd.code`` names; UNKNOWN for a number gRPC
    does not define."""
    return _CODES.get(number, grpc.StatusCode.UNKNOWN)


@dataclass(frozen=True)
class SessionOpened:
    """Who opened a session, from where, speaking what: ``serial`` is its certificate's
    (``None`` over plaintext), ``release`` what the node says it runs."""

    node_id: str
    address: str
    protocol_version: int
    release: str
    serial: int | None
    since: datetime


class Session:
    """One member's session: its outbox (read by the handler that serves the stream), the
    exchanges open on it, and how it ended. ``hang_up`` cancels the session's call: it is
    called :data:`SESSION_HANG_UP_S` after the end, for a handler held in gRPC's flow
    control, where the closed outbox does not reach it."""

    def __init__(self, opened: SessionOpened, hang_up: Callable[[], None] | None = None) -> None:
        self.opened = opened
        self._hang_up = hang_up
        self.outbox: Outbox[pb.OpenSessionResponse] = Outbox()
        self.last_seen = opened.since
        self.ended: LinkError | None = None
        self._lock = threading.Lock()
        self._exchanges: dict[int, Inbox[Reply]] = {}
        self._ids = itertools.count(1)

    @property
    def address(self) -> str:
        return f"session of {self.opened.node_id} from {self.opened.address}"

    # -- the reader's side -----------------------------------------------------------------

    def receive(self, message: pb.OpenSessionRequest) -> None:
        """Hand a message from the node to its exchange (the stream's reader thread). A
        message of an exchange already over is dropped; a second ``open``, or one that
        carries nothing, ends the session (INVALID_ARGUMENT)."""
        self.last_seen = datetime.now(UTC)
        kind = message.WhichOneof("item")
        if kind not in ("described", "cycle", "end"):
            what = "a second SessionOpen" if kind == "open" else "a message with no item"
            self.end(LinkError(grpc.StatusCode.INVALID_ARGUMENT, f"the node sent {what}"))
            return
        with self._lock:
            replies = self._exchanges.get(message.exchange_id)
        if replies is not None:
            replies.put(getattr(message, kind))

    def end(self, error: LinkError) -> None:
        """End the session with ``error`` (once): every exchange fails with it, and the
        stream's handler stops sending."""
        with self._lock:
            if self.ended is not None:
                return
            self.ended = error
            exchanges = list(self._exchanges.values())
            self._exchanges.clear()
        for replies in exchanges:
            replies.fail(error, discard=False)
        self.outbox.close()
        if self._hang_up is not None:
            timer = threading.Timer(SESSION_HANG_UP_S, self._hang_up)
            timer.daemon = True
            timer.start()

    # -- the round's side (NodeLink) -------------------------------------------------------

    def _open(self) -> tuple[int, Inbox[Reply]]:
        replies: Inbox[Reply] = Inbox()
        with self._lock:
            if self.ended is not None:
                raise self.ended
            exchange_id = next(self._ids)
            self._exchanges[exchange_id] = replies
        return exchange_id, replies

    def _forget(self, exchange_id: int) -> None:
        """The exchange is over: what the node sends for it is dropped, and a reader waiting
        to hand it a message (its queue full) goes on."""
        with self._lock:
            replies = self._exchanges.pop(exchange_id, None)
        if replies is not None:
            replies.fail(LinkError(grpc.StatusCode.CANCELLED, "the exchange is over"), discard=True)

    def _send(self, message: pb.OpenSessionResponse, *, control: bool, deadline: float) -> None:
        """Queue ``message`` (a :class:`LinkError` if it cannot be); a node that has not
        taken the control messages already queued for it loses its session."""
        try:
            if control:
                self.outbox.control(message)
            else:
                self.outbox.data(message, deadline)
        except OutboxFull as full:
            error = LinkError(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"the node did not read its session: {full}"
            )
            self.end(error)
            raise self.ended or error from None
        except OutboxClosed:
            raise self.ended or LinkError(grpc.StatusCode.UNAVAILABLE, "session ended") from None
        except TimeoutError as error:
            raise LinkError(grpc.StatusCode.DEADLINE_EXCEEDED, str(error)) from None

    def describe(self, timeout_s: float) -> pb.DescribeResponse:
        exchange_id, replies = self._open()
        deadline = time.monotonic() + timeout_s
        try:
            self._send(
                pb.OpenSessionResponse(exchange_id=exchange_id, describe=pb.DescribeRequest()),
                control=True,
                deadline=deadline,
            )
            reply = _take(replies, deadline, "describe")
        finally:
            self._forget(exchange_id)
        if isinstance(reply, pb.DescribeResponse):
            return reply
        if isinstance(reply, pb.ExchangeEnd) and reply.code:
            raise LinkError(status_code(reply.code), reply.message[:MAX_ERROR_DETAILS_CHARS])
        raise LinkError(grpc.StatusCode.INVALID_ARGUMENT, "the node answered a describe wrongly")

    def cycle(self, requests: Iterator[pb.RunSovereignCycleRequest], timeout_s: float) -> CycleCall:
        exchange_id, replies = self._open()
        return SessionCall(self, exchange_id, replies, requests, time.monotonic() + timeout_s)

    def close(self) -> None:
        """Nothing to release per round: the session outlives it."""


class SessionCall:
    """A cycle over a session: a thread sends the requests as they come (data bounded by the
    outbox), then their end; iterating yields the node's replies until its end. Past the
    deadline, or on :meth:`cancel`, the node is told the cycle is cancelled."""

    def __init__(
        self,
        session: Session,
        exchange_id: int,
        replies: Inbox[Reply],
        requests: Iterator[pb.RunSovereignCycleRequest],
        deadline: float,
    ) -> None:
        self._session = session
        self._id = exchange_id
        self._replies = replies
        self._deadline = deadline
        self._done = threading.Event()
        threading.Thread(
            target=self._send_requests, args=(requests,), name="session-cycle", daemon=True
        ).start()

    def _send_requests(self, requests: Iterator[pb.RunSovereignCycleRequest]) -> None:
        try:
            for request in requests:
                if self._done.is_set():
                    return
                self._session._send(
                    pb.OpenSessionResponse(exchange_id=self._id, cycle=request),
                    control=False,
                    deadline=self._deadline,
                )
            if not self._done.is_set():
                # After the requests, never ahead of them: the half-close travels as data.
                end = pb.ExchangeEnd(code=grpc.StatusCode.OK.value[0])
                self._session._send(
                    pb.OpenSessionResponse(exchange_id=self._id, end=end),
                    control=False,
                    deadline=self._deadline,
                )
        except LinkError as error:
            self._replies.fail(error, discard=False)

    def __iter__(self) -> SessionCall:
        return self

    def __next__(self) -> pb.RunSovereignCycleResponse:
        try:
            item = _take(self._replies, self._deadline, "cycle")
        except LinkError as error:
            if error.code() is grpc.StatusCode.DEADLINE_EXCEEDED:
                self.cancel()
            raise
        if isinstance(item, pb.RunSovereignCycleResponse):
            return item
        self._finish()
        if isinstance(item, pb.ExchangeEnd) and not item.code:
            raise StopIteration
        if isinstance(item, pb.ExchangeEnd):
            raise LinkError(status_code(item.code), item.message[:MAX_ERROR_DETAILS_CHARS])
        raise LinkError(grpc.StatusCode.INVALID_ARGUMENT, "the node answered a cycle wrongly")

    def _finish(self) -> bool:
        if self._done.is_set():
            return False
        self._done.set()
        self._session._forget(self._id)
        return True

    def cancel(self) -> bool:
        """End the cycle on both sides (the node is told CANCELLED); ``False`` if it had
        ended already."""
        # Before the exchange is forgotten, which would fail it with a vaguer reason.
        self._replies.fail(
            LinkError(grpc.StatusCode.CANCELLED, "the coordinator cancelled the cycle"),
            discard=True,
        )
        if not self._finish():
            return False
        end = pb.ExchangeEnd(code=grpc.StatusCode.CANCELLED.value[0])
        # A session already over has ended the cycle on the node too.
        with contextlib.suppress(LinkError):
            self._session._send(
                pb.OpenSessionResponse(exchange_id=self._id, end=end),
                control=True,
                deadline=self._deadline,
            )
        return True


def _take(replies: Inbox[Reply], deadline: float, what: str) -> Reply:
    try:
        return replies.take(deadline)
    except TimeoutError:
        raise LinkError(
            grpc.StatusCode.DEADLINE_EXCEEDED, f"the node did not answer the {what} in time"
        ) from None
