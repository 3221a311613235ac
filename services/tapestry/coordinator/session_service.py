"""``OpenSession``: a member's node dials out and holds its session here.

The opening is checked before anything is sent back: the first message must be a
:class:`SessionOpen` within :data:`OPEN_TIMEOUT_S`, speaking :data:`PROTOCOL_VERSION` (another
is refused naming both), for this consortium, from a member the consortium file lists (with
mutual TLS, the node id is its certificate's, whatever the message says) in the
jurisdiction the file gives it. The coordinator then welcomes it with the consortium's model
spec and checks, on its own thread, that the node describes itself as that member training
that model (as a round does before sending weights): a node that does not is told why and its
session ends (FAILED_PRECONDITION).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import grpc

from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.coordinator.members import Members, SessionRefused
from tapestry.coordinator.node_links import LinkError
from tapestry.coordinator.remote_node import NodeCallFailed
from tapestry.coordinator.sessions import MemberLink, Session, SessionOpened
from tapestry.errors import quoted
from tapestry.limits import MAX_EXCHANGES, MAX_PEER_NAME_CHARS
from tapestry.pki.access import calling_peer
from tapestry.training.consortium.models.spec import ModelSpec
from tapestry.wire import codec

log = logging.getLogger(__name__)

PROTOCOL_VERSION = pb.SESSION_PROTOCOL_V1
# A node's SessionOpen must arrive this soon after its call opens, or the call is cancelled.
OPEN_TIMEOUT_S = 10.0
# Why a session ended when the node's call broke off (its connection, or its cancel).
_NODE_DROPPED = "the node's connection dropped"
# Codes that end a session without a word from the coordinator (the node went away).
_SILENT = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


class Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class SessionDoor:
    """Opens members' sessions into ``members``; ``check`` is the identity check a joined
    session must pass (raising with the reason); ``secure`` when the server serves mutual
    TLS (the node id is then the certificate's)."""

    def __init__(
        self,
        members: Members,
        consortium_id: str,
        spec: ModelSpec,
        round_num: Callable[[], int],
        check: Callable[[MemberLink], None],
        *,
        secure: bool,
    ) -> None:
        self._members = members
        self._consortium_id = consortium_id
        self._spec = spec
        self._round_num = round_num
        self._check = check
        self._secure = secure

    def open(
        self, requests: Iterator[pb.OpenSessionRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.OpenSessionResponse]:
        first = _first(requests, context)
        handled = threading.Event()

        def hang_up() -> None:  # the session ended, and this handler is still held
            if not handled.is_set():
                context.cancel()

        try:
            opened = self._opened(first, context)
            assert first is not None  # _opened refused a stream without one
            lane = first.open.lane
            if lane:
                session = self._members.join_lane(opened, lane, first.open.lane_key, hang_up)
            else:
                held = [(e.exchange_id, e.received) for e in first.open.exchanges[:MAX_EXCHANGES]]
                session, resumed = self._members.join(opened, held, hang_up)
        except (Refused, SessionRefused) as refused:
            log.warning("session refused: %s", refused)
            context.abort(refused.code, str(refused))
        link = self._members.link(opened.node_id)
        try:
            if not lane:
                yield self._welcome(session, resumed)
                threading.Thread(
                    target=self._admit, args=(session,), name="session-check", daemon=True
                ).start()
            threading.Thread(
                target=_read,
                args=(requests, session, link, lane),
                name=f"session-reader-{lane}",
                daemon=True,
            ).start()
            yield from session.outboxes[lane].messages()
        finally:
            handled.set()
            # gRPC also closes this generator when the node hangs up (a node that refuses
            # the welcome, say) before the reader has noticed: that is the node's doing.
            # A lane that ends ends its session.
            session.end(
                LinkError(grpc.StatusCode.CANCELLED, "the coordinator ended the call")
                if context.is_active()
                else LinkError(grpc.StatusCode.UNAVAILABLE, _NODE_DROPPED)
            )
            if not lane:
                self._members.leave(session)
        ended = session.ended
        if ended is not None and ended.code() not in _SILENT:
            context.abort(ended.code(), ended.details())

    def _welcome(self, session: Session, resumed: list[tuple[int, int]]) -> pb.OpenSessionResponse:
        return pb.OpenSessionResponse(
            welcome=pb.SessionWelcome(
                protocol_version=PROTOCOL_VERSION,
                consortium_id=self._consortium_id,
                model=codec.model_spec_to_proto(self._spec),
                model_sha256=self._spec.digest(),
                round_num=self._round_num(),
                exchanges=[
                    pb.ExchangeState(exchange_id=key, received=count) for key, count in resumed
                ],
                lanes=session.lanes,
                lane_key=session.lane_key,
            )
        )

    def _admit(self, session: Session) -> None:
        try:
            self._check(self._members.link(session.opened.node_id))
        except LinkError:
            return  # the session ended while it was checked: its end says why
        except NodeCallFailed as problem:  # unanswered is not refused: the node dials again
            if session.ended is not None:
                return  # it ended while it was checked: its end says why
            log.warning(
                "node %s did not answer at its session's opening: %s",
                session.opened.node_id,
                problem,
            )
            session.end(LinkError(grpc.StatusCode.UNAVAILABLE, str(problem)))
        except Exception as problem:
            log.warning(
                "node %s refused at its session's opening: %s", session.opened.node_id, problem
            )
            session.end(LinkError(grpc.StatusCode.FAILED_PRECONDITION, str(problem)))
        else:
            log.info("node %s: identity and model confirmed", session.opened.node_id)

    def _opened(
        self, first: pb.OpenSessionRequest | None, context: grpc.ServicerContext
    ) -> SessionOpened:
        """Who opens the session, checked (:class:`Refused`, with the code to answer)."""
        if first is None or first.WhichOneof("item") != "open":
            raise Refused(
                grpc.StatusCode.INVALID_ARGUMENT,
                "a session must begin with a SessionOpen message",
            )
        hello = first.open
        if hello.protocol_version != PROTOCOL_VERSION:
            raise Refused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"the node speaks session protocol version {hello.protocol_version}; this "
                f"coordinator speaks version {PROTOCOL_VERSION}: upgrade the older of the two",
            )
        if hello.consortium_id != self._consortium_id:
            raise Refused(
                grpc.StatusCode.PERMISSION_DENIED,
                f"the node serves consortium {quoted(hello.consortium_id)}, this coordinator "
                f"{self._consortium_id!r}",
            )
        node_id = hello.node_id
        serial = None
        if self._secure:
            peer = calling_peer(context)
            if peer is None or peer.role != "node":
                raise Refused(grpc.StatusCode.PERMISSION_DENIED, "only a node opens a session")
            if peer.name != node_id:
                raise Refused(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"the node says it is {quoted(node_id, MAX_PEER_NAME_CHARS)} but its "
                    f"certificate names node {peer.name!r}",
                )
            serial = peer.serial
        jurisdiction = self._members.jurisdiction(node_id)
        if jurisdiction is None:
            raise Refused(
                grpc.StatusCode.PERMISSION_DENIED,
                f"node {quoted(node_id, MAX_PEER_NAME_CHARS)} is not a member: the consortium "
                "file does not list it",
            )
        if hello.jurisdiction != jurisdiction:
            raise Refused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"node {node_id!r} says it serves jurisdiction "
                f"{quoted(hello.jurisdiction, MAX_PEER_NAME_CHARS)}; the consortium file "
                f"gives {jurisdiction!r}",
            )
        return SessionOpened(
            node_id=node_id,
            address=context.peer()[:MAX_PEER_NAME_CHARS],
            protocol_version=hello.protocol_version,
            release=hello.release[:MAX_PEER_NAME_CHARS],
            serial=serial,
            since=datetime.now(UTC),
        )


