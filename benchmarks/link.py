"""A userspace link emulator: a TCP proxy on 127.0.0.1 that gives each direction a one-way
delay, a bandwidth and a bounded buffer, and can cut every connection through it at once.

This kernel has no ``netem`` qdisc, so a WAN is emulated in userspace. A node dials out to
the coordinator, so the emulator sits between a node process (the *client*, which connects
to :attr:`Link.port`) and the coordinator's port (the *target*)::

    python benchmarks/link.py --listen-port 0 --target 127.0.0.1:5000 --delay-ms 100 \
        --rate-mbit 1000            # 1 Gbit/s each way, 200 ms round trip

    with Link(("127.0.0.1", 5000), Direction.of(delay_ms=100, rate_mbit=1000)) as link:
        connect_to(link.port); ...; link.cut(); link.stats()

The model, per direction (``to_target``: client -> target, i.e. node -> coordinator;
``to_client``: the reverse):

- **Rate.** Bytes leave at the link rate, one after another (serialisation delay: a piece of
  ``n`` bytes occupies the link for ``8 n / rate`` seconds, after whatever is queued before
  it, on any connection through the link: they share its bandwidth), and arrive ``delay``
  later. Reads are cut into pieces of about 1 ms of link time, so
  the first byte of a large read does not wait for its last.
- **Buffer.** The link holds at most ``rate * delay / 8`` bytes on the wire plus
  ``queue_bytes`` waiting to leave (a bottleneck's queue); past that the emulator stops
  reading its source, so the sender's own TCP backs off on loopback (lossless, like a
  flow-controlled link). Memory per connection and direction: that bound, plus one read
  (256 KiB) and the destination transport's write buffer (64 KiB), in this process; plus
  the kernel buffers of the two loopback sockets (autotuned, at most ``net.ipv4.tcp_rmem``
  and ``tcp_wmem``'s maxima each). At 1 Gbit/s and 100 ms each way: 12.5 MB + 1 MiB.
- **What it does not emulate.** The emulator ends TCP on both sides (like a split-TCP
  accelerator), so the endpoints' own TCP windows see a loopback round trip, and the
  connection opens without a handshake's round trip. Protocols above TCP (HTTP/2 windows,
  acknowledgements, request/response turns) pay the full delay, which is what this is for.
  ``window_bytes`` caps a direction's bytes sent but not yet acknowledged (acknowledged one
  return delay after they arrive), to show what TCP itself would reach with a given window
  (the sender's ``tcp_wmem`` maximum, say); it models no congestion control or loss.
- **Cuts.** :meth:`Link.cut` resets every connection through the link (both sides, RST by
  ``SO_LINGER`` 0); :meth:`Link.schedule_cuts` does so at seeded random times in a window.

One event loop thread serves every connection; at 1 Gbit/s it costs a fraction of a core.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import random
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TypeVar

_T = TypeVar("_T")

# The most a selector transport reads at once (asyncio's max_size).
READ_BYTES = 256 * 1024
# Pieces of about this much link time; never smaller than MIN_PIECE (timer cost).
PIECE_SECONDS = 0.001
MIN_PIECE = 16 * 1024
# Without a rate cap, the bytes a direction may hold in flight (loopback moves GB/s).
UNCAPPED_IN_FLIGHT = 32 << 20
_RST = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST, drops unsent bytes


@dataclass(frozen=True)
class Direction:
    """One direction of the link: one-way ``delay_s``, ``rate_bps`` (bit/s; ``None``: no
    cap), ``queue_bytes`` that may wait to leave, and an optional ``window_bytes`` cap on
    bytes sent but not yet acknowledged (TCP's window; ``None``: no cap)."""

    delay_s: float = 0.0
    rate_bps: float | None = None
    queue_bytes: int = 1 << 20
    window_bytes: int | None = None

    @classmethod
    def of(
        cls,
        delay_ms: float = 0.0,
        rate_mbit: float | None = None,
        queue_bytes: int = 1 << 20,
        window_bytes: int | None = None,
    ) -> Direction:
        rate = rate_mbit * 1e6 if rate_mbit is not None else None
        return cls(delay_ms / 1e3, rate, queue_bytes, window_bytes)

    def __post_init__(self) -> None:
        if self.delay_s < 0:
            raise ValueError(f"delay must be >= 0 s, got {self.delay_s}")
        if self.rate_bps is not None and self.rate_bps <= 0:
            raise ValueError(f"rate must be > 0 bit/s, got {self.rate_bps}")
        if self.queue_bytes < MIN_PIECE:
            raise ValueError(f"queue_bytes must be >= {MIN_PIECE}, got {self.queue_bytes}")
        if self.window_bytes is not None and self.window_bytes < MIN_PIECE:
            raise ValueError(f"window_bytes must be >= {MIN_PIECE}, got {self.window_bytes}")

    @property
    def buffer_bytes(self) -> int:
        """The most this direction holds in this process: bytes on the wire at full rate
        (bandwidth x delay) plus the queue."""
        in_flight = int(self.rate_bps * self.delay_s / 8) if self.rate_bps else UNCAPPED_IN_FLIGHT
        return in_flight + self.queue_bytes

    @property
    def piece_bytes(self) -> int:
        if self.rate_bps is None:
            return READ_BYTES
        return max(MIN_PIECE, int(self.rate_bps * PIECE_SECONDS / 8))


@dataclass(frozen=True)
class LinkStats:
    """Bytes delivered each way, connections accepted, open now, and cuts made."""

    bytes_to_target: int
    bytes_to_client: int
    connections: int
    open_connections: int
    cuts: int


class _Side(asyncio.Protocol):
    """One socket of a proxied connection; hands what it reads to its outgoing pipe."""

    def __init__(self, conn: _Connection, name: str) -> None:
        self.conn = conn
        self.name = name
        self.transport: asyncio.Transport | None = None
        self.outgoing: _Pipe | None = None  # bytes read here go into this pipe
        self.incoming: _Pipe | None = None  # this pipe writes into our transport
        self.write_paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if self.name == "client":
            self.conn.client_connected(self)

    def data_received(self, data: bytes) -> None:
        if self.outgoing is not None:
            self.outgoing.push(data)

    def eof_received(self) -> bool:
        if self.outgoing is not None:
            self.outgoing.push_eof()
        return True  # keep the other half open: the reply may still be on its way

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.incoming is not None:
            self.incoming.deliver()

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn.side_lost(self, exc)


class _Pipe:
    """One direction of one connection: a delay line of (arrival time, piece) entries."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        spec: Direction,
        source: _Side,
        sink: _Side,
        counter: list[int],
        ack_delay_s: float,
        clock: list[float],
    ) -> None:
        self.loop = loop
        self.spec = spec
        self.ack_delay_s = ack_delay_s  # the return direction's delay
        self.source = source
        self.sink = sink
        self.counter = counter  # one-element list shared with the link: delivered bytes
        self.line: collections.deque[tuple[float, memoryview | None]] = collections.deque()
        self.held = 0  # bytes read from the source and not yet written to the sink
        self.unacked = 0  # bytes read and not yet acknowledged (window_bytes)
        # When the link has sent everything queued so far, on every connection through it
        # (one-element list shared by the link's pipes of this direction).
        self.clock = clock
        self.timer: asyncio.TimerHandle | None = None
        self.reading = True
        self.closed = False
        self.eof_done = False

    def push(self, data: bytes) -> None:
        if self.closed:
            return
        now = self.loop.time()
        start = max(now, self.clock[0])
        view = memoryview(data)
        step = self.spec.piece_bytes
        for offset in range(0, len(view), step):
            piece = view[offset : offset + step]
            if self.spec.rate_bps is not None:
                start += len(piece) * 8 / self.spec.rate_bps
            self.line.append((start + self.spec.delay_s, piece))
        self.clock[0] = start
        self.held += len(data)
        self.unacked += len(data)
        self._throttle()
        self._arm()

    def push_eof(self) -> None:
        if self.closed:
            return
        at = max(self.loop.time(), self.clock[0])
        self.line.append((at + self.spec.delay_s, None))
        self._arm()

    def _full(self) -> bool:
        window = self.spec.window_bytes
        return self.held >= self.spec.buffer_bytes or (
            window is not None and self.unacked >= window
        )

    def _throttle(self) -> None:
        if self.reading and self._full():
            self.reading = False
            assert self.source.transport is not None
            self.source.transport.pause_reading()

    def _maybe_resume(self) -> None:
        if self.reading or self.closed:
            return
        window = self.spec.window_bytes
        slack = self.spec.queue_bytes // 2
        if self.held <= self.spec.buffer_bytes - slack and (
            window is None or self.unacked <= window - min(slack, window // 2)
        ):
            self.reading = True
            transport = self.source.transport
            if transport is not None and not transport.is_closing():
                transport.resume_reading()

    def _arm(self) -> None:
        if self.timer is None and self.line and not self.sink.write_paused:
            self.timer = self.loop.call_at(self.line[0][0], self.deliver)

    def deliver(self) -> None:
        """Write every piece whose arrival time has come (until the sink pushes back)."""
        self.timer = None
        if self.closed:
            return
        sink = self.sink.transport
        assert sink is not None
        now = self.loop.time()
        delivered = 0
        while self.line and self.line[0][0] <= now and not self.sink.write_paused:
            _, piece = self.line.popleft()
            if piece is None:
                self.eof_done = True
                if sink.can_write_eof() and not sink.is_closing():
                    with contextlib.suppress(OSError):  # the sink is gone already
                        sink.write_eof()
                self.sink.conn.maybe_finish()
                continue
            # counted before it is written: the peer may read it (and a caller the counter)
            # before this loop ends
            self.counter[0] += len(piece)
            sink.write(piece)
            delivered += len(piece)
        if delivered:
            self.held -= delivered
            if self.spec.window_bytes is not None:
                self.loop.call_later(self.ack_delay_s, self._ack, delivered)
            self._maybe_resume()
        self._arm()

    def _ack(self, nbytes: int) -> None:
        self.unacked -= nbytes
        self._maybe_resume()

    def close(self) -> None:
        self.closed = True
        self.line.clear()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class _Connection:
    """A client connection and the one it opened to the target, joined by two pipes."""

    def __init__(self, link: Link) -> None:
        self.link = link
        self.client = _Side(self, "client")
        self.target = _Side(self, "target")
        self.pipes: list[_Pipe] = []
        self.done = False

    def client_connected(self, side: _Side) -> None:
        assert side.transport is not None
        side.transport.pause_reading()  # until the target is connected
        self.link.open.add(self)
        self.link.accepted += 1
        self.link.loop.create_task(self._connect_target())

    async def _connect_target(self) -> None:
        loop = self.link.loop
        try:
            await loop.create_connection(lambda: self.target, *self.link.target)
        except OSError:
            self.reset()
            return
        if self.done:  # cut while connecting
            self.reset()
            return
        to_target, to_client = self.link.to_target, self.link.to_client
        link = self.link
        up = _Pipe(
            loop,
            to_target,
            self.client,
            self.target,
            link.sent_up,
            to_client.delay_s,
            link.clock_up,
        )
        down = _Pipe(
            loop,
            to_client,
            self.target,
            self.client,
            link.sent_down,
            to_target.delay_s,
            link.clock_down,
        )
        for side, spec in ((self.client, to_target), (self.target, to_client)):
            if spec.window_bytes is not None and side.transport is not None:
                # So that one read overshoots the window by little: asyncio's selector
                # transports read max_size bytes at a time.
                side.transport.max_size = max(MIN_PIECE, spec.window_bytes // 8)  # type: ignore[attr-defined]
        self.client.outgoing = self.target.incoming = up
        self.target.outgoing = self.client.incoming = down
        self.pipes = [up, down]
        assert self.client.transport is not None
        if not self.client.transport.is_closing():
            self.client.transport.resume_reading()

    def maybe_finish(self) -> None:
        """Both halves closed cleanly and delivered: close both sockets."""
        if self.pipes and all(p.eof_done for p in self.pipes):
            self._close(reset=False)

    def side_lost(self, side: _Side, exc: Exception | None) -> None:
        # The other side learns of a reset or close at once (a real link would carry the
        # RST with the delay; a cut is the case that matters, and it is immediate anyway).
        if not self.done:
            self._close(reset=exc is not None)

    def reset(self) -> None:
        self._close(reset=True)

    def _close(self, *, reset: bool) -> None:
        if self.done and not reset:
            return
        self.done = True
        for pipe in self.pipes:
            pipe.close()
        for side in (self.client, self.target):
            transport = side.transport
            if transport is None:
                continue
            if reset:
                sock = transport.get_extra_info("socket")
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RST)
                transport.abort()
            else:
                transport.close()
        self.link.open.discard(self)


class Link:
    """The emulator; start it with ``with`` (or :meth:`start`/:meth:`close`). It listens on
    ``127.0.0.1:listen_port`` (0: a free port, see :attr:`port`) and forwards each
    connection to ``target``. ``to_target`` is the client -> target direction and
    ``to_client`` the reverse (``to_client`` defaults to ``to_target``)."""

    def __init__(
        self,
        target: tuple[str, int],
        to_target: Direction,
        to_client: Direction | None = None,
        *,
        listen_port: int = 0,
    ) -> None:
        self.target = target
        self.to_target = to_target
        self.to_client = to_client if to_client is not None else to_target
        self.listen_port = listen_port
        self.loop = asyncio.new_event_loop()
        self.open: set[_Connection] = set()
        self.accepted = 0
        self.cuts = 0
        self.sent_up = [0]
        self.sent_down = [0]
        self.clock_up = [0.0]  # when each direction has sent all it holds (all connections)
        self.clock_down = [0.0]
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._port = 0

    @property
    def port(self) -> int:
        return self._port

    @property
    def memory_bound_bytes(self) -> int:
        """The most one connection holds in this process (both directions, plus a read and
        a write buffer each); kernel socket buffers come on top."""
        extra = READ_BYTES + 64 * 1024
        return self.to_target.buffer_bytes + self.to_client.buffer_bytes + 2 * extra

    def start(self) -> Link:
        ready = threading.Event()
        failed: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            try:
                self._server = self.loop.run_until_complete(
                    self.loop.create_server(
                        lambda: _Connection(self).client, "127.0.0.1", self.listen_port
                    )
                )
            except BaseException as error:  # reported to start()'s caller
                failed.append(error)
                ready.set()
                return
            self._port = self._server.sockets[0].getsockname()[1]
            ready.set()
            self.loop.run_forever()

        self._thread = threading.Thread(target=run, name="link-emulator", daemon=True)
        self._thread.start()
        ready.wait()
        if failed:
            self._thread.join()
            self.loop.close()
            raise failed[0]
        return self

    def _call(self, fn: Callable[[], _T]) -> _T:
        """Run ``fn()`` on the loop's thread and return its result."""

        async def call() -> _T:
            return fn()

        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(timeout=10)

    def _cut_now(self) -> int:
        victims = list(self.open)
        for conn in victims:
            conn.reset()
        self.cuts += 1
        return len(victims)

    def cut(self) -> int:
        """Reset every connection through the link now (RST both ways); how many."""
        return self._call(self._cut_now)

    def schedule_cuts(
        self, count: int, window_s: tuple[float, float], seed: int = 0
    ) -> list[float]:
        """Cut every connection ``count`` times at seeded uniform random moments within
        ``window_s`` (seconds from now); returns the moments, sorted."""
        start, end = window_s
        if count < 0 or not 0 <= start <= end:
            raise ValueError(f"need count >= 0 and 0 <= start <= end, got {count}, {window_s}")
        rng = random.Random(seed)
        moments = sorted(rng.uniform(start, end) for _ in range(count))

        def arm() -> None:
            for moment in moments:
                self.loop.call_later(moment, self._cut_now)

        self._call(arm)
        return moments

    def stats(self) -> LinkStats:
        return LinkStats(
            bytes_to_target=self.sent_up[0],
            bytes_to_client=self.sent_down[0],
            connections=self.accepted,
            open_connections=len(self.open),
            cuts=self.cuts,
        )

    def close(self) -> None:
        """Stop listening, reset what is still open, and stop the loop's thread."""
        if self._thread is None:
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
                await self._server.wait_closed()
            for conn in list(self.open):
                conn.reset()
            await asyncio.sleep(0)  # let the transports finish closing

        if self.loop.is_running():
            asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(timeout=10)
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self._thread = None
        self.loop.close()

    def __enter__(self) -> Link:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()


def parse_target(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"--target must be HOST:PORT, got {text!r}")
    return host, int(port)


def parse_window(text: str) -> tuple[float, float]:
    start, _, end = text.partition(":")
    try:
        return float(start), float(end)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--cut-window must be START:END seconds, got {text!r}"
        ) from None


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen-port", type=int, default=0, help="0: a free port (printed)")
    parser.add_argument("--target", type=parse_target, required=True, help="HOST:PORT")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="one-way, each direction")
    parser.add_argument("--rate-mbit", type=float, default=None, help="each direction")
    parser.add_argument("--up-delay-ms", type=float, help="client -> target, if different")
    parser.add_argument("--up-rate-mbit", type=float, help="client -> target, if different")
    parser.add_argument("--queue-kib", type=int, default=1024, help="bottleneck queue")
    parser.add_argument("--window-kib", type=int, default=None, help="cap unacked bytes")
    parser.add_argument("--cuts", type=int, default=0, help="random cuts of every connection")
    parser.add_argument("--cut-window", type=parse_window, default=(0.0, 60.0), help="S:E s")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    window = args.window_kib * 1024 if args.window_kib else None
    queue = args.queue_kib * 1024
    down = Direction.of(args.delay_ms, args.rate_mbit, queue, window)
    up = Direction.of(
        args.delay_ms if args.up_delay_ms is None else args.up_delay_ms,
        args.rate_mbit if args.up_rate_mbit is None else args.up_rate_mbit,
        queue,
        window,
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with Link(args.target, up, down, listen_port=args.listen_port) as link:
        print(link.port, flush=True)
        print(
            f"link 127.0.0.1:{link.port} -> {args.target[0]}:{args.target[1]}; "
            f"up {up}; down {down}; at most {link.memory_bound_bytes / 2**20:.1f} MiB "
            "a connection in this process",
            file=sys.stderr,
            flush=True,
        )
        if args.cuts:
            moments = link.schedule_cuts(args.cuts, args.cut_window, args.seed)
            print(f"cuts at {', '.join(f'{m:.2f}' for m in moments)} s", file=sys.stderr)
        started = time.monotonic()
        stop.wait()
        stats = link.stats()
    print(
        f"after {time.monotonic() - started:.1f} s: {stats}",
        file=sys.stderr,
        flush=True,
    )


if __name__ == "__main__":
    main()
