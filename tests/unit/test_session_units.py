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
from tapestry.coordinator.sessions import MemberLink, Session, SessionOpened
from tapestry.limits import (
    LANE_KEY_BYTES,
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
    """What an outbox sends, read on a thread as gRPC reads it (acknowledgements alone, which
    a numbered exchange adds, left out)."""

    def __init__(self, outbox: Outbox[Any]) -> None:
        self._queue: queue.Queue[Any] = queue.Queue()
        threading.Thread(target=self._read, args=(outbox,), daemon=True).start()

    def _read(self, outbox: Outbox[Any]) -> None:
        for message in outbox.messages():
            if message.WhichOneof("item") is not None or not message.ack:
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


class Joined:
    """A member's link with one session attached, as the coordinator holds it: what the
    member's messages reach (:meth:`receive`, which ends the session on a protocol error, as
    the session's reader does) and what a round calls (describe, cycle). A cycle whose
    session ends waits ``resume_window_s`` for the member to come back, then fails."""

    def __init__(self, resume_window_s: float = 0.2) -> None:
        self.session = Session(_opened())
        self.link = MemberLink("vietnam", resume_window_s, 16 << 20)
        self.link.attach(self.session, [])
        self.outbox = self.session.outbox

    @property
    def ended(self) -> LinkError | None:
        return self.session.ended

    def receive(self, message: Request) -> None:
        try:
            self.link.receive(message, self.session)
        except LinkError as error:
            self.end(error)

    def end(self, error: LinkError) -> None:
        self.session.end(error)
        self.link.detach(self.session)

    def describe(self, timeout_s: float, *, again: bool = True) -> pb.DescribeResponse:
        return self.link.describe(timeout_s, again=again)

    def cycle(self, requests: Iterator[pb.RunSovereignCycleRequest], timeout_s: float) -> Any:
        return self.link.cycle(requests, timeout_s)


def _session() -> tuple[Joined, Sent]:
    session = Joined()
    return session, Sent(session.outbox)


def _answer(session: Joined, exchange_id: int, **item: Any) -> None:
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
    exchange_id, _replies = session.link._open(cycle=False)  # as describe opens one
    for _ in range(4):  # the exchange's queue is full
        _answer(session, exchange_id, described=pb.DescribeResponse())
    reader = _in_thread(lambda: _answer(session, exchange_id, described=pb.DescribeResponse()))
    time.sleep(0.1)
    session.link.forget(exchange_id)  # as describe does once it has its answer

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
    session = Joined()  # nobody reads its outbox
    chunks = [pb.RunSovereignCycleRequest(base_chunk=pb.TensorChunk()) for _ in range(100)]
    call = session.cycle(iter(chunks), 0.5)

    with pytest.raises(LinkError) as caught:
        next(call)
    assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED


def test_a_member_that_never_reads_loses_its_session_once_control_messages_pile_up() -> None:
    session = Joined()  # nobody reads its outbox: describes and cancels pile up
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
    session = members.join(_opened(), hang_up=hung_up.set)[0]

    session.end(LinkError(grpc.StatusCode.PERMISSION_DENIED, "revoked"))

    assert hung_up.wait(5)


# -- who holds a session -----------------------------------------------------------------


def test_a_session_replaced_mid_cycle_by_one_without_the_cycle_fails_the_rounds_exchange() -> None:
    """The newer session's node does not list the cycle (another process, a restart): the
    round hears why at once; the older session ends ABORTED, naming the newer."""
    members = Members([("vietnam", "Vietnam")])
    old = members.join(_opened(serial=7))[0]
    sent = Sent(old.outbox)
    link = members.link("vietnam")
    call = link.cycle(iter([START]), 30.0)
    key = sent.take().exchange_id
    link.receive(Request(exchange_id=key, ack=1), old)  # the node took the cycle's start

    new = members.join(_opened(serial=7))[0]

    with pytest.raises(LinkError) as caught:
        next(call)
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    assert caught.value.details() == "the node no longer holds the cycle (it restarted?)"
    assert old.outbox.closed
    assert old.ended is not None and old.ended.code() is grpc.StatusCode.ABORTED
    assert old.ended.details() == (
        "replaced by a newer session of the same node from ipv4:127.0.0.1:5000"
    )
    assert list(members.connected()) == ["vietnam"]
    assert members.link("vietnam").session is new and new.ended is None


def test_a_cycle_whose_start_never_reached_the_node_starts_again_on_its_next_session() -> None:
    """The session dropped before the node took anything of the cycle (it acknowledged
    nothing, sent nothing): the node's next session does not list it, and the cycle goes on
    there from its first message instead of failing."""
    members = Members([("vietnam", "Vietnam")])
    old = members.join(_opened(serial=7))[0]
    link = members.link("vietnam")
    call = link.cycle(iter([START]), 30.0)
    first = Sent(old.outbox).take()
    assert (first.seq, first.cycle.WhichOneof("item")) == (1, "start")
    old.end(LinkError(grpc.StatusCode.UNAVAILABLE, "cut"))
    members.leave(old)

    new, resumed = members.join(_opened(serial=7))
    again = Sent(new.outbox)
    assert resumed == [(first.exchange_id, 0)]
    assert [(m.seq, m.WhichOneof("item")) for m in (again.take(), again.take())] == [
        (1, "cycle"),
        (2, "end"),
    ]
    link.receive(
        Request(exchange_id=first.exchange_id, seq=1, cycle=PROGRESS), new
    )  # and the cycle answers
    assert next(call) == PROGRESS


def test_a_second_session_with_another_certificate_is_refused_and_the_first_kept() -> None:
    members = Members([("vietnam", "Vietnam")])
    first = members.join(_opened(serial=7))[0]

    with pytest.raises(SessionRefused) as caught:
        members.join(_opened(serial=8))

    assert caught.value.code is grpc.StatusCode.ALREADY_EXISTS
    assert members.link("vietnam").session is first
    assert first.ended is None


def test_sessions_opened_in_a_loop_hold_one_session_per_member() -> None:
    members = Members([("vietnam", "Vietnam"), ("india", "India")])
    threads = threading.active_count()
    held = [members.join(_opened(serial=7))[0] for _ in range(2_000)]

    assert list(members.connected()) == ["vietnam"]
    assert members.link("vietnam").session is held[-1]
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

    def is_active(self) -> bool:
        return not self.cancelled.is_set()

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
    cycles = _Cycles(plaintext=False, node_id="vietnam", retain_bytes=16 << 20)
    cycles.servicer = servicer
    cycles.attach([outbox], pb.SessionWelcome())
    _numbers.clear()
    return cycles, outbox


_numbers: dict[int, int] = {}


def _acknowledge_all(cycles: _Cycles, exchanges: Any) -> None:
    """What a coordinator does as the node's messages arrive: acknowledge them, for a while
    (the cycles' ends come after the test lets them go)."""

    def acknowledge() -> None:
        for _ in range(100):
            for key in exchanges:
                cycles.receive(Response(exchange_id=key, ack=1_000))
            time.sleep(0.05)

    threading.Thread(target=acknowledge, daemon=True).start()


def _to_node(exchange_id: int, **item: Any) -> Response:
    """A coordinator's message; a cycle's messages numbered in order, as the coordinator's
    are (tapestry.wire.numbering)."""
    message = Response(exchange_id=exchange_id, **item)
    if message.WhichOneof("item") in ("cycle", "end"):
        _numbers[exchange_id] = _numbers.get(exchange_id, 0) + 1
        message.seq = _numbers[exchange_id]
    return message


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

    assert threading.active_count() <= threads  # none started (earlier tests' may end)
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

    # The coordinator acknowledges what the cycles sent (their ends included): each cycle's
    # thread waits for that (END_ACK_S at most), so that a reconnection still delivers it.
    _acknowledge_all(cycles, range(1, MAX_SESSION_CYCLES + 1))
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
    _acknowledge_all(cycles, [1])
    assert end.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    assert "receive_timeout_s = 0.3 s" in end.message
    assert _eventually(lambda: (_threads("receive-deadline"), _threads("cycle-")) == before)


# -- lanes: a session spread over several connections --------------------------------------


def _laned(lanes: int = 3) -> tuple[Members, Session]:
    members = Members([("vietnam", "Vietnam")], lanes=lanes)
    return members, members.join(_opened(serial=7))[0]


def _refused(call: Callable[[], Any]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(SessionRefused) as caught:
        call()
    return caught.value.code, str(caught.value)


def test_a_lane_joins_only_its_session_with_its_key_once() -> None:
    members, session = _laned()
    key = session.lane_key
    assert len(key) == LANE_KEY_BYTES and session.lanes == 3
    hang_up = lambda: None  # noqa: E731
    join = members.join_lane
    assert _refused(lambda: join(_opened(serial=7), 1, b"x" * 16, hang_up))[0] is (
        grpc.StatusCode.ABORTED  # as a lane of a replaced session is: the node dials again
    )
    assert _refused(lambda: join(_opened(serial=8), 1, key, hang_up)) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "the session of node 'vietnam' holds another certificate",
    )
    for lane in (0, 3, 2**31):
        assert _refused(lambda lane=lane: join(_opened(serial=7), lane, key, hang_up))[0] is (
            grpc.StatusCode.INVALID_ARGUMENT
        )
    assert join(_opened(serial=7), 1, key, hang_up) is session
    assert _refused(lambda: join(_opened(serial=7), 1, key, hang_up))[0] is (
        grpc.StatusCode.ALREADY_EXISTS
    )
    session.end(LinkError(grpc.StatusCode.UNAVAILABLE, "cut"))
    members.leave(session)
    assert _refused(lambda: join(_opened(serial=7), 2, key, hang_up))[0] is (
        grpc.StatusCode.UNAVAILABLE
    )


def test_a_session_whose_lanes_do_not_all_join_in_time_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sessions, "LANES_OPEN_S", 0.2)
    members, session = _laned()
    members.join_lane(_opened(serial=7), 1, session.lane_key, lambda: None)
    poll_until = time.monotonic() + 5
    while session.ended is None and time.monotonic() < poll_until:
        time.sleep(0.05)
    assert session.ended is not None and session.ended.code() is grpc.StatusCode.UNAVAILABLE
    assert "1 of the session's 2 further lanes did not open" in session.ended.details()


