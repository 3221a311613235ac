"""Attacks on lanes (``[link] streams``: a member's session spread over several
connections), in process: a hostile member joining lanes it should not, sending out of its
turn or lying about what it received; a stranger's lanes; a dishonest coordinator's welcome
and lanes toward a node. Each case asserts the safe outcome, and that no reader, thread or
queue is held past its bound (the session's end, the exchange's end, the retain budget)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

import grpc
import pytest

from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.coordinator import sessions
from tapestry.coordinator.members import Members, SessionRefused
from tapestry.coordinator.node_links import LinkError
from tapestry.coordinator.sessions import MemberLink, Session
from tapestry.errors import WireError
from tapestry.limits import LANE_KEY_BYTES, MAX_LINK_STREAMS
from tapestry.node.dial_out import SessionClosedForGood, _Cycles, _lane_count
from tapestry.wire.numbering import MIN_RETAIN_BYTES, Numbering
from tapestry.wire.outbox import Outbox

from .test_session_units import (
    PROGRESS,
    START,
    Aborted,
    FakeContext,
    FakeServicer,
    MemberStream,
    Request,
    Response,
    Sent,
    _door,
    _eventually,
    _hello,
    _in_thread,
    _laned,
    _opened,
    _refused,
    _threads,
)

CUT = LinkError(grpc.StatusCode.UNAVAILABLE, "cut")


def _no_hang_up() -> None:
    pass


def _join_all(members: Members, session: Session) -> None:
    for lane in range(1, session.lanes):
        members.join_lane(_opened(serial=7), lane, session.lane_key, _no_hang_up)


def _reply(key: int, seq: int, step: int = 0) -> Request:
    reply = Request(exchange_id=key, seq=seq, cycle=PROGRESS)
    reply.cycle.progress.step = step or seq
    return reply


# -- joining lanes -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [b"", b"\0" * LANE_KEY_BYTES, b"k" * (LANE_KEY_BYTES - 1), b"k" * 1_000_000],
    ids=["empty", "zeros", "short", "huge"],
)
def test_a_lane_with_a_wrong_key_is_refused_and_the_session_goes_on(key: bytes) -> None:
    members, session = _laned(3)
    code, why = _refused(lambda: members.join_lane(_opened(serial=7), 1, key, _no_hang_up))
    # ABORTED, not final: what a lane of a replaced session hears too (the node dials again).
    assert (code, why) == (
        grpc.StatusCode.ABORTED,
        "the lane's key is not its session's (a session replaced since?)",
    )
    # Nor does the right key with a byte more, or the key of the session's first bytes.
    for near in (session.lane_key + b"\0", session.lane_key[:-1]):
        assert _refused(
            lambda near=near: members.join_lane(_opened(serial=7), 1, near, _no_hang_up)
        )[0] is (grpc.StatusCode.ABORTED)
    assert session.ended is None
    _join_all(members, session)  # the node's own lanes still join
    assert session.ended is None


def test_another_members_key_and_certificate_join_nothing_of_its_session() -> None:
    members = Members([("vietnam", "Vietnam"), ("india", "India")], lanes=2)
    vietnam = members.join(_opened("vietnam", serial=7))[0]
    india = members.join(_opened("india", serial=9))[0]

    # India presents Vietnam's key: it names India's own session, whose key differs.
    code, _ = _refused(
        lambda: members.join_lane(_opened("india", serial=9), 1, vietnam.lane_key, _no_hang_up)
    )
    assert code is grpc.StatusCode.ABORTED
    # Vietnam's node id with India's certificate (what a plaintext peer could claim).
    code, _ = _refused(
        lambda: members.join_lane(_opened("vietnam", serial=9), 1, vietnam.lane_key, _no_hang_up)
    )
    assert code is grpc.StatusCode.PERMISSION_DENIED
    assert vietnam.ended is None and india.ended is None
    assert members.join_lane(_opened("vietnam", serial=7), 1, vietnam.lane_key, _no_hang_up) is (
        vietnam
    )


def test_lane_numbers_out_of_range_are_refused_and_a_one_lane_session_takes_none() -> None:
    members, session = _laned(3)
    for lane in (3, MAX_LINK_STREAMS, 2**32 - 1):
        code, why = _refused(
            lambda lane=lane: members.join_lane(
                _opened(serial=7), lane, session.lane_key, _no_hang_up
            )
        )
        assert code is grpc.StatusCode.INVALID_ARGUMENT
        assert why == f"lane {lane}: this session has lanes 1 to 2 to join"
    single = Members([("vietnam", "Vietnam")])
    one = single.join(_opened(serial=7))[0]
    assert one.lane_key == b""
    code, _ = _refused(lambda: single.join_lane(_opened(serial=7), 1, b"", _no_hang_up))
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert session.ended is None and one.ended is None


def test_the_same_lane_joined_by_many_calls_at_once_joins_once() -> None:
    members, session = _laned(2)
    start = threading.Barrier(16)

    def join() -> str:
        start.wait(5)
        try:
            members.join_lane(_opened(serial=7), 1, session.lane_key, _no_hang_up)
        except SessionRefused as refused:
            return refused.code.name
        return "joined"

    outcomes = [_in_thread(join) for _ in range(16)]
    results = sorted(outcome.result(10) for outcome in outcomes)
    assert results == ["ALREADY_EXISTS"] * 15 + ["joined"]


def test_a_replaced_or_ended_sessions_key_joins_nothing() -> None:
    members, old = _laned(2)
    new = members.join(_opened(serial=7))[0]  # the node dialed again
    assert old.ended is not None and new.lane_key != old.lane_key
    code, _ = _refused(lambda: members.join_lane(_opened(serial=7), 1, old.lane_key, _no_hang_up))
    assert code is grpc.StatusCode.ABORTED
    new.end(CUT)
    members.leave(new)
    code, why = _refused(lambda: members.join_lane(_opened(serial=7), 1, new.lane_key, _no_hang_up))
    assert (code, why) == (grpc.StatusCode.UNAVAILABLE, "node 'vietnam' holds no session to join")


def test_sessions_opened_or_refused_in_a_loop_hold_no_thread_for_their_lanes() -> None:
    """Each session waits LANES_OPEN_S (10 s) for its lanes: a member that dials again and
    again, or a second certificate refused each time, must not leave a waiting thread per
    try."""
    members = Members([("vietnam", "Vietnam")], lanes=3)
    members.join(_opened(serial=7))
    threads = threading.active_count()
    for _ in range(200):
        members.join(_opened(serial=7))
    for _ in range(200):
        with pytest.raises(SessionRefused):
            members.join(_opened(serial=8))
    assert _eventually(lambda: threading.active_count() <= threads)


def test_a_session_whose_lanes_all_joined_waits_on_no_thread_and_ends_with_one() -> None:
    threads = threading.active_count()
    members, session = _laned(MAX_LINK_STREAMS)
    _join_all(members, session)
    assert _eventually(lambda: threading.active_count() <= threads)
    session.end(CUT)  # the hang-ups of its eight calls: one timer, not eight
    assert threading.active_count() <= threads + 1


def test_every_call_of_a_session_that_ends_is_hung_up_its_lanes_included(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sessions, "SESSION_HANG_UP_S", 0.05)
    hung_up = [threading.Event() for _ in range(MAX_LINK_STREAMS)]
    members = Members([("vietnam", "Vietnam")], lanes=MAX_LINK_STREAMS)
    session = members.join(_opened(serial=7), hang_up=hung_up[0].set)[0]
    for lane in range(1, MAX_LINK_STREAMS):
        members.join_lane(_opened(serial=7), lane, session.lane_key, hung_up[lane].set)
    session.end(LinkError(grpc.StatusCode.PERMISSION_DENIED, "revoked"))
    assert all(event.wait(5) for event in hung_up)


# -- the door: lanes through SessionDoor.open ---------------------------------------------


def _lane_hello(lane: int, key: bytes) -> Request:
    hello = _hello()
    hello.open.lane, hello.open.lane_key = lane, key
    return hello


def _open_lane(members: Members, lane: int, key: bytes) -> tuple[FakeContext, MemberStream, Any]:
    context = FakeContext()
    stream = MemberStream(context)
    stream.put(_lane_hello(lane, key))
    return context, stream, _door(members).open(stream, context)  # type: ignore[arg-type]


def test_a_flood_of_lane_calls_with_wrong_keys_or_lanes_is_refused_without_threads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sessions, "SESSION_HANG_UP_S", 0.05)
    members = Members([("vietnam", "Vietnam")], lanes=3)
    context = FakeContext()
    stream = MemberStream(context)
    stream.put(_hello())
    replies = _door(members).open(stream, context)  # type: ignore[arg-type]
    welcome = next(replies).welcome
    key = welcome.lane_key
    assert (welcome.lanes, len(key)) == (3, LANE_KEY_BYTES)
    reading = _threads("session-reader-0")
    rest = _in_thread(lambda: list(replies))
    # the session's reader runs, its admission check has run
    assert _eventually(
        lambda: _threads("session-reader-0") == reading + 1 and not _threads("session-check")
    )
    threads = threading.active_count()

    refused = set()
    for _ in range(40):
        for lane, wrong in (
            (1, b""),
            (1, key[:-1]),
            (2, b"k" * 100_000),
            (3, key),
            (2**32 - 1, key),
        ):
            lane_context, _, lane_replies = _open_lane(members, lane, wrong)
            with pytest.raises(Aborted):
                next(lane_replies)
            refused.add(lane_context.code)
            assert len(lane_context.details) < 100  # the key is never echoed
    assert refused == {grpc.StatusCode.ABORTED, grpc.StatusCode.INVALID_ARGUMENT}
    session = members.link("vietnam").session
    assert session is not None and session.ended is None
    assert _eventually(lambda: threading.active_count() <= threads)

    # Its own lanes still join (each then reads on its thread); the first of them whose
    # call ends ends the session.
    readers = _threads("session-reader-1"), _threads("session-reader-2")
    lanes = [_open_lane(members, lane, key) for lane in (1, 2)]
    served = [_in_thread(lambda r=r: list(r)) for _, _, r in lanes]
    assert _eventually(
        lambda: (
            (_threads("session-reader-1"), _threads("session-reader-2"))
            == (readers[0] + 1, readers[1] + 1)
        )
    )
    assert session.ended is None
    lanes[1][1].put(None)  # lane 2's stream ends
    assert _eventually(lambda: session.ended is not None)
    assert [future.result(5) for future in served] == [[], []]
    assert rest.result(5) == []
    assert members.connected() == {}
    ok = _eventually(lambda: threading.active_count() <= threads)
    assert ok, [t.name for t in threading.enumerate()]


def test_a_lane_call_for_a_member_without_a_session_opens_none() -> None:
    members = Members([("vietnam", "Vietnam")], lanes=2)
    context, _, replies = _open_lane(members, 1, b"k" * LANE_KEY_BYTES)
    with pytest.raises(Aborted):
        next(replies)
    assert context.code is grpc.StatusCode.UNAVAILABLE
    assert members.connected() == {} and members.listing()[0].since.seconds == 0


# -- a hostile member's messages on its lanes ---------------------------------------------


def _cycle_on(lanes: int = 2) -> tuple[Members, Session, MemberLink, Any, int]:
    members, session = _laned(lanes)
    _join_all(members, session)
    link = members.link("vietnam")
    call = link.cycle(iter([START]), 30.0)
    key = Sent(session.outboxes[0]).take().exchange_id
    return members, session, link, call, key


def test_a_message_ahead_of_its_turn_waits_no_longer_than_its_session() -> None:
    """Message 3 on lane 0 with message 2 never sent: the lane's reader waits for its turn,
    and lets go when the session ends (the message is not taken: it comes again)."""
    members, session, link, _, key = _cycle_on(2)
    threads = threading.active_count()
    reader = _in_thread(lambda: link.receive(_reply(key, 1), session, 0))
    reader.result(5)
    waiting = _in_thread(lambda: link.receive(_reply(key, 3), session, 0))
    time.sleep(0.2)
    assert not waiting.done()
    session.end(CUT)
    members.leave(session)
    waiting.result(5)
    assert link.numbering.states() == [(key, 1)]
    assert _eventually(lambda: threading.active_count() <= threads)


def test_a_message_ahead_of_its_turn_waits_no_longer_than_its_exchange() -> None:
    _, session, link, call, key = _cycle_on(2)
    waiting = _in_thread(lambda: link.receive(_reply(key, 2), session, 1))
    time.sleep(0.2)
    assert not waiting.done()
    call.cancel()  # the round gives up on the cycle (its deadline, say)
    waiting.result(5)
    assert session.ended is None


@pytest.mark.parametrize(
    ("lane", "seq"),
    [(0, 2**64 - 1), (1, 2**64 - 2), (0, 3), (1, 4)],
    ids=["huge-lane0", "huge-lane1", "ahead-lane0", "ahead-lane1"],
)
def test_a_number_further_ahead_than_its_lane_allows_ends_the_session_at_once(
    lane: int, seq: int
) -> None:
    _, session, link, _, key = _cycle_on(2)
    link.receive(_reply(key, 1), session, 0)  # lane 0 may be at 3 next, lane 1 at 2
    if seq in (3,):
        link.receive(_reply(key, 2), session, 1)
        seq = 5  # two ahead of the next (3)
    with pytest.raises(LinkError) as caught:
        _in_thread(lambda: link.receive(_reply(key, seq), session, lane)).result(5)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert f"message {seq} of exchange {key} on lane {lane} of 2" in caught.value.details()


@pytest.mark.parametrize("seq", [1, 2, 3, 2**63])
def test_numbers_for_exchanges_unknown_or_over_are_dropped_at_once(seq: int) -> None:
    _, session, link, call, key = _cycle_on(2)
    call.cancel()
    for exchange in (key, key + 1, 2**63):
        lane = (seq - 1) % 2
        dropped = _in_thread(lambda e=exchange, ln=lane: link.receive(_reply(e, seq), session, ln))
        dropped.result(1)  # no wait: the coordinator opens every exchange it takes
    assert session.ended is None


def test_one_number_racing_on_an_old_and_a_new_sessions_lane_is_handed_on_once() -> None:
    """The node dials again while its old lane still delivers: message 2 arrives on lane 1
    of both sessions, twice on the new one; the cycle gets each reply once, in order."""
    members, old, link, call, key = _cycle_on(2)
    late = _in_thread(lambda: link.receive(_reply(key, 2), old, 1))  # waits for message 1
    new = members.join(_opened(serial=7), [(key, 0)])[0]
    _join_all(members, new)
    racing = [_in_thread(lambda: link.receive(_reply(key, 2), new, 1)) for _ in range(2)]
    time.sleep(0.1)
    link.receive(_reply(key, 1), new, 0)
    for reader in (late, *racing):
        reader.result(5)
    link.receive(Request(exchange_id=key, seq=3, end=pb.ExchangeEnd()), new, 0)
    assert [reply.progress.step for reply in call] == [1, 2]


# -- acknowledgements: what a member says it received --------------------------------------


def test_a_member_acknowledging_what_it_never_read_cannot_make_the_coordinator_queue_it() -> None:
    """The node reads none of its lanes but acknowledges, again and again, every message the
    coordinator has numbered: were that taken, the coordinator would let them go and number
    more, queueing the whole base for connections that take nothing."""
    members = Members([("vietnam", "Vietnam")], lanes=2, retain_bytes=MIN_RETAIN_BYTES)
    session = members.join(_opened(serial=7))[0]
    _join_all(members, session)
    link = members.link("vietnam")
    pulled: list[int] = []
    chunk = pb.RunSovereignCycleRequest(base_chunk=pb.TensorChunk(data=b"x" * (1 << 20)))

    def base() -> Iterator[pb.RunSovereignCycleRequest]:
        yield START
        for index in range(64):
            pulled.append(index)
            yield chunk

    link.cycle(base(), 30.0)
    for _ in range(50):
        link.receive(Request(exchange_id=1, ack=len(pulled) + 1), session, 0)
        link.receive(Request(exchange_id=1, ack=2**63), session, 1)
        time.sleep(0.01)
    assert len(pulled) <= MIN_RETAIN_BYTES // (1 << 20) + 2
    # What it lied about is still there, sent in order once it reads.
    lanes = [Sent(outbox) for outbox in session.outboxes]
    assert [lanes[(seq - 1) % 2].take().seq for seq in range(1, 6)] == [1, 2, 3, 4, 5]
    assert session.ended is None


def test_an_acknowledgement_beyond_what_left_lets_go_of_nothing_that_did_not() -> None:
    members, session, link, _, key = _cycle_on(2)  # message 1 was read, 2 waits on lane 1
    link.receive(Request(exchange_id=key, ack=2**63), session, 1)
    session.end(CUT)
    members.leave(session)
    new, resumed = members.join(_opened(serial=7), [(key, 0)])
    assert resumed == [(key, 0)]
    again = [Sent(outbox) for outbox in new.outboxes]
    message = again[1].take()
    assert (message.seq, message.WhichOneof("item")) == (2, "end")  # 1 went, 2 kept
    assert again[0].empty_after(0.1)


@pytest.mark.parametrize("took", ["acknowledged-all", "answered"])
def test_a_cycle_the_node_took_is_not_started_again_when_it_comes_back_without_it(
    took: str,
) -> None:
    """The node took the whole cycle (acknowledged every message), or answered it, then came
    back without it (it restarted): the round hears so at once, instead of waiting out its
    deadline for a cycle that nothing will send again."""
    members = Members([("vietnam", "Vietnam")])
    old = members.join(_opened(serial=7))[0]
    link = members.link("vietnam")
    call = link.cycle(iter([START]), 30.0)
    sent = Sent(old.outbox)
    first, end = sent.take(), sent.take()
    assert (first.seq, end.seq) == (1, 2)
    key = first.exchange_id
    if took == "acknowledged-all":
        link.receive(Request(exchange_id=key, ack=2), old)
    else:
        link.receive(_reply(key, 1), old)
        assert next(call) == _reply(key, 1).cycle
    old.end(CUT)
    members.leave(old)

    assert members.join(_opened(serial=7))[1] == []

    with pytest.raises(LinkError) as caught:
        _in_thread(lambda: next(call)).result(5)
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    assert caught.value.details() == "the node no longer holds the cycle (it restarted?)"


def test_a_node_dialing_again_and_again_without_a_cycle_it_never_took_gets_it_once_a_session() -> (
    None
):
    """Starting again an untouched cycle costs what a resume costs: its kept messages, once
    per session, in order; the cycle stays one exchange and its replies arrive once."""
    members = Members([("vietnam", "Vietnam")], lanes=2)
    session = members.join(_opened(serial=7))[0]
    link = members.link("vietnam")
    call = link.cycle(iter([START]), 30.0)
    for _ in range(20):
        _join_all(members, session)
        lanes = [Sent(outbox) for outbox in session.outboxes]
        assert [lanes[0].take().seq, lanes[1].take().seq] == [1, 2]
        session.end(CUT)
        members.leave(session)
        session, resumed = members.join(_opened(serial=7))
        assert [count for _, count in resumed] == [0]
    key = resumed[0][0]
    link.receive(_reply(key, 1), session, 0)
    link.receive(Request(exchange_id=key, seq=2, end=pb.ExchangeEnd()), session, 1)
    assert [reply.progress.step for reply in call] == [1]
    assert link.numbering.states() == []


# -- a dishonest coordinator toward a node ------------------------------------------------


@pytest.mark.parametrize(
    ("lanes", "key", "why"),
    [
        (MAX_LINK_STREAMS + 1, b"k" * LANE_KEY_BYTES, "asks for 9 lanes; at most 8"),
        (2**32 - 1, b"k" * LANE_KEY_BYTES, "asks for 4294967295 lanes; at most 8"),
        (2, b"", "lane_key must be 16 bytes"),
        (2, b"k" * (LANE_KEY_BYTES + 1), "lane_key must be 16 bytes"),
        (8, b"k" * 1_000_000, "lane_key must be 16 bytes"),
    ],
)
def test_a_welcome_asking_for_too_many_lanes_or_with_a_bad_key_is_refused_for_good(
    lanes: int, key: bytes, why: str
) -> None:
    with pytest.raises(SessionClosedForGood, match=why):
        _lane_count(pb.SessionWelcome(lanes=lanes, lane_key=key))


def test_a_welcome_of_no_or_one_lane_opens_none_whatever_its_key() -> None:
    assert _lane_count(pb.SessionWelcome()) == 1
    assert _lane_count(pb.SessionWelcome(lanes=1, lane_key=b"k" * 1_000)) == 1


def _node(lanes: int) -> tuple[_Cycles, list[Outbox[Request]], FakeServicer]:
    servicer = FakeServicer()
    cycles = _Cycles(plaintext=False, node_id="vietnam", retain_bytes=16 << 20)
    cycles.servicer = servicer  # type: ignore[assignment]
    outboxes: list[Outbox[Request]] = [Outbox() for _ in range(lanes)]
    cycles.attach(outboxes, pb.SessionWelcome(lanes=lanes))
    return cycles, outboxes, servicer


def _base_chunk(key: int, seq: int) -> Response:
    return Response(
        exchange_id=key, seq=seq, cycle=pb.RunSovereignCycleRequest(base_chunk=pb.TensorChunk())
    )


def test_a_coordinator_holding_a_nodes_lane_readers_on_cycles_it_never_starts_lets_go_with_the_session() -> (
    None
):
    cycles, _, _ = _node(MAX_LINK_STREAMS)
    gone = threading.Event()
    threads = threading.active_count()
    held: list[Future[Any]] = [
        _in_thread(lambda lane=lane: cycles.receive(_base_chunk(100 + lane, lane + 1), lane, gone))
        for lane in range(1, MAX_LINK_STREAMS)
    ]
    time.sleep(0.2)
    assert not any(reader.done() for reader in held)
    # Numbers past what a lane can be ahead, for cycles never started: dropped at once.
    for seq in (MAX_LINK_STREAMS + 1, 2**64 - 1):
        lane = (seq - 1) % MAX_LINK_STREAMS
        _in_thread(lambda s=seq, ln=lane: cycles.receive(_base_chunk(7, s), ln, gone)).result(1)
    gone.set()  # the session ends
    for reader in held:
        reader.result(5)
    assert cycles.numbering.states() == []
    assert _eventually(lambda: threading.active_count() <= threads)


def test_a_coordinators_message_on_the_wrong_lane_or_unnumbered_on_a_lane_ends_the_session() -> (
    None
):
    cycles, _, servicer = _node(2)
    try:
        cycles.receive(Response(exchange_id=1, seq=1, cycle=START), 0)
        for lane, message in (
            (0, _base_chunk(1, 2)),  # message 2 belongs on lane 1
            (1, _base_chunk(1, 4)),  # lane 1 is at 2 next
            (1, Response(exchange_id=1, end=pb.ExchangeEnd(code=1))),  # unnumbered
            (1, Response(exchange_id=2, describe=pb.DescribeRequest())),  # unnumbered
        ):
            with pytest.raises(WireError):
                _in_thread(lambda ln=lane, m=message: cycles.receive(m, ln)).result(5)
        assert servicer.described == 0
    finally:
        servicer.release.set()


def test_a_cycle_start_on_a_further_lane_starts_nothing_and_ends_the_session() -> None:
    cycles, _, _ = _node(2)
    threads = threading.active_count()
    with pytest.raises(WireError, match="first message on lane 1"):
        cycles.receive(Response(exchange_id=1, seq=1, cycle=START), 1)
    assert cycles.numbering.states() == []  # no cycle opened
    assert threading.active_count() <= threads  # no cycle thread


def test_a_coordinator_acknowledging_replies_never_sent_lets_go_of_none() -> None:
    """The node's reply and its end wait on lanes the coordinator does not read; its
    acknowledgement of a thousand frees neither: both go again on the next session, and
    the cycle's thread ends once they are acknowledged for real."""
    cycles, first, servicer = _node(2)
    threads = threading.active_count()
    cycles.receive(Response(exchange_id=1, seq=1, cycle=START), 0)
    servicer.release.set()  # the cycle replies, then ends: messages 1 and 2
    time.sleep(0.2)
    cycles.receive(Response(exchange_id=1, ack=1_000), 1)
    cycles.detach(first[0])
    second: list[Outbox[Request]] = [Outbox(), Outbox()]
    cycles.attach(second, pb.SessionWelcome(lanes=2, exchanges=[pb.ExchangeState(exchange_id=1)]))
    lanes = [Sent(outbox) for outbox in second]
    reply, end = lanes[0].take(), lanes[1].take()
    assert (reply.seq, reply.WhichOneof("item"), end.seq, end.WhichOneof("item")) == (
        1,
        "cycle",
        2,
        "end",
    )
    cycles.receive(Response(exchange_id=1, ack=2), 0)
    assert _eventually(lambda: threading.active_count() <= threads)


def test_numbering_lets_go_of_what_left_and_nothing_beyond() -> None:
    """What the receiving ends rest on: an acknowledgement frees messages up to the last
    taken off a lane (even on an earlier session), and none still queued."""
    sender: Numbering[Request] = Numbering(
        lambda key, count: Request(exchange_id=key, ack=count), MIN_RETAIN_BYTES
    )
    first = [Outbox[Request](), Outbox[Request]()]
    sender.attach(first, [])
    sender.open(4)
    for _ in range(4):
        sender.send(Request(exchange_id=4, cycle=PROGRESS))
    assert next(first[0].messages()).seq == 1  # the peer read message 1, and no more
    sender.acknowledged(4, 4)
    sender.detach(first[0])
    second = [Outbox[Request](), Outbox[Request]()]
    sender.attach(second, [])
    again = [Sent(outbox) for outbox in second]
    assert [again[0].take().seq, again[1].take().seq, again[1].take().seq] == [3, 2, 4]
    # Now all left (on this session): acknowledging them frees them.
    sender.acknowledged(4, 4)
    assert sender.drained(4, 1.0)
