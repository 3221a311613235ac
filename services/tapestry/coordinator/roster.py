"""The nodes a round runs over: one :class:`RemoteSovereignNode` per member of the consortium
file, in its order, over the link that reaches it.

A member with an ``address`` listens there and is dialed (its proxy is kept). Any other
member dials out: a round counts the session it holds at the round's start, and a member
without one fails at once in that round, saying so (a node that connects mid-round joins at
the next).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import grpc

from tapestry.config import ConsortiumConfig, MemberConfig
from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.coordinator.base_proofs import base_proofs, receipts
from tapestry.coordinator.journal import CoordinatorStore
from tapestry.coordinator.members import Members
from tapestry.coordinator.node_links import CycleCall, DialedLink, LinkError, NodeLink
from tapestry.coordinator.remote_node import RemoteSovereignNode
from tapestry.coordinator.sent_deltas import SentDeltas
from tapestry.coordinator.sessions import MemberLink
from tapestry.observe.metrics import CoordinatorMetrics
from tapestry.pki.serving import ServerSecurity
from tapestry.pki.statements import SignatureCheck
from tapestry.training.consortium.tensors import StateLayout
from tapestry.wire.delta_encoding import DeltaEncoding
from tapestry.wire.windows import window_bytes

# What a chunk's message carries besides its bytes (name, shape, offsets, numbers), at most.
CHUNK_HEADER_BYTES = 1024


class Absent:
    """The link of a member that holds no session: every call fails at once (UNAVAILABLE),
    naming the member and why."""

    def __init__(self, node_id: str, why: str) -> None:
        self._error = LinkError(grpc.StatusCode.UNAVAILABLE, why)
        self._address = f"no session of {node_id}"

    @property
    def address(self) -> str:
        return self._address

    @property
    def resumes(self) -> int:
        return 0

    def describe(self, timeout_s: float, *, again: bool = True) -> pb.DescribeResponse:
        raise self._error

    def cycle(self, requests: Iterator[pb.RunSovereignCycleRequest], timeout_s: float) -> CycleCall:
        raise self._error

    def close(self) -> None:
        pass


class Roster:
    """Members, their sessions (:attr:`members`) and the proxies a round runs over."""

    def __init__(
        self,
        config: ConsortiumConfig,
        layout: StateLayout,
        store: CoordinatorStore,
        security: ServerSecurity,
        metrics: CoordinatorMetrics,
        sent_deltas: SentDeltas | None = None,
        records: Callable[[], Sequence[pb.RoundRecord]] = list,
    ) -> None:
        """``layout`` is what every member's state must hold; ``security`` gives the
        credentials to dial members that listen, and the CRL that ends a revoked member's
        session; ``sent_deltas``, the deltas each member sent (one sent again is refused);
        ``records``, the journal's committed records now (the proofs of each base a node is
        sent come from them)."""
        self._records = records
        tls = config.tls  # with a CA, a member's evaluation counts only signed by it
        self._signatures = None if tls is None else SignatureCheck(tls.ca, tls.crl)
        self.sent_deltas = sent_deltas if sent_deltas is not None else SentDeltas()
        self._config = config
        self._layout = layout
        self._store = store
        self._security = security
        self._metrics = metrics
        self._by_id = {member.node_id: member for member in config.nodes}
        window = window_bytes(config.link, len(config.nodes))
        self.members = Members(
            [(member.node_id, member.jurisdiction) for member in config.nodes],
            security.revocations,
            resume_window_s=config.resume_window_s,
            # what a cycle keeps to send again after a reconnection: its lanes' windows
            retain_bytes=window * config.link.streams,
            metrics=metrics,
            # each kept chunk counted at its chunk size (plus a header), not encoded to size it
            message_bytes=config.chunk_bytes + CHUNK_HEADER_BYTES,
            lanes=config.link.streams,
        )
        self.dialed = [
            self._proxy(
                member,
                DialedLink(member.node_id, member.address, security.channel_credentials, window),
            )
            for member in config.nodes
            if member.address
        ]

    def _proxy(self, member: MemberConfig, link: NodeLink | str) -> RemoteSovereignNode:
        config = self._config
        return RemoteSovereignNode(
            member.node_id,
            member.jurisdiction,
            link,
            model=config.model,
            state_layout=self._layout,
            consortium_id=config.consortium_id,
            timeout_s=config.node_timeout_s,
            chunk_bytes=config.chunk_bytes,
            spill_dir=self._store.spill_dir,
            credentials=self._security.channel_credentials,
            server_check=self._security.server_check if isinstance(link, DialedLink) else None,
            count_sent=self._metrics.base_sent(member.node_id),
            count_received=self._metrics.delta_received(member.node_id),
            delta_encoding=DeltaEncoding(config.delta_encoding),
            sent_deltas=self.sent_deltas,
            evaluation_timeout_s=config.policy.acceptance.timeout_s,
            count_candidate_sent=self._metrics.candidate_sent(member.node_id),
            signatures=self._signatures,
            base_proofs=lambda since: base_proofs(self._records(), since),
            receipts=lambda since: receipts(self._records(), since),
        )

    def for_round(self) -> list[RemoteSovereignNode]:
        """The round's nodes, in the consortium file's order: each member's session as it
        is now (or its dialed proxy)."""
        dialed = {node.node_id: node for node in self.dialed}
        sessions = self.members.connected()
        nodes = []
        for member in self._config.nodes:
            node_id = member.node_id
            if node_id in dialed:
                nodes.append(dialed[node_id])
            elif node_id in sessions:
                nodes.append(self._proxy(member, sessions[node_id]))
            else:
                why = (
                    f"node {node_id} holds no session with the coordinator: it is not running, "
                    "cannot reach the coordinator, or was refused (tapestry nodes shows when it "
                    "was last seen and why its session ended)"
                )
                nodes.append(self._proxy(member, Absent(node_id, why)))
        return nodes

    def check(self, link: MemberLink) -> None:
        """The identity check of a session that just opened: the node must describe itself
        as its member, training the consortium's model (raises the proxy's mismatch). A
        session that drops meanwhile fails it at once: the next is checked on its own."""
        self._proxy(self._by_id[link.node_id], link).check_identity(again=False)

    def close(self) -> None:
        self.members.end_all("the coordinator is stopping")
        for node in self.dialed:
            node.close()
