"""The attacker's side of mutual TLS (issue 7 §7): every attack on a consortium of real
servers is refused, one test per case, each asserting the status code and that the shared
base, the journal and every node's artifacts are what they were before the attempt.

One consortium serves the whole module (three real nodes, the coordinator, and impostors
at the addresses of members whose own servers are down), so the cases cost a call each:

1. a stranger without a certificate, plaintext or TLS: refused at the handshake;
2. a certificate from another CA, same consortium and member names: refused at the
   handshake;
3. a node's (or the coordinator's) certificate running or rolling back a round:
   PERMISSION_DENIED, naming what is needed; reading the journal is allowed;
4. anyone but the coordinator running a node's cycle, a node reading another's artifact:
   PERMISSION_DENIED;
5. a revoked operator: PERMISSION_DENIED without a restart; a newly issued one runs a round;
6. an impostor at a member's address with another member's (or another CA's, or its own
   revoked) certificate: the coordinator fails that member and never sends it the base;
7. a server whose own credentials are bad: exits 1 at start-up with one line naming the file;
8. a server started with --insecure: warns at start and on every round.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from tapestry.config import NodeConfig, TlsConfig, write_config
from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.consortium.v1 import consortium_pb2_grpc as pb_grpc
from tapestry.demo.launcher import OPERATOR, LocalConsortium
from tapestry.pki.access import PeerRole
from tapestry.pki.authority import (
    init_consortium,
    issue_certificate,
    issue_member,
    load_authority,
    revoke_certificate,
    revoke_member,
)
from tapestry.pki.credentials import load_channel_credentials
from tapestry.pki.layout import Layout, node_server_name, spiffe_id, write_pair
from tapestry.training.consortium import state_digest
from tapestry.wire.grpc_plumbing import open_channel
from tapestry.wire.tensor_stream import send_state

from .conftest import JURISDICTIONS, POLICY, node_specs
from .fake_nodes import FakeNode, serve

pytestmark = pytest.mark.slow  # whole consortia of training processes

CONSORTIUM = "tapestry-local"  # the launcher's, and the foreign CA's too
REAL = list(JURISDICTIONS)  # vietnam, switzerland, india: running nodes
TARGET = "vietnam"  # the node the attacks on nodes aim at
READER: tuple[PeerRole, str] = ("node", "switzerland")  # reads the snapshots (any member may read)
RELIEF = "relief"  # the operator that runs rounds here: the launcher's is revoked in case 5
SUCCESSOR = "successor"  # issued after the launcher's operator is revoked
CALL_TIMEOUT_S = 10.0
START_TIMEOUT_S = 60.0


# Members whose own servers are down: at each one's address an impostor answers Describe as
# that member would, presenting the certificate (ours, or the other CA's) chosen here. The
# last field is what the coordinator's reason for failing that member must say.
Pick = Callable[[Layout, Layout], Path]
IMPOSTORS: dict[str, tuple[str, Pick, str]] = {
    "kenya": (
        "india's certificate",
        lambda ours, foreign: ours.member("node", "india"),
        "Hostname Verification Check failed",
    ),
    "peru": (
        "the operator's certificate",
        lambda ours, foreign: ours.member("operator", OPERATOR),
        "CERTIFICATE_VERIFY_FAILED: unsupported certificate purpose",  # no serverAuth
    ),
    "chile": (
        "the coordinator's certificate",
        lambda ours, foreign: ours.coordinator,
        "Hostname Verification Check failed",
    ),
    "norway": (
        "another CA's norway certificate",
        lambda ours, foreign: foreign.member("node", "norway"),
        "CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate",
    ),
    "ghana": (
        "its own revoked certificate",
        lambda ours, foreign: ours.member("node", "ghana"),
        "presents a revoked certificate for ghana.node.tapestry.invalid (serial ",
    ),
}
IMPOSTOR_JURISDICTION = "Nowhere"  # FakeNode's, and so the consortium file's


@dataclass
class World:
    consortium: LocalConsortium
    foreign: Layout  # another CA's certificates: same consortium name, same members
    impostors: dict[str, FakeNode]

    @property
    def certs(self) -> Layout:
        return self.consortium.certs


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("trust")
    members = [(node_id, "127.0.0.1") for node_id in [*REAL, *IMPOSTORS]]
    # The launcher keeps certificates it finds: these are the ones it would make, plus the
    # offline members' and a second operator.
    ours = init_consortium(
        root / "certs",
        CONSORTIUM,
        coordinator_hosts=["127.0.0.1", "localhost"],
        nodes=members,
        operators=[OPERATOR, RELIEF],
    )
    foreign = init_consortium(
        root / "foreign",
        CONSORTIUM,
        coordinator_hosts=["127.0.0.1", "localhost"],
        nodes=members,
        operators=[OPERATOR],
    )
    revoke_member(ours.root, "node", "ghana")
    with ExitStack() as stack:
        impostors, entries = {}, []
        for node_id, (_, pick, _) in IMPOSTORS.items():
            pair = pick(ours, foreign)
            credentials = grpc.ssl_server_credentials(
                [((pair / "key.pem").read_bytes(), (pair / "cert.pem").read_bytes())]
            )
            impostor = FakeNode(node_id, jurisdiction=IMPOSTOR_JURISDICTION)
            entries += stack.enter_context(serve([impostor], credentials))
            impostors[node_id] = impostor
        # The members listen: these tests call a node's own port, as a stranger would.
        consortium = LocalConsortium(
            root,
            node_specs(root),
            consortium_id=CONSORTIUM,
            policy=POLICY,
            extra_members=entries,
            dial_out=False,
        )
        stack.callback(consortium.stop)
        consortium.start()
        yield World(consortium, foreign, impostors)


# -- what must not change ------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    base_sha256: str
    rounds: tuple[bytes, ...]
    node_files: tuple[tuple[str, str], ...]  # (path, sha256) of every file under the nodes


def snapshot(consortium: LocalConsortium) -> Snapshot:
    with consortium.client(*READER) as reader:
        _, base = reader.get_base()
        rounds = tuple(r.SerializeToString(deterministic=True) for r in reader.list_rounds())
    files = [
        (str(path.relative_to(consortium.workdir)), hashlib.sha256(path.read_bytes()).hexdigest())
        for node_id in REAL
        for path in sorted(consortium.node_data_dir(node_id).rglob("*"))
        if path.is_file()
    ]
    return Snapshot(state_digest(base), rounds, tuple(files))


Call = Callable[[grpc.Channel, LocalConsortium], object]


def refused(world: World, channel: grpc.Channel, call: Call) -> grpc.RpcError:
    """Make the call on ``channel``, which must fail, and check that nothing it could touch
    changed."""
    before = snapshot(world.consortium)
    with pytest.raises(grpc.RpcError) as caught:
        call(channel, world.consortium)
    assert snapshot(world.consortium) == before
    return caught.value


def refused_on_new(world: World, channel: grpc.Channel, call: Call) -> grpc.RpcError:
    with channel:
        return refused(world, channel, call)


# -- the calls an attacker makes -------------------------------------------------------


def run_round(channel: grpc.Channel, _: LocalConsortium) -> object:
    return list(
        pb_grpc.CoordinatorServiceStub(channel).RunRound(
            pb.RunRoundRequest(), timeout=CALL_TIMEOUT_S
        )
    )


def roll_back_base(channel: grpc.Channel, _: LocalConsortium) -> object:
    return pb_grpc.CoordinatorServiceStub(channel).RollBackBase(
        pb.RollBackBaseRequest(to_round=0), timeout=CALL_TIMEOUT_S
    )


def list_rounds(channel: grpc.Channel, _: LocalConsortium) -> object:
    return pb_grpc.CoordinatorServiceStub(channel).ListRounds(
        pb.ListRoundsRequest(), timeout=CALL_TIMEOUT_S
    )


def get_base(channel: grpc.Channel, _: LocalConsortium) -> object:
    return list(
        pb_grpc.CoordinatorServiceStub(channel).GetBase(pb.GetBaseRequest(), timeout=CALL_TIMEOUT_S)
    )


def describe(channel: grpc.Channel, _: LocalConsortium) -> object:
    return pb_grpc.SovereignNodeServiceStub(channel).Describe(
        pb.DescribeRequest(), timeout=CALL_TIMEOUT_S
    )


def run_cycle(channel: grpc.Channel, consortium: LocalConsortium) -> object:
    """A cycle the node would run if the caller were the coordinator: the next round of
    this consortium, with the current base."""
    with consortium.client(*READER) as reader:
        round_num, base = reader.get_base()
    start = pb.CycleStart(round_num=round_num + 1, consortium_id=CONSORTIUM)
    requests = [
        pb.RunSovereignCycleRequest(start=start),
        *send_state(
            base,
            lambda c: pb.RunSovereignCycleRequest(base_chunk=c),
            lambda t: pb.RunSovereignCycleRequest(base_end=t),
        ),
        pb.RunSovereignCycleRequest(delta_decision=pb.DeltaDecision(send=True)),
    ]
    stub = pb_grpc.SovereignNodeServiceStub(channel)
    return list(stub.RunSovereignCycle(iter(requests), timeout=CALL_TIMEOUT_S))


def get_artifact(channel: grpc.Channel, _: LocalConsortium) -> object:
    return pb_grpc.SovereignNodeServiceStub(channel).GetArtifact(
        pb.GetArtifactRequest(latest=True), timeout=CALL_TIMEOUT_S
    )


COORDINATOR_CALLS: dict[str, Call] = {
    "RunRound": run_round,
    "RollBackBase": roll_back_base,
    "ListRounds": list_rounds,
    "GetBase": get_base,
}
NODE_CALLS: dict[str, Call] = {
    "Describe": describe,
    "RunSovereignCycle": run_cycle,
    "GetArtifact": get_artifact,
}


def _server_name(target: str) -> str | None:
    return None if target == "coordinator" else node_server_name(target)


def _tls_channel(world: World, target: str, credentials: grpc.ChannelCredentials) -> grpc.Channel:
    return open_channel(
        world.consortium.processes[target].address, credentials, server_name=_server_name(target)
    )


# -- 1. a stranger without a certificate ---------------------------------------------

STRANGER_CALLS = [
    ("coordinator", "RunRound"),
    ("coordinator", "ListRounds"),
    ("coordinator", "GetBase"),
    (TARGET, "Describe"),
    (TARGET, "RunSovereignCycle"),
]


def _call(target: str, method: str) -> Call:
    return (COORDINATOR_CALLS if target == "coordinator" else NODE_CALLS)[method]


@pytest.mark.parametrize(
    "target, method", STRANGER_CALLS, ids=[f"{t}.{m}" for t, m in STRANGER_CALLS]
)
@pytest.mark.parametrize("transport", ["plaintext", "tls-without-certificate"])
def test_a_stranger_without_a_certificate_is_refused_at_the_handshake(
    world: World, transport: str, target: str, method: str
) -> None:
    address = world.consortium.processes[target].address
    if transport == "plaintext":
        channel = grpc.insecure_channel(address)
    else:  # it trusts our CA and checks our names: only the server's refusal can fail it
        trusting = grpc.ssl_channel_credentials(root_certificates=world.certs.ca_cert.read_bytes())
        channel = _tls_channel(world, target, trusting)
    error = refused_on_new(world, channel, _call(target, method))
    assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()


# -- 2. a certificate from another CA ------------------------------------------------

FOREIGN_CALLS = [
    ("operator", "coordinator", "RunRound"),
    ("operator", "coordinator", "RollBackBase"),
    ("node", "coordinator", "GetBase"),
    ("coordinator", TARGET, "RunSovereignCycle"),
    ("operator", TARGET, "GetArtifact"),
]


@pytest.mark.parametrize(
    "role, target, method", FOREIGN_CALLS, ids=[f"{r}-{t}.{m}" for r, t, m in FOREIGN_CALLS]
)
def test_a_certificate_from_another_ca_is_refused_at_the_handshake(
    world: World, role: PeerRole, target: str, method: str
) -> None:
    """The other CA issued the same consortium's names (its coordinator, node vietnam, an
    operator called "operator"); the client trusts our CA, so only the server's refusal of
    its certificate can fail the call."""
    name = {"operator": OPERATOR, "node": TARGET, "coordinator": ""}[role]
    pair = world.foreign.holder(role, name)
    credentials = load_channel_credentials(pair / "cert.pem", pair / "key.pem", world.certs.ca_cert)
    error = refused_on_new(world, _tls_channel(world, target, credentials), _call(target, method))
    assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()


# Certificates our CA signed that name no member of this consortium (a CA shared with
# another consortium, say): the handshake admits them, the access policy does not.
ODD_IDENTITIES = {
    "another-consortium": ("spiffe://elsewhere/operator/eve", "'spiffe://elsewhere/operator/eve'"),
    "no-consortium-identity": (
        "https://example.invalid/eve",
        "the caller's certificate names no consortium identity",
    ),
}


@pytest.mark.parametrize("case", list(ODD_IDENTITIES))
def test_our_cas_certificate_naming_no_member_is_refused(
    world: World, tmp_path: Path, case: str
) -> None:
    identity, named = ODD_IDENTITIES[case]
    ca_cert, ca_key = load_authority(world.certs.root)
    cert, key = issue_certificate(
        ca_cert, ca_key, common_name="eve", identity=identity, server=False
    )
    write_pair(tmp_path / "eve", cert, key)
    credentials = load_channel_credentials(
        tmp_path / "eve" / "cert.pem", tmp_path / "eve" / "key.pem", world.certs.ca_cert
    )
    error = refused_on_new(world, _tls_channel(world, "coordinator", credentials), run_round)
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    details = error.details() or ""
    assert details.startswith(
        f"RunRound needs a certificate of consortium {CONSORTIUM!r} (operator)"
    ), details
    assert named in details, details


# -- 3. a member without the operator's role, on the coordinator ---------------------

WRONG_ROLE_ON_COORDINATOR = [
    ("node", TARGET, "RunRound"),
    ("node", TARGET, "RollBackBase"),
    ("coordinator", "", "RunRound"),
]


@pytest.mark.parametrize(
    "role, name, method",
    WRONG_ROLE_ON_COORDINATOR,
    ids=[f"{r}-{m}" for r, _, m in WRONG_ROLE_ON_COORDINATOR],
)
def test_only_an_operator_may_run_or_roll_back_a_round(
    world: World, role: PeerRole, name: str, method: str
) -> None:
    channel = world.consortium.channel("coordinator", role, name)
    error = refused_on_new(world, channel, COORDINATOR_CALLS[method])
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    caller = spiffe_id(CONSORTIUM, role, name)
    assert error.details() == (
        f"{method} needs a certificate of consortium {CONSORTIUM!r} (operator); "
        f"the caller is {caller}"
    )


def test_a_node_may_read_the_journal(world: World) -> None:
    """Not an attack: the same certificate that may not run a round reads the rounds."""
    with world.consortium.channel("coordinator", "node", TARGET) as channel:
        reply = list_rounds(channel, world.consortium)
    assert isinstance(reply, pb.ListRoundsResponse)


# -- 4. anyone but the coordinator, on a node ----------------------------------------

WRONG_ROLE_ON_NODE = [
    ("operator", RELIEF, "RunSovereignCycle", "coordinator"),
    ("node", "switzerland", "RunSovereignCycle", "coordinator"),
    ("node", TARGET, "RunSovereignCycle", "coordinator"),  # the node's own, stolen
    ("node", "switzerland", "GetArtifact", "coordinator or operator"),
]


@pytest.mark.parametrize(
    "role, name, method, needs",
    WRONG_ROLE_ON_NODE,
    ids=[f"{r}-{n}-{m}" for r, n, m, _ in WRONG_ROLE_ON_NODE],
)
def test_only_the_coordinator_may_run_a_cycle_and_no_node_reads_anothers_artifact(
    world: World, role: PeerRole, name: str, method: str, needs: str
) -> None:
    channel = world.consortium.channel(TARGET, role, name)
    error = refused_on_new(world, channel, NODE_CALLS[method])
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    caller = spiffe_id(CONSORTIUM, role, name)
    assert error.details() == (
        f"{method} needs a certificate of consortium {CONSORTIUM!r} ({needs}); "
        f"the caller is {caller}"
    )


# -- 5. a revoked operator -----------------------------------------------------------


@dataclass
class Revocation:
    credentials: grpc.ChannelCredentials  # the revoked operator's, read before revocation
    channel: grpc.Channel  # to the coordinator, connected before revocation
    pids: dict[str, int]


@pytest.fixture(scope="module")
def revocation(world: World) -> Iterator[Revocation]:
    """The launcher's operator, known to be accepted, is revoked; a successor is issued."""
    consortium = world.consortium
    credentials = consortium.credentials("operator", OPERATOR)
    assert credentials is not None
    channel = consortium.channel("coordinator", "operator", OPERATOR)
    list_rounds(channel, consortium)  # accepted, and connected
    pids = _running(consortium)
    revoke_member(world.certs.root, "operator", OPERATOR)
    issue_member(world.certs.root, "operator", SUCCESSOR)
    with channel:
        yield Revocation(credentials, channel, pids)


