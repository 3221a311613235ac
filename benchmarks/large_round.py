"""A round whose deltas are past protobuf's 2 GiB message limit, through real local servers
(mutual TLS), checked bit for bit against the in-process core doing the same rounds.

    PYTHONPATH=services .venv/bin/python benchmarks/large_round.py --params 700M --nodes 2 \\
        --rounds 1 --json benchmarks/large.json

Issue 8 part 5: 700M float32 parameters (a 2.6 GiB delta per node), N = 2, synthetic
trainer, on a 24 GiB machine. It prints, per round, the served base's digest, and once the
servers are stopped, the digest of the in-process core's base after the same rounds
(:class:`ConsortiumCoordinator` with in-process :class:`SovereignTrainingNode`\\ s, synthetic
trainer, same seeds, policy and quality scores), then ``MATCH`` or ``MISMATCH``.

The in-process core runs as the proof of concept's API does, except that its nodes are
built one at a time when their cycle starts, run one after another, and hand their
trained state to a ``persist`` that keeps none of it: the same bits (the node's tests say
so) in fewer models' worth of memory (its peak is recorded as ``inprocess_peak_rss_bytes``:
this script's own process, which only ran a client while the servers ran), so both sides
fit one after the other.

Memory is watched while the servers run: when ``MemAvailable`` falls below
``--min-available-gib`` the consortium is stopped (before the kernel's OOM killer picks a
process of another user) and the run is reported as not fitting, with every process's
peak (``VmHWM``) at that moment.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from round_bench import (
    CORPUS_LINE,
    SEED,
    VOCAB,
    consortium,
    hidden_for,
    kib,
    machine,
    parse_params,
)

from tapestry.config import ConsortiumConfig, load_config
from tapestry.training.consortium import ConsortiumCoordinator, SovereignTrainingNode
from tapestry.training.consortium.messages import SovereignCycleResult, SovereignModelArtifact
from tapestry.training.consortium.models.spec import ModelSpec
from tapestry.training.consortium.progress import ProgressCallback

GIB = 2**30


def available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise KeyError("MemAvailable")


class MemoryGuard(threading.Thread):
    """Samples the machine's available memory; below ``floor`` bytes it calls ``stop`` once."""

    def __init__(self, floor: int, stop: Any) -> None:
        super().__init__(name="memory-guard", daemon=True)
        self.floor = floor
        self.stop_consortium = stop
        self.lowest = available_bytes()
        self.tripped = False
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.2):
            now = available_bytes()
            self.lowest = min(self.lowest, now)
            if now < self.floor and not self.tripped:
                self.tripped = True
                print(f"  MemAvailable {now / GIB:.2f} GiB: stopping", file=sys.stderr)
                self.stop_consortium()

    def finish(self) -> None:
        self._done.set()
        self.join()


def peaks(pids: Mapping[str, int]) -> dict[str, int]:
    """VmHWM of every process still there, in bytes."""
    out = {}
    for name, pid in pids.items():
        try:
            out[name] = kib(pid, "VmHWM") * 1024
        except (OSError, KeyError):
            continue
    return out


def served(root: Path, hidden: int, nodes: int, rounds: int, floor: int) -> dict[str, Any]:
    """The rounds through the services: each round's base digest and time, every process's
    peak, and whether the memory guard had to stop them."""
    digests: list[str] = []
    walls: list[float] = []
    error = ""
    with consortium(root, hidden, nodes, "synthetic") as local:
        pids = {name: p.popen.pid for name, p in local.processes.items()}
        last: dict[str, int] = {}
        guard = MemoryGuard(floor, lambda: last.update(peaks(pids)) or local.stop())
        guard.start()
        try:
            with local.client() as client:
                for _ in range(rounds):
                    start = time.perf_counter()
                    result = client.run_round()
                    walls.append(time.perf_counter() - start)
                    if result.failed_nodes or len(result.accepted_nodes) != nodes:
                        failed = {k: v[:300] for k, v in result.failed_nodes.items()}
                        raise RuntimeError(f"round {result.round_num}: not all accepted {failed}")
                    digests.append(result.shared_base_sha256)
                    print(
                        f"  round {result.round_num}: {walls[-1]:.1f} s, base "
                        f"{result.shared_base_sha256[:16]}",
                        file=sys.stderr,
                    )
        except Exception as failure:  # recorded with the peaks: the point of the run
            error = f"{type(failure).__name__}: {str(failure)[:500]}"
        finally:
            guard.finish()
        measured = last or peaks(pids)
        config = load_config(root / "c" / "config" / "consortium.toml", ConsortiumConfig)
    return {
        "rounds_s": [round(w, 2) for w in walls],
        "served_digests": digests,
        "peak_rss_bytes": measured,
        "min_available_bytes": guard.lowest,
        "stopped_for_memory": guard.tripped,
        "error": error,
        "_config": config,
    }