def _first(
    requests: Iterator[pb.OpenSessionRequest], context: grpc.ServicerContext
) -> pb.OpenSessionRequest | None:
    """The session's first message, or None if it does not come within
    :data:`OPEN_TIMEOUT_S` (the call is then cancelled) or the stream ends first."""
    timer = threading.Timer(OPEN_TIMEOUT_S, context.cancel)
    timer.daemon = True
    timer.start()
    try:
        return next(requests, None)
    except Exception:  # the call ended (cancelled at the deadline, or by the node)
        return None
    finally:
        timer.cancel()


def _read(
    requests: Iterator[pb.OpenSessionRequest], session: Session, link: MemberLink, lane: int
) -> None:
    """Hand each message of the node on ``lane`` of ``session`` to its exchange, until the
    stream ends, while this session is the member's (a replaced one's late messages are not
    taken)."""
    why = LinkError(grpc.StatusCode.UNAVAILABLE, "the node closed its session")
    try:
        for message in requests:
            if session.ended is not None or link.session is not session:
                return
            session.last_seen = datetime.now(UTC)
            link.receive(message, session, lane)
    except LinkError as error:
        why = error
    except Exception:
        why = LinkError(grpc.StatusCode.UNAVAILABLE, _NODE_DROPPED)
    session.end(why)