def _running(consortium: LocalConsortium) -> dict[str, int]:
    """Each server's process id, for those still running."""
    return {n: p.popen.pid for n, p in consortium.processes.items() if p.popen.poll() is None}


REVOKED_CALLS = [
    ("coordinator", "RunRound", "open"),
    ("coordinator", "ListRounds", "new"),
    (TARGET, "GetArtifact", "new"),
]


@pytest.mark.parametrize(
    "target, method, channel_kind",
    REVOKED_CALLS,
    ids=[f"{t}.{m}-{c}-channel" for t, m, c in REVOKED_CALLS],
)
def test_a_revoked_operator_is_refused_without_a_restart(
    world: World, revocation: Revocation, target: str, method: str, channel_kind: str
) -> None:
    """On the channel it connected before the revocation, and on a new one; the servers
    read the CRL again when it changes."""
    if channel_kind == "open":
        error = refused(world, revocation.channel, _call(target, method))
    else:
        channel = _tls_channel(world, target, revocation.credentials)
        error = refused_on_new(world, channel, _call(target, method))
    assert _running(world.consortium) == revocation.pids  # the same servers, not restarted
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    details = error.details() or ""
    assert details.startswith(
        f"the caller's certificate {spiffe_id(CONSORTIUM, 'operator', OPERATOR)} (serial "
    ), details
    assert details.endswith(") is revoked"), details


