"""The consortium's members and their sessions: who holds one now, since when, who last
did, and why it ended. One session per node id: a newer session replaces an older one only
when it comes with the same certificate (a node that reconnects before the coordinator
noticed its old connection drop); with another certificate it is refused, and both events
are logged. A member whose certificate is revoked loses its session within
:data:`REVOCATION_POLL_S` of the CRL file changing (no restart).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.coordinator.node_links import LinkError
from tapestry.coordinator.sessions import MemberLink, Session, SessionOpened
from tapestry.observe.metrics import CoordinatorMetrics
from tapestry.pki.access import RevocationList

log = logging.getLogger(__name__)

# How often the CRL file is checked for a change that revokes a member holding a session.
REVOCATION_POLL_S = 1.0


@dataclass
class _Member:
    node_id: str
    jurisdiction: str
    link: MemberLink
    session: Session | None = None
    last: Session | None = None  # the latest session, open or ended
    ended_reason: str = ""


class SessionRefused(Exception):
    """A session cannot open: ``code`` and a message for the node."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class Members:
    """The members of the consortium file, in its order, and their sessions."""

    def __init__(
        self,
        members: Sequence[tuple[str, str]],
        revocations: RevocationList | None = None,
        *,
        resume_window_s: float = 120.0,
        retain_bytes: int = 64 << 20,
        metrics: CoordinatorMetrics | None = None,
        message_bytes: int | None = None,
        lanes: int = 1,
    ) -> None:
        """``members`` are ``(node_id, jurisdiction)`` pairs; with ``revocations`` a
        thread ends the session of a member whose certificate the CRL comes to list. A
        member's cycles wait ``resume_window_s`` for it to dial again after its session
        dropped, each keeping at most ``retain_bytes`` to send again
        (:class:`~tapestry.coordinator.sessions.MemberLink`); each session spreads its
        transfers over ``lanes`` connections."""
        self._lanes = lanes
        self._members = {
            node_id: _Member(
                node_id, place, MemberLink(node_id, resume_window_s, retain_bytes, message_bytes)
            )
            for node_id, place in members
        }
        self._lock = threading.Lock()
        self._metrics = metrics
        self._revocations = revocations
        self._stop = threading.Event()
        if revocations is not None:
            threading.Thread(target=self._watch_revocations, name="crl-watch", daemon=True).start()

    def jurisdiction(self, node_id: str) -> str | None:
        member = self._members.get(node_id)
        return member.jurisdiction if member is not None else None

    def link(self, node_id: str) -> MemberLink:
        return self._members[node_id].link

    def join(
        self,
        opened: SessionOpened,
        held: Sequence[tuple[int, int]] = (),
        hang_up: Callable[[], None] | None = None,
    ) -> tuple[Session, list[tuple[int, int]]]:
        """A session for ``opened.node_id``, replacing an older one with the same
        certificate (:class:`SessionRefused` ALREADY_EXISTS with another), and the cycles it
        resumes (``held``: the node's, from its SessionOpen; see
        :meth:`MemberLink.attach`); ``hang_up`` cancels its call (:class:`Session`)."""
        member = self._members[opened.node_id]
        with self._lock:
            older = member.session
            if older is not None and older.ended is None:
                if older.opened.serial != opened.serial:
                    log.warning(
                        "refused a second session for node %s from %s: its session from %s "
                        "holds another certificate",
                        opened.node_id,
                        opened.address,
                        older.opened.address,
                    )
                    raise SessionRefused(
                        grpc.StatusCode.ALREADY_EXISTS,
                        f"node {opened.node_id!r} already holds a session (from "
                        f"{older.opened.address}, since {older.opened.since:%Y-%m-%d %H:%M:%S} "
                        "UTC) with another certificate; only one session per node",
                    )
                log.warning(
                    "node %s opened a new session from %s: it replaces the one from %s",
                    opened.node_id,
                    opened.address,
                    older.opened.address,
                )
            # Made once it is admitted: a refused one would still wait for its lanes.
            session = Session(opened, hang_up, self._lanes)
            member.session = member.last = session
            resumed = member.link.attach(session, held)
        if older is not None:
            older.end(
                LinkError(
                    grpc.StatusCode.ABORTED,
                    f"replaced by a newer session of the same node from {opened.address}",
                )
            )
        if self._metrics is not None:
            self._metrics.sessions.labels(node=opened.node_id).inc()
            self._metrics.resumes.labels(node=opened.node_id).inc(len(resumed))
        log.info(
            "node %s joined from %s%s",
            opened.node_id,
            opened.address,
            f", resuming {len(resumed)} cycle(s)" if resumed else "",
        )
        return session, resumed

    def join_lane(
        self, opened: SessionOpened, lane: int, key: bytes, hang_up: Callable[[], None]
    ) -> Session:
        """The session that lane ``lane`` of ``opened.node_id`` joins with ``key``: the
        member's open session, with the same certificate (:class:`SessionRefused` with the
        code to answer otherwise)."""
        with self._lock:
            session = self._members[opened.node_id].session
        if session is None or session.ended is not None:
            raise SessionRefused(
                grpc.StatusCode.UNAVAILABLE, f"node {opened.node_id!r} holds no session to join"
            )
        if session.opened.serial != opened.serial:
            raise SessionRefused(
                grpc.StatusCode.PERMISSION_DENIED,
                f"the session of node {opened.node_id!r} holds another certificate",
            )
        try:
            session.join_lane(lane, key, hang_up)
        except LinkError as error:
            raise SessionRefused(error.code(), error.details()) from None
        return session

    def leave(self, session: Session) -> None:
        """Forget ``session`` once its stream has ended (a newer one may hold its place)."""
        member = self._members[session.opened.node_id]
        reason = session.ended.details() if session.ended is not None else "ended"
        with self._lock:
            if member.session is session:
                member.session = None
                member.ended_reason = reason
        member.link.detach(session)
        log.info("node %s left: %s", session.opened.node_id, reason)

    def connected(self) -> dict[str, MemberLink]:
        """The links of the members holding a session now, by node id: a round counts
        these members only."""
        with self._lock:
            return {
                node_id: member.link
                for node_id, member in self._members.items()
                if member.session is not None and member.session.ended is None
            }

    def sessions(self) -> list[Session]:
        """The sessions open now."""
        with self._lock:
            return [
                member.session
                for member in self._members.values()
                if member.session is not None and member.session.ended is None
            ]

    def listing(self) -> list[pb.MemberSession]:
        """Every member, in the consortium file's order, as ``ListMembers`` shows it."""
        with self._lock:
            return [_listed(member) for member in self._members.values()]

    def end_all(self, reason: str) -> None:
        """End every session (the coordinator is stopping)."""
        self._stop.set()
        for session in self.sessions():
            session.end(LinkError(grpc.StatusCode.UNAVAILABLE, reason))

    def _watch_revocations(self) -> None:
        assert self._revocations is not None
        while not self._stop.wait(REVOCATION_POLL_S):
            revoked = self._revocations.serials()
            for session in self.sessions():
                if session.opened.serial in revoked:
                    log.warning(
                        "node %s: its certificate (serial %x) is revoked; session ended",
                        session.opened.node_id,
                        session.opened.serial,
                    )
                    session.end(
                        LinkError(
                            grpc.StatusCode.PERMISSION_DENIED,
                            f"the certificate of node {session.opened.node_id} (serial "
                            f"{session.opened.serial:x}) is revoked",
                        )
                    )


def _timestamp(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def _listed(member: _Member) -> pb.MemberSession:
    listed = pb.MemberSession(node_id=member.node_id, jurisdiction=member.jurisdiction)
    last = member.last
    if last is None:
        return listed
    listed.connected = member.session is not None and last.ended is None
    listed.since.CopyFrom(_timestamp(last.opened.since))
    listed.last_seen.CopyFrom(_timestamp(last.last_seen))
    listed.protocol_version = last.opened.protocol_version
    listed.release = last.opened.release
    listed.address = last.opened.address
    if not listed.connected:
        listed.ended_reason = member.ended_reason or (
            last.ended.details() if last.ended is not None else ""
        )
    return listed
