"""One round through real processes on 127.0.0.1 with a larger model: round wall time, the
nodes' own training time, and the coordinator's peak memory against the model's size.

    .venv/bin/python benchmarks/round_profile.py [--hidden 8192] [--nodes 3]

DESIGN §4 targets: coordinator peak RSS within ~3x the model's bytes; a round's overhead
beyond the slowest node's training within 2x raw loopback TCP for the same bytes.
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from tapestry.demo.launcher import LocalConsortium, LocalNodeSpec

TRAINING = {"local_epochs": 1, "batch_size": 8, "max_seq_len": 64, "lr": 0.001}
UNVALIDATED = {"acceptance": {"rule": "off"}}  # a round's transport, as before validation
STAMP = re.compile(
    r"^(\S+ \S+) INFO tapestry.node.servicer: round (\d+): (base .* received|artifact stored)"
)


def kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def node_seconds(log: Path, round_num: int) -> float:
    """From 'base received' to 'artifact stored' in the node's own log: train + persist."""
    times = {}
    for line in log.read_text().splitlines():
        m = STAMP.match(line)
        if m and int(m.group(2)) == round_num:
            times[m.group(3).split()[0]] = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f")
    return (times["artifact"] - times["base"]).total_seconds()


@contextmanager
def bench_consortium(hidden: int, nodes: int) -> Iterator[LocalConsortium]:
    """A local consortium of ``nodes`` nodes training TinyCausalModel(256, hidden)."""
    model = {"architecture": "tiny-causal", "vocab_size": 256, "hidden_size": hidden}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        corpus = root / "corpus.txt"
        corpus.write_text("consortium training keeps data at home.\n" * 16)
        specs = [
            LocalNodeSpec(f"n{i}", f"J{i}", 0.9, [corpus], dict(TRAINING)) for i in range(nodes)
        ]
        with LocalConsortium(root / "c", specs, model=model, policy=UNVALIDATED) as consortium:
            yield consortium


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=8192)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    model_bytes = (256 * args.hidden * 2 + 256) * 4
    with bench_consortium(args.hidden, args.nodes) as consortium:
        pid = consortium.processes["coordinator"].popen.pid
        idle = kib(pid, "VmRSS")
        print(
            f"model: hidden {args.hidden}, {model_bytes / 2**20:.1f} MiB; "
            f"{args.nodes} nodes; coordinator idle RSS {idle / 1024:.0f} MiB"
        )
        with consortium.client() as client:
            for _ in range(args.rounds):
                start = time.perf_counter()
                result = client.run_round()
                wall = time.perf_counter() - start
                slowest = max(
                    node_seconds(consortium.processes[s.node_id].log_path, result.round_num)
                    for s in consortium.nodes
                )
                peak = kib(pid, "VmHWM")
                print(
                    f"round {result.round_num}: wall {wall:.2f} s, slowest node "
                    f"train+persist {slowest:.2f} s, overhead {wall - slowest:.2f} s; "
                    f"coordinator peak RSS {peak / 1024:.0f} MiB = idle + "
                    f"{(peak - idle) * 1024 / model_bytes:.1f}x model"
                )


if __name__ == "__main__":
    main()