def test_a_newly_issued_operator_runs_a_round(world: World, revocation: Revocation) -> None:
    with world.consortium.client("operator", SUCCESSOR) as client:
        result = client.run_round(timeout_s=120)
        assert [r.round_num for r in client.list_rounds()][-1] == result.round_num
    assert sorted(result.accepted_nodes) == sorted(REAL)


# -- 6. an impostor at a member's address --------------------------------------------


@pytest.fixture(scope="module")
def impostor_round(world: World) -> pb.ConsortiumRoundResult:
    with world.consortium.client("operator", RELIEF) as client:
        return client.run_round(timeout_s=120)


@pytest.mark.parametrize(
    "node_id", list(IMPOSTORS), ids=[f"{n}-with-{IMPOSTORS[n][0]}" for n in IMPOSTORS]
)
def test_an_impostor_at_a_members_address_is_failed_before_any_weights_are_sent(
    world: World, impostor_round: pb.ConsortiumRoundResult, node_id: str
) -> None:
    """It answers Describe as that member would, so only its certificate can tell: the
    coordinator asks for the member's node name, which only that member's certificate from
    our CA carries, and then checks that the CRL does not list the certificate served."""
    reason = impostor_round.failed_nodes[node_id]
    assert world.impostors[node_id].cycles == 0, reason
    address = next(m["address"] for m in world.consortium.extra_members if m["node_id"] == node_id)
    assert f"the server at {address}" in reason or f"node at {address}" in reason, reason
    assert IMPOSTORS[node_id][2] in reason, reason
    assert sorted(impostor_round.accepted_nodes) == sorted(REAL)
    assert sorted(impostor_round.failed_nodes) == sorted(IMPOSTORS)


