"""Numbered exchanges (tapestry.wire.numbering): each message taken once and in order, kept
until acknowledged, sent again after a reconnection from the first one the peer lacks."""

from __future__ import annotations

import threading
import time

import pytest

from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.wire.numbering import MIN_RETAIN_BYTES, Numbering, OutOfOrder
from tapestry.wire.outbox import Outbox, OutboxClosed

CHUNK = 1 << 20


def _numbering(retain: int = MIN_RETAIN_BYTES) -> Numbering[pb.OpenSessionRequest]:
    return Numbering(lambda key, count: pb.OpenSessionRequest(exchange_id=key, ack=count), retain)


def _chunk(key: int, tag: int) -> pb.OpenSessionRequest:
    chunk = pb.TensorChunk(name="w", offset=tag * CHUNK, data=bytes([tag % 256]) * CHUNK)
    return pb.OpenSessionRequest(
        exchange_id=key, cycle=pb.RunSovereignCycleResponse(delta_chunk=chunk)
    )


def _queued(outbox: Outbox[pb.OpenSessionRequest]) -> list[pb.OpenSessionRequest]:
    """What the outbox holds now, without waiting."""
    taken = []
    stream = outbox.messages()
    outbox.data(pb.OpenSessionRequest(exchange_id=0))  # a marker: data goes after the rest
    for message in stream:
        if message.exchange_id == 0 and not message.seq:
            return taken
        taken.append(message)
    return taken


def test_messages_are_numbered_in_order_and_carry_what_was_received():
    sender, outbox = _numbering(), Outbox()
    sender.attach([outbox], [])
    sender.open(7)
    for tag in range(3):
        sender.send(_chunk(7, tag))
    assert [(m.exchange_id, m.seq) for m in _queued(outbox)] == [(7, 1), (7, 2), (7, 3)]


def test_a_receiver_takes_each_message_once_and_refuses_a_gap():
    receiver, outbox = _numbering(), Outbox()
    receiver.attach([outbox], [])
    receiver.open(7)
    first, second, fourth = (_chunk(7, t) for t in (1, 2, 4))
    first.seq, second.seq, fourth.seq = 1, 2, 4
    handed: list[int] = []
    assert receiver.take(first, lambda: handed.append(1))
    assert receiver.take(second, lambda: handed.append(2))
    assert not receiver.take(first, lambda: handed.append(1))  # sent again: dropped
    with pytest.raises(OutOfOrder):
        receiver.take(fourth, lambda: handed.append(4))
    assert handed == [1, 2]
    # It acknowledged what it took (the latest acknowledgement replaces one still queued).
    assert [m.ack for m in _queued(outbox)] == [2]
    assert receiver.states() == [(7, 2)]


def test_a_sender_keeps_at_most_its_budget_unacknowledged_and_an_ack_frees_it():
    sender, outbox = _numbering(MIN_RETAIN_BYTES), Outbox()
    sender.attach([outbox], [])
    sender.open(1)
    fits = MIN_RETAIN_BYTES // (CHUNK + 64)
    for tag in range(fits):
        sender.send(_chunk(1, tag))
    with pytest.raises(TimeoutError):
        sender.send(_chunk(1, fits), deadline=time.monotonic() + 0.2)
    _queued(outbox)  # the peer reads them (an acknowledgement frees only what left)

    def acknowledge() -> None:
        time.sleep(0.1)
        sender.acknowledged(1, 3)

    threading.Thread(target=acknowledge).start()
    sender.send(_chunk(1, fits), deadline=time.monotonic() + 5)  # waits for room, then goes


