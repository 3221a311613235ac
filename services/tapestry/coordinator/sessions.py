"""Members' sessions, as the coordinator holds them: a node dials out and holds one session,
over which the coordinator asks it to describe itself and runs its cycles.

A :class:`Session` is one connection: its outbox (what the stream's handler sends) and how
it ended. A :class:`MemberLink` is the member, across its sessions, and the round's
:class:`~tapestry.coordinator.node_links.NodeLink` to it: ``describe`` and ``cycle`` are
exchanges multiplexed on the session now open, each with its own id, its own bounded reply
queue and its own deadline. A cycle's messages are numbered (:mod:`tapestry.wire.numbering`):
when the session drops, the cycle waits up to ``resume_window_s`` for the node to dial
again, then both sides send again what the other did not get, and the base or delta goes on
from the last chunk that arrived. A node that does not come back in time, or comes back
without the cycle (it restarted), fails the round with the reason. A describe cut by a
dropped session is asked again on the next one, within the same window.

A member that does not read loses its session once the control messages for it pile up
(:data:`~tapestry.limits.SESSION_CONTROL_MESSAGES`). The call of a session that ended is hung
up if it is still held after :data:`~tapestry.limits.SESSION_HANG_UP_S`.
"""

from __future__ import annotations

import itertools
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime

import grpc

from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.coordinator.node_links import CycleCall, LinkError
from tapestry.limits import LANE_KEY_BYTES, LANES_OPEN_S, MAX_ERROR_DETAILS_CHARS, SESSION_HANG_UP_S
from tapestry.wire.numbering import Numbering, OutOfOrder
from tapestry.wire.outbox import Inbox, Outbox, OutboxClosed, OutboxFull

_CODES = {code.value[0]: code for code in grpc.StatusCode}
# The sessions a describe is asked on before its UNAVAILABLE stands (MemberLink.describe).
DESCRIBE_ATTEMPTS = 3
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
    """One session of a member: its lanes' outboxes (each read by the handler that serves
    that lane's call; the first, the session's own call, also carries every unnumbered
    message) and how it ended. Lanes beyond the first join with the session's ``lane_key``
    (:meth:`join_lane`); one that does not within :data:`LANES_OPEN_S` ends the session.
    ``hang_up`` cancels a call of the session: each is called :data:`SESSION_HANG_UP_S`
    after the end, for a handler held in gRPC's flow control, where the closed outbox does
    not reach it."""

    def __init__(
        self,
        opened: SessionOpened,
        hang_up: Callable[[], None] | None = None,
        lanes: int = 1,
    ) -> None:
        self.opened = opened
        self._hang_ups = [hang_up] if hang_up is not None else []
        self.outboxes: list[Outbox[pb.OpenSessionResponse]] = [Outbox() for _ in range(lanes)]
        self.lane_key = secrets.token_bytes(LANE_KEY_BYTES) if lanes > 1 else b""
        self._joined = {0}
        self.last_seen = opened.since
        self.ended: LinkError | None = None
        self.gone = threading.Event()
        self._lock = threading.Lock()
        # Let go once every lane joined or the session ended: a member dialing in a loop
        # must not leave a thread waiting LANES_OPEN_S per session.
        self._lanes_timer: threading.Timer | None = None
        if lanes > 1:
            self._lanes_timer = threading.Timer(LANES_OPEN_S, self._lanes_opened)
            self._lanes_timer.name = "session-lanes"
            self._lanes_timer.daemon = True
            self._lanes_timer.start()

    @property
    def outbox(self) -> Outbox[pb.OpenSessionResponse]:
        """The first lane's: unnumbered messages (acknowledgements, control) go there."""
        return self.outboxes[0]

    @property
    def lanes(self) -> int:
        return len(self.outboxes)

    def join_lane(self, lane: int, key: bytes, hang_up: Callable[[], None]) -> None:
        """Lane ``lane`` (from 1) joins with ``key``; a :class:`LinkError` says why not."""
        with self._lock:
            if self.ended is not None:
                raise LinkError(grpc.StatusCode.UNAVAILABLE, "the session has ended")
            if not 0 < lane < self.lanes:
                raise LinkError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"lane {lane}: this session has lanes 1 to {self.lanes - 1} to join",
                )
            if not secrets.compare_digest(key, self.lane_key):  # ABORTED: not final, as
                # a lane of the node's previous session, replaced meanwhile, would be told
                raise LinkError(
                    grpc.StatusCode.ABORTED,
                    "the lane's key is not its session's (a session replaced since?)",
                )
            if lane in self._joined:
                raise LinkError(grpc.StatusCode.ALREADY_EXISTS, f"lane {lane} has joined")
            self._joined.add(lane)
            self._hang_ups.append(hang_up)
            if len(self._joined) == self.lanes and self._lanes_timer is not None:
                self._lanes_timer.cancel()

    def _lanes_opened(self) -> None:
        with self._lock:
            missing = self.lanes - len(self._joined)
        if missing:
            self.end(
                LinkError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"{missing} of the session's {self.lanes - 1} further lanes did not "
                    f"open within {LANES_OPEN_S:g} s",
                )
            )

    @property
    def address(self) -> str:
        return f"session of {self.opened.node_id} from {self.opened.address}"

    def end(self, error: LinkError) -> None:
        """End the session with ``error`` (once): the stream's handler stops sending."""
        with self._lock:
            if self.ended is not None:
                return
            self.ended = error
            hang_ups = list(self._hang_ups)
        if self._lanes_timer is not None:
            self._lanes_timer.cancel()
        self.gone.set()
        for outbox in self.outboxes:
            outbox.close()
        if hang_ups:  # one thread for all the session's calls, whatever its lanes
            timer = threading.Timer(SESSION_HANG_UP_S, _call_each, (hang_ups,))
            timer.name = "session-hang-up"
            timer.daemon = True
            timer.start()


