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
from tapestry.coordinator.sessions import Session, SessionOpened
from tapestry.pki.access import RevocationList

log = logging.getLogger(__name__)

# How often the CRL file is checked for a change that revokes a member holding a session.
REVOCATION_POLL_S = 1.0


@dataclass
class _Member:
    node_id: str
    jurisdiction: str
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
    ) -> None:
        """``members`` are ``(node_id, jurisdiction)`` pairs; with ``revocations`` a
        thread ends the session of a member whose certificate the CRL comes to list."""
        self._members = {node_id: _Member(node_id, place) for node_id, place in members}
        self._lock = threading.Lock()
        self._revocations = revocations
        self._stop = threading.Event()
        if revocations is not None:
            threading.Thread(target=self._watch_revocations, name="crl-watch", daemon=True).start()

    def jurisdiction(self, node_id: str) -> str | None:
        member = self._members.get(node_id)
        return member.jurisdiction if member is not None else None

    def join(self, opened: SessionOpened, hang_up: Callable[[], None] | None = None) -> Session:
        """A session for ``opened.node_id``, replacing an older one with the same
        certificate (:class:`SessionRefused` ALREADY_EXISTS with another); ``hang_up``
        cancels its call (:class:`Session`)."""
        member = self._members[opened.node_id]
        session = Session(opened, hang_up)
        with self._lock:
            held = member.session
            if held is not None and held.ended is None:
                if held.opened.serial != opened.serial:
                    log.warning(
                        "refused a second session for node %s from %s: its session from %s "
                        "holds another certificate",
                        opened.node_id,
                        opened.address,
                        held.opened.address,
                    )
                    raise SessionRefused(
                        grpc.StatusCode.ALREADY_EXISTS,
                        f"node {opened.node_id!r} already holds a session (from "
                        f"{held.opened.address}, since {held.opened.since:%Y-%m-%d %H:%M:%S} "
                        "UTC) with another certificate; only one session per node",
                    )
                log.warning(
                    "node %s opened a new session from %s: it replaces the one from %s",
                    opened.node_id,
                    opened.address,
                    held.opened.address,
                )
            member.session = member.last = session
        if held is not None:
            held.end(
                LinkError(
                    grpc.StatusCode.ABORTED,
                    f"replaced by a newer session of the same node from {opened.address}",
                )
            )
        log.info("node %s joined from %s", opened.node_id, opened.address)
        return session

    def leave(self, session: Session) -> None:
        """Forget ``session`` once its stream has ended (a newer one may hold its place)."""
        member = self._members[session.opened.node_id]
        reason = session.ended.details() if session.ended is not None else "ended"
        with self._lock:
            if member.session is session:
                member.session = None
                member.ended_reason = reason
        log.info("node %s left: %s", session.opened.node_id, reason)

    def connected(self) -> dict[str, Session]:
        """The sessions open now, by node id: a round counts these members only."""
        with self._lock:
            return {
                node_id: member.session
                for node_id, member in self._members.items()
                if member.session is not None and member.session.ended is None
            }

    def listing(self) -> list[pb.MemberSession]:
        """Every member, in the consortium file's order, as ``ListMembers`` shows it."""
        with self._lock:
            return [_listed(member) for member in self._members.values()]

    def end_all(self, reason: str) -> None:
        """End every session (the coordinator is stopping)."""
        self._stop.set()
        for session in self.connected().values():
            session.end(LinkError(grpc.StatusCode.UNAVAILABLE, reason))

    def _watch_revocations(self) -> None:
        assert self._revocations is not None
        while not self._stop.wait(REVOCATION_POLL_S):
            revoked = self._revocations.serials()
            for session in self.connected().values():
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
