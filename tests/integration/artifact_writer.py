"""Run as a script by test_node_killed_mid_write: saves large artifacts into a node's
ArtifactStore, one after another, until it is killed. It prints ``writing N`` just before
each save, so the test can time its SIGKILL to land inside one.

    python artifact_writer.py DATA_DIR SEED
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch

from tapestry.node.artifacts import ArtifactStore
from tapestry.training.consortium import SovereignModelArtifact, state_digest
from tapestry.training.consortium.tensors import state_nbytes

ROUNDS = 3  # saves cycle over these rounds, so re-runs set copies aside and prune them


def main(data_dir: Path, seed: int) -> None:
    store = ArtifactStore(data_dir, max_superseded=2)
    gen = torch.Generator().manual_seed(seed)
    # 24 MB: a save (write, fsync, rename, manifest) takes tens of ms.
    state = {
        "embedding.weight": torch.randn(4_000_000, generator=gen),
        "lm_head.weight": torch.randn(2_000_000, generator=gen),
    }
    for n in itertools.count(1):
        state["lm_head.weight"][0] = float(n)  # every save a new model
        artifact = SovereignModelArtifact(
            "india",
            "India",
            "continued_pretraining",
            state,
            {"loss": 1.0 / n},
            round_num=1 + n % ROUNDS,
            model_state_sha256=state_digest(state),
            model_state_bytes=state_nbytes(state),
        )
        print(f"writing {n}", flush=True)
        store.save(artifact)


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
