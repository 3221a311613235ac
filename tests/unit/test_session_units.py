"""Attacks on members' sessions, in process: what a hostile member sends the coordinator's
:class:`Session`, :class:`Members` and :class:`SessionDoor`, and what a dishonest
coordinator sends a node's ``_Cycles``. Every peer is untrusted: each case asserts the safe
outcome (the message dropped, the exchange or the session ended with a reason that does not
echo the input), and that no reader, thread or queue is held past its bound."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import grpc
import pytest

from tapestry.config import NodeLimits
from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.coordinator import session_service, sessions
from tapestry.coordinator.members import Members, SessionRefused
from tapestry.coordinator.node_links import LinkError
from tapestry.coordinator.remote_node import RemoteSovereignNode
from tapestry.coordinator.session_service import SessionDoor
from tapestry.coordinator.sessions import Session, SessionOpened
from tapestry.limits import (
    MAX_ERROR_DETAILS_CHARS,
    MAX_PEER_NAME_CHARS,
    MAX_SESSION_CYCLES,
    SESSION_CONTROL_MESSAGES,
)
from tapestry.node.artifacts import ArtifactStore
from tapestry.node.dial_out import _Cycles
from tapestry.node.servicer import SovereignNodeServicer
from tapestry.training.consortium import ModelSpec, SovereignTrainingNode
from tapestry.wire.outbox import Outbox, OutboxFull

CONSORTIUM = "tapestry-test"
Request = pb.OpenSessionRequest
Response = pb.OpenSessionResponse
START = pb.RunSovereignCycleRequest(start=pb.CycleStart(round_num=1, consortium_id=CONSORTIUM))
PROGRESS = pb.RunSovereignCycleResponse(progress=pb.CycleProgress())
HUGE = "x" * 1_000_000


class Sent:
    """What an outbox sends, read on a thread as gRPC reads it."""

    def __init__(self, outbox: Outbox[Any]) -> None:
        self._queue: queue.Queue[Any] = queue.Queue()
        threading.Thread(target=self._read, args=(outbox,), daemon=True).start()

    def _read(self, outbox: Outbox[Any]) -> None:
        for message in outbox.messages():
            self._queue.put(message)

    def take(self, timeout_s: float = 5.0) -> Any:
        return self._queue.get(timeout=timeout_s)

    def empty_after(self, wait_s: float) -> bool:
        time.sleep(wait_s)
        return self._queue.empty()


def _opened(
    node_id: str = "vietnam", serial: int | None = 7, release: str = "1.0"
) -> SessionOpened:
    return SessionOpened(node_id, "ipv4:127.0.0.1:5000", 1, release, serial, datetime.now(UTC))


def _session() -> tuple[Session, Sent]:
    session = Session(_opened())
    return session, Sent(session.outbox)


def _answer(session: Session, exchange_id: int, **item: Any) -> None:
    session.receive(Request(exchange_id=exchange_id, **item))


def _in_thread(call: Callable[[], Any]) -> Future[Any]:
    pool = ThreadPoolExecutor(1)
    future = pool.submit(call)
    pool.shutdown(wait=False)
    return future


def _threads(name: str) -> int:
    return sum(1 for thread in threading.enumerate() if thread.name.startswith(name))


def _eventually(condition: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


# -- a hostile member's messages to its session -------------------------------------------


def test_replies_before_any_request_are_dropped_not_taken_as_answers() -> None:
    session, sent = _session()
    # Exchange ids count from 1: the member answers the describe it expects before it is asked.
    _answer(session, 1, described=pb.DescribeResponse(node_id="forged"))
    _answer(session, 1, end=pb.ExchangeEnd(code=grpc.StatusCode.OK.value[0]))

    answer = _in_thread(lambda: session.describe(5.0))
    ask = sent.take()
    _answer(session, ask.exchange_id, described=pb.DescribeResponse(node_id="vietnam"))

    assert ask.exchange_id == 1
    assert answer.result(5).node_id == "vietnam"
    assert session.ended is None


def test_a_flood_of_unknown_exchange_ids_is_dropped_and_the_session_still_works() -> None:
    session, sent = _session()
    items: list[dict[str, Any]] = [
        {"described": pb.DescribeResponse(node_id="x")},
        {"cycle": PROGRESS},
        {"end": pb.ExchangeEnd(code=13, message="boom")},
    ]
    began = time.monotonic()
    for exchange_id in range(1_000, 31_000):
        _answer(session, exchange_id, **items[exchange_id % 3])
    flooded_s = time.monotonic() - began

    answer = _in_thread(lambda: session.describe(5.0))
    ask = sent.take()
    _answer(session, ask.exchange_id, described=pb.DescribeResponse(node_id="vietnam"))

    assert flooded_s < 10  # dropped on arrival: no reader waits on an exchange nobody holds
    assert answer.result(5).node_id == "vietnam"
    assert session.ended is None


def test_an_end_with_a_code_grpc_does_not_define_and_a_huge_message_is_cut() -> None:
    session, sent = _session()
    answer = _in_thread(lambda: session.describe(5.0))
    ask = sent.take()
    _answer(session, ask.exchange_id, end=pb.ExchangeEnd(code=2**32 - 1, message=HUGE))

    with pytest.raises(LinkError) as caught:
        answer.result(5)
    assert caught.value.code() is grpc.StatusCode.UNKNOWN
    assert caught.value.details() == "x" * MAX_ERROR_DETAILS_CHARS


def test_a_cycle_ended_by_the_member_with_a_huge_message_fails_with_it_cut() -> None:
    session, sent = _session()
    call = session.cycle(iter([START]), 5.0)
    ask = sent.take()
    _answer(session, ask.exchange_id, end=pb.ExchangeEnd(code=14, message=HUGE))

    with pytest.raises(LinkError) as caught:
        next(call)
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    assert caught.value.details() == "x" * MAX_ERROR_DETAILS_CHARS
    assert session.ended is None  # one exchange over, the session goes on


WRONG_ANSWERS: dict[str, tuple[str, dict[str, Any], str]] = {
    "a cycle message to a describe": (
        "describe",
        {"cycle": PROGRESS},
        "the node answered a describe wrongly",
    ),
    "an OK end to a describe": (
        "describe",
        {"end": pb.ExchangeEnd(code=0, message=HUGE)},
        "the node answered a describe wrongly",
    ),
    "a describe answer to a cycle": (
        "cycle",
        {"described": pb.DescribeResponse(node_id="vietnam")},
        "the node answered a cycle wrongly",
    ),
}


@pytest.mark.parametrize("case", list(WRONG_ANSWERS))
def test_an_answer_of_the_wrong_kind_fails_the_exchange(case: str) -> None:
    asked, item, message = WRONG_ANSWERS[case]
    session, sent = _session()
    if asked == "describe":
        answer = _in_thread(lambda: session.describe(5.0))
    else:
        call = session.cycle(iter([START]), 5.0)
        answer = _in_thread(lambda: next(call))
    ask = sent.take()
    _answer(session, ask.exchange_id, **item)

    with pytest.raises(LinkError) as caught:
        answer.result(5)
    assert (caught.value.code(), caught.value.details()) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        message,
    )


@pytest.mark.parametrize(
    ("item", "said"),
    [
        ({"open": pb.SessionOpen(node_id="switzerland")}, "the node sent a second SessionOpen"),
        ({}, "the node sent a message with no item"),
    ],
    ids=["a second open", "an empty oneof"],
)
def test_a_second_open_or_an_empty_message_ends_the_session_and_its_exchanges(
    item: dict[str, Any], said: str
) -> None:
    session, sent = _session()
    answer = _in_thread(lambda: session.describe(5.0))
    sent.take()
    _answer(session, 0, **item)

    with pytest.raises(LinkError) as caught:
        answer.result(5)
    assert (caught.value.code(), caught.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, said)
    assert session.ended is caught.value
    assert session.outbox.closed


def test_a_reader_handing_a_message_to_an_exchange_that_ends_is_released() -> None:
    """A member that answers one exchange many times over fills its queue; the reader then
    waits to hand over the next. When the exchange ends (the round took its one answer)
    the reader must go on, or the member's session reads nothing more, ever."""
    session, _ = _session()
    exchange_id, _replies = session._open()  # an exchange, as describe opens it
    for _ in range(4):  # the exchange's queue is full
        _answer(session, exchange_id, described=pb.DescribeResponse())
    reader = _in_thread(lambda: _answer(session, exchange_id, described=pb.DescribeResponse()))
    time.sleep(0.1)
    session._forget(exchange_id)  # as describe does once it has its answer

    reader.result(timeout=5)  # raises TimeoutError while the reader is held