class OneAtATime:
    """An in-process node built when its cycle starts and dropped when it ends, so the
    in-process core holds one node's model at a time; the trained state goes to a
    ``persist`` that keeps nothing (the delta and the metadata are what a round uses)."""

    _lock = threading.Lock()  # the core runs nodes in threads: one model at a time

    def __init__(self, node_id: str, jurisdiction: str, spec: ModelSpec) -> None:
        self.node_id = node_id
        self.jurisdiction = jurisdiction
        self.spec = spec

    def run_sovereign_cycle(
        self,
        round_num: int,
        base_state: Mapping[str, torch.Tensor],
        *,
        on_progress: ProgressCallback | None = None,
    ) -> SovereignCycleResult:
        with self._lock:
            corpus = [list(CORPUS_LINE.encode())] * 16
            node = SovereignTrainingNode(
                self.node_id,
                self.jurisdiction,
                self.spec.build(SEED),  # replaced by the base; the node keeps its own copy
                corpus,
                0.9,
                local_epochs=1,
                seed=SEED,
                trainer="synthetic",
            )
            return node.run_sovereign_cycle(
                round_num, base_state, on_progress=on_progress, persist=_forget
            )


def _forget(artifact: SovereignModelArtifact) -> SovereignModelArtifact:
    return artifact


def in_process(config: ConsortiumConfig, rounds: int) -> list[str]:
    """The base digest after each round of the in-process core, built as the coordinator
    service builds its own (coordinator/startup.py) from the same configuration."""
    spec = config.model
    core = ConsortiumCoordinator(
        spec.build(config.seed),
        config.policy.policy(),
        assessed_quality={
            m.node_id: m.quality_score for m in config.nodes if m.quality_score is not None
        },
        min_nodes=config.policy.quorum(),
    )
    members = [OneAtATime(m.node_id, m.jurisdiction, spec) for m in config.nodes]
    digests = []
    for _ in range(rounds):
        result = core.run_round(members)  # type: ignore[arg-type]  # the node protocol
        digests.append(result.shared_base_sha256)
        del result
        print(f"  in-process round {core.round_num}: base {digests[-1][:16]}", file=sys.stderr)
    return digests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="700M")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--min-available-gib", type=float, default=1.5)
    parser.add_argument("--json", type=Path, help="append the run's object to this list")
    args = parser.parse_args()
    hidden = hidden_for(parse_params(args.params))
    params = 2 * VOCAB * hidden + VOCAB
    print(f"{params:,} params (H={hidden}), {args.nodes} nodes", file=sys.stderr)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    load_before = os.getloadavg()
    floor = int(args.min_available_gib * GIB)
    with tempfile.TemporaryDirectory(prefix="large-round-") as tmp:
        run = served(Path(tmp), hidden, args.nodes, args.rounds, floor)
    config = run.pop("_config")
    expected: list[str] = []
    inprocess_peak = 0
    if run["served_digests"]:  # servers stopped: the machine is the in-process core's
        expected = in_process(config, len(run["served_digests"]))
        inprocess_peak = kib(os.getpid(), "VmHWM") * 1024
    verdict = ("MATCH" if expected == run["served_digests"] else "MISMATCH") if expected else ""
    model = params * 4
    record = {
        "params": params,
        "hidden_size": hidden,
        "nodes": args.nodes,
        "model_bytes": model,
        **run,
        "peak_x_model": {k: round(v / model, 2) for k, v in run["peak_rss_bytes"].items()},
        "inprocess_digests": expected,
        "inprocess_peak_rss_bytes": inprocess_peak,
        "verdict": verdict,
        "load_avg_before": [round(x, 2) for x in load_before],
        "load_avg_after": [round(x, 2) for x in os.getloadavg()],
        "date": started,
        "machine": machine(),
    }
    print(json.dumps(record))
    print(verdict or "NOT COMPARED (no round completed)")
    if args.json is not None:
        runs = json.loads(args.json.read_text()) if args.json.exists() else []
        args.json.write_text(json.dumps([*runs, record], indent=1) + "\n")


if __name__ == "__main__":
    main()