# -- 7. a server's own bad credentials -----------------------------------------------


@dataclass(frozen=True)
class Exit:
    returncode: int
    output: str


def _bad_pairs(world: World, root: Path) -> dict[str, tuple[TlsConfig | None, bool, str]]:
    """Each case's [tls] section (None: none), whether --insecure is given, and a part of
    the one line the node must print; every file named is its own copy under ``root``."""
    certs = world.certs
    ca_cert, ca_key = load_authority(certs.root)
    node = certs.member("node", TARGET)
    now = dt.datetime.now(dt.UTC)

    def issued(name: str, start: dt.datetime, end: dt.datetime) -> Path:
        cert, key = issue_certificate(
            ca_cert,
            ca_key,
            common_name=f"node {TARGET}",
            identity=spiffe_id(CONSORTIUM, "node", TARGET),
            hosts=["127.0.0.1"],
            server=True,
            server_names=[node_server_name(TARGET)],
            not_before=start,
            not_after=end,
        )
        write_pair(root / name, cert, key)
        return root / name

    def copied(name: str, cert: Path, key: Path, key_mode: int = 0o600) -> Path:
        (root / name).mkdir(parents=True)
        shutil.copy(cert, root / name / "cert.pem")
        shutil.copy(key, root / name / "key.pem")
        os.chmod(root / name / "key.pem", key_mode)
        return root / name

    def tls(pair: Path) -> TlsConfig:
        return TlsConfig(
            ca=certs.ca_cert, cert=pair / "cert.pem", key=pair / "key.pem", crl=certs.crl
        )

    expired = issued("expired", now - dt.timedelta(days=2), now - dt.timedelta(days=1))
    early = issued("not-yet-valid", now + dt.timedelta(days=1), now + dt.timedelta(days=2))
    revoked = issued("revoked", now - dt.timedelta(minutes=5), now + dt.timedelta(days=1))
    revoke_certificate(certs.root, revoked / "cert.pem")
    foreign = world.foreign.member("node", TARGET)
    other = certs.member("node", "switzerland")
    cases: dict[str, tuple[TlsConfig | None, bool, str]] = {
        "expired-certificate": (tls(expired), False, f"certificate {expired}/cert.pem expired on"),
        "certificate-not-yet-valid": (
            tls(early),
            False,
            f"certificate {early}/cert.pem is not valid yet",
        ),
        "certificate-of-another-ca": (
            tls(copied("foreign", foreign / "cert.pem", foreign / "key.pem")),
            False,
            f"certificate {root}/foreign/cert.pem is not signed by the CA in {certs.ca_cert}",
        ),
        "key-not-matching": (
            tls(copied("mismatch", node / "cert.pem", other / "key.pem")),
            False,
            f"key {root}/mismatch/key.pem does not match the certificate {root}/mismatch/cert.pem",
        ),
        "key-readable-by-others": (
            tls(copied("open-key", node / "cert.pem", node / "key.pem", 0o644)),
            False,
            f"key {root}/open-key/key.pem is readable by group or others (mode 0644)",
        ),
        "certificate-of-another-node": (
            tls(copied("switzerland", other / "cert.pem", other / "key.pem")),
            False,
            f"certificate {root}/switzerland/cert.pem does not name "
            f"'{spiffe_id(CONSORTIUM, 'node', TARGET)}'",
        ),
        "revoked-certificate": (
            tls(revoked),
            False,
            f"certificate {revoked}/cert.pem is revoked (serial ",
        ),
        "no-tls-section": (None, False, "has no [tls] section"),
        "tls-section-and-insecure": (tls(node), True, "has a [tls] section and --insecure"),
    }
    return cases