def test_slow_loris_progress_does_not_stretch_the_cycles_deadline() -> None:
    session, sent = _session()
    call = session.cycle(iter([START]), 1.0)
    ask = sent.take()
    stop = threading.Event()

    def trickle() -> None:
        while not stop.wait(0.05):
            _answer(session, ask.exchange_id, cycle=PROGRESS)

    threading.Thread(target=trickle, daemon=True).start()
    began = time.monotonic()
    with pytest.raises(LinkError) as caught:
        for _ in call:
            pass
    stop.set()

    assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - began < 3
    told = [sent.take() for _ in range(2)]  # the requests' end, then the cancel
    assert told[-1].end.code == grpc.StatusCode.CANCELLED.value[0]


# -- a member that does not read ---------------------------------------------------------


def test_a_cycle_toward_a_member_that_never_reads_fails_at_its_deadline() -> None:
    session = Session(_opened())  # nobody reads its outbox
    chunks = [pb.RunSovereignCycleRequest(base_chunk=pb.TensorChunk()) for _ in range(100)]
    call = session.cycle(iter(chunks), 0.5)

    with pytest.raises(LinkError) as caught:
        next(call)
    assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED


def test_a_member_that_never_reads_loses_its_session_once_control_messages_pile_up() -> None:
    session = Session(_opened())  # nobody reads its outbox: describes and cancels pile up
    for _ in range(SESSION_CONTROL_MESSAGES * 4):
        if session.ended is not None:
            break
        with pytest.raises(LinkError):
            session.describe(0.001)

    assert session.ended is not None
    assert session.ended.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert session.ended.details() == (
        f"the node did not read its session: {SESSION_CONTROL_MESSAGES} control messages "
        "wait for it (SESSION_CONTROL_MESSAGES)"
    )


