"""Calls no member can starve: each member (a certificate's identity) may hold at most
:data:`~tapestry.limits.MAX_CALLS_PER_MEMBER` calls open at once on a server, a node
:data:`~tapestry.limits.MAX_CALLS_PER_NODE` (its one session, and its next while it dials
again); one more is refused at once with RESOURCE_EXHAUSTED, naming the bound, instead of
waiting for a worker thread that others need. A server's worker pool is sized so that every
member at its bound still leaves room for the rest (:func:`worker_threads`), and gRPC
refuses what would exceed the pool (``maximum_concurrent_rpcs``) rather than queueing it.

Streams that never end by themselves (``grpc.health.v1.Health/Watch``) are also bounded in
time: past their lifetime the server ends them, and a client that still wants them opens
another. Over plaintext there is no proven identity to count by: only the pool bounds.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import grpc

from tapestry.limits import MAX_CALLS_PER_MEMBER, MAX_CALLS_PER_NODE
from tapestry.pki.access import Peer, calling_peer, wrapped_handler

log = logging.getLogger(__name__)

# A health Watch stream lasts at most this long; the watcher opens another after it.
WATCH_LIFETIME_S = 3600.0
WATCH_METHOD = "/grpc.health.v1.Health/Watch"
# Worker threads beyond the members' shares: operators' calls and the server's own.
SPARE_WORKERS = 16


def worker_threads(members: int, per_member: int = MAX_CALLS_PER_MEMBER) -> int:
    """A pool in which ``members`` members, each at its bound, leave :data:`SPARE_WORKERS`
    threads for everyone else."""
    return SPARE_WORKERS + members * per_member


class CallLimits(grpc.ServerInterceptor):
    """Count each member's open calls (by its certificate's identity) and refuse one past
    ``per_member`` (``per_node`` for a node); end a stream of a method in ``lifetimes`` after
    its lifetime."""

    def __init__(
        self,
        per_member: int = MAX_CALLS_PER_MEMBER,
        lifetimes: Mapping[str, float] | None = None,
        per_node: int = MAX_CALLS_PER_NODE,
    ) -> None:
        self.per_member = per_member
        self.per_node = per_node
        self.lifetimes = dict({WATCH_METHOD: WATCH_LIFETIME_S} if lifetimes is None else lifetimes)
        self._open: dict[str, int] = {}
        self._lock = threading.Lock()

    def open_calls(self, member: str) -> int:
        with self._lock:
            return self._open.get(member, 0)

    def bound(self, peer: Peer) -> int:
        """The calls ``peer`` may hold open at once."""
        return self.per_node if peer.role == "node" else self.per_member

    def _enter(self, member: str, bound: int) -> bool:
        with self._lock:
            held = self._open.get(member, 0)
            if held >= bound:
                return False
            self._open[member] = held + 1
            return True

    def _leave(self, member: str) -> None:
        with self._lock:
            held = self._open.get(member, 1) - 1
            if held:
                self._open[member] = held
            else:
                self._open.pop(member, None)

    def _refuse(self, context: grpc.ServicerContext, peer: Peer, method: str) -> None:
        bound = self.bound(peer)
        name = "MAX_CALLS_PER_NODE" if peer.role == "node" else "MAX_CALLS_PER_MEMBER"
        log.warning("refused %s from %s: %d calls open", method, peer.uri, bound)
        context.abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"{peer.uri} already has {bound} calls open on this server, the most it may "
            f"hold at once ({name}); end one first",
        )

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        lifetime = self.lifetimes.get(method)
        streams = handler.unary_stream is not None or handler.stream_stream is not None

        def guard(behavior: Callable[[Any, grpc.ServicerContext], Any]) -> Any:
            def unary(request: Any, context: grpc.ServicerContext) -> Any:
                peer = calling_peer(context)
                if peer is None:
                    return behavior(request, context)
                if not self._enter(peer.uri, self.bound(peer)):
                    self._refuse(context, peer, method)
                try:
                    return behavior(request, context)
                finally:
                    self._leave(peer.uri)

            def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                peer = calling_peer(context)
                if peer is not None and not self._enter(peer.uri, self.bound(peer)):
                    self._refuse(context, peer, method)
                timer = threading.Timer(lifetime, context.cancel) if lifetime else None
                if timer is not None:
                    timer.daemon = True
                    timer.start()
                try:
                    yield from behavior(request, context)
                finally:
                    if timer is not None:
                        timer.cancel()
                    if peer is not None:
                        self._leave(peer.uri)

            return stream if streams else unary

        return wrapped_handler(handler, guard)
