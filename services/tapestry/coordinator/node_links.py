"""How the coordinator reaches a node: the two calls a cycle needs, whichever side opened the
TCP connection.

A :class:`NodeLink` answers ``describe`` and opens a ``cycle`` call (the node's
``RunSovereignCycle`` request and reply streams). :class:`DialedLink` is the coordinator
calling a node that listens (a member whose consortium-file entry has an ``address``);
:class:`~tapestry.coordinator.sessions.SessionLink` is a node that dialed out and holds a
session (the default: the node opens no listening socket). The cycle itself is one
implementation on each side, :class:`~tapestry.coordinator.remote_node.RemoteSovereignNode`
and :class:`~tapestry.node.servicer.SovereignNodeServicer`, whichever link carries it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import grpc

from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.consortium.v1 import consortium_pb2_grpc as pb_grpc
from tapestry.limits import MIN_WINDOW_BYTES
from tapestry.pki.layout import node_server_name
from tapestry.wire.grpc_plumbing import node_channel
from tapestry.wire.windows import window_options


class CycleCall(Protocol):
    """A cycle's reply stream: iterate it for the node's messages (a failure raises a
    :class:`grpc.RpcError`); ``cancel`` ends the call at once, from any thread."""

    def __iter__(self) -> Iterator[pb.RunSovereignCycleResponse]: ...

    def __next__(self) -> pb.RunSovereignCycleResponse: ...

    def cancel(self) -> bool: ...


class NodeLink(Protocol):
    """The two calls the coordinator makes on a node; ``address`` names where the node is,
    for messages; ``resumes`` counts the cycles it resumed after a reconnection so far."""

    @property
    def address(self) -> str: ...

    @property
    def resumes(self) -> int: ...

    def describe(self, timeout_s: float, *, again: bool = True) -> pb.DescribeResponse:
        """The node's ``Describe``; ``again``: one cut by a dropped connection is asked
        again on the next (a round's check; a session's admission check is not)."""
        ...

    def cycle(
        self, requests: Iterator[pb.RunSovereignCycleRequest], timeout_s: float
    ) -> CycleCall: ...

    def close(self) -> None: ...


class LinkError(grpc.RpcError):
    """A call over a link failed: a status ``code`` and ``details``, as a gRPC call's error
    carries them (so :func:`~tapestry.wire.status.describe_rpc_error` words both alike)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class DialedLink:
    """A node that listens at ``address``, called over a channel the coordinator opens:
    mutual TLS with ``credentials``, the handshake refusing a server whose certificate is not
    ``node_id``'s (:func:`~tapestry.pki.layout.node_server_name`)."""

    def __init__(
        self,
        node_id: str,
        address: str,
        credentials: grpc.ChannelCredentials | None = None,
        window: int = MIN_WINDOW_BYTES,
    ) -> None:
        """``window`` is the flow-control window of the deltas it receives
        (:mod:`tapestry.wire.windows`)."""
        self._address = address
        self._channel = node_channel(
            address,
            credentials,
            node_server_name(node_id) if credentials else None,
            window_options(window),
        )
        self._stub = pb_grpc.SovereignNodeServiceStub(self._channel)

    @property
    def address(self) -> str:
        return self._address

    @property
    def resumes(self) -> int:
        return 0  # a call the coordinator opens does not resume: it fails with its connection

    def describe(self, timeout_s: float, *, again: bool = True) -> pb.DescribeResponse:
        # ``again`` either way: the channel's retry policy asks an UNAVAILABLE one again
        reply: pb.DescribeResponse = self._stub.Describe(pb.DescribeRequest(), timeout=timeout_s)
        return reply

    def cycle(self, requests: Iterator[pb.RunSovereignCycleRequest], timeout_s: float) -> CycleCall:
        call: CycleCall = self._stub.RunSovereignCycle(requests, timeout=timeout_s)
        return call

    def close(self) -> None:
        self._channel.close()
