"""Dial-out sessions (issue 15), against a consortium of real processes whose nodes dial out
over mutual TLS: a node opens no listening socket; ``tapestry nodes`` shows each member's
session; one session per node id (the newer wins only with the same certificate); an
incompatible protocol version, another model, another consortium, a stranger are refused
with the code and words that say why; a member cannot starve the coordinator with streams;
a revoked member's session ends within seconds.

One consortium serves the module: three running nodes and ``kenya``, a member the file lists
whose node is not running (tests start node processes under its name). Tests that stop,
replace or revoke a node leave it running again when they end.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import tapestry
from tapestry.config import ConsortiumConfig, NodeConfig, TlsConfig, build_config, write_config
from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.demo.launcher import OPERATOR, LocalConsortium
from tapestry.limits import MAX_CALLS_PER_NODE
from tapestry.pki.authority import init_consortium
from tapestry.pki.credentials import load_channel_credentials
from tapestry.pki.layout import Layout, spiffe_id
from tapestry.wire.grpc_plumbing import open_channel

from .conftest import JURISDICTIONS, POLICY, node_specs
from .sessions_support import (
    Log,
    RawSession,
    connected_after,
    disconnected,
    established,
    hello,
    issue_node_pair,
    listening_ports,
    members,
    poll,
    refusal,
    since,
)

pytestmark = pytest.mark.slow  # a consortium of processes, nodes started and stopped

CONSORTIUM = "tapestry-local"  # the launcher's
REAL = list(JURISDICTIONS)  # vietnam, switzerland, india: running nodes
ABSENT = "kenya"  # listed in the consortium file, its node not running
GHOST = "ghost"  # a node certificate from our CA whose id the file does not list
NO_SESSION = "holds no session with the coordinator"  # a round's reason for an absent member
# How the coordinator words a session the node ended (closed, or its connection dropped).
NODE_WENT = ("the node closed its session", "the node's connection dropped")
REDIAL = "dialing the coordinator at"  # what a node logs before it dials again
ROUND_TIMEOUT_S = 120.0
EXIT_TIMEOUT_S = 60.0


@dataclass
class World:
    consortium: LocalConsortium
    foreign: Layout  # another CA: same consortium name, same node names

    @property
    def certs(self) -> Layout:
        return self.consortium.certs

    @property
    def address(self) -> str:
        return self.consortium.coordinator_address


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("sessions")
    # The launcher keeps the certificates it finds: its own, plus kenya's and ghost's.
    init_consortium(
        root / "certs",
        CONSORTIUM,
        coordinator_hosts=["127.0.0.1", "localhost"],
        nodes=[(node_id, "127.0.0.1") for node_id in [*REAL, ABSENT, GHOST]],
        operators=[OPERATOR],
    )
    foreign = init_consortium(
        root / "foreign",
        CONSORTIUM,
        coordinator_hosts=["127.0.0.1"],
        nodes=[("vietnam", "127.0.0.1")],
        operators=[],
    )
    consortium = LocalConsortium(
        root,
        node_specs(root),
        consortium_id=CONSORTIUM,
        policy=POLICY,
        extra_members=[{"node_id": ABSENT, "jurisdiction": "Kenya"}],
    )
    try:
        consortium.start()
        yield World(consortium, foreign)
    finally:
        consortium.stop()


# -- helpers ---------------------------------------------------------------------------


def run_round(world: World) -> pb.ConsortiumRoundResult:
    with world.consortium.client() as client:
        return client.run_round(timeout_s=ROUND_TIMEOUT_S)


def node_credentials(world: World, node_id: str) -> grpc.ChannelCredentials:
    credentials = world.consortium.credentials("node", node_id)
    assert credentials is not None
    return credentials


def cli(world: World, *args: str, certs: bool = False) -> subprocess.CompletedProcess[str]:
    """`tapestry ARGS` as the operator (``certs``: a `tapestry certs` command, no client)."""
    command = [sys.executable, "-m", "tapestry", *args]
    if not certs:
        command += ["--coordinator", world.address]
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **({} if certs else world.consortium.cli_env())},
    )


def table_row(table: str, node_id: str) -> str:
    """The first line of ``node_id``'s row in a table of `tapestry nodes` (80 columns wide
    off a terminal: ids, times and versions never fold)."""
    return next(line for line in table.splitlines() if line.startswith(f"{node_id} "))


def error_lines(output: str) -> list[str]:
    """The lines a command printed as its error (click's ``Error: ...``)."""
    return [line for line in output.splitlines() if line.startswith("Error: ")]


# -- 1. no listening socket ------------------------------------------------------------


def test_a_node_opens_no_listening_socket_and_rounds_commit(world: World) -> None:
    consortium = world.consortium
    assert all(members(world.consortium)[node_id].connected for node_id in REAL)
    coordinator = consortium.processes["coordinator"].popen.pid
    coordinator_port = int(world.address.rpartition(":")[2])
    assert [port for _, port in listening_ports(coordinator)] == [coordinator_port]
    for node_id in REAL:
        pid = consortium.processes[node_id].popen.pid
        assert listening_ports(pid) == [], node_id
        # It dialed out: one connection to the coordinator's port.
        assert [remote for _, remote in established(pid)] == [coordinator_port], node_id

    result = run_round(world)

    assert list(result.accepted_nodes) == REAL
    assert list(result.failed_nodes) == [ABSENT]
    assert NO_SESSION in result.failed_nodes[ABSENT]
    for node_id in REAL:  # and after a cycle, still none
        assert listening_ports(consortium.processes[node_id].popen.pid) == [], node_id


# -- 2. `tapestry nodes`; a node stopped and started again ------------------------------


def test_tapestry_nodes_lists_sessions_and_a_stopped_node_joins_again(world: World) -> None:
    consortium = world.consortium
    listed = cli(world, "nodes", "--json")
    assert listed.returncode == 0, listed.stderr
    shown = {m["node_id"]: m for m in json.loads(listed.stdout)}
    assert list(shown) == [*REAL, ABSENT]  # the consortium file's order
    for node_id in REAL:
        member = shown[node_id]
        assert member["connected"] is True, member
        assert member["jurisdiction"] == JURISDICTIONS[node_id]
        assert member["protocol_version"] == 1
        assert member["release"] == tapestry.__version__
        assert member["ended_reason"] == ""
        opened = dt.datetime.fromisoformat(member["since"])
        seen = dt.datetime.fromisoformat(member["last_seen"])
        assert opened <= seen <= dt.datetime.now(dt.UTC), member
        # The address is where the node's own connection comes from.
        local_ports = [local for local, _ in established(consortium.processes[node_id].popen.pid)]
        assert member["address"] in [f"ipv4:127.0.0.1:{port}" for port in local_ports], member
    never = shown[ABSENT]
    assert never["connected"] is False and "since" not in never, never
    assert never["protocol_version"] == 0 and never["address"] == ""

    table = cli(world, "nodes")
    assert table.returncode == 0, table.stderr
    for node_id in REAL:
        row = table_row(table.stdout, node_id)
        assert "connected" in row and f" 1/{tapestry.__version__} " in row, table.stdout
        assert len(row) <= 80, row
    assert "never" in table_row(table.stdout, ABSENT), table.stdout

    before = since(members(world.consortium)["india"])
    consortium.stop_node("india")
    gone = disconnected(world.consortium, "india")
    assert gone.ended_reason, gone
    assert since(gone) == before  # its last session, still shown
    listed = cli(world, "nodes", "--json")
    india = next(m for m in json.loads(listed.stdout) if m["node_id"] == "india")
    assert india["connected"] is False and india["ended_reason"] == gone.ended_reason, india
    table = cli(world, "nodes")
    assert "ended" in table_row(table.stdout, "india") and "india:" in table.stdout, table.stdout

    without = run_round(world)
    assert list(without.accepted_nodes) == ["vietnam", "switzerland"]
    assert sorted(without.failed_nodes) == sorted(["india", ABSENT])
    assert NO_SESSION in without.failed_nodes["india"], without.failed_nodes

    consortium.start_node("india")
    connected_after(world.consortium, "india", before)
    again = run_round(world)
    assert list(again.accepted_nodes) == REAL


# -- 3. two sessions for one node id ---------------------------------------------------

REPLACED = re.compile(
    r"node vietnam opened a new session from (\S+): it replaces the one from (\S+)$", re.M
)


def test_a_newer_session_with_the_same_certificate_replaces_the_older(world: World) -> None:
    """The raw session (vietnam's own certificate) replaces the node's; the node, told
    ABORTED, dials again and replaces the raw one in turn, which is told ABORTED."""
    held = members(world.consortium)["vietnam"]
    coordinator_log = Log(world.consortium, "coordinator")
    node_log = Log(world.consortium, "vietnam")
    opening = hello("vietnam", "Vietnam", CONSORTIUM)
    with RawSession(world.address, node_credentials(world, "vietnam"), opening) as raw:
        welcome = raw.next().welcome
        assert welcome.protocol_version == 1 and welcome.consortium_id == CONSORTIUM
        model = load_consortium(world).model
        assert welcome.model_sha256 == model.digest()
        ended = raw.ended()  # the node came back with the same certificate
    assert ended.code() == grpc.StatusCode.ABORTED, ended.details()

    def logged() -> list[tuple[str, str]] | None:
        found = REPLACED.findall(coordinator_log.new())
        return found if len(found) >= 2 else None

    replacements = poll("the coordinator to log both replacements", logged)
    (raw_address, replaced), (node_address, replaced_raw) = replacements[:2]
    assert replaced == held.address and replaced_raw == raw_address
    assert ended.details() == f"replaced by a newer session of the same node from {node_address}"
    told = node_log.new()
    assert "ABORTED" in told and f"same node from {raw_address}" in told, told
    back = connected_after(world.consortium, "vietnam", since(held))
    assert back.address == node_address


def test_a_second_session_with_another_certificate_is_refused(world: World, tmp_path: Path) -> None:
    held = members(world.consortium)["vietnam"]
    assert held.connected
    coordinator_log = Log(world.consortium, "coordinator")
    pair = issue_node_pair(world.certs.root, tmp_path / "second", "vietnam", CONSORTIUM)
    second = load_channel_credentials(pair / "cert.pem", pair / "key.pem", world.certs.ca_cert)

    error = refusal(world.address, second, hello("vietnam", "Vietnam", CONSORTIUM))

    assert error.code() == grpc.StatusCode.ALREADY_EXISTS, error.details()
    assert error.details().startswith(
        f"node 'vietnam' already holds a session (from {held.address}, since "
    ), error.details()
    assert error.details().endswith("with another certificate; only one session per node")
    now = members(world.consortium)["vietnam"]
    assert now.connected and since(now) == since(held) and now.address == held.address
    assert "refused a second session for node vietnam" in coordinator_log.new()


# -- 4. versions, models, consortia ----------------------------------------------------


@pytest.mark.parametrize("version", [0, 2])
def test_another_protocol_version_is_refused_naming_both(world: World, version: int) -> None:
    held = members(world.consortium)["vietnam"]
    opening = hello("vietnam", "Vietnam", CONSORTIUM, protocol_version=version)

    error = refusal(world.address, node_credentials(world, "vietnam"), opening)

    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error.details() == (
        f"the node speaks session protocol version {version}; this coordinator speaks "
        "version 1: upgrade the older of the two"
    )
    assert since(members(world.consortium)["vietnam"]) == since(held)


def load_consortium(world: World) -> ConsortiumConfig:
    from tapestry.config import load_config

    return load_config(world.consortium.consortium_config_path, ConsortiumConfig)


def absent_node(
    world: World, folder: Path, pair: Path, consortium_id: str = CONSORTIUM, **fields: object
) -> subprocess.CompletedProcess[str]:
    """Run `tapestry node serve` as the absent member (its certificate ``pair``) until it
    exits by itself."""
    tls = TlsConfig(
        ca=world.certs.ca_cert, cert=pair / "cert.pem", key=pair / "key.pem", crl=world.certs.crl
    )
    config = build_config(
        NodeConfig,
        {
            "node_id": ABSENT,
            "jurisdiction": "Kenya",
            "consortium_id": consortium_id,
            "quality_score": 0.8,
            "corpus": world.consortium.nodes[0].corpus,
            "coordinator": world.address,
            "tls": tls.model_dump(),
            **fields,
        },
        ABSENT,
    )
    path = write_config(folder / f"{ABSENT}.toml", config)
    return subprocess.run(
        [sys.executable, "-m", "tapestry", "node", "serve", "--config", str(path),
         "--data-dir", str(folder / "data")],
        capture_output=True, text=True, timeout=EXIT_TIMEOUT_S, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def test_a_node_pinning_another_model_stops_at_once(world: World, tmp_path: Path) -> None:
    pinned = hashlib.sha256(b"another model").hexdigest()
    actual = load_consortium(world).model.digest()

    node = absent_node(world, tmp_path, world.certs.member("node", ABSENT), model_sha256=pinned)

    assert node.returncode == 1, node.stderr
    said = error_lines(node.stderr)
    assert len(said) == 1 and pinned in said[0] and actual in said[0], node.stderr
    assert "Traceback" not in node.stderr and REDIAL not in node.stderr  # it did not try again
    # Welcomed, it refused the model and hung up: its listing says the node went.
    gone = members(world.consortium)[ABSENT]
    assert not gone.connected and gone.ended_reason in NODE_WENT, gone


def test_a_node_of_another_consortium_is_refused_and_stops(world: World, tmp_path: Path) -> None:
    """Its certificate comes from our CA (a CA two consortia share) and names the other."""
    other = "another-consortium"
    pair = issue_node_pair(world.certs.root, tmp_path / "pair", ABSENT, other)
    before = observable(world)

    node = absent_node(world, tmp_path, pair, consortium_id=other)

    assert node.returncode == 1, node.stderr
    said = error_lines(node.stderr)
    assert len(said) == 1, node.stderr
    assert said[0].startswith("Error: the coordinator refused this node: "), said
    assert "PERMISSION_DENIED" in said[0] and other in said[0], said
    assert "Traceback" not in node.stderr and REDIAL not in node.stderr
    assert observable(world) == before  # it never held a session


# -- 5. strangers ----------------------------------------------------------------------


@dataclass(frozen=True)
class Stranger:
    credentials: str  # whose: see _stranger_credentials
    node_id: str  # what its SessionOpen says
    code: grpc.StatusCode
    details: str  # the start of the refusal's details ("" for a refused handshake)
    consortium_id: str = CONSORTIUM


STRANGERS = {
    "plaintext": Stranger("none", "vietnam", grpc.StatusCode.UNAVAILABLE, ""),
    "tls-without-certificate": Stranger("ca-only", "vietnam", grpc.StatusCode.UNAVAILABLE, ""),
    "certificate-of-another-ca": Stranger("foreign", "vietnam", grpc.StatusCode.UNAVAILABLE, ""),
    "operator-certificate": Stranger(
        "operator",
        "vietnam",
        grpc.StatusCode.PERMISSION_DENIED,
        f"OpenSession needs a certificate of consortium {CONSORTIUM!r} (node); the caller is "
        f"{spiffe_id(CONSORTIUM, 'operator', OPERATOR)}",
    ),
    "node-the-file-does-not-list": Stranger(
        GHOST,
        GHOST,
        grpc.StatusCode.PERMISSION_DENIED,
        f"node {GHOST!r} is not a member: the consortium file does not list it",
    ),
    "node-claiming-another-id": Stranger(
        "vietnam",
        "switzerland",
        grpc.StatusCode.PERMISSION_DENIED,
        "the node says it is 'switzerland' but its certificate names node 'vietnam'",
    ),
    "node-claiming-another-consortium": Stranger(
        "vietnam",
        "vietnam",
        grpc.StatusCode.PERMISSION_DENIED,
        f"the node serves consortium 'elsewhere', this coordinator {CONSORTIUM!r}",
        consortium_id="elsewhere",
    ),
}


def _stranger_credentials(world: World, whose: str) -> grpc.ChannelCredentials | None:
    if whose == "none":
        return None
    if whose == "ca-only":  # trusts our CA, presents nothing
        return grpc.ssl_channel_credentials(root_certificates=world.certs.ca_cert.read_bytes())
    if whose == "foreign":
        pair = world.foreign.member("node", "vietnam")
        return load_channel_credentials(pair / "cert.pem", pair / "key.pem", world.certs.ca_cert)
    role = "operator" if whose == "operator" else "node"
    credentials = world.consortium.credentials(role, OPERATOR if role == "operator" else whose)
    assert credentials is not None
    return credentials


def observable(world: World) -> tuple[object, ...]:
    """What a refused session must not change: every member's session, and the journal."""
    sessions = tuple(
        (m.node_id, m.connected, since(m), m.address, m.ended_reason)
        for m in members(world.consortium).values()
    )
    with world.consortium.client() as client:
        rounds = tuple(r.SerializeToString(deterministic=True) for r in client.list_rounds())
    return sessions, rounds


@pytest.mark.parametrize("case", list(STRANGERS))
def test_a_stranger_cannot_open_a_session(world: World, case: str) -> None:
    stranger = STRANGERS[case]
    before = observable(world)
    jurisdiction = JURISDICTIONS.get(stranger.node_id, "Nowhere")
    opening = hello(stranger.node_id, jurisdiction, stranger.consortium_id)

    error = refusal(world.address, _stranger_credentials(world, stranger.credentials), opening)

    assert error.code() == stranger.code, error.details()
    assert (error.details() or "").startswith(stranger.details), error.details()
    assert observable(world) == before


# -- 6. a member opening many streams -------------------------------------------------


def test_a_member_opening_50_streams_starves_nobody(world: World) -> None:
    """Switzerland's certificate: its node holds its session (one call), so its streams get
    the rest of MAX_CALLS_PER_NODE; every other stream and session is refused at once."""
    held = members(world.consortium)["switzerland"]
    credentials = node_credentials(world, "switzerland")
    channel = open_channel(world.address, credentials)
    watch = health_pb2_grpc.HealthStub(channel).Watch
    streams, sessions = [], []
    try:
        began = time.monotonic()
        streams = [watch(health_pb2.HealthCheckRequest(), timeout=60) for _ in range(50)]
        admitted, refused = [], []
        for stream in streams:
            try:
                admitted.append(next(stream).status)
            except grpc.RpcError as error:
                refused.append(error)
        answered_s = time.monotonic() - began
        opening = hello("switzerland", "Switzerland", CONSORTIUM)
        sessions = [RawSession(world.address, credentials, opening) for _ in range(3)]
        refused_sessions = [refusal_of(session) for session in sessions]

        assert len(admitted) == MAX_CALLS_PER_NODE - 1  # + its node's session
        assert set(admitted) == {health_pb2.HealthCheckResponse.SERVING}
        assert {e.code() for e in [*refused, *refused_sessions]} == {
            grpc.StatusCode.RESOURCE_EXHAUSTED
        }
        assert f"already has {MAX_CALLS_PER_NODE} calls open" in refused[0].details()
        assert answered_s < 5.0, answered_s

        with world.consortium.client() as operator:
            began = time.monotonic()
            operator.list_rounds()
            assert time.monotonic() - began < 2.0
        result = run_round(world)
        assert list(result.accepted_nodes) == REAL
        now = members(world.consortium)["switzerland"]
        assert now.connected and since(now) == since(held)
    finally:
        for stream in streams:
            stream.cancel()
        for session in sessions:
            session.close()
        channel.close()

    def admitted_again() -> bool:
        with open_channel(world.address, credentials) as fresh:
            stream = health_pb2_grpc.HealthStub(fresh).Watch(health_pb2.HealthCheckRequest())
            try:
                next(stream)
                return True
            except grpc.RpcError:
                return False
            finally:
                stream.cancel()

    poll("a cancelled stream's place to be free again", admitted_again)


def refusal_of(session: RawSession) -> grpc.RpcError:
    try:
        first = session.next()
    except grpc.RpcError as error:
        return error
    raise AssertionError(f"a session past the member's bound was welcomed: {first}")


# -- 7. revocation ---------------------------------------------------------------------


def test_a_revoked_members_session_ends_within_seconds(world: World) -> None:
    consortium = world.consortium
    held = members(world.consortium)["india"]
    assert held.connected
    node = consortium.processes["india"].popen
    node_log = Log(consortium, "india")

    revoked = cli(world, "certs", "revoke", "--dir", str(world.certs.root), "--node", "india",
                  certs=True)  # fmt: skip
    assert revoked.returncode == 0, revoked.stderr
    began = time.monotonic()
    gone = disconnected(world.consortium, "india", timeout_s=15.0)
    took = time.monotonic() - began

    assert took < 15.0
    assert gone.ended_reason.startswith("the certificate of node india (serial "), gone
    assert gone.ended_reason.endswith(") is revoked"), gone
    poll("the revoked node to exit", lambda: node.poll() is not None, EXIT_TIMEOUT_S)
    assert node.returncode == 1
    said = error_lines(node_log.new())
    assert len(said) == 1, said
    assert said[0].startswith("Error: the coordinator refused this node: "), said
    assert "PERMISSION_DENIED" in said[0] and "is revoked" in said[0], said
    assert REDIAL not in node_log.new()
    result = run_round(world)
    assert NO_SESSION in result.failed_nodes["india"], result.failed_nodes
    assert list(result.accepted_nodes) == ["vietnam", "switzerland"]

    # A new certificate, and it joins again.
    issued = cli(world, "certs", "issue", "--dir", str(world.certs.root), "--node", "india",
                 "--host", "127.0.0.1", certs=True)  # fmt: skip
    assert issued.returncode == 0, issued.stderr
    consortium.start_node("india")
    connected_after(world.consortium, "india", since(held))
    assert list(run_round(world).accepted_nodes) == REAL
