"""The attacker's side of dial-out sessions, over real sockets (issue 15): a coordinator
built from a consortium file in this process, serving mutual TLS on 127.0.0.1, attacked by
strangers and by a hostile member holding a valid certificate; and a node's session held
against a dishonest coordinator that sends it whatever it likes.

Every case asserts the safe outcome: the call refused (or the session ended) with a status
and a reason that does not echo unbounded input, the coordinator's data directory unchanged,
and no call, thread or queue held past its bound. The finer cases are in-process, in
tests/unit/test_session_units.py.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from tapestry.config import ConsortiumConfig, NodeConfig, TlsConfig, build_config
from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.consortium.v1 import consortium_pb2_grpc as pb_grpc
from tapestry.coordinator.roster import Roster
from tapestry.coordinator.sessions import Session
from tapestry.coordinator.startup import build_coordinator_server
from tapestry.limits import MAX_ERROR_DETAILS_CHARS
from tapestry.node.dial_out import DialOut, SessionClosedForGood
from tapestry.pki.authority import init_consortium, revoke_member
from tapestry.pki.credentials import load_channel_credentials
from tapestry.pki.layout import COORDINATOR_SERVER_NAME, Layout
from tapestry.training.consortium import ModelSpec
from tapestry.wire import codec
from tapestry.wire.grpc_plumbing import SESSION_CHANNEL_OPTIONS, build_server, open_channel

CONSORTIUM = "tapestry-attacks"
MEMBERS = {"vietnam": "Vietnam", "switzerland": "Switzerland", "india": "India", "peru": "Peru"}
OPERATOR = "ops"
Request = pb.OpenSessionRequest
Response = pb.OpenSessionResponse


@dataclass
class Coordinator:
    address: str
    certs: Layout
    foreign: Layout  # another CA's: same consortium name, same members
    roster: Roster
    data_dir: Path


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Coordinator]:
    root = tmp_path_factory.mktemp("sessions")
    hosts = [(node_id, "127.0.0.1") for node_id in MEMBERS]
    certs = init_consortium(
        root / "certs",
        CONSORTIUM,
        coordinator_hosts=["127.0.0.1"],
        nodes=hosts,
        operators=[OPERATOR],
    )
    foreign = init_consortium(
        root / "foreign", CONSORTIUM, coordinator_hosts=["127.0.0.1"], nodes=hosts
    )
    tls = TlsConfig(
        ca=certs.ca_cert,
        cert=certs.coordinator / "cert.pem",
        key=certs.coordinator / "key.pem",
        crl=certs.crl,
    )
    settings = {
        "consortium_id": CONSORTIUM,
        "nodes": [{"node_id": n, "jurisdiction": j} for n, j in MEMBERS.items()],
        "tls": tls.model_dump(),
    }
    config = build_config(ConsortiumConfig, settings, "test")
    data_dir = root / "data"
    server, port, _, roster = build_coordinator_server(config, "127.0.0.1:0", data_dir)
    server.start()
    try:
        yield Coordinator(f"127.0.0.1:{port}", certs, foreign, roster, data_dir)
    finally:
        roster.close()
        server.stop(None).wait()


def _credentials(certs: Layout, role: str, name: str, trust: Layout | None = None) -> Any:
    folder = certs.member(role, name)  # type: ignore[arg-type]
    return load_channel_credentials(
        folder / "cert.pem", folder / "key.pem", (trust or certs).ca_cert
    )


def _channel(coordinator: Coordinator, credentials: grpc.ChannelCredentials) -> grpc.Channel:
    return open_channel(
        coordinator.address,
        credentials,
        server_name=COORDINATOR_SERVER_NAME,
        options=SESSION_CHANNEL_OPTIONS,
    )


def _hello(node_id: str, jurisdiction: str | None = None) -> Request:
    return Request(
        open=pb.SessionOpen(
            protocol_version=pb.SESSION_PROTOCOL_V1,
            consortium_id=CONSORTIUM,
            node_id=node_id,
            jurisdiction=jurisdiction if jurisdiction is not None else MEMBERS.get(node_id, ""),
            release="attacker",
        )
    )


class RawSession:
    """A session as a hostile member holds it: whatever it sends, read when it likes."""

    def __init__(self, channel: grpc.Channel, first: Request) -> None:
        self._requests: queue.Queue[Request | None] = queue.Queue()
        self._requests.put(first)
        stub = pb_grpc.CoordinatorServiceStub(channel)
        self.call = stub.OpenSession(iter(self._requests.get, None))

    def send(self, message: Request) -> None:
        self._requests.put(message)

    def close(self) -> None:
        self._requests.put(None)

    def next(self) -> Response:
        reply: Response = next(self.call)
        return reply

    def refusal(self, timeout_s: float = 10.0) -> grpc.RpcError:
        """How the call ended: the first error its replies raise (they are drained)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                next(self.call)
            except grpc.RpcError as error:
                return error
        raise AssertionError("the call did not end")


