"""The frozen messages exchanged in a consortium round (the proof of concept's dataclasses).

The first fields of every class are the proof of concept's, in its order; fields added since
have defaults, so code written against the proof of concept keeps working.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from tapestry.training.consortium.policy import ContributionPolicy

ModelState = dict[str, torch.Tensor]
"""A model's state: parameter name -> tensor, each tensor once (a tied tensor under its first
key; :func:`tapestry.training.consortium.model.model_state`). For untied models it is the
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


@dataclass(frozen=True)
class ConsortiumRoundResult:
    """Outcome of one round.

    ``rejected_nodes`` were dropped by the contribution policy (reasons in
    ``rejection_reasons``); ``failed_nodes`` maps nodes whose cycle raised or whose
    contribution failed validation to the reason. Neither kind changes the base.
    ``contributions`` holds every received contribution's metadata (its delta emptied) and
    ``quality_scores`` the scores the policy weighed (assessed where the coordinator has an
    assessment, else self-reported). ``artifacts`` are the sovereign artifacts the nodes
    that passed every check retain this round (metadata only when they came over the wire).
    ``policy`` is the policy that decided the round; the two digests are
    :func:`~tapestry.training.consortium.state_digest` of the base before and after.
    ``aborted_reason`` says why a round that met no quorum integrated nothing (the policy
    was not consulted: no node is accepted or rejected); empty when the round took effect.
    ``rolled_back_to`` is set on a round that is an operator's rollback: no node trained, and
    the new base is, bitwise, the base committed by that round (0: the initial base).
    ``outer_momentum`` is diloco's outer momentum in force after the round, persisted with
    its base (``None``: zeros, or a strategy without momentum); the coordinator keeps these
    very tensors (no copy of a model's worth), so read them, never change them.
    """

    round_num: int
    previous_base_state: ModelState
    shared_base_state: ModelState
    accepted_nodes: list[str]
    rejected_nodes: list[str]
    contribution_weights: dict[str, float]
    rejection_reasons: dict[str, str] = field(default_factory=dict)
    failed_nodes: dict[str, str] = field(default_factory=dict)
    contributions: dict[str, SovereignContribution] = field(default_factory=dict)
    quality_scores: dict[str, float] = field(default_factory=dict)
    artifacts: dict[str, SovereignModelArtifact] = field(default_factory=dict)
    policy: ContributionPolicy | None = None
    previous_base_sha256: str = ""
    shared_base_sha256: str = ""
    started_at: datetime | None = None  # timezone-aware (UTC)
    finished_at: datetime | None = None
    aborted_reason: str = ""  # set when too few nodes contributed: nothing was integrated
    rolled_back_to: int | None = None  # set on a rollback: the round whose base is restored
    outer_momentum: ModelState | None = None  # diloco only: persisted with the base

    @property
    def aborted(self) -> bool:
        """Whether the round was aborted for want of a quorum (the base is unchanged)."""
        return bool(self.aborted_reason)
