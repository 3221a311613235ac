"""The frozen messages exchanged in a consortium round (the proof of concept's dataclasses).

The first fields of every class are the proof of concept's, in its order; fields added since
have defaults, so code written against the proof of concept keeps working.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import torch

from tapestry.limits import MAX_HELDOUT_LOSS
from tapestry.training.consortium.progress import ProgressCallback

ModelState = dict[str, torch.Tensor]
"""A model's state: parameter name -> tensor, each tensor once (a tied tensor under its first
key; :func:`tapestry.training.consortium.models.state.model_state`). For untied models it is the
``state_dict``."""


@dataclass(frozen=True)
class SovereignModelArtifact:
    """The full model a node keeps after local training: it never leaves the node.

    Over gRPC only its metadata travels; there ``model_state`` is empty and
    ``model_state_sha256`` / ``model_state_bytes`` describe the weights the node retains.
    """

    node_id: str
    jurisdiction: str
    stage: str
    model_state: ModelState
    metrics: Mapping[str, float]
    round_num: int = 0
    model_state_sha256: str = ""
    model_state_bytes: int = 0
    stored_at: str = ""


@dataclass(frozen=True)
class HeldOutEvaluation:
    """How well the round's incoming base and the node's new sovereign model predict the
    node's held-out split: documents it never trains on, so a falling loss means the model
    learned the jurisdiction's text, not the training lines.

    Losses are mean next-token cross-entropy in nats over the split's ``tokens`` real target
    tokens (padding excluded); each perplexity is ``exp`` of its loss. Numbers only: no
    held-out text ever leaves the node.
    """

    base_loss: float
    base_perplexity: float
    sovereign_loss: float
    sovereign_perplexity: float
    tokens: int


@dataclass(frozen=True)
class MemberEvaluation:
    """One member's evaluation of one candidate: the held-out loss of the base it trained
    from and of the candidate, in nats per token."""

    node_id: str
    base_loss: float
    candidate_loss: float
    state_sha256: str = ""  # what the member evaluated, as it hashed it ("": not said)
    # The member's signature of it, opaque to the core (the services' Signature message,
    # serialized); empty when unsigned.
    signature: bytes = b""

    def __post_init__(self) -> None:
        for name in ("base_loss", "candidate_loss"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{name} must be a number, got {type(value).__name__}")
            # bounds first: an int past float's range compares, but isfinite overflows
            if not 0.0 <= value <= MAX_HELDOUT_LOSS or not math.isfinite(value):
                raise ValueError(
                    f"{name} {value!r} is not a held-out loss in [0, {MAX_HELDOUT_LOSS:g}]"
                )

    @property
    def change(self) -> float:
        """How far the candidate moved this member's loss (negative: it improved)."""
        return self.candidate_loss - self.base_loss


@dataclass(frozen=True)
class SovereignContribution:
    """What a node offers the consortium: ``weight_delta[k] = trained[k] - base[k]``."""

    node_id: str
    round_num: int
    weight_delta: Mapping[str, torch.Tensor]  # a ModelState, or a read-only spilled one
    quality_score: float
    token_count: int
    metrics: Mapping[str, float]
    weight_delta_sha256: str = ""  # set when the delta came over the wire, verified on arrival
    evaluation: HeldOutEvaluation | None = None  # None: the node holds nothing out


@dataclass(frozen=True)
class SovereignCycleResult:
    """One node's local cycle: the artifact it keeps and the contribution it sends."""

    artifact: SovereignModelArtifact
    contribution: SovereignContribution


class PlainNode(Protocol):
    """The proof of concept's node: an id and a cycle that takes the round's base."""

    node_id: str

    def run_sovereign_cycle(
        self, round_num: int, base_state: ModelState
    ) -> SovereignCycleResult: ...


class ConsortiumNode(Protocol):
    """What a round needs of a node, in-process or a remote proxy alike: its cycle, which
    reports progress to ``on_progress`` where it is given one. A :class:`PlainNode` takes
    part through :func:`~tapestry.training.consortium.round.relay.as_consortium_node`."""

    node_id: str

    def run_sovereign_cycle(
        self,
        round_num: int,
        base_state: ModelState,
        *,
        on_progress: ProgressCallback | None = None,
    ) -> SovereignCycleResult: ...