def _files(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _connected(coordinator: Coordinator) -> set[str]:
    return set(coordinator.roster.members.connected())


def _eventually(condition: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def _threads(name: str) -> int:
    return sum(1 for thread in threading.enumerate() if thread.name == name)


# -- strangers -----------------------------------------------------------------------------

STRANGERS: dict[str, tuple[Callable[[Coordinator], Any], grpc.StatusCode]] = {
    "no certificate": (
        lambda c: grpc.ssl_channel_credentials(root_certificates=c.certs.ca_cert.read_bytes()),
        grpc.StatusCode.UNAVAILABLE,
    ),
    "a member's certificate from another CA": (
        lambda c: _credentials(c.foreign, "node", "vietnam", trust=c.certs),
        grpc.StatusCode.UNAVAILABLE,
    ),
    "the operator's certificate": (
        lambda c: _credentials(c.certs, "operator", OPERATOR),
        grpc.StatusCode.PERMISSION_DENIED,
    ),
}


@pytest.mark.parametrize("case", list(STRANGERS))
def test_a_stranger_cannot_open_a_session(coordinator: Coordinator, case: str) -> None:
    credentials, code = STRANGERS[case]
    before = _files(coordinator.data_dir)
    with _channel(coordinator, credentials(coordinator)) as channel:
        session = RawSession(channel, _hello("vietnam"))
        error = session.refusal()

    assert error.code() is code
    assert "vietnam" not in _connected(coordinator)
    assert _files(coordinator.data_dir) == before


def test_a_member_cannot_open_a_session_as_another_member(coordinator: Coordinator) -> None:
    with _channel(coordinator, _credentials(coordinator.certs, "node", "vietnam")) as channel:
        claimed = RawSession(channel, _hello("switzerland")).refusal()
        huge = RawSession(channel, _hello("s" * 1_000_000, "Switzerland")).refusal()

    assert claimed.code() is grpc.StatusCode.PERMISSION_DENIED
    assert claimed.details() == (
        "the node says it is 'switzerland' but its certificate names node 'vietnam'"
    )
    assert huge.code() is grpc.StatusCode.PERMISSION_DENIED
    assert len(huge.details()) < 200
    assert "(1000000 characters)" in huge.details()
    assert not _connected(coordinator) & {"vietnam", "switzerland"}


# -- a hostile member ----------------------------------------------------------------------


def test_a_members_nonsense_ends_its_own_session_and_nothing_else(
    coordinator: Coordinator,
) -> None:
    before = _files(coordinator.data_dir)
    with _channel(coordinator, _credentials(coordinator.certs, "node", "switzerland")) as channel:
        session = RawSession(channel, _hello("switzerland"))
        assert session.next().WhichOneof("item") == "welcome"
        assert session.next().WhichOneof("item") == "describe"  # its admission check
        for exchange_id in range(100, 5_100):  # exchanges nobody opened
            session.send(Request(exchange_id=exchange_id, described=pb.DescribeResponse()))
            session.send(
                Request(exchange_id=exchange_id, end=pb.ExchangeEnd(code=99, message="x" * 4096))
            )
        session.send(_hello("switzerland"))  # a second open
        error = session.refusal()

    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "the node sent a second SessionOpen"
    listed = {m.node_id: m for m in coordinator.roster.members.listing()}["switzerland"]
    assert not listed.connected
    assert listed.ended_reason == "the node sent a second SessionOpen"
    assert listed.release == "attacker"
    assert _files(coordinator.data_dir) == before


def test_sessions_opened_in_a_loop_hold_one_session_and_no_threads(
    coordinator: Coordinator,
) -> None:
    readers, checks = _threads("session-reader"), _threads("session-check")
    with _channel(coordinator, _credentials(coordinator.certs, "node", "vietnam")) as channel:
        held: RawSession | None = None
        for _ in range(20):
            session = RawSession(channel, _hello("vietnam"))
            assert session.next().WhichOneof("item") == "welcome"
            if held is not None:  # the newer session, with the same certificate, wins
                replaced = held.refusal()
                assert replaced.code() is grpc.StatusCode.ABORTED
                assert replaced.details().startswith("replaced by a newer session of the same")
            held = session

        assert _connected(coordinator) >= {"vietnam"}
        assert _eventually(lambda: _threads("session-reader") <= readers + 1)
        assert _eventually(lambda: _threads("session-check") <= checks + 1)
        assert held is not None
        held.close()
        assert _eventually(lambda: "vietnam" not in _connected(coordinator))


def test_a_revoked_member_that_never_reads_loses_its_call_within_seconds(
    coordinator: Coordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its handler waits in gRPC's flow control, where the session's end cannot reach it:
    the call must still end, freeing the worker thread and the member's call count."""
    monkeypatch.setattr("tapestry.coordinator.remote_node.DESCRIBE_TIMEOUT_S", 60.0)
    members = coordinator.roster.members
    handler_returned = threading.Event()  # the session's handler ends by leaving Members
    leave = members.leave

    def left(session: Session) -> None:
        leave(session)
        if session.opened.node_id == "india":
            handler_returned.set()

    monkeypatch.setattr(members, "leave", left)
    with _channel(coordinator, _credentials(coordinator.certs, "node", "india")) as channel:
        session = RawSession(channel, _hello("india"))
        assert session.next().WhichOneof("item") == "welcome"
        held = coordinator.roster.members.link("india").session
        assert held is not None
        chunk = pb.RunSovereignCycleRequest(base_chunk=pb.TensorChunk(data=bytes(1 << 20)))
        with pytest.raises(TimeoutError):  # the base of a round, to a member that never reads
            while True:
                held.outbox.data(Response(exchange_id=99, cycle=chunk), time.monotonic() + 2)

        revoke_member(coordinator.certs.root, "node", "india")

        assert handler_returned.wait(15)
    listed = {m.node_id: m for m in coordinator.roster.members.listing()}["india"]
    assert not listed.connected
    assert "is revoked" in listed.ended_reason


# -- a dishonest coordinator ---------------------------------------------------------------

Script = Callable[[Iterator[Request], grpc.ServicerContext, int], Iterator[Response]]


def _hold(context: grpc.ServicerContext) -> None:
    """Keep the session open, saying nothing, until the node (or the test) ends it."""
    while context.is_active():
        time.sleep(0.05)


class FakeCoordinator(pb_grpc.CoordinatorServiceServicer):
    """A coordinator that plays ``script`` on each session (the n-th, counted from 1)."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.sessions = 0

    def OpenSession(
        self, request_iterator: Iterator[Request], context: grpc.ServicerContext
    ) -> Iterator[Response]:
        self.sessions += 1
        yield from self.script(request_iterator, context, self.sessions)


class NodeServicer:
    """The node's side of cycles, as far as these cases reach: it describes itself."""

    def __init__(self, padding: int = 0) -> None:
        self.padding = padding

    def Describe(self, request: pb.DescribeRequest, context: Any) -> pb.DescribeResponse:
        return pb.DescribeResponse(node_id="vietnam", jurisdiction="Vietnam" + "." * self.padding)


@dataclass
class DialedNode:
    dial: DialOut
    built: list[ModelSpec]  # what the node was asked to build a model from
    ran: Future[None]
    stop: threading.Event
    coordinator: FakeCoordinator


@pytest.fixture
def dial(tmp_path: Path) -> Iterator[Callable[[Script, NodeServicer], DialedNode]]:
    """A node dialing a fake coordinator that plays the given script."""
    started: list[tuple[grpc.Server, threading.Event]] = []
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("xin chao\n", encoding="utf-8")

    def start(
        script: Script, servicer: NodeServicer, limits: dict[str, Any] | None = None
    ) -> DialedNode:
        fake = FakeCoordinator(script)
        server, port, _ = build_server(
            "127.0.0.1:0", [lambda s: pb_grpc.add_CoordinatorServiceServicer_to_server(fake, s)], []
        )
        server.start()
        stop = threading.Event()
        started.append((server, stop))
        config = build_config(
            NodeConfig,
            {
                "node_id": "vietnam",
                "jurisdiction": "Vietnam",
                "consortium_id": CONSORTIUM,
                "quality_score": 0.9,
                "corpus": [str(corpus)],
                "coordinator": f"127.0.0.1:{port}",
                **({"limits": limits} if limits else {}),
            },
            "test",
        )
        built: list[ModelSpec] = []

        def prepare(spec: ModelSpec) -> Any:
            built.append(spec)
            return servicer

        dial = DialOut(config, f"127.0.0.1:{port}", None, prepare, backoff=(0.01, 0.05))
        pool = ThreadPoolExecutor(1)
        ran = pool.submit(dial.run, stop)
        pool.shutdown(wait=False)
        return DialedNode(dial, built, ran, stop, fake)

    yield start
    for server, stop in started:
        stop.set()
        server.stop(None).wait()


def _welcome(model: pb.ModelSpec, sha256: str | None = None) -> Response:
    digest = sha256 if sha256 is not None else codec.model_spec_from_proto(model).digest()
    return Response(
        welcome=pb.SessionWelcome(
            protocol_version=pb.SESSION_PROTOCOL_V1,
            consortium_id=CONSORTIUM,
            model=model,
            model_sha256=digest,
        )
    )


def _spec(*args: Any, **fields: Any) -> pb.ModelSpec:
    """A model spec as a coordinator sends one (the fields nobody set at their defaults)."""
    return codec.model_spec_to_proto(ModelSpec(*args, **fields))


def _hf(config: str) -> pb.ModelSpec:
    return _spec("hf-causal-lm", 256, hf_config=config)


TINY = _spec()
BAD_WELCOMES: dict[str, tuple[Response, str]] = {
    "an architecture nobody knows, named at length": (
        _welcome(_spec("x" * 1_000_000)),
        "the coordinator's model cannot be built: unknown model architecture 'xxxx",
    ),
    "an hf config that is not JSON": (
        _welcome(_hf("{not json")),
        "the coordinator's model cannot be built: hf_config is not JSON text",
    ),
    "an hf config that is a JSON list": (
        _welcome(_hf("[1,2]")),
        "the coordinator's model cannot be built: hf_config vocab_size None differs",
    ),
    "an hf config asking for code from a model repository": (
        _welcome(
            _hf(
                '{"auto_map":{"AutoModel":"x.Y"},"model_type":"gpt2","trust_remote_code":true,'
                '"vocab_size":256}'
            )  # fmt: skip
        ),
        "the coordinator's model: (file): hf_config sets auto_map, trust_remote_code",
    ),
    "an hf config with a megabyte vocab_size": (
        _welcome(_hf('{"model_type":"gpt2","vocab_size":"' + "9" * 1_000_000 + '"}')),
        "the coordinator's model cannot be built: hf_config vocab_size '9999",
    ),
    "a gpt past MAX_MODEL_PARAMS": (
        _welcome(_spec("gpt", 256, 1 << 16, n_layers=1024)),
        "the coordinator's model: (file): the model would hold about",
    ),
    "an hf config past MAX_MODEL_PARAMS, counted without building it": (
        _welcome(
            _hf(
                '{"hidden_size":65536,"intermediate_size":200000,"model_type":"llama",'
                '"num_attention_heads":64,"num_hidden_layers":80,"vocab_size":256}'
            )  # fmt: skip
        ),
        "the coordinator's model hf-causal-lm(vocab_size=256, hf_config sha256 2f45558c096e) "
        "holds about 4,520,161,640,448 parameters; this node builds at most 68,719,476,736",
    ),
    "an hf config of a million layers, which even counting would build": (
        _welcome(
            _hf(
                '{"hidden_size":8,"intermediate_size":8,"model_type":"llama",'
                '"num_attention_heads":1,"num_hidden_layers":1000000,"vocab_size":256}'
            )  # fmt: skip
        ),
        "the coordinator's model: (file): hf_config num_hidden_layers = 1,000,000 is more "
        "than 1,024",
    ),
    "an hf config nested 100,000 tables deep": (
        _welcome(
            _hf(
                '{"model_type":"gpt2","vocab_size":256,"x":'
                + '{"a":' * 100_000
                + "1"
                + "}" * 100_001
            )
        ),
        "the coordinator's model cannot be built: hf_config nests too deep",
    ),
    "an hf config nested 9 tables deep": (
        _welcome(_hf('{"model_type":"gpt2","vocab_size":256,"x":' + '{"a":' * 8 + "1" + "}" * 9)),
        "the coordinator's model: (file): hf_config nests more than 8 tables deep",
    ),
    "a gpt wider than MAX_HIDDEN_SIZE": (
        _welcome(_spec("gpt", 256, 1 << 30)),
        "the coordinator's model: hidden_size: Input should be less than or equal to 16777216",
    ),
    "a field the architecture does not read": (
        _welcome(_spec("tiny-causal", n_layers=7)),
        "the coordinator's model cannot be built: n_layers does not apply",
    ),
    "a digest that is not the model's": (
        _welcome(TINY, sha256="0" * 64),
        "the welcome's model does not match the digest it carries",
    ),
}


@pytest.mark.parametrize("case", list(BAD_WELCOMES))
def test_a_welcome_the_node_cannot_take_stops_it_before_any_model_is_built(
    dial: Callable[[Script, NodeServicer], DialedNode], case: str
) -> None:
    welcome, said = BAD_WELCOMES[case]

    def script(requests: Any, context: Any, n: int) -> Iterator[Response]:
        yield welcome
        _hold(context)

    node = dial(script, NodeServicer())

    with pytest.raises(SessionClosedForGood) as caught:
        node.ran.result(timeout=30)
    assert str(caught.value).startswith(said)
    assert len(str(caught.value)) <= MAX_ERROR_DETAILS_CHARS
    assert node.built == []


def test_a_welcome_past_the_nodes_own_model_bound_is_refused_before_it_is_built(
    dial: Callable[..., DialedNode],
) -> None:
    # A GPT-2 of 2 layers, width 64: 124,672 parameters (counted on the meta device), one
    # more than this node's [limits] max_model_params lets it build.
    config = (
        '{"model_type":"gpt2","n_embd":64,"n_head":2,"n_layer":2,"n_positions":128,'
        '"vocab_size":256}'
    )

    def script(requests: Any, context: Any, n: int) -> Iterator[Response]:
        yield _welcome(_hf(config))
        _hold(context)

    node = dial(script, NodeServicer(), limits={"max_model_params": 124_671})

    with pytest.raises(SessionClosedForGood) as caught:
        node.ran.result(timeout=30)
    assert "holds about 124,672 parameters; this node builds at most 124,671" in str(caught.value)
    assert node.built == []


def _read_into(requests: Iterator[Request], answers: queue.Queue[Request]) -> None:
    try:
        for request in requests:
            answers.put(request)
    except grpc.RpcError:
        pass  # the session ended


def test_a_second_welcome_and_talk_of_unknown_exchanges_leave_the_session_working(
    dial: Callable[[Script, NodeServicer], DialedNode],
) -> None:
    answers: queue.Queue[Request] = queue.Queue()

    def script(requests: Iterator[Request], context: Any, n: int) -> Iterator[Response]:
        threading.Thread(target=_read_into, args=(requests, answers), daemon=True).start()
        yield _welcome(TINY)
        yield _welcome(TINY)
        for exchange_id in range(1, 2_001):
            yield Response(exchange_id=exchange_id, cycle=pb.RunSovereignCycleRequest(
                base_chunk=pb.TensorChunk(data=b"x" * 100)))  # fmt: skip
            yield Response(exchange_id=exchange_id, end=pb.ExchangeEnd(code=2**32 - 1))
            yield Response(exchange_id=exchange_id)
        yield Response(exchange_id=9_999, describe=pb.DescribeRequest())
        _hold(context)

    node = dial(script, NodeServicer())
    answers.get(timeout=10)  # the node's SessionOpen
    described = answers.get(timeout=30)

    assert described.exchange_id == 9_999
    assert described.described.node_id == "vietnam"
    assert node.dial.sessions == 1
    assert not node.ran.done()


def test_a_coordinator_that_floods_describes_and_never_reads_loses_the_session(
    dial: Callable[[Script, NodeServicer], DialedNode],
) -> None:
    """The node's answers would pile up in its memory for as long as the connection lasts:
    past SESSION_CONTROL_MESSAGES the node ends the session and dials again."""
    second = threading.Event()

    def script(requests: Iterator[Request], context: Any, n: int) -> Iterator[Response]:
        yield _welcome(TINY)
        if n > 1:
            second.set()
            _hold(context)
            return
        for exchange_id in range(1, 30_001):  # and never a look at what the node sends
            if not context.is_active():
                return
            yield Response(exchange_id=exchange_id, describe=pb.DescribeRequest())
        _hold(context)

    node = dial(script, NodeServicer(padding=2048))

    assert second.wait(60), "the node held the flooded session"
    assert _eventually(lambda: node.dial.sessions >= 2)  # welcomed again
    assert not node.ran.done()