def test_a_cycle_spreads_over_the_lanes_and_takes_the_nodes_replies_in_turn() -> None:
    members, session = _laned(2)
    link = members.link("vietnam")
    call = link.cycle(iter([START, START, START]), 30.0)
    lanes = [Sent(outbox) for outbox in session.outboxes]
    sent = [lanes[0].take(), lanes[1].take(), lanes[0].take(), lanes[1].take()]
    assert [m.seq for m in sent] == [1, 2, 3, 4]  # three requests and the half-close
    key = sent[0].exchange_id
    replies = [Request(exchange_id=key, seq=seq, cycle=PROGRESS) for seq in (1, 2, 3)]
    for reply in replies:
        reply.cycle.progress.step = reply.seq
    # Reply 2 arrives on lane 1 before reply 1 on lane 0: it waits for its turn.
    early = _in_thread(lambda: link.receive(replies[1], session, 1))
    time.sleep(0.1)
    assert not early.done()
    link.receive(replies[0], session, 0)
    early.result(5)
    link.receive(replies[2], session, 0)
    assert [next(call).progress.step for _ in range(3)] == [1, 2, 3]


@pytest.mark.parametrize(
    ("lane", "message", "why"),
    [
        (1, Request(exchange_id=1, seq=1, cycle=PROGRESS), "message 1 of exchange 1 on lane 1"),
        (0, Request(exchange_id=1, seq=5, cycle=PROGRESS), "message 5 of exchange 1 on lane 0"),
        (1, Request(exchange_id=1, end=pb.ExchangeEnd()), "an unnumbered message on lane 1"),
    ],
)
def test_a_message_out_of_its_lane_or_turn_ends_the_session(
    lane: int, message: Request, why: str
) -> None:
    members, session = _laned(2)
    link = members.link("vietnam")
    link.cycle(iter([START]), 30.0)
    with pytest.raises(LinkError) as caught:
        link.receive(message, session, lane)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert why in caught.value.details()