def test_a_session_that_ends_hangs_up_its_call_if_the_handler_is_still_held(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The handler of a member that does not read waits in gRPC's flow control, where no
    closed outbox reaches it: the session's end must hang the call up itself."""
    monkeypatch.setattr(sessions, "SESSION_HANG_UP_S", 0.05)
    hung_up = threading.Event()
    members = Members([("vietnam", "Vietnam")])
    session = members.join(_opened(), hang_up=hung_up.set)

    session.end(LinkError(grpc.StatusCode.PERMISSION_DENIED, "revoked"))

    assert hung_up.wait(5)


# -- who holds a session -----------------------------------------------------------------


def test_a_session_replaced_mid_cycle_fails_the_rounds_exchange_with_the_reason() -> None:
    members = Members([("vietnam", "Vietnam")])
    old = members.join(_opened(serial=7))
    Sent(old.outbox)
    call = old.cycle(iter([START]), 30.0)

    new = members.join(_opened(serial=7))

    with pytest.raises(LinkError) as caught:
        next(call)
    assert caught.value.code() is grpc.StatusCode.ABORTED
    assert caught.value.details() == (
        "replaced by a newer session of the same node from ipv4:127.0.0.1:5000"
    )
    assert old.outbox.closed
    assert members.connected() == {"vietnam": new}
    assert new.ended is None


def test_a_second_session_with_another_certificate_is_refused_and_the_first_kept() -> None:
    members = Members([("vietnam", "Vietnam")])
    first = members.join(_opened(serial=7))

    with pytest.raises(SessionRefused) as caught:
        members.join(_opened(serial=8))

    assert caught.value.code is grpc.StatusCode.ALREADY_EXISTS
    assert members.connected() == {"vietnam": first}
    assert first.ended is None


def test_sessions_opened_in_a_loop_hold_one_session_per_member() -> None:
    members = Members([("vietnam", "Vietnam"), ("india", "India")])
    threads = threading.active_count()
    held = [members.join(_opened(serial=7)) for _ in range(2_000)]

    assert members.connected() == {"vietnam": held[-1]}
    assert all(session.ended is not None for session in held[:-1])
    assert [m.node_id for m in members.listing()] == ["vietnam", "india"]
    assert threading.active_count() <= threads + 1  # at most a hang-up timer's worth


# -- the door: a session's opening --------------------------------------------------------


class Aborted(Exception):
    pass


class FakeContext:
    """What the door asks of a gRPC call; ``abort`` raises :class:`Aborted`."""

    def __init__(self) -> None:
        self.cancelled = threading.Event()
        self.code: grpc.StatusCode | None = None
        self.details = ""

    def abort(self, code: grpc.StatusCode, details: str) -> NoReturn:
        self.code, self.details = code, details
        raise Aborted(details)

    def cancel(self) -> None:
        self.cancelled.set()

    def peer(self) -> str:
        return "ipv4:127.0.0.1:5000"


class MemberStream:
    """A member's request stream: what the test puts, until it ends or the call is
    cancelled (then it raises, as gRPC's iterator does)."""

    def __init__(self, context: FakeContext) -> None:
        self._queue: queue.Queue[Request | None] = queue.Queue()
        self._context = context

    def put(self, message: Request | None) -> None:
        self._queue.put(message)

    def __iter__(self) -> Iterator[Request]:
        return self

    def __next__(self) -> Request:
        while True:
            if self._context.cancelled.is_set():
                raise grpc.RpcError("cancelled")
            try:
                message = self._queue.get(timeout=0.01)
            except queue.Empty:
                continue
            if message is None:
                raise StopIteration
            return message


def _door(members: Members, check: Callable[[Session], None] | None = None) -> SessionDoor:
    return SessionDoor(
        members, CONSORTIUM, ModelSpec(), lambda: 0, check or (lambda session: None), secure=False
    )


def _hello(
    node_id: str = "vietnam", jurisdiction: str = "Vietnam", release: str = "1.0"
) -> Request:
    return Request(
        open=pb.SessionOpen(
            protocol_version=pb.SESSION_PROTOCOL_V1,
            consortium_id=CONSORTIUM,
            node_id=node_id,
            jurisdiction=jurisdiction,
            release=release,
        )
    )


def test_a_member_that_never_sends_its_open_is_cancelled_and_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(session_service, "OPEN_TIMEOUT_S", 0.1)
    context = FakeContext()
    replies = _door(Members([("vietnam", "Vietnam")])).open(MemberStream(context), context)  # type: ignore[arg-type]

    with pytest.raises(Aborted):
        next(replies)
    assert context.cancelled.is_set()
    assert (context.code, context.details) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "a session must begin with a SessionOpen message",
    )