@pytest.fixture(scope="module")
def bad_starts(
    world: World, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[Exit, str]]:
    """Start a node with each bad configuration, all at once (each costs an interpreter and
    its imports), and collect how each exited."""
    root = tmp_path_factory.mktemp("bad-starts")
    spec = next(s for s in world.consortium.nodes if s.node_id == TARGET)
    base_config = world.consortium.node_config(spec)
    running: dict[str, tuple[subprocess.Popen[str], str]] = {}
    try:
        for case, (tls, insecure, expected) in _bad_pairs(world, root / "pki").items():
            config: NodeConfig = base_config.model_copy(update={"tls": tls})
            path = write_config(root / case / "node.toml", config)
            command = [
                sys.executable, "-m", "tapestry", "node", "serve", "--config", str(path),
                "--data-dir", str(root / case / "data"), "--listen", "127.0.0.1:0",
                *(["--insecure"] if insecure else []),
            ]  # fmt: skip
            popen = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
            running[case] = (popen, expected)
        exits = {}
        for case, (popen, expected) in running.items():
            output, _ = popen.communicate(timeout=START_TIMEOUT_S)
            exits[case] = (Exit(popen.returncode, output), expected)
        return exits
    finally:
        for popen, _ in running.values():
            if popen.poll() is None:
                popen.kill()
                popen.wait()