def _call_each(calls: list[Callable[[], None]]) -> None:
    for call in calls:
        call()


class MemberLink:
    """A member's exchanges with the coordinator, across its sessions (its ``NodeLink``)."""

    def __init__(
        self,
        node_id: str,
        resume_window_s: float,
        retain_bytes: int,
        message_bytes: int | None = None,
    ) -> None:
        """``message_bytes``: what each message it keeps counts for (its chunk size)."""
        self.node_id = node_id
        self.resume_window_s = resume_window_s
        self.numbering: Numbering[pb.OpenSessionResponse] = Numbering(
            lambda exchange, count: pb.OpenSessionResponse(exchange_id=exchange, ack=count),
            retain_bytes,
            message_bytes,
        )
        self.session: Session | None = None
        self.resumes = 0  # cycles resumed after a reconnection
        self._lock = threading.Lock()
        self._attached = threading.Condition(self._lock)  # told when a session attaches
        self._inboxes: dict[int, Inbox[Reply]] = {}
        self._cycles: set[int] = set()
        self._ids = itertools.count(1)
        self._lost: threading.Timer | None = None

    @property
    def address(self) -> str:
        session = self.session
        return session.address if session is not None else f"no session of {self.node_id}"

    # -- sessions (tapestry.coordinator.members) ---------------------------------------------

    def attach(self, session: Session, held: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
        """``session`` is now the member's; ``held`` are the node's ``(exchange, received)``
        from its SessionOpen. The cycles both hold resume (their unacknowledged messages are
        queued again), and so does one of which the node took nothing (it never began it:
        from its first message); the others fail. Returns ours, for the welcome."""
        node_has = dict(held)
        with self._lock:
            if self._lost is not None:
                self._lost.cancel()
                self._lost = None
            self.session = session
            self._attached.notify_all()
            # A cycle the node does not hold, of which it took nothing (its first message
            # was lost with the session), starts again from that message.
            for key in self._cycles:
                if key not in node_has and self.numbering.untouched(key):
                    node_has[key] = 0
            resumed = [key for key in self._cycles if key in node_has]
            lost = [key for key in self._inboxes if key not in resumed]
            self.resumes += len(resumed)
        for key in lost:
            lost_it = "the node no longer holds the cycle (it restarted?)"
            self._fail(key, LinkError(grpc.StatusCode.UNAVAILABLE, lost_it))
        self.numbering.attach(session.outboxes, [(key, node_has[key]) for key in resumed])
        return [(key, received) for key, received in self.numbering.states() if key in resumed]

    def detach(self, session: Session) -> None:
        """``session`` ended: a describe on it fails now (and is asked again on the next,
        :meth:`describe`); a cycle waits for the next session up to ``resume_window_s``,
        then fails."""
        with self._lock:
            if self.session is not session:
                return
            self.session = None
            describes = [key for key in self._inboxes if key not in self._cycles]
            if self._cycles:
                self._lost = threading.Timer(self.resume_window_s, self._give_up, (session,))
                self._lost.daemon = True
                self._lost.start()
        self.numbering.detach(session.outbox)
        error = session.ended or LinkError(grpc.StatusCode.UNAVAILABLE, "the session ended")
        for key in describes:
            self._fail(key, error)

    def _give_up(self, session: Session) -> None:
        why = session.ended.details() if session.ended is not None else "the session ended"
        with self._lock:
            if self.session is not None:
                return
            keys = list(self._inboxes)
        gone = LinkError(
            grpc.StatusCode.UNAVAILABLE,
            f"{why}; the node did not dial again within resume_window_s = "
            f"{self.resume_window_s:g} s",
        )
        for key in keys:
            self._fail(key, gone)

    def _fail(self, key: int, error: LinkError) -> None:
        with self._lock:
            inbox = self._inboxes.pop(key, None)
            self._cycles.discard(key)
        self.numbering.close(key)
        if inbox is not None:
            inbox.fail(error, discard=False)

    def receive(self, message: pb.OpenSessionRequest, session: Session, lane: int = 0) -> None:
        """Hand a message from the node, arrived on ``lane`` of ``session``, to its exchange
        (the lane's reader thread): each numbered one once, in order; one of an exchange
        already over is dropped. A second ``open``, one that carries nothing, an unnumbered
        one on a further lane, or a numbered one out of its turn is a :class:`LinkError`
        (INVALID_ARGUMENT) that ends the session."""
        if message.ack:
            self.numbering.acknowledged(message.exchange_id, message.ack)
        kind = message.WhichOneof("item")
        if kind is None and message.ack:
            return
        if kind not in ("described", "cycle", "end"):
            what = "a second SessionOpen" if kind == "open" else "a message with no item"
            raise LinkError(grpc.StatusCode.INVALID_ARGUMENT, f"the node sent {what}")
        if not message.seq:
            if lane:
                raise LinkError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"the node sent an unnumbered message on lane {lane}",
                )
            self._hand_on(message.exchange_id, getattr(message, kind))
            return
        try:
            self.numbering.take(
                message,
                lambda: self._hand_on(message.exchange_id, getattr(message, kind)),
                lane=lane,
                lanes=session.lanes,
                ack_now=kind == "end",
                gone=session.gone,
            )
        except OutOfOrder as error:
            raise LinkError(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None

    def _hand_on(self, key: int, item: Reply) -> None:
        with self._lock:
            inbox = self._inboxes.get(key)
        if inbox is not None:
            inbox.put(item)

    # -- the round's side (NodeLink) -------------------------------------------------------

    def _open(self, cycle: bool) -> tuple[int, Inbox[Reply]]:
        inbox: Inbox[Reply] = Inbox()
        with self._lock:
            if self.session is None:
                raise LinkError(
                    grpc.StatusCode.UNAVAILABLE, f"node {self.node_id} holds no session"
                )
            key = next(self._ids)
            self._inboxes[key] = inbox
            if cycle:
                self._cycles.add(key)
                self.numbering.open(key)
        return key, inbox

    def forget(self, key: int) -> None:
        """The exchange is over: what the node sends for it is dropped, and a reader waiting
        to hand it a message (its queue full) goes on."""
        with self._lock:
            inbox = self._inboxes.pop(key, None)
            self._cycles.discard(key)
        self.numbering.close(key)
        if inbox is not None:
            inbox.fail(LinkError(grpc.StatusCode.CANCELLED, "the exchange is over"), discard=True)

    def control(self, message: pb.OpenSessionResponse) -> None:
        """Queue an unnumbered message on the session now open (dropped without one); a node
        that has not taken the control messages already queued for it loses its session
        (RESOURCE_EXHAUSTED)."""
        session = self.session
        if session is None:
            return
        try:
            session.outbox.control(message)
        except OutboxClosed:
            pass
        except OutboxFull as full:
            why = f"the node did not read its session: {full}"
            session.end(LinkError(grpc.StatusCode.RESOURCE_EXHAUSTED, why))

    def describe(self, timeout_s: float, *, again: bool = True) -> pb.DescribeResponse:
        """The node's ``Describe``, answered within ``timeout_s``. With ``again``, a
        session that drops before the answer (UNAVAILABLE: the node dials again) is waited
        for as a cycle waits, up to ``resume_window_s``, and the node asked again on its
        next one: a describe changes nothing, so asking twice is safe. At most
        :data:`DESCRIBE_ATTEMPTS` sessions are asked, all within ``timeout_s`` plus
        ``resume_window_s``, so a member that drops its session again and again holds the
        round's start no longer than one cut cycle would. Without (a session's admission
        check: the next session is checked on its own), it fails at once."""
        attempts = DESCRIBE_ATTEMPTS if again else 1
        give_up = time.monotonic() + timeout_s + self.resume_window_s
        for attempt in range(1, attempts + 1):
            try:
                return self._describe_once(min(timeout_s, give_up - time.monotonic()))
            except LinkError as error:
                if (
                    error.code() is not grpc.StatusCode.UNAVAILABLE
                    or attempt == attempts
                    or not self._session_back(min(self.resume_window_s, give_up - time.monotonic()))
                ):
                    raise
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    def _session_back(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for a session to be attached; whether one is."""
        with self._attached:
            return self._attached.wait_for(lambda: self.session is not None, timeout_s)

    def _describe_once(self, timeout_s: float) -> pb.DescribeResponse:
        key, replies = self._open(cycle=False)
        deadline = time.monotonic() + timeout_s
        try:
            self.control(pb.OpenSessionResponse(exchange_id=key, describe=pb.DescribeRequest()))
            reply = _take(replies, deadline, "describe")
        finally:
            self.forget(key)
        if isinstance(reply, pb.DescribeResponse):
            return reply
        if isinstance(reply, pb.ExchangeEnd) and reply.code:
            raise LinkError(status_code(reply.code), reply.message[:MAX_ERROR_DETAILS_CHARS])
        raise LinkError(grpc.StatusCode.INVALID_ARGUMENT, "the node answered a describe wrongly")

    def cycle(self, requests: Iterator[pb.RunSovereignCycleRequest], timeout_s: float) -> CycleCall:
        key, replies = self._open(cycle=True)
        return SessionCall(self, key, replies, requests, time.monotonic() + timeout_s)

    def close(self) -> None:
        """Nothing to release per round: the link outlives it."""


class SessionCall:
    """A cycle over a member's sessions: a thread sends the requests as they come (numbered,
    bounded by what the node has not acknowledged), then their end; iterating yields the
    node's replies until its end. Past the deadline, or on :meth:`cancel`, the node is told
    the cycle is cancelled."""

    def __init__(
        self,
        link: MemberLink,
        key: int,
        replies: Inbox[Reply],
        requests: Iterator[pb.RunSovereignCycleRequest],
        deadline: float,
    ) -> None:
        self._link = link
        self._key = key
        self._replies = replies
        self._deadline = deadline
        self._done = threading.Event()
        threading.Thread(
            target=self._send_requests, args=(requests,), name="session-cycle", daemon=True
        ).start()

    def _send(self, message: pb.OpenSessionResponse) -> None:
        try:
            self._link.numbering.send(message, deadline=self._deadline, gone=self._done)
        except OutboxClosed:
            raise LinkError(grpc.StatusCode.CANCELLED, "the cycle ended") from None
        except TimeoutError as error:
            raise LinkError(grpc.StatusCode.DEADLINE_EXCEEDED, str(error)) from None

    def _send_requests(self, requests: Iterator[pb.RunSovereignCycleRequest]) -> None:
        try:
            for request in requests:
                if self._done.is_set():
                    return
                message = pb.OpenSessionResponse(exchange_id=self._key)
                # CopyFrom, not cycle=request: protobuf's constructor merges the chunk's
                # bytes (upb: ~1.5 ms per MiB, against ~30 us for a copy).
                message.cycle.CopyFrom(request)
                self._send(message)
            if not self._done.is_set():  # the half-close, numbered: after the requests
                end = pb.ExchangeEnd(code=grpc.StatusCode.OK.value[0])
                self._send(pb.OpenSessionResponse(exchange_id=self._key, end=end))
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
        self._link.forget(self._key)
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
        self._link.control(pb.OpenSessionResponse(exchange_id=self._key, end=end))
        return True


def _take(replies: Inbox[Reply], deadline: float, what: str) -> Reply:
    try:
        return replies.take(deadline)
    except TimeoutError:
        raise LinkError(
            grpc.StatusCode.DEADLINE_EXCEEDED, f"the node did not answer the {what} in time"
        ) from None
