"""The WAN benchmarks' link emulator (benchmarks/link.py): bytes arrive whole and in order,
each direction pays its one-way delay and its rate, a cut resets every connection, and the
emulator lets go of its port when it stops."""

from __future__ import annotations

import contextlib
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from link import Direction, Link  # noqa: E402  (a benchmark script, not a package)

TIMEOUT_S = 10.0


@contextlib.contextmanager
def echo_server() -> Iterator[tuple[str, int]]:
    """A server on a free 127.0.0.1 port that echoes every connection until it closes."""
    listener = socket.create_server(("127.0.0.1", 0))
    stopping = threading.Event()

    def echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(1 << 16):
                conn.sendall(data)

    def accept() -> None:
        while not stopping.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.settimeout(TIMEOUT_S)
            threading.Thread(target=_quietly, args=(echo, conn), daemon=True).start()

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        yield listener.getsockname()
    finally:
        stopping.set()
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        listener.close()
        acceptor.join(timeout=TIMEOUT_S)


def _quietly(fn: Callable[[socket.socket], None], conn: socket.socket) -> None:
    with contextlib.suppress(OSError):  # a cut connection: the test asserts on the client's side
        fn(conn)


def connect(link: Link) -> socket.socket:
    conn = socket.create_connection(("127.0.0.1", link.port), timeout=TIMEOUT_S)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


def receive(conn: socket.socket, nbytes: int) -> bytes:
    out = bytearray()
    while len(out) < nbytes:
        data = conn.recv(nbytes - len(out))
        if not data:
            raise ConnectionError(f"closed after {len(out)} of {nbytes} bytes")
        out += data
    return bytes(out)


def test_bytes_arrive_whole_and_in_order_both_ways_and_are_counted() -> None:
    payload = bytes(range(256)) * 4096 + b"tail"  # 1 MiB and a bit, no period of 1 MiB
    with echo_server() as target, Link(target, Direction.of(delay_ms=1)) as link:
        with connect(link) as conn:
            sender = threading.Thread(target=conn.sendall, args=(payload,))
            sender.start()
            echoed = receive(conn, len(payload))
            sender.join()
        stats = link.stats()
    assert echoed == payload
    assert stats.bytes_to_target == stats.bytes_to_client == len(payload)
    assert stats.connections == 1


def test_a_ping_pong_pays_the_one_way_delay_each_way() -> None:
    with (
        echo_server() as target,
        Link(target, Direction.of(delay_ms=50)) as link,
        connect(link) as conn,
    ):
        conn.sendall(b"x")
        receive(conn, 1)  # the proxy's own connection to the target is open from here on
        start = time.perf_counter()
        conn.sendall(b"ping")
        assert receive(conn, 4) == b"ping"
        elapsed = time.perf_counter() - start
    assert 0.100 <= elapsed < 0.100 + 0.1


def test_the_rate_cap_holds_and_each_direction_has_its_own() -> None:
    # 2 MB at 40 Mbit/s takes 0.4 s to leave; the way back is uncapped.
    nbytes = 2_000_000
    up = Direction.of(rate_mbit=40)
    with echo_server() as target, Link(target, up, Direction()) as link, connect(link) as conn:
        start = time.perf_counter()
        sender = threading.Thread(target=conn.sendall, args=(b"\x01" * nbytes,))
        sender.start()
        receive(conn, nbytes)
        elapsed = time.perf_counter() - start
        sender.join()
    assert 0.39 <= elapsed < 0.4 + 0.3


def test_connections_through_one_link_share_its_rate() -> None:
    # Two connections of 1 MB each at 40 Mbit/s: 2 MB leave in 0.4 s, not 0.2 s each.
    nbytes = 1_000_000
    up = Direction.of(rate_mbit=40)
    with echo_server() as target, Link(target, up, Direction()) as link:
        conns = [connect(link), connect(link)]
        start = time.perf_counter()
        senders = [threading.Thread(target=c.sendall, args=(b"\x03" * nbytes,)) for c in conns]
        for sender in senders:
            sender.start()
        for conn in conns:
            receive(conn, nbytes)
        elapsed = time.perf_counter() - start
        for sender, conn in zip(senders, conns, strict=True):
            sender.join()
            conn.close()
    assert 0.39 <= elapsed < 0.4 + 0.3


def test_a_window_cap_allows_one_window_a_round_trip() -> None:
    # 512 KiB through a 64 KiB window over a 50 ms round trip: at least 7 round trips more
    # than the data's own one-way trip (the link's rate is uncapped).
    nbytes, window = 512 * 1024, 64 * 1024
    up = Direction.of(delay_ms=25, window_bytes=window)
    with (
        echo_server() as target,
        Link(target, up, Direction.of(delay_ms=25)) as link,
        connect(link) as conn,
    ):
        start = time.perf_counter()
        sender = threading.Thread(target=conn.sendall, args=(b"\x02" * nbytes,))
        sender.start()
        receive(conn, nbytes)
        elapsed = time.perf_counter() - start
        sender.join()
    # The floor is the cap's effect; the ceiling only says the transfer ends (a loaded
    # machine stretched 16 round trips past it once in the full suite).
    assert 0.05 + 7 * 0.05 <= elapsed < 0.05 + 60 * 0.05


def test_the_buffer_is_bounded_by_bandwidth_times_delay_plus_the_queue() -> None:
    spec = Direction.of(delay_ms=100, rate_mbit=1000, queue_bytes=1 << 20)
    assert spec.buffer_bytes == 12_500_000 + (1 << 20)
    with pytest.raises(ValueError, match="rate must be > 0"):
        Direction.of(rate_mbit=0)


def test_a_cut_resets_every_connection_through_the_link() -> None:
    with echo_server() as target, Link(target, Direction.of(delay_ms=1)) as link:
        first, second = connect(link), connect(link)
        with first, second:
            for conn in (first, second):
                conn.sendall(b"hi")
                assert receive(conn, 2) == b"hi"
            assert link.cut() == 2
            for conn in (first, second):
                with pytest.raises((ConnectionResetError, ConnectionError)):
                    conn.sendall(b"more")
                    receive(conn, 4)
        stats = link.stats()
    assert stats.cuts == 1 and stats.open_connections == 0


def test_scheduled_cuts_are_seeded_within_their_window_and_reset_connections() -> None:
    with echo_server() as target, Link(target, Direction()) as link:
        moments = link.schedule_cuts(3, (0.05, 0.15), seed=4)
        with connect(link) as conn, pytest.raises((ConnectionResetError, ConnectionError)):
            receive(conn, 1)  # nothing comes back: the first cut ends it
        deadline = time.monotonic() + TIMEOUT_S
        while link.stats().cuts < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert link.stats().cuts == 3
    assert moments == sorted(moments) and all(0.05 <= m <= 0.15 for m in moments)
    # The same seed, the same moments (these links close before any of them comes).
    with Link(target, Direction()) as same, Link(target, Direction()) as other:
        assert same.schedule_cuts(3, (0.05, 0.15), seed=4) == moments
        assert other.schedule_cuts(3, (0.05, 0.15), seed=5) != moments


def test_the_emulator_lets_go_of_its_port_when_it_stops() -> None:
    with echo_server() as target:
        with Link(target, Direction()) as link:
            port = link.port
            socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S).close()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S)