def test_a_huge_node_id_is_refused_without_being_echoed() -> None:
    context = FakeContext()
    stream = MemberStream(context)
    stream.put(_hello(node_id="n" * 1_000_000))

    with pytest.raises(Aborted):
        next(_door(Members([("vietnam", "Vietnam")])).open(stream, context))  # type: ignore[arg-type]
    assert context.code is grpc.StatusCode.PERMISSION_DENIED
    assert len(context.details) < 2 * MAX_PEER_NAME_CHARS + 100
    assert "(1000000 characters)" in context.details


def test_a_huge_release_is_kept_cut_to_its_bound() -> None:
    members = Members([("vietnam", "Vietnam")])
    context = FakeContext()
    stream = MemberStream(context)
    stream.put(_hello(release="r" * 1_000_000))
    replies = _door(members).open(stream, context)  # type: ignore[arg-type]

    assert next(replies).WhichOneof("item") == "welcome"
    assert members.listing()[0].release == "r" * MAX_PEER_NAME_CHARS
    stream.put(None)
    assert list(replies) == []


def _admitted(members: Members, answer: pb.DescribeResponse | None) -> tuple[FakeContext, Future]:
    """A session opened through the door, its identity checked as a round checks it; the
    member answers the admission describe with ``answer``, or never. The call's remaining
    replies come in the future."""

    def check(session: Session) -> None:
        RemoteSovereignNode("vietnam", "Vietnam", session, model=ModelSpec()).check_identity()

    context = FakeContext()
    stream = MemberStream(context)
    stream.put(_hello())
    replies = _door(members, check).open(stream, context)  # type: ignore[arg-type]
    assert next(replies).WhichOneof("item") == "welcome"
    ask = next(replies)
    assert ask.WhichOneof("item") == "describe"
    if answer is not None:
        stream.put(Request(exchange_id=ask.exchange_id, described=answer))
    return context, _in_thread(lambda: list(replies))


