"""gRPC options and the server factory every Tapestry service uses.

Each option is set on purpose:
- message limits: tensors travel in 1 MiB chunks, so 8 MiB leaves room for headers while
  still refusing a peer that sends one huge message;
- keepalive: a node may train for minutes without sending a byte on an open call; client
  pings every 30 s keep NAT and proxies from dropping it, and servers accept pings that
  often (a stricter server would answer GOAWAY "too_many_pings");
- node channels (:func:`node_channel`) retry ``Describe`` on UNAVAILABLE with backoff, through
  gRPC's own retry policy: it carries no weights and changes nothing, so a node that is
  restarting or comes up a moment after the round started is still reached, within
  Describe's deadline. Nothing else is retried: once a base has been sent, a cycle is not
  idempotent (the node trains and keeps an artifact). Reconnection backoff is shortened to
  match, or the retries would all land while the channel still waits to reconnect.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tapestry.atomic_files import write_text
from tapestry.errors import UserError
from tapestry.limits import MAX_MESSAGE_BYTES

log = logging.getLogger(__name__)

# How long a stopping server lets running calls finish (a SIGTERM'd container, say).
STOP_GRACE_S = 10.0

CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]

SERVER_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.so_reuseport", 0),  # a port chosen at bind time must be ours alone
]


# gRPC's retry policy (gRFC A6) for the one method of a node that may safely run twice. At
# most 5 attempts (gRPC's own ceiling); attempt n waits random(0, min(0.2 s * 2^(n-1), 2 s)).
NODE_SERVICE = "tapestry.consortium.v1.SovereignNodeService"
NODE_RETRY_POLICY = {
    "maxAttempts": 5,
    "initialBackoff": "0.2s",
    "maxBackoff": "2s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}
NODE_SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{"service": NODE_SERVICE, "method": "Describe"}],
                "retryPolicy": NODE_RETRY_POLICY,
            }
        ]
    }
)
NODE_CHANNEL_OPTIONS: list[tuple[str, int | str]] = [
    *CHANNEL_OPTIONS,
    ("grpc.enable_retries", 1),
    ("grpc.service_config", NODE_SERVICE_CONFIG),
    # Reconnect soon after a refused connection (the default waits 1 s, then longer).
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


# A node's channel to the coordinator, for its session: the node dials again itself (with
# backoff and jitter, tapestry.node.dial_out), so gRPC's own reconnection is not relied on.
SESSION_CHANNEL_OPTIONS: list[tuple[str, int | str]] = [*CHANNEL_OPTIONS]


class BindError(UserError, OSError):
    """A server could not listen on its address; the message says why and what to do."""


def open_channel(
    address: str,
    credentials: grpc.ChannelCredentials | None = None,
    *,
    server_name: str | None = None,
    options: Sequence[tuple[str, int | str]] = CHANNEL_OPTIONS,
) -> grpc.Channel:
    """A channel with our options: TLS with ``credentials`` (plaintext without), the
    server's certificate checked for ``server_name`` instead of the address's host when
    given (a node's :func:`~tapestry.pki.layout.node_server_name`)."""
    if credentials is None:
        return grpc.insecure_channel(address, options=options)
    if server_name is not None:
        options = [*options, ("grpc.ssl_target_name_override", server_name)]
    return grpc.secure_channel(address, credentials, options=options)


def node_channel(
    address: str,
    credentials: grpc.ChannelCredentials | None = None,
    server_name: str | None = None,
    window: Sequence[tuple[str, int]] = (),
) -> grpc.Channel:
    """The coordinator's channel to a node that listens: :data:`CHANNEL_OPTIONS` plus the
    retry of ``Describe`` on UNAVAILABLE (:data:`NODE_RETRY_POLICY`) and the ``window``
    options of the deltas it receives (:mod:`tapestry.wire.windows`)."""
    options = [*NODE_CHANNEL_OPTIONS, *window]
    return open_channel(address, credentials, server_name=server_name, options=options)


def build_server(
    listen: str,
    register: Sequence[Callable[[grpc.Server], None]],
    service_names: Sequence[str],
    *,
    credentials: grpc.ServerCredentials | None = None,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
    max_workers: int = 16,
    options: Sequence[tuple[str, int]] = (),
) -> tuple[grpc.Server, int, health.HealthServicer]:
    """A server with our services, ``grpc.health.v1`` and reflection, bound but not started:
    TLS with ``credentials`` (plaintext without), every call through ``interceptors``. At
    most ``max_workers`` calls run at once, one thread each; gRPC refuses one more at once
    (RESOURCE_EXHAUSTED) rather than queueing it behind calls that may never end.
    ``options`` are added to :data:`SERVER_OPTIONS` (the flow-control window).

    Returns ``(server, port, health)``; ``listen`` may end in ``:0`` for a free port.
    Health starts NOT_SERVING; call :func:`mark_serving` once the server is started.
    """
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers),
        options=[*SERVER_OPTIONS, *options],
        interceptors=list(interceptors),
        maximum_concurrent_rpcs=max_workers,
    )
    for add in register:
        add(server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", *service_names):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection(
        (*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    # gRPC says only "Failed to bind" (after logging its own line): ask the OS first.
    why = _why_not_bindable(listen)
    if why:
        raise BindError(why)
    try:
        port = (
            server.add_secure_port(listen, credentials)
            if credentials is not None
            else server.add_insecure_port(listen)
        )
    except RuntimeError:
        port = 0
    if port == 0:
        raise BindError(f"cannot listen on {listen}: gRPC could not bind it; {_RETRY}")
    return server, port, health_servicer


_RETRY = "choose another address with --listen HOST:PORT (port 0 picks a free port)"


def _why_not_bindable(listen: str) -> str:
    """Why ``listen`` cannot be bound, and what to do, found by binding a plain socket
    there as gRPC will (SO_REUSEADDR on); ``""`` when it can be."""
    host, _, port = listen.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except (OSError, ValueError) as error:
        return (
            f"cannot listen on {listen}: {host!r} does not resolve ({error}); "
            "fix the host in --listen HOST:PORT"
        )
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as error:
                if error.errno == errno.EADDRINUSE:
                    return (
                        f"cannot listen on {listen}: the address is already in use — another "
                        f"process (perhaps another Tapestry server) holds port {port}; stop it "
                        f"or {_RETRY}"
                    )
                if error.errno == errno.EADDRNOTAVAIL:
                    return (
                        f"cannot listen on {listen}: {host} is not an address of this machine; "
                        "pass one of its own with --listen HOST:PORT (127.0.0.1, or 0.0.0.0 "
                        "for every interface)"
                    )
                if error.errno == errno.EACCES:
                    return (
                        f"cannot listen on {listen}: permission denied (ports below 1024 need "
                        f"privileges); {_RETRY}"
                    )
                return f"cannot listen on {listen}: {error.strerror}; {_RETRY}"
    return ""


def mark_serving(health_servicer: health.HealthServicer, service_names: Sequence[str]) -> None:
    for name in ("", *service_names):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)


def write_ready_file(path: Path, port: int, extra: Mapping[str, int] | None = None) -> None:
    """Tell whoever started us which port we bound, and ``extra`` ports (e.g.
    ``metrics_port``); written atomically, then renamed."""
    write_text(path, json.dumps({"port": port, "pid": os.getpid(), **(extra or {})}))


def check_health(
    address: str,
    service: str = "",
    timeout_s: float = 5.0,
    credentials: grpc.ChannelCredentials | None = None,
    server_name: str | None = None,
) -> str:
    """The health status name of ``service`` at ``address`` (e.g. ``"SERVING"``)."""
    with open_channel(address, credentials, server_name=server_name) as channel:
        # The method by its path: typeshed's HealthStub declares no methods to type-check.
        check = channel.unary_unary(
            f"/{health.SERVICE_NAME}/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        reply: health_pb2.HealthCheckResponse = check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
        )
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def serve_forever(
    server: grpc.Server,
    port: int,
    health_servicer: health.HealthServicer,
    service_names: Sequence[str],
    ready_file: Path | None = None,
    ready_extra: Mapping[str, int] | None = None,
    before_stop: Callable[[], None] | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT; then ``before_stop`` (ending long-lived calls, such
    as members' sessions, that would otherwise hold the grace period), then drain."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    mark_serving(health_servicer, service_names)
    if ready_file is not None:
        write_ready_file(ready_file, port, ready_extra)
    log.info("serving %s on port %d", ", ".join(service_names), port)
    stop.wait()
    log.info("stopping: draining calls for up to %.0f s", STOP_GRACE_S)
    health_servicer.enter_graceful_shutdown()
    if before_stop is not None:
        before_stop()
    server.stop(STOP_GRACE_S).wait()
