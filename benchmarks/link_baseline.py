"""The reference a round over a WAN is held to: how long one plain TCP connection (or one
mutual-TLS connection) needs to move B bytes down, then B bytes up, through an emulated link
(:mod:`link`), with no protocol above the socket.

    python benchmarks/link_baseline.py --mib 95 --delay-ms 100 --rate-mbit 1000 [--tls] \
        [--window-kib 4096] [--repeats 3]

The *server* stands for the coordinator and the *client*, which connects through the link,
for a node (it dials out). Each exchange has the shape of two gRPC calls, so the two can be
compared one for one: **down** runs from the client's 1-byte request to its last byte of the
B the server sends (B / rate + one round trip); **up** from the client's first byte of B to
the server's 1-byte acknowledgement (B / rate + one round trip). Connecting and the TLS
handshake are not timed.

The sockets keep the kernel's default buffers (autotuned): through the emulator each socket
sees a loopback round trip, so its own window never binds. ``--window-kib`` caps the link's
unacknowledged bytes instead, to show what TCP would reach over a real path whose window is
that size (the sender's ``net.ipv4.tcp_wmem`` maximum, for one).
"""

from __future__ import annotations

import argparse
import socket
import ssl
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from link import Direction, Link
from loopback import BLOCK, mutual_tls


@dataclass(frozen=True)
class Exchange:
    """Seconds for B bytes down (request to last byte) and B bytes up (first byte to ack)."""

    down_s: float
    up_s: float

    @property
    def total_s(self) -> float:
        return self.down_s + self.up_s


def _receive(conn: socket.socket, nbytes: int, sink: memoryview) -> None:
    left = nbytes
    while left:
        got = conn.recv_into(sink, min(len(sink), left))
        if not got:
            raise ConnectionError(f"peer closed with {left} of {nbytes} bytes to come")
        left -= got


def _send(conn: socket.socket, nbytes: int, source: memoryview) -> None:
    left = nbytes
    while left:
        step = min(len(source), left)
        conn.sendall(source[:step])
        left -= step


def _serve(
    listener: socket.socket, nbytes: int, wrap: ssl.SSLContext | None, failed: list[BaseException]
) -> None:
    try:
        conn, _ = listener.accept()
        if wrap is not None:
            conn = wrap.wrap_socket(conn, server_side=True)
        buffer = memoryview(bytearray(BLOCK))
        with conn:
            if conn.recv(1) != b"r":
                raise ConnectionError("no request")
            _send(conn, nbytes, buffer)
            _receive(conn, nbytes, buffer)
            conn.sendall(b"k")
    except BaseException as error:  # reported by exchange()
        failed.append(error)


def exchange(
    nbytes: int,
    down: Direction,
    up: Direction,
    tls: tuple[ssl.SSLContext, ssl.SSLContext] | None = None,
) -> Exchange:
    """Move ``nbytes`` down then up over one connection through a fresh :class:`Link`."""
    listener = socket.create_server(("127.0.0.1", 0))
    server_ctx, client_ctx = tls if tls is not None else (None, None)
    failed: list[BaseException] = []
    server = threading.Thread(target=_serve, args=(listener, nbytes, server_ctx, failed))
    server.start()
    try:
        with Link(listener.getsockname(), up, down) as link:
            raw = socket.create_connection(("127.0.0.1", link.port))
            conn = (
                client_ctx.wrap_socket(raw, server_hostname="127.0.0.1")
                if client_ctx is not None
                else raw
            )
            buffer = memoryview(bytearray(BLOCK))
            with conn:
                start = time.perf_counter()
                conn.sendall(b"r")
                _receive(conn, nbytes, buffer)
                middle = time.perf_counter()
                _send(conn, nbytes, buffer)
                if conn.recv(1) != b"k":
                    raise ConnectionError("no acknowledgement")
                end = time.perf_counter()
    finally:
        server.join(timeout=60)
        listener.close()
    if failed:
        raise failed[0]
    return Exchange(middle - start, end - middle)


def bench_tls(root: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server, client) mutual-TLS contexts from a throwaway consortium CA under ``root``:
    the coordinator's certificate (IP SAN 127.0.0.1) and node n0's."""
    from tapestry.pki.authority import init_consortium

    layout = init_consortium(
        root, "bench", coordinator_hosts=["127.0.0.1"], nodes=[("n0", "127.0.0.1")]
    )
    return mutual_tls(layout.ca_cert, layout.coordinator, layout.member("node", "n0"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=float, default=95.0, help="B, each way")
    parser.add_argument("--delay-ms", type=float, default=100.0, help="one-way, each way")
    parser.add_argument("--rate-mbit", type=float, default=1000.0)
    parser.add_argument("--window-kib", type=int, default=None)
    parser.add_argument("--tls", action="store_true", help="mutual TLS, as the services run")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    nbytes = int(args.mib * 2**20)
    window = args.window_kib * 1024 if args.window_kib else None
    spec = Direction.of(args.delay_ms, args.rate_mbit, window_bytes=window)
    with tempfile.TemporaryDirectory() as tmp:
        tls = bench_tls(Path(tmp)) if args.tls else None
        runs = [exchange(nbytes, spec, spec, tls) for _ in range(args.repeats)]
    ideal = nbytes * 8 / (args.rate_mbit * 1e6) + 2 * args.delay_ms / 1e3
    for name, ways, values in (
        ("down", 1, [r.down_s for r in runs]),
        ("up", 1, [r.up_s for r in runs]),
        ("down+up", 2, [r.total_s for r in runs]),
    ):
        median = statistics.median(values)
        print(
            f"{name:8} {median:7.3f} s  {ways * nbytes / median / 1e6:7.1f} MB/s  "
            f"(runs {', '.join(f'{v:.3f}' for v in values)}; ideal {ways * ideal:.3f} s)"
        )


if __name__ == "__main__":
    main()
