"""The demo consortium under each delta encoding: bytes on the wire and held-out loss.

    PYTHONPATH=. .venv/bin/python benchmarks/encoding_bench.py --rounds 10 \\
        [--model demo|evidence] [--encodings float32 int8_block ...] [--json out.json]

(``PYTHONPATH=.``: it scores with the evidence package, which lives at the repository root,
outside the product package.)

For each encoding it starts the demo's consortium (coordinator + Vietnam, Switzerland,
India as processes on 127.0.0.1, mutual TLS, the demo's corpora and policy) with
``delta_encoding`` set, runs ``--rounds`` rounds, and records:

- ``delta_bytes_per_round``: the delta tensor bytes the coordinator received, all nodes, per
  round (its ``tapestry_bytes_received_total{what="delta"}`` counters: bytes as they travel);
- ``heldout_loss``: the base committed by the last round, scored on every jurisdiction's
  held-out split (rebuilt by the nodes' own function, :mod:`evidence.heldout`), and
  their mean (and the initial base's, for scale); and the mean after each round, averaged
  over the last half of the rounds (a base's held-out loss wanders from round to round:
  docs/evidence.md); the table gives each figure against float32's, run the same way.

``--model demo`` is the demo's own model and training (tiny-causal, 256 x 32, the node
defaults); ``--model evidence`` is the evidence run's 1.05M-parameter gpt and its training
settings (:data:`evidence.settings.EVIDENCE`). Seeds are fixed, so float32 repeats
bit for bit; the other encodings differ from it only by their rounding.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import torch
from prometheus_client.parser import text_string_to_metric_families

from evidence.heldout import HeldOutScorer, member
from evidence.settings import EVIDENCE
from tapestry.config import NodeConfig, load_config
from tapestry.demo import DEMO_NODES, DEMO_POLICY
from tapestry.demo.launcher import LocalConsortium, LocalNodeSpec
from tapestry.wire.delta_encoding import DeltaEncoding

SEED = 2026


def delta_bytes(consortium: LocalConsortium) -> float:
    """Delta tensor bytes the coordinator has received from every node."""
    with urllib.request.urlopen(consortium.metrics_url("coordinator"), timeout=30) as reply:
        text = reply.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "tapestry_bytes_received_total" and sample.labels.get("what") == "delta"
    )


def run(encoding: DeltaEncoding, rounds: int, model: str, root: Path, seed: int) -> dict[str, Any]:
    if model == "evidence":
        nodes = [
            LocalNodeSpec(
                n.node_id, n.jurisdiction, n.quality_score, n.corpus, dict(EVIDENCE.training)
            )
            for n in DEMO_NODES
        ]
        model_fields: dict[str, Any] | None = dict(EVIDENCE.model)
    else:
        nodes, model_fields = list(DEMO_NODES), None
    consortium = LocalConsortium(
        root / encoding.value,
        nodes,
        consortium_id="tapestry-demo",
        seed=seed,
        model=model_fields,
        policy=DEMO_POLICY,
        settings={"delta_encoding": encoding.value},
        metrics=True,
    )
    with consortium:
        members = [
            member(load_config(consortium.node_config_path(n.node_id), NodeConfig))
            for n in consortium.nodes
        ]
        scorer = HeldOutScorer(members[0].config.model, members, seed)
        seconds, curve = [], []
        with consortium.client() as client:
            _, initial = client.get_base()
            for _ in range(rounds):
                started = time.monotonic()
                result = client.run_round()
                seconds.append(time.monotonic() - started)
                if sorted(result.accepted_nodes) != sorted(n.node_id for n in nodes):
                    raise SystemExit(f"{encoding.value}: round accepted {result.accepted_nodes}")
                _, state = client.get_base()
                curve.append(statistics.fmean(scorer.losses(state).values()))
        received = delta_bytes(consortium)
    losses = scorer.losses(state)
    before = scorer.losses(initial)
    return {
        "encoding": encoding.value,
        "rounds": rounds,
        "delta_bytes_per_round": received / rounds,
        "heldout_loss": losses,
        "mean_heldout_loss": statistics.fmean(losses.values()),
        "initial_mean_heldout_loss": statistics.fmean(before.values()),
        "mean_heldout_loss_per_round": curve,
        "mean_heldout_loss_last_half": statistics.fmean(curve[len(curve) // 2 :]),
        # Under a shared machine's load this is mostly waiting: kept, not tabled.
        "round_s_median": statistics.median(seconds),
    }


def table(runs: list[dict[str, Any]]) -> str:
    exact = next((r for r in runs if r["encoding"] == DeltaEncoding.FLOAT32.value), None)
    places = list(runs[0]["heldout_loss"])
    lines = [
        "| encoding | delta bytes / round | fewer bytes than float32 | "
        + " | ".join(f"held-out loss {p}" for p in places)
        + " | mean | vs float32 | mean over the last half of the rounds | vs float32 |",
        "|---" * (7 + len(places)) + "|",
    ]
    for r in runs:
        fewer = exact["delta_bytes_per_round"] / r["delta_bytes_per_round"] if exact else 0
        ratio = f"{fewer:.2f}x" if exact else "-"
        change, later = (
            (
                f"{100 * (r[key] / exact[key] - 1):+.3f} %"
                for key in ("mean_heldout_loss", "mean_heldout_loss_last_half")
            )
            if exact
            else ("-", "-")
        )
        losses = " | ".join(f"{r['heldout_loss'][p]:.4f}" for p in places)
        lines.append(
            f"| {r['encoding']} | {r['delta_bytes_per_round']:,.0f} | {ratio} | {losses} | "
            f"{r['mean_heldout_loss']:.4f} | {change} | "
            f"{r['mean_heldout_loss_last_half']:.4f} | {later} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--model", choices=["demo", "evidence"], default="demo")
    parser.add_argument(
        "--encodings", nargs="+", choices=[e.value for e in DeltaEncoding], default=None
    )
    parser.add_argument("--seed", type=int, default=SEED, help="the consortium's seed")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    encodings = [DeltaEncoding(e) for e in args.encodings or [e.value for e in DeltaEncoding]]
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
        f"{torch.__version__}; load average before: {os.getloadavg()}"
    )
    runs = []
    with tempfile.TemporaryDirectory(prefix="tapestry-encodings-") as root:
        for encoding in encodings:
            runs.append(run(encoding, args.rounds, args.model, Path(root), args.seed))
            print(f"{encoding.value}: done; load average {os.getloadavg()}", flush=True)
    print(table(runs))
    initial = runs[0]["initial_mean_heldout_loss"]
    print(f"the initial base (round 0): mean held-out loss {initial:.4f}")
    if args.json is not None:
        args.json.write_text(json.dumps(runs, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
