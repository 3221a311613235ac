"""Rounds through real local servers (mutual TLS, every process on this machine), against
the same bytes over a bare socket and the in-process core doing the same round.

    .venv/bin/python benchmarks/round_bench.py --params 25M --nodes 3 --rounds 3 \\
        --trainer synthetic --json benchmarks/runs.json

For each (params, nodes) pair it records one object (appended to the list in ``--json``):

- ``round_s``: median wall time of ``RunRound`` seen by the operator's client;
- ``slowest_node_s``: median over rounds of the slowest node's core cycle, timed by the
  node itself (its log line "cycle took"): training, the delta and the artifact's digest,
  the work the in-process core does too; ``overhead_s`` = median(round - slowest node):
  what the services add (streaming, checks, digests, spill, persistence, commit);
- ``wire_bytes``: tensor bytes the coordinator sent and received in one round (its
  ``tapestry_bytes_*`` counters); ``loopback_s``: those bytes over 127.0.0.1, plain TCP and
  mutual TLS, median of 3, measured in the same run, with no consortium running;
- ``inprocess_s``: median round of :class:`ConsortiumCoordinator` with the same nodes in one
  process (nodes one after another, nothing on disk);
- peak RSS (``VmHWM``) of the coordinator and of the largest node after the rounds.

Model: ``TinyCausalModel(256, H)``, ``2·256·H + 256`` float32 parameters; ``--params`` takes
counts such as 1M, 25M, 100M, 400M and picks the nearest ``H``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import google.protobuf
import grpc
import torch
from loopback import mutual_tls, transfer_seconds

from tapestry.demo.launcher import LocalConsortium, LocalNodeSpec
from tapestry.training.consortium import ConsortiumCoordinator, SovereignTrainingNode
from tapestry.training.consortium.models.spec import ModelSpec
from tapestry.wire.delta_encoding import DeltaEncoding

VOCAB = 256
SEED = 2026
CORPUS_LINE = "consortium training keeps data at home.\n"
# Nothing held out: the figures are about moving weights, not evaluating them.
TRAINING = {
    "local_epochs": 1,
    "batch_size": 8,
    "max_seq_len": 64,
    "lr": 0.001,
    "heldout_percent": 0,
}
# Member-validated commit (on by default in a consortium file) evaluates each candidate on
# held-out text: off here, as before it existed, unless --validate asks for its cost.
UNVALIDATED = {"acceptance": {"rule": "off"}}
CYCLE = re.compile(r"INFO tapestry\.node\.servicer: round (\d+): cycle took ([0-9.]+) s")
BYTES = re.compile(r"^tapestry_bytes_(sent|received)_total\{[^}]*\} ([0-9.e+]+)$", re.M)


def parse_params(text: str) -> int:
    scale = {"K": 10**3, "M": 10**6, "G": 10**9}
    unit = text[-1].upper()
    return int(float(text[:-1]) * scale[unit]) if unit in scale else int(text)


def hidden_for(params: int) -> int:
    return max(1, round((params - VOCAB) / (2 * VOCAB)))


def kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def cycle_seconds(log: Path) -> dict[int, float]:
    return {int(m[1]): float(m[2]) for m in CYCLE.finditer(log.read_text(errors="replace"))}


def coordinator_bytes(url: str) -> float:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return sum(float(m[2]) for m in BYTES.finditer(text))


def machine() -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    memory = int(Path("/proc/meminfo").read_text().split()[1])  # MemTotal, KiB
    here = Path(__file__).resolve().parent
    commit = subprocess.run(
        ["git", "-C", str(here), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(memory / 2**20, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "grpcio": grpc.__version__,
        "protobuf": google.protobuf.__version__,
        "commit": commit,
    }


@contextmanager
def consortium(
    root: Path,
    hidden: int,
    nodes: int,
    trainer: str,
    encoding: str = "float32",
    link: dict[str, Any] | None = None,
    validate: bool = False,
) -> Iterator[LocalConsortium]:
    """``validate``: the consortium file's default member-validated commit, each node
    holding 10% of its lines out to evaluate on; else no validation and nothing held out."""
    corpus = root / "corpus.txt"
    if validate:  # lines that differ, so some can be held out
        corpus.write_text("".join(f"{i}: {CORPUS_LINE}" for i in range(16)))
    else:
        corpus.write_text(CORPUS_LINE * 16)
    training = {**TRAINING, "trainer": trainer, **({"heldout_percent": 10} if validate else {})}
    specs = [LocalNodeSpec(f"n{i}", f"J{i}", 0.9, [corpus], training) for i in range(nodes)]
    model = {"architecture": "tiny-causal", "vocab_size": VOCAB, "hidden_size": hidden}
    settings: dict[str, Any] = {"delta_encoding": encoding}
    if link:
        settings["link"] = link
    with LocalConsortium(
        root / "c",
        specs,
        model=model,
        seed=SEED,
        metrics=True,
        settings=settings,
        policy=None if validate else UNVALIDATED,
    ) as local:
        yield local


def served_rounds(
    root: Path,
    hidden: int,
    nodes: int,
    rounds: int,
    trainer: str,
    encoding: str,
    link: dict[str, Any] | None = None,
    validate: bool = False,
) -> dict[str, Any]:
    """Rounds through the services; the peak RSS of every process once they are done."""
    walls, slowest, overhead = [], [], []
    with consortium(root, hidden, nodes, trainer, encoding, link, validate) as local:
        url = local.metrics_url("coordinator")
        with local.client() as client:
            for _ in range(rounds):
                before = coordinator_bytes(url)
                start = time.perf_counter()
                result = client.run_round()
                wall = time.perf_counter() - start
                wire = coordinator_bytes(url) - before
                if result.failed_nodes or len(result.accepted_nodes) != nodes:
                    raise RuntimeError(f"round {result.round_num} did not accept every node")
                node = max(
                    cycle_seconds(local.processes[s.node_id].log_path)[result.round_num]
                    for s in local.nodes
                )
                walls.append(wall)
                slowest.append(node)
                overhead.append(wall - node)
                print(
                    f"  round {result.round_num}: {wall:.3f} s, slowest node {node:.3f} s, "
                    f"{wire / 2**20:.0f} MiB on the wire",
                    file=sys.stderr,
                )
        pids = {name: p.popen.pid for name, p in local.processes.items()}
        peaks = {name: kib(pid, "VmHWM") * 1024 for name, pid in pids.items()}
        certs = local.certs
        tls_dirs = (certs.ca_cert, certs.holder("node", "n0"), certs.holder("coordinator"))
        tls = mutual_tls(*tls_dirs)
    return {
        "round_s": statistics.median(walls),
        "rounds_s": [round(w, 4) for w in walls],
        "slowest_node_s": statistics.median(slowest),
        "overhead_s": statistics.median(overhead),
        "wire_bytes": int(wire),
        "coordinator_peak_rss_bytes": peaks.pop("coordinator"),
        "node_peak_rss_bytes": max(peaks.values()),
        "_tls": tls,
    }


def inprocess_models(nodes: int) -> int:
    """Model-sized states the in-process core holds in a round: the base, the coordinator's
    copy and snapshot, the new base, and per node its model, trained state and delta."""
    return 4 + 3 * nodes


def available_bytes() -> int:
    """``MemAvailable`` from ``/proc/meminfo``."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def inprocess_round(hidden: int, nodes: int, rounds: int, trainer: str) -> float:
    """Median round of the in-process core with the same model, nodes and trainer."""
    spec = ModelSpec("tiny-causal", VOCAB, hidden)
    base = spec.build(SEED)
    corpus = [list(CORPUS_LINE.encode())] * 16
    members = [
        SovereignTrainingNode(
            f"n{i}", f"J{i}", base, corpus, 0.9, local_epochs=1, seed=SEED, trainer=trainer
        )
        for i in range(nodes)
    ]
    coordinator = ConsortiumCoordinator(base)
    del base
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        coordinator.run_round(members)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def one_run(params: int, nodes: int, args: argparse.Namespace) -> dict[str, Any]:
    hidden = hidden_for(params)
    actual = 2 * VOCAB * hidden + VOCAB
    print(f"{actual:,} params (H={hidden}), {nodes} nodes", file=sys.stderr)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="round-bench-") as tmp:
        link = {"window_budget_mib": args.window_budget_mib} if args.window_budget_mib else None
        served = served_rounds(
            Path(tmp), hidden, nodes, args.rounds, args.trainer, args.encoding, link, args.validate
        )
    tls = served.pop("_tls")
    wire = served["wire_bytes"]
    plain = statistics.median(transfer_seconds(wire, None) for _ in range(3))
    secure = statistics.median(transfer_seconds(wire, tls) for _ in range(3))
    # The in-process core holds every node's model, trained state and delta at once: skip
    # it (null, said on stderr) where that would not fit beside what the machine has free.
    need = actual * 4 * inprocess_models(nodes)
    inprocess = (
        inprocess_round(hidden, nodes, args.rounds, args.trainer)
        if need < 0.8 * available_bytes()
        else None
    )
    if inprocess is None:
        print(f"  in-process skipped: it needs ~{need / 2**30:.1f} GiB", file=sys.stderr)
    return {
        "params": actual,
        "hidden_size": hidden,
        "nodes": nodes,
        "model_bytes": actual * 4,
        "validated": args.validate,
        **served,
        "loopback_s": {"plain": plain, "tls": secure},
        "inprocess_s": inprocess,
        "encoding": args.encoding,
        "window_budget_mib": args.window_budget_mib,
        "trainer": args.trainer,
        "rounds": args.rounds,
        "load_avg_before": [round(x, 2) for x in load_before],
        "load_avg_after": [round(x, 2) for x in os.getloadavg()],
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
    }


