"""Rounds over a WAN anyone can rerun: every node dials the coordinator through its own
emulated link (:mod:`link`: one-way delay, bandwidth, optional cuts), against the time one
plain TCP socket (and one mutual-TLS socket) needs for the same bytes through the same link.

    .venv/bin/python benchmarks/wan_bench.py --params 25M --nodes 3 --rounds 3 \\
        --delay-ms 100 --rate-mbit 1000 [--cuts 20] [--json benchmarks/wan.json]

Per run it prints, and appends to ``--json``, one object:

- ``round_s``: median wall time of ``RunRound`` seen by the operator (all nodes in parallel,
  each behind its own link); ``rounds_s`` every round's;
- ``socket_s`` / ``tls_socket_s``: one node's base down then delta up (B bytes each way)
  through one connection over the same link, no protocol above the socket, median of 3
  (:func:`link_baseline.exchange`); ``ratio`` = ``round_s / tls_socket_s`` (the services
  run mutual TLS);
- ``slowest_node_s``: median of the slowest node's own cycle (its log's "cycle took"), part of
  the round that no link can shorten; ``coordinator_cpu_s`` and ``nodes_cpu_s`` (all nodes
  together): CPU seconds per round, median (``/proc/PID/stat``), what a machine with fewer
  cores than processes pays in wall time;
- ``wire_bytes``: tensor bytes the coordinator sent and received in the last round (its
  metrics); ``link_bytes``: bytes that crossed the links in that round, both ways;
- ``cuts``: connections cut during the rounds (``--cuts N`` cuts every link N times at
  seeded random moments within the rounds' expected span); ``failed``: nodes the rounds
  failed; ``resumes``: transfers resumed (the coordinator's metrics);
- peaks of memory (``VmHWM``) of the coordinator and of the largest node, and the links'
  own bound.

Model: ``TinyCausalModel(256, H)``, ``2·256·H + 256`` float32 parameters (``--params`` picks
``H``); nodes train with the synthetic trainer, so the round is transport. The consortium's
``[link]`` is set to the emulated link, so the flow-control windows are sized for it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from link import Direction, Link
from link_baseline import bench_tls, exchange
from round_bench import (
    CORPUS_LINE,
    SEED,
    TRAINING,
    UNVALIDATED,
    VOCAB,
    coordinator_bytes,
    cycle_seconds,
    hidden_for,
    kib,
    machine,
    parse_params,
)

from tapestry.demo.launcher import LocalConsortium, LocalNodeSpec

RESUMES = "tapestry_transfer_resumes_total"


@contextmanager
def wan_consortium(
    root: Path,
    hidden: int,
    nodes: int,
    link: Direction,
    links: list[Link],
    fixed_window: bool = False,
    streams: int = 1,
    window_budget_mib: int | None = None,
) -> Iterator[LocalConsortium]:
    """A dial-out consortium whose every node reaches the coordinator through a fresh
    :class:`Link` of ``link`` (appended to ``links``)."""
    corpus = root / "corpus.txt"
    corpus.write_text(CORPUS_LINE * 16)
    training = {**TRAINING, "trainer": "synthetic"}
    specs = [LocalNodeSpec(f"n{i}", f"J{i}", 0.9, [corpus], training) for i in range(nodes)]
    model = {"architecture": "tiny-causal", "vocab_size": VOCAB, "hidden_size": hidden}
    rtt_ms = 2 * link.delay_s * 1e3
    bandwidth = (link.rate_bps or 1e11) / 1e6
    settings = {
        "link": {"bandwidth_mbit": bandwidth, "rtt_ms": max(rtt_ms, 1.0), "streams": streams}
    }
    if fixed_window:  # as before issue 15: windows of gRPC's usual 4 MiB whatever the link
        settings = {"link": {"bandwidth_mbit": 1.0, "rtt_ms": 1.0, "streams": streams}}
    if window_budget_mib:
        settings["link"]["window_budget_mib"] = window_budget_mib

    with ExitStack() as stack:

        def through_link(node_id: str, address: str) -> str:
            host, _, port = address.rpartition(":")
            emulated = stack.enter_context(Link((host, int(port)), link))
            links.append(emulated)
            return f"127.0.0.1:{emulated.port}"

        local = LocalConsortium(
            root / "c",
            specs,
            model=model,
            seed=SEED,
            metrics=True,
            settings=settings,
            route=through_link,
            policy=UNVALIDATED,
        )
        with local:
            yield local


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` and its threads so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def link_total(links: list[Link]) -> int:
    """Bytes delivered through every link so far, both ways."""
    return sum(e.stats().bytes_to_target + e.stats().bytes_to_client for e in links)


def metric(url: str, name: str) -> float:
    import urllib.request

    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and not line.startswith("#")
    )


def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    hidden = hidden_for(parse_params(args.params))
    state_bytes = (2 * VOCAB * hidden + VOCAB) * 4
    rate = args.rate_mbit or None
    tcp_window = args.tcp_window_kib << 10 if args.tcp_window_kib else None
    link = Direction.of(args.delay_ms, rate, window_bytes=tcp_window)
    links: list[Link] = []
    walls, slowest, failed, bases = [], [], 0, []
    with wan_consortium(
        root,
        hidden,
        args.nodes,
        link,
        links,
        args.fixed_window,
        args.streams,
        args.window_budget_mib,
    ) as local:
        url = local.metrics_url("coordinator")
        expected_s = 2 * state_bytes * 8 / ((rate or 1e5) * 1e6) + 1.0
        if args.cuts:
            for number, emulated in enumerate(links):
                emulated.schedule_cuts(args.cuts, (0.5, args.rounds * expected_s), seed=number)
        pids = {name: p.popen.pid for name, p in local.processes.items()}
        cpu: dict[str, list[float]] = {name: [] for name in pids}
        with local.client() as client:
            for _ in range(args.rounds):
                cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
                sent_before = link_total(links)
                before = coordinator_bytes(url)
                start = time.perf_counter()
                result = client.run_round()
                wall = time.perf_counter() - start
                wire = coordinator_bytes(url) - before
                link_bytes = link_total(links) - sent_before
                for name, pid in pids.items():
                    cpu[name].append(cpu_seconds(pid) - cpu_before[name])
                failed += len(result.failed_nodes)
                bases.append(result.shared_base_sha256)
                cycles = [
                    cycle_seconds(local.processes[s.node_id].log_path).get(result.round_num, 0.0)
                    for s in local.nodes
                ]
                walls.append(wall)
                slowest.append(max(cycles))
                print(
                    f"  round {result.round_num}: {wall:.3f} s, {len(result.accepted_nodes)} "
                    f"accepted, failed {sorted(result.failed_nodes)}, {wire / 2**20:.0f} MiB "
                    "tensors",
                    file=sys.stderr,
                )
        resumes = metric(url, RESUMES)
        peaks = {name: kib(p.popen.pid, "VmHWM") * 1024 for name, p in local.processes.items()}
        cuts = sum(e.cuts for e in links)
        link_bound = links[0].memory_bound_bytes if links else 0
    tls = bench_tls(root / "tls")
    plain = [exchange(state_bytes, link, link).total_s for _ in range(3)]
    secured = [exchange(state_bytes, link, link, tls).total_s for _ in range(3)]
    uncapped = replace(link, window_bytes=None)  # one socket with whatever window it needs
    best = [exchange(state_bytes, uncapped, uncapped, tls).total_s for _ in range(3)]
    round_s = statistics.median(walls)
    return {
        "params": 2 * VOCAB * hidden + VOCAB,
        "state_bytes": state_bytes,
        "nodes": args.nodes,
        "delay_ms_each_way": args.delay_ms,
        "rate_mbit": args.rate_mbit,
        "windows": "fixed 4 MiB" if args.fixed_window else "from [link]",
        "streams": args.streams,
        "window_budget_mib": args.window_budget_mib,
        "tcp_window_bytes": tcp_window,
        "round_s": round(round_s, 3),
        "rounds_s": [round(w, 3) for w in walls],
        "socket_s": round(statistics.median(plain), 3),
        "tls_socket_s": round(statistics.median(secured), 3),
        "ratio": round(round_s / statistics.median(secured), 2),
        # the TLS socket with no TCP window cap: what the link itself allows one connection
        "tls_socket_uncapped_s": round(statistics.median(best), 3),
        "ratio_uncapped": round(round_s / statistics.median(best), 2),
        "slowest_node_s": round(statistics.median(slowest), 3),
        # CPU seconds per round (median): the coordinator's, and every node's together.
        "coordinator_cpu_s": round(statistics.median(cpu.pop("coordinator")), 3),
        "nodes_cpu_s": round(sum(statistics.median(v) for v in cpu.values()), 3),
        "wire_bytes": int(wire),
        "link_bytes": int(link_bytes),
        "cuts": cuts,
        # Each round's shared base: a run with cuts must give an uncut run's, bit for bit.
        "bases_sha256": bases,
        "failed": failed,
        "resumes": int(resumes),
        "coordinator_peak_rss_bytes": peaks.pop("coordinator"),
        "node_peak_rss_bytes": max(peaks.values()),
        "link_memory_bound_bytes": link_bound,
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(sys.argv),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="25M")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--delay-ms", type=float, default=100.0, help="one-way, each way")
    parser.add_argument("--rate-mbit", type=float, default=1000.0, help="0: no rate cap")
    parser.add_argument("--streams", type=int, default=1, help="[link] streams: lanes")
    parser.add_argument(
        "--window-budget-mib", type=int, help="[link] window_budget_mib (default: the config's)"
    )
    parser.add_argument(
        "--tcp-window-kib",
        type=int,
        default=0,
        help="cap each connection's unacknowledged bytes, as a TCP buffer maximum would "
        "(Linux's default tcp_wmem maximum is 4096); 0: no cap",
    )
    parser.add_argument("--cuts", type=int, default=0, help="cuts of every link over the run")
    parser.add_argument("--json", type=Path, default=None, help="append the result here")
    parser.add_argument(
        "--fixed-window",
        action="store_true",
        help="4 MiB flow-control windows whatever the link (the comparison: before [link])",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args, Path(tmp))
    print(json.dumps(result, indent=2))
    if args.json is not None:
        existing = json.loads(args.json.read_text()) if args.json.exists() else []
        args.json.write_text(json.dumps([*existing, result], indent=2) + "\n")


if __name__ == "__main__":
    main()
