"""Tokens per second of one node's sovereign cycle, on a device and on several processes
(issue 9 §5: record CPU vs GPU in RESULTS.md).

    .venv/bin/python benchmarks/node_cycle_tokens.py [--device cpu|cuda|auto] [--epochs 1]
    torchrun --standalone --nproc-per-node 2 benchmarks/node_cycle_tokens.py --device cpu

Model: the demo's ``gpt`` (GPT_DEMO, 3.3M parameters); corpus: the demo's Vietnamese text in
windows of 129 byte tokens, batches of 8. Counts real target tokens trained (every epoch)
over the wall time of ``run_sovereign_cycle`` (training, plus moving the trained state to
the CPU and taking the delta); the first cycle warms up and is not counted. Under torchrun,
rank 0 prints and the other ranks serve as workers.
"""

from __future__ import annotations

import argparse
import time

import torch

from tapestry.corpus import load_corpus
from tapestry.demo import DEMO_NODES
from tapestry.node.processes import join_training_group, serve_as_worker, training_device
from tapestry.training.consortium.local.distributed import STOP
from tapestry.training.consortium.local.node import SovereignTrainingNode
from tapestry.training.consortium.models.spec import GPT_DEMO
from tapestry.training.consortium.models.state import model_state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--cycles", type=int, default=2, help="measured after one warm-up")
    args = parser.parse_args()
    group = join_training_group(args.device, 600.0)
    device = group.device if group else training_device(args.device)
    corpus = load_corpus(DEMO_NODES[0].corpus, GPT_DEMO.context_length + 1)
    model = GPT_DEMO.build(seed=0)
    node = SovereignTrainingNode(
        "vietnam", "Vietnam", model, corpus, 0.9, local_epochs=args.epochs, lr=1e-3,
        batch_size=8, device=device, group=group,
    )  # fmt: skip
    if group is not None and group.is_worker:
        serve_as_worker(node, group)
        return
    base = {k: v.clone() for k, v in model_state(model).items()}
    targets = sum(len(seq) - 1 for seq in corpus if len(seq) >= 2) * args.epochs
    try:
        seconds = []
        for round_num in range(1, args.cycles + 2):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            node.run_sovereign_cycle(round_num, base)  # ends on the CPU: synchronised
            seconds.append(time.perf_counter() - start)
    finally:
        if group is not None:
            group.post(STOP)
    best = min(seconds[1:])
    processes = group.world_size if group else 1
    print(
        f"device={device} processes={processes} sequences={len(corpus)} "
        f"target_tokens={targets} best_cycle_s={best:.3f} tokens_per_s={targets / best:.0f}"
    )


if __name__ == "__main__":
    main()