def test_a_reconnection_sends_again_what_the_peer_did_not_get_in_order():
    sender, first = _numbering(), Outbox()
    sender.attach([first], [])
    sender.open(5)
    for tag in range(6):
        sender.send(_chunk(5, tag))
    sender.acknowledged(5, 2)  # the peer took 1 and 2 and said so
    sender.detach(first)
    first.close()  # the session drops
    sender.send(_chunk(5, 6))  # kept while no session is attached
    second = Outbox()
    sender.attach([second], [(5, 4)])  # the peer says it got 4 (its ack of 3 and 4 was lost)
    again = _queued(second)
    assert [m.seq for m in again] == [5, 6, 7]
    assert [m.cycle.delta_chunk.offset // CHUNK for m in again] == [4, 5, 6]


def test_a_closed_exchange_sends_nothing_and_forgets_what_it_kept():
    sender, outbox = _numbering(), Outbox()
    sender.attach([outbox], [])
    sender.open(2)
    sender.send(_chunk(2, 0))
    sender.close(2)
    with pytest.raises(OutboxClosed):
        sender.send(_chunk(2, 1))
    assert sender.states() == []


def test_drained_waits_for_the_last_acknowledgement():
    sender, outbox = _numbering(), Outbox()
    sender.attach([outbox], [])
    sender.open(3)
    sender.send(_chunk(3, 0))
    _queued(outbox)  # the peer reads it
    assert not sender.drained(3, 0.1)
    threading.Timer(0.1, sender.acknowledged, (3, 1)).start()
    assert sender.drained(3, 5.0)


def _numbered(key: int, seq: int) -> pb.OpenSessionRequest:
    message = _chunk(key, seq)
    message.seq = seq
    return message


def test_lanes_carry_message_seq_on_lane_seq_minus_one_mod_lanes():
    sender = _numbering()
    lanes = [Outbox(), Outbox(), Outbox()]
    sender.attach(lanes, [])
    sender.open(4)
    for tag in range(7):
        sender.send(_chunk(4, tag))
    assert [[m.seq for m in _queued(lane)] for lane in lanes] == [[1, 4, 7], [2, 5], [3, 6]]


def test_a_reconnection_puts_each_message_again_on_its_lane():
    sender, first = _numbering(), [Outbox(), Outbox()]
    sender.attach(first, [])
    sender.open(5)
    for tag in range(5):
        sender.send(_chunk(5, tag))
    sender.detach(first[0])
    second = [Outbox(), Outbox()]
    sender.attach(second, [(5, 2)])
    assert [[m.seq for m in _queued(lane)] for lane in second] == [[3, 5], [4]]


def test_lanes_hand_messages_on_in_order_whatever_order_they_arrive_in():
    """Four lanes, each read by its own thread, messages arriving lane by lane in reverse:
    every message is handed on once, in number order."""
    receiver = _numbering()
    receiver.attach([Outbox()], [])
    receiver.open(9)
    lanes = 4
    handed: list[int] = []
    arrivals = {lane: [s for s in range(1, 41) if (s - 1) % lanes == lane] for lane in range(lanes)}

    def read(lane: int) -> None:
        time.sleep(0.01 * (lanes - lane))  # the last lane first
        for seq in arrivals[lane]:
            receiver.take(_numbered(9, seq), lambda s=seq: handed.append(s), lane=lane, lanes=lanes)

    readers = [threading.Thread(target=read, args=(lane,)) for lane in range(lanes)]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join(10)
    assert handed == list(range(1, 41))
    assert receiver.states() == [(9, 40)]


def test_a_message_on_the_wrong_lane_or_too_far_ahead_is_refused():
    receiver = _numbering()
    receiver.attach([Outbox()], [])
    receiver.open(3)
    with pytest.raises(OutOfOrder, match="lane 0 of 2"):
        receiver.take(_numbered(3, 2), lambda: None, lane=0, lanes=2)
    with pytest.raises(OutOfOrder):  # lane 1's next can be message 2 at most, not 4
        receiver.take(_numbered(3, 4), lambda: None, lane=1, lanes=2)


def test_a_lane_waiting_for_its_turn_lets_go_when_its_session_ends():
    receiver, gone = _numbering(), threading.Event()
    receiver.attach([Outbox()], [])
    receiver.open(3)
    threading.Timer(0.2, gone.set).start()
    started = time.monotonic()
    assert not receiver.take(_numbered(3, 2), lambda: None, lane=1, lanes=2, gone=gone)
    assert time.monotonic() - started < 5
    assert receiver.states() == [(3, 0)]  # not taken: it comes again on the next session


def test_a_sender_that_sizes_its_messages_may_keep_four_of_them_whatever_its_share():
    # A member's share of a small budget (many members) still leaves room for four chunks,
    # and no more: the floor is the sender's own chunk, not the largest chunk there is.
    def numbering(retain: int, size: int | None) -> Numbering[pb.OpenSessionRequest]:
        return Numbering(
            lambda key, count: pb.OpenSessionRequest(exchange_id=key, ack=count),
            retain,
            message_bytes=size,
        )

    assert numbering(1, CHUNK + 64).retain_bytes == 4 * (CHUNK + 64)
    assert numbering(64 * CHUNK, CHUNK + 64).retain_bytes == 64 * CHUNK
    assert numbering(1, None).retain_bytes == MIN_RETAIN_BYTES


def test_a_message_ahead_of_its_exchanges_opening_waits_for_it_when_the_peer_opens():
    receiver = Numbering(
        lambda key, count: pb.OpenSessionRequest(exchange_id=key, ack=count),
        MIN_RETAIN_BYTES,
        peer_opens=True,
    )
    receiver.attach([Outbox()], [])
    handed: list[int] = []
    second = threading.Thread(
        target=receiver.take,
        args=(_numbered(6, 2), lambda: handed.append(2)),
        kwargs={"lane": 1, "lanes": 2},
    )
    second.start()
    time.sleep(0.1)
    receiver.open(6)  # message 1 opens it, on lane 0
    assert receiver.take(_numbered(6, 1), lambda: handed.append(1), lanes=2)
    second.join(5)
    assert handed == [1, 2]
    # An exchange closed here drops what comes late, on any lane, without waiting.
    receiver.close(6)
    assert not receiver.take(_numbered(6, 3), lambda: handed.append(3), lanes=2)
    assert not receiver.take(_numbered(7, 2), lambda: handed.append(2), lanes=1)  # never open