def test_a_described_answer_that_lies_ends_the_session_without_echoing_it() -> None:
    forged = pb.DescribeResponse(node_id="n" * 1_000_000, jurisdiction="j" * 1_000_000)

    context, rest = _admitted(Members([("vietnam", "Vietnam")]), forged)

    with pytest.raises(Aborted):
        rest.result(5)
    assert context.code is grpc.StatusCode.FAILED_PRECONDITION
    assert len(context.details) < 1000
    assert "(1000000 characters)" in context.details


def test_an_admission_describe_never_answered_lets_the_node_try_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Unanswered is not refused: FAILED_PRECONDITION would stop the node for good."""
    monkeypatch.setattr("tapestry.coordinator.remote_node.DESCRIBE_TIMEOUT_S", 0.1)
    members = Members([("vietnam", "Vietnam")])

    context, rest = _admitted(members, None)

    assert rest.result(5) == []  # the call ends without a refusal; the node dials again
    ended = members.listing()[0]
    assert not ended.connected
    assert ended.ended_reason == (
        "the sovereign node at session of vietnam from ipv4:127.0.0.1:5000 did not answer in "
        "time (DEADLINE_EXCEEDED: the node did not answer the describe in time)"
    )


# -- a dishonest coordinator's messages to a node -----------------------------------------


class FakeServicer:
    """A node's cycle servicer whose cycle waits for ``release``, or refuses at once."""

    def __init__(self, refuse: bool = False) -> None:
        self.refuse = refuse
        self.release = threading.Event()
        self.described = 0

    def Describe(self, request: pb.DescribeRequest, context: Any) -> pb.DescribeResponse:
        self.described += 1
        return pb.DescribeResponse(node_id="vietnam", jurisdiction="Vietnam")

    def RunSovereignCycle(
        self, requests: Iterator[pb.RunSovereignCycleRequest], context: Any
    ) -> Iterator[pb.RunSovereignCycleResponse]:
        if self.refuse:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "refused at its start")
        next(requests)
        self.release.wait(10)
        yield PROGRESS


def _cycles(servicer: Any) -> tuple[_Cycles, Outbox[Request]]:
    outbox: Outbox[Request] = Outbox()
    cycles = _Cycles(outbox, plaintext=False, node_id="vietnam")
    cycles.servicer = servicer
    return cycles, outbox


def _to_node(exchange_id: int, **item: Any) -> Response:
    return Response(exchange_id=exchange_id, **item)


def test_a_coordinator_speaking_of_exchanges_that_are_not_open_is_ignored() -> None:
    servicer = FakeServicer()
    cycles, outbox = _cycles(servicer)
    sent = Sent(outbox)
    threads = threading.active_count()
    for exchange_id in range(1, 3_001):
        cycles.receive(_to_node(exchange_id, cycle=pb.RunSovereignCycleRequest(base_chunk={})))
        cycles.receive(_to_node(exchange_id, end=pb.ExchangeEnd(code=2**32 - 1, message=HUGE)))
        cycles.receive(_to_node(exchange_id))  # no item
        cycles.receive(_to_node(exchange_id, welcome=pb.SessionWelcome()))  # a second welcome

    assert threading.active_count() == threads
    assert sent.empty_after(0.1)