# -- a describe cut by a dropped session --------------------------------------------------

DESCRIBED = pb.DescribeResponse(node_id="vietnam", jurisdiction="Vietnam")


def _describing(members: Members, again: bool = True) -> tuple[Future[Any], Session, int]:
    """A describe in flight on the member's session: the session and the exchange it uses."""
    session = members.join(_opened(serial=7))[0]
    asked = _in_thread(lambda: members.link("vietnam").describe(5.0, again=again))
    message = Sent(session.outbox).take()
    assert message.WhichOneof("item") == "describe"
    return asked, session, message.exchange_id


def _cut(members: Members, session: Session) -> None:
    session.end(LinkError(grpc.StatusCode.UNAVAILABLE, "cut"))
    members.leave(session)


def test_a_describe_cut_by_a_dropped_session_is_asked_again_on_the_next() -> None:
    members = Members([("vietnam", "Vietnam")], resume_window_s=5.0)
    asked, old, _ = _describing(members)
    _cut(members, old)
    time.sleep(0.1)
    assert not asked.done()  # waiting for the node to dial again, as a cycle would

    new = members.join(_opened(serial=7))[0]
    again = Sent(new.outbox).take()
    assert again.WhichOneof("item") == "describe"
    members.link("vietnam").receive(
        Request(exchange_id=again.exchange_id, described=DESCRIBED), new
    )
    assert asked.result(timeout=5.0) == DESCRIBED