BAD_STARTS = [
    "expired-certificate",
    "certificate-not-yet-valid",
    "certificate-of-another-ca",
    "key-not-matching",
    "key-readable-by-others",
    "certificate-of-another-node",
    "revoked-certificate",
    "no-tls-section",
    "tls-section-and-insecure",
]


@pytest.mark.parametrize("case", BAD_STARTS)
def test_a_server_with_bad_credentials_exits_at_start_with_one_line(
    bad_starts: dict[str, tuple[Exit, str]], case: str
) -> None:
    exit_, expected = bad_starts[case]
    lines = exit_.output.strip().splitlines()
    assert exit_.returncode == 1, exit_.output
    assert len(lines) == 1, exit_.output
    assert "Traceback" not in exit_.output
    assert lines[0].startswith("Error: "), exit_.output
    assert expected in lines[0], lines[0]


# -- 8. a plaintext server says so -----------------------------------------------------


def test_an_insecure_server_warns_at_start_and_on_every_round(
    tmp_path: Path,
) -> None:
    specs = node_specs(tmp_path)[:2]  # two members: the policy's least for a round
    with LocalConsortium(tmp_path, specs, policy=POLICY, tls=False) as consortium:
        with consortium.client() as client:
            for _ in range(2):
                client.run_round(timeout_s=120)
        coordinator = consortium.log_tail("coordinator", lines=400)
        node = consortium.log_tail(specs[0].node_id, lines=400)
    start = "INSECURE: coordinator serves plaintext (--insecure)"
    per_round = "INSECURE: coordinator over plaintext, from an unauthenticated caller"
    assert coordinator.count(start) == 1, coordinator
    assert coordinator.count(per_round) == 2, coordinator
    # The node dials out: it says so once, and on every cycle.
    assert node.count(f"INSECURE: node {specs[0].node_id} dials its coordinator") == 1, node
    assert node.count(f"INSECURE: node {specs[0].node_id} cycle over plaintext") == 2, node