def test_many_concurrent_cycle_starts_start_a_bounded_number_of_cycles() -> None:
    servicer = FakeServicer()
    cycles, outbox = _cycles(servicer)
    sent = Sent(outbox)
    before = _threads("cycle-")
    refused = []
    try:
        for exchange_id in range(1, 201):
            cycles.receive(_to_node(exchange_id, cycle=START))
            if exchange_id > MAX_SESSION_CYCLES:
                refused.append(sent.take())
        started = _threads("cycle-") - before
    finally:
        servicer.release.set()

    assert started == MAX_SESSION_CYCLES
    assert {m.end.code for m in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]}
    assert refused[0].end.message == (
        f"this node already runs {MAX_SESSION_CYCLES} cycles on this session, the most it "
        "runs at once (MAX_SESSION_CYCLES)"
    )
    assert _eventually(lambda: _threads("cycle-") == before)


def test_a_cycle_refused_at_its_start_never_holds_the_sessions_reader() -> None:
    """The coordinator streams its base before it hears the refusal: the chunks that
    follow must not wait, forever, for a cycle that is over."""
    cycles, outbox = _cycles(FakeServicer(refuse=True))
    sent = Sent(outbox)
    chunk = pb.RunSovereignCycleRequest(base_chunk=pb.TensorChunk())

    def stream() -> None:
        cycles.receive(_to_node(1, cycle=START))
        for _ in range(50):
            cycles.receive(_to_node(1, cycle=chunk))

    reader = _in_thread(stream)
    reader.result(timeout=5)  # raises TimeoutError while the reader is held
    assert sent.take().end.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]


def test_an_end_with_a_bogus_code_cancels_the_cycle_and_frees_its_thread() -> None:
    servicer = FakeServicer()
    cycles, outbox = _cycles(servicer)
    Sent(outbox)
    before = _threads("cycle-")
    cycles.receive(_to_node(1, cycle=START))
    assert _eventually(lambda: _threads("cycle-") == before + 1)

    cycles.receive(_to_node(1, end=pb.ExchangeEnd(code=2**32 - 1, message=HUGE)))
    servicer.release.set()

    assert _eventually(lambda: _threads("cycle-") == before)


def test_describes_in_a_flood_from_a_coordinator_that_does_not_read_are_bounded() -> None:
    servicer = FakeServicer()
    cycles, _ = _cycles(servicer)  # nobody sends what the node queues

    with pytest.raises(OutboxFull):
        for exchange_id in range(1, SESSION_CONTROL_MESSAGES * 4):
            cycles.receive(_to_node(exchange_id, describe=pb.DescribeRequest()))
    assert servicer.described == SESSION_CONTROL_MESSAGES + 1


def _real_servicer(tmp_path: Path, receive_timeout_s: float) -> SovereignNodeServicer:
    spec = ModelSpec()
    node = SovereignTrainingNode(
        "vietnam", "Vietnam", spec.build(seed=1), [list(b"xin chao")], 0.9, local_epochs=1
    )
    limits = NodeLimits(receive_timeout_s=receive_timeout_s)
    return SovereignNodeServicer(node, spec, ArtifactStore(tmp_path), CONSORTIUM, limits)


def test_a_cycle_start_that_never_sends_the_base_ends_at_the_deadline_and_holds_no_thread(
    tmp_path: Path,
) -> None:
    cycles, outbox = _cycles(_real_servicer(tmp_path, 0.3))
    sent = Sent(outbox)
    before = _threads("receive-deadline"), _threads("cycle-")

    cycles.receive(_to_node(1, cycle=START))

    end = sent.take().end
    assert end.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    assert "receive_timeout_s = 0.3 s" in end.message
    assert _eventually(lambda: (_threads("receive-deadline"), _threads("cycle-")) == before)