def test_an_admission_describe_is_not_asked_again_when_its_session_drops() -> None:
    members = Members([("vietnam", "Vietnam")], resume_window_s=5.0)
    asked, old, _ = _describing(members, again=False)
    _cut(members, old)
    with pytest.raises(LinkError) as caught:
        asked.result(timeout=1.0)
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE


def test_a_describe_whose_session_is_refused_rather_than_cut_fails_at_once() -> None:
    members = Members([("vietnam", "Vietnam")], resume_window_s=5.0)
    asked, old, _ = _describing(members)
    old.end(LinkError(grpc.StatusCode.PERMISSION_DENIED, "revoked"))
    members.leave(old)
    with pytest.raises(LinkError) as caught:
        asked.result(timeout=1.0)
    assert (caught.value.code(), caught.value.details()) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "revoked",
    )


def test_a_describe_waits_no_longer_than_the_resume_window_for_a_session() -> None:
    members = Members([("vietnam", "Vietnam")], resume_window_s=0.3)
    asked, old, _ = _describing(members)
    started = time.monotonic()
    _cut(members, old)
    with pytest.raises(LinkError) as caught:
        asked.result(timeout=5.0)
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    assert 0.25 < time.monotonic() - started < 3.0


def test_a_member_that_drops_every_session_cannot_hold_a_describe_past_its_attempts() -> None:
    members = Members([("vietnam", "Vietnam")], resume_window_s=5.0)
    asked, session, _ = _describing(members)
    for _ in range(sessions.DESCRIBE_ATTEMPTS - 1):
        _cut(members, session)
        session = members.join(_opened(serial=7))[0]
        assert Sent(session.outbox).take().WhichOneof("item") == "describe"
    _cut(members, session)
    with pytest.raises(LinkError) as caught:
        asked.result(timeout=1.0)
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE


def test_a_describe_asked_again_keeps_to_its_first_deadline_plus_the_resume_window() -> None:
    # timeout 2 s + resume window 1.5 s: a session cut at 1.5 s (unanswered), a node back
    # at 2.9 s that never answers gets what is left (0.6 s), not a fresh 2 s: the describe
    # ends at ~3.5 s, not ~4.9 s
    members = Members([("vietnam", "Vietnam")], resume_window_s=1.5)
    session = members.join(_opened(serial=7))[0]
    started = time.monotonic()
    asked = _in_thread(lambda: members.link("vietnam").describe(2.0))
    assert Sent(session.outbox).take().WhichOneof("item") == "describe"
    time.sleep(1.5)
    _cut(members, session)
    time.sleep(1.4)
    again = members.join(_opened(serial=7))[0]
    assert Sent(again.outbox).take().WhichOneof("item") == "describe"
    with pytest.raises(LinkError) as caught:
        asked.result(timeout=10.0)
    assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert 3.4 < time.monotonic() - started < 4.5
