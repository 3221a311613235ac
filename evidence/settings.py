"""What an evidence run trains: the model, each node's training settings, how many rounds."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class EvidenceSettings:
    """One evidence run. ``model`` and ``training`` are the fields of
    :class:`~tapestry.config.ModelTable` and :class:`~tapestry.config.TrainingConfig`.

    ``poison_scale``: the hostile member sends its own trained delta times this (-8: eight
    times as long as an honest one, the wrong way; under the default
    ``max_delta_norm_ratio`` of 10, which it would pass). ``poison_rounds``: rounds of each
    poisoning experiment.
    """

    model: dict[str, Any]
    training: dict[str, Any]
    rounds: int = 10
    poison_rounds: int = 3
    poison_scale: float = -8.0
    seed: int = 2026
    experiments: bool = True  # False: the service run and the cross evaluation only
    extra: dict[str, Any] = field(default_factory=dict)


# A gpt of 1.05M parameters (the issue asks 1-10M for the demo): on this 2-core CPU a round
# of three nodes takes about a second when the machine is idle and tens of seconds under a
# load of 10+, so the whole run (10 service rounds, 2 x 10 in-process strategy rounds,
# 3 x poison_rounds poisoned ones) takes 2-10 minutes. The demo size (3.3M, context 128;
# docs/concepts/models.md) is about 4x the compute per token. lr 3e-3 (AdamW): the default
# 1e-3 barely moves in 10 rounds.
EVIDENCE = EvidenceSettings(
    model={
        "architecture": "gpt",
        "hidden_size": 128,
        "n_layers": 5,
        "n_heads": 4,
        "context_length": 64,
    },
    training={"local_epochs": 1, "lr": 3e-3, "batch_size": 16, "max_seq_len": 65},
    poison_rounds=5,
)

# The CI size: GPT_TEST, two rounds, one poisoned round.
SMOKE = EvidenceSettings(
    model={
        "architecture": "gpt",
        "hidden_size": 32,
        "n_layers": 2,
        "n_heads": 2,
        "context_length": 64,
    },
    training={"local_epochs": 1, "lr": 3e-3, "batch_size": 32, "max_seq_len": 65},
    rounds=2,
    poison_rounds=1,
)
