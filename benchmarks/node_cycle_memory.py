"""What one cycle of the in-process core node adds to a process's resident memory.

    PYTHONPATH=services .venv/bin/python benchmarks/node_cycle_memory.py --params 25M \\
        --trainer real

The node and a base are built first; then, per cycle, the peak (``VmHWM``, reset through
``/proc/self/clear_refs`` before the cycle) is reported above what the process held just
before it, in models' worth. The trained state goes to a ``persist`` that keeps nothing, as
in the node service. With the real trainer this is what training itself costs (gradients,
AdamW's two moments, activations, the step's temporaries) with no gRPC, no received base
buffers and no store: the part of a node's peak that the service cannot remove.
Linux only.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from round_bench import CORPUS_LINE, VOCAB, hidden_for, parse_params

from tapestry.training.consortium import SovereignTrainingNode
from tapestry.training.consortium.messages import SovereignModelArtifact
from tapestry.training.consortium.models.spec import ModelSpec
from tapestry.training.consortium.models.state import model_state
from tapestry.training.consortium.tensors import state_nbytes


def resident_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="25M")
    parser.add_argument("--trainer", choices=["synthetic", "real"], default="real")
    parser.add_argument("--cycles", type=int, default=2)
    args = parser.parse_args()
    spec = ModelSpec("tiny-causal", VOCAB, hidden_for(parse_params(args.params)))
    corpus = [list(CORPUS_LINE.encode())] * 16
    node = SovereignTrainingNode(
        "n0", "J0", spec.build(1), corpus, 0.9, local_epochs=1, trainer=args.trainer
    )
    base = model_state(spec.build(2))
    model = state_nbytes(base)

    def forget(artifact: SovereignModelArtifact) -> SovereignModelArtifact:
        return artifact

    for round_num in range(1, args.cycles + 1):
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        before = resident_kib("VmRSS") * 1024
        result = node.run_sovereign_cycle(round_num, base, persist=forget)
        peak = resident_kib("VmHWM") * 1024
        del result
        print(
            f"{args.trainer}, {model / 2**20:.0f} MiB model, cycle {round_num}: "
            f"{before / 2**20:.0f} MiB resident before (imports, model, base), "
            f"peak {peak / 2**20:.0f} MiB: +{(peak - before) / model:.2f} x model"
        )


if __name__ == "__main__":
    main()
