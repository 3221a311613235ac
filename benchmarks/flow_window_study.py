"""HTTP/2 flow control over a long fat pipe: which gRPC options let ONE connection move a
model's bytes through an emulated WAN link (:mod:`link`) about as fast as a plain socket.

    python benchmarks/flow_window_study.py [--mib 95] [--links 1000/200 200/200 1000/100] \
        [--sets today defaults ...] [--repeats 3] [--tls] [--json out.json]

A link is ``RATE_MBIT/RTT_MS`` (the one-way delay is half the round trip, each way). Per
option set and link, ``--repeats`` fresh trials (median reported); each trial starts a
gRPC server (the coordinator) and a client (a node, which dials out through the link) as
two processes, and the client times, over one channel:

- **down**: a server-streaming call, ``--mib`` messages of 1 MiB from the server (the base
  the node downloads; the *client's* channel options set the receive window);
- **up**: a client-streaming call, the same bytes to the server, which answers once it holds
  them all (the delta the node uploads; the *server's* options set the receive window);
- then both again on the same connection (**warm**: a dial-out session lives across rounds,
  so gRPC's BDP estimate carries over), unless ``--no-warm``.

Each option set applies to both the channel and the server (each receives one way), on top
of the services' own message-size and keepalive options. The reference is
``link_baseline.exchange``: one TCP (or mutual-TLS) connection moving the same bytes the
same way through the same link. Peak RSS growth (VmHWM minus the RSS before the first call)
of each process shows what the windows cost in memory.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from link import Direction, Link
from link_baseline import bench_tls, exchange

from tapestry.wire.grpc_plumbing import CHANNEL_OPTIONS, SERVER_OPTIONS

MIB = 1 << 20
SERVICE = "/flowstudy.Study"
Options = list[tuple[str, int]]


def fixed(window: int, *more: tuple[str, int]) -> Options:
    """No BDP probe: a window of ``window`` bytes, whatever the link."""
    return [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", window), *more]


def both(options: Options) -> tuple[Options, Options]:
    return options, options


TODAY = fixed(4 * MIB)  # wire/grpc_plumbing.py's node channel today

# Option sets: (the node's channel, the coordinator's server).
SETS: dict[str, tuple[Options, Options]] = {
    "today": both(TODAY),
    # gRPC's own: BDP probe on, the window it grows to max(4 MiB, 2 x estimate).
    "defaults": both([]),
    "bdp + 16 MiB initial": both([("grpc.http2.lookahead_bytes", 16 * MIB)]),
    "bdp + 64 MiB initial": both([("grpc.http2.lookahead_bytes", 64 * MIB)]),
    "fixed 16 MiB": both(fixed(16 * MIB)),
    "fixed 32 MiB": both(fixed(32 * MIB)),
    "fixed 64 MiB": both(fixed(64 * MIB)),
    "fixed 32 MiB, 1 MiB frames": both(fixed(32 * MIB, ("grpc.http2.max_frame_size", MIB))),
    # Which side's options count: the receiver's (down: the channel; up: the server).
    "channel fixed 64 MiB, server today": (fixed(64 * MIB), TODAY),
    "channel today, server fixed 64 MiB": (TODAY, fixed(64 * MIB)),
}
DEFAULT_SETS = list(SETS)[:8]


def _identity(data: bytes) -> bytes:
    return data


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


# --- the two processes ---------------------------------------------------------------------


def serve(options: Options, tls_dir: Path | None, slow_s: float) -> None:
    """Serve Down (server streaming), Up (client streaming: ``slow_s`` of sleep after each
    message) and Ping; print the port, stop when stdin closes, then print the peak RSS
    growth in KiB."""
    payload = os.urandom(MIB)

    def down(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        for _ in range(int.from_bytes(request, "big")):
            yield payload

    def up(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        return sum(len(r) for r in _slowly(requests, slow_s)).to_bytes(8, "big")

    def ping(request: bytes, context: grpc.ServicerContext) -> bytes:
        return request

    handlers = {
        "Down": grpc.unary_stream_rpc_method_handler(down, _identity, _identity),
        "Up": grpc.stream_unary_rpc_method_handler(up, _identity, _identity),
        "Ping": grpc.unary_unary_rpc_method_handler(ping, _identity, _identity),
    }
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4), options=[*SERVER_OPTIONS, *options]
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE.strip("/"), handlers),)
    )
    if tls_dir is not None:
        credentials = grpc.ssl_server_credentials(
            [((tls_dir / "coordinator/key.pem").read_bytes(), _read(tls_dir, "coordinator"))],
            root_certificates=(tls_dir / "ca.pem").read_bytes(),
            require_client_auth=True,
        )
        port = server.add_secure_port("127.0.0.1:0", credentials)
    else:
        port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    idle = _rss_kib("VmRSS")
    print(port, flush=True)
    sys.stdin.read()
    server.stop(1).wait()
    print(_rss_kib("VmHWM") - idle, flush=True)


def _slowly(messages: Iterator[bytes], slow_s: float) -> Iterator[bytes]:
    """The messages, with a pause after each: a receiver slower than the link, so the
    window fills and its cost in memory shows."""
    for message in messages:
        yield message
        if slow_s:
            time.sleep(slow_s)


def _read(tls_dir: Path, holder: str) -> bytes:
    return (tls_dir / holder / "cert.pem").read_bytes()


def client(
    port: int, options: Options, mib: int, warm: bool, tls_dir: Path | None, slow_s: float
) -> None:
    """Time down and up (twice with ``warm``) over one channel; print JSON."""
    target = f"127.0.0.1:{port}"
    channel_options = [*CHANNEL_OPTIONS, *options]
    if tls_dir is not None:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=(tls_dir / "ca.pem").read_bytes(),
            private_key=(tls_dir / "nodes/n0/key.pem").read_bytes(),
            certificate_chain=_read(tls_dir, "nodes/n0"),
        )
        channel = grpc.secure_channel(target, credentials, options=channel_options)
    else:
        channel = grpc.insecure_channel(target, options=channel_options)
    payload = os.urandom(MIB)
    with channel:
        down = channel.unary_stream(f"{SERVICE}/Down", _identity, _identity)
        up = channel.stream_unary(f"{SERVICE}/Up", _identity, _identity)
        ping = channel.unary_unary(f"{SERVICE}/Ping", _identity, _identity)
        ping(b"x", timeout=60, wait_for_ready=True)  # connected (and handshaken) first
        idle = _rss_kib("VmRSS")
        times: list[float] = []
        for _ in range(2 if warm else 1):
            start = time.perf_counter()
            got = sum(len(m) for m in _slowly(down(mib.to_bytes(8, "big"), timeout=600), slow_s))
            middle = time.perf_counter()
            answer = up((payload for _ in range(mib)), timeout=600)
            end = time.perf_counter()
            if got != mib * MIB or int.from_bytes(answer, "big") != mib * MIB:
                raise RuntimeError(f"moved {got} down, {answer!r} up; expected {mib} MiB")
            times += [middle - start, end - middle]
    print(json.dumps({"times": times, "rss_growth_kib": _rss_kib("VmHWM") - idle}), flush=True)


# --- one trial, and the study --------------------------------------------------------------


def _role(*args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *args]


def trial(
    options: tuple[Options, Options],
    spec: Direction,
    mib: int,
    warm: bool,
    tls_dir: Path | None,
    slow_ms: float,
) -> dict[str, Any]:
    channel_options, server_options = (json.dumps(o) for o in options)
    tls = ["--tls-dir", str(tls_dir)] if tls_dir is not None else []
    tls += ["--slow-ms", str(slow_ms)]
    server = subprocess.Popen(
        _role("--role", "serve", "--options", server_options, *tls),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None and server.stdin is not None
        port = int(server.stdout.readline())
        with Link(("127.0.0.1", port), spec) as link:
            run = subprocess.run(
                _role(
                    "--role",
                    "client",
                    "--port",
                    str(link.port),
                    "--options",
                    channel_options,
                    "--mib",
                    str(mib),
                    "--warm" if warm else "--no-warm",
                    *tls,
                ),
                capture_output=True,
                text=True,
                timeout=1800,
                check=True,
            )
        server.stdin.close()
        server_growth = int(server.stdout.readline() or 0)
        server.wait(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    result: dict[str, Any] = json.loads(run.stdout)
    result["server_rss_growth_kib"] = server_growth
    return result


def parse_link(text: str) -> tuple[float, float]:
    rate, _, rtt = text.partition("/")
    return float(rate), float(rtt)


def median_row(trials: list[dict[str, Any]], nbytes: int) -> dict[str, Any]:
    columns = list(zip(*(t["times"] for t in trials), strict=True))
    down, up = statistics.median(columns[0]), statistics.median(columns[1])
    row: dict[str, Any] = {
        "down_s": down,
        "up_s": up,
        "total_s": statistics.median([sum(t["times"][:2]) for t in trials]),
        "runs_total_s": [round(sum(t["times"][:2]), 3) for t in trials],
        "client_rss_growth_mib": max(t["rss_growth_kib"] for t in trials) / 1024,
        "server_rss_growth_mib": max(t["server_rss_growth_kib"] for t in trials) / 1024,
    }
    if len(columns) == 4:
        row["warm_total_s"] = statistics.median([sum(t["times"][2:]) for t in trials])
    row["down_mb_s"] = nbytes / down / 1e6
    row["up_mb_s"] = nbytes / up / 1e6
    return row


def study(args: argparse.Namespace) -> list[dict[str, Any]]:
    nbytes = args.mib * MIB
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        tls_dir = Path(tmp) if args.tls else None
        tls = bench_tls(Path(tmp)) if args.tls else None
        for rate, rtt in args.links:
            spec = Direction.of(delay_ms=rtt / 2, rate_mbit=rate)
            plain = [exchange(nbytes, spec, spec, tls) for _ in range(args.repeats)]
            reference: dict[str, Any] = {
                "link": f"{rate:g} Mbit/s, {rtt:g} ms",
                "set": "socket" + (" (mutual TLS)" if args.tls else ""),
                "down_s": statistics.median(p.down_s for p in plain),
                "up_s": statistics.median(p.up_s for p in plain),
                "total_s": statistics.median(p.total_s for p in plain),
                "runs_total_s": [round(p.total_s, 3) for p in plain],
            }
            rows.append(reference)
            _report(reference, reference["total_s"])
            for name in args.sets:
                trials = [
                    trial(SETS[name], spec, args.mib, args.warm, tls_dir, args.slow_ms)
                    for _ in range(args.repeats)
                ]
                row = {"link": reference["link"], "set": name, **median_row(trials, nbytes)}
                rows.append(row)
                _report(row, reference["total_s"])
    return rows


def _report(row: dict[str, Any], plain_s: float) -> None:
    warm = row.get("warm_total_s")
    print(
        f"{row['link']:>22} | {row['set']:<28} | down {row['down_s']:6.2f} s | "
        f"up {row['up_s']:6.2f} s | total {row['total_s']:6.2f} s "
        f"({row['total_s'] / plain_s:4.2f}x) | "
        + (f"warm {warm:6.2f} s ({warm / plain_s:4.2f}x) | " if warm else "")
        + f"runs {row['runs_total_s']}",
        file=sys.stderr,
        flush=True,
    )


def table(rows: Sequence[dict[str, Any]], nbytes: int) -> str:
    def mb_s(seconds: float) -> str:
        return f"{seconds:.2f} s ({nbytes / seconds / 1e6:.0f} MB/s)"

    lines = [
        "| link | option set | down | up | down + up | vs socket | warm down + up | vs socket "
        "| RSS growth client / server |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    plain_s = 0.0
    for row in rows:
        if row["set"].startswith("socket"):
            plain_s = row["total_s"]
        warm = row.get("warm_total_s")
        growth = (
            f"{row['client_rss_growth_mib']:.0f} / {row['server_rss_growth_mib']:.0f} MiB"
            if "client_rss_growth_mib" in row
            else ""
        )
        lines.append(
            f"| {row['link']} | {row['set']} | {mb_s(row['down_s'])} | {mb_s(row['up_s'])} "
            f"| {row['total_s']:.2f} s | {row['total_s'] / plain_s:.2f}x "
            f"| {f'{warm:.2f} s' if warm else ''} | {f'{warm / plain_s:.2f}x' if warm else ''} "
            f"| {growth} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--role", choices=["study", "serve", "client"], default="study")
    parser.add_argument("--options", type=json.loads, default=[], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--tls-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--mib", type=int, default=95, help="MiB each way (1 MiB messages)")
    parser.add_argument(
        "--links", type=parse_link, nargs="+", default=["1000/200", "200/200", "1000/100"]
    )
    parser.add_argument("--sets", nargs="+", choices=list(SETS), default=DEFAULT_SETS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warm", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--tls", action="store_true", help="mutual TLS, as the services run")
    parser.add_argument("--json", type=Path, help="write the rows here too")
    parser.add_argument(
        "--slow-ms", type=float, default=0.0, help="receivers pause this long after each MiB"
    )
    args = parser.parse_args()
    options = [tuple(pair) for pair in args.options]
    if args.role == "serve":
        serve(options, args.tls_dir, args.slow_ms / 1e3)
        return
    if args.role == "client":
        client(args.port, options, args.mib, args.warm, args.tls_dir, args.slow_ms / 1e3)
        return
    args.links = [parse_link(x) if isinstance(x, str) else x for x in args.links]
    rows = study(args)
    print(table(rows, args.mib * MIB))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
