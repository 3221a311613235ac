"""One cycle of a node on the processes ``torchrun`` starts, without gRPC: rank 0 runs the
cycle and writes what it returned to ``argv[1]`` (JSON); the other ranks serve as workers.

Run by tests/integration/test_node_on_processes.py; the corpus and model are
:func:`cycle_inputs`', which the test also trains on one process to compare."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from tapestry.node.processes import join_training_group, serve_as_worker
from tapestry.training.consortium import TinyCausalModel
from tapestry.training.consortium.local.distributed import STOP, TrainingGroup
from tapestry.training.consortium.local.node import SovereignTrainingNode
from tapestry.training.consortium.models.state import model_state
from tapestry.training.consortium.tensors import state_digest

# Five rows in batches of 2: the last batch has one row, so rank 1 trains on none of it.
CORPUS = [[(7 * i + j) % 251 + 1 for j in range(6 + i)] for i in range(5)]
HELDOUT = [[3, 1, 4, 1, 5, 9, 2, 6]]


def cycle_node(group: TrainingGroup | None = None) -> SovereignTrainingNode:
    torch.manual_seed(0)
    model = TinyCausalModel(vocab_size=256, hidden_size=8)
    return SovereignTrainingNode(
        "vietnam",
        "Vietnam",
        model,
        CORPUS,
        0.9,
        local_epochs=2,
        lr=0.01,
        batch_size=2,
        seed=2026,
        heldout_corpus=HELDOUT,
        group=group,
    )


def main(out: Path) -> None:
    group = join_training_group("cpu", 30.0)
    assert group is not None, "run under torchrun with more than one process"
    node = cycle_node(group)
    if group.is_worker:
        serve_as_worker(node, group)
        return
    base = {k: v.clone() for k, v in model_state(cycle_node().model).items()}
    try:
        result = node.run_sovereign_cycle(1, base)
    finally:
        group.post(STOP)
    delta = result.contribution.weight_delta
    out.write_text(
        json.dumps(
            {
                "trained_sha256": state_digest(result.artifact.model_state),
                "delta": {k: [str(t.dtype), str(t.device)] for k, t in delta.items()},
                "metrics": result.contribution.metrics,
                "trained": {
                    k: t.flatten().tolist() for k, t in result.artifact.model_state.items()
                },
            }
        )
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
