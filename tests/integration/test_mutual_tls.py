"""Mutual TLS with the consortium's certificates, over a real socket: a server built with
``load_server_credentials`` answers a client holding a node certificate from its CA, refuses
a client without a certificate or with one from another CA, and names the caller."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tapestry.cli import main
from tapestry.pki.credentials import (
    load_channel_credentials,
    load_server_credentials,
    peer_identity,
)


def _init(root: Path) -> Path:
    result = CliRunner().invoke(
        main,
        ["certs", "init", "--dir", str(root), "--consortium", "acme",
         "--coordinator-host", "127.0.0.1", "--node", "eu=127.0.0.1"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return root


class _NamingHealth(health.HealthServicer):
    """The standard health service, recording who each call came from."""

    def __init__(self) -> None:
        super().__init__()
        self.callers: list[str | None] = []

    def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        self.callers.append(peer_identity(context))
        return super().Check(request, context)


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    return _init(tmp_path / "pki")


@pytest.fixture
def server(pki: Path) -> Iterator[tuple[int, _NamingHealth]]:
    servicer = _NamingHealth()
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, grpc_server)
    coordinator = pki / "coordinator"
    port = grpc_server.add_secure_port(
        "127.0.0.1:0",
        load_server_credentials(coordinator / "cert.pem", coordinator / "key.pem", pki / "ca.pem"),
    )
    grpc_server.start()
    try:
        yield port, servicer
    finally:
        grpc_server.stop(None).wait()


def _check(port: int, credentials: grpc.ChannelCredentials) -> str:
    with grpc.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=10
        )
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def test_a_node_of_the_consortium_is_answered_and_named(
    pki: Path, server: tuple[int, _NamingHealth]
) -> None:
    port, servicer = server
    node = pki / "nodes" / "eu"
    credentials = load_channel_credentials(node / "cert.pem", node / "key.pem", pki / "ca.pem")
    assert _check(port, credentials) == "SERVING"
    assert servicer.callers == ["spiffe://acme/node/eu"]


def test_a_client_without_a_certificate_is_refused(
    pki: Path, server: tuple[int, _NamingHealth]
) -> None:
    port, servicer = server
    credentials = grpc.ssl_channel_credentials(root_certificates=(pki / "ca.pem").read_bytes())
    with pytest.raises(grpc.RpcError) as caught:
        _check(port, credentials)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert servicer.callers == []


def test_a_client_from_another_ca_is_refused(
    pki: Path, server: tuple[int, _NamingHealth], tmp_path: Path
) -> None:
    port, servicer = server
    other = _init(tmp_path / "other")
    node = other / "nodes" / "eu"
    # It trusts our CA, so only our server's refusal of its certificate can fail the call.
    credentials = load_channel_credentials(node / "cert.pem", node / "key.pem", pki / "ca.pem")
    with pytest.raises(grpc.RpcError) as caught:
        _check(port, credentials)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert servicer.callers == []


def test_a_plaintext_caller_has_no_identity() -> None:
    servicer = _NamingHealth()
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    finally:
        grpc_server.stop(None).wait()
    assert servicer.callers == [None]