def _seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f} s"


def table(runs: list[dict[str, Any]]) -> str:
    """The runs of a ``--json`` file as a Markdown table (RESULTS.md's)."""
    mib = 2**20
    rows = [
        "| params | N | round | slowest node | overhead | wire | loopback plain / TLS "
        "| overhead / plain | in-process | coordinator peak | node peak | load (1 min) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        loop = r["loopback_s"]
        model = r["model_bytes"]
        rows.append(
            f"| {r['params'] / 1e6:.0f}M | {r['nodes']} | {r['round_s']:.2f} s "
            f"| {r['slowest_node_s']:.2f} s | {r['overhead_s']:.2f} s "
            f"| {r['wire_bytes'] / mib:.0f} MiB | {loop['plain']:.3f} / {loop['tls']:.3f} s "
            f"| {r['overhead_s'] / loop['plain']:.1f}x | {_seconds(r['inprocess_s'])} "
            f"| {r['coordinator_peak_rss_bytes'] / mib:.0f} MiB "
            f"({r['coordinator_peak_rss_bytes'] / model:.1f}x) "
            f"| {r['node_peak_rss_bytes'] / mib:.0f} MiB ({r['node_peak_rss_bytes'] / model:.1f}x) "
            f"| {r['load_avg_before'][0]:.1f}-{r['load_avg_after'][0]:.1f} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", nargs="+", default=["1M", "25M", "100M", "400M"])
    parser.add_argument("--nodes", nargs="+", type=int, default=[3, 8])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--encoding", choices=[e.value for e in DeltaEncoding], default="float32")
    parser.add_argument("--trainer", choices=["synthetic", "real"], default="synthetic")
    parser.add_argument(
        "--window-budget-mib", type=int, help="[link] window_budget_mib (default: the config's)"
    )
    parser.add_argument(
        "--validate",
        action="store_true",
        help="member-validated commit on (nodes hold 10%% out): its cost; off by default",
    )
    parser.add_argument("--json", type=Path, help="append one object per run to this list")
    parser.add_argument("--table", type=Path, help="print this --json file as Markdown, run none")
    args = parser.parse_args()
    if args.table is not None:
        print(table(json.loads(args.table.read_text())))
        return
    for size in args.params:
        for nodes in args.nodes:
            run = one_run(parse_params(size), nodes, args)
            print(json.dumps(run))
            if args.json is not None:
                runs = json.loads(args.json.read_text()) if args.json.exists() else []
                args.json.write_text(json.dumps([*runs, run], indent=1) + "\n")


if __name__ == "__main__":
    main()
