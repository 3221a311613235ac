"""The outcome of one round (or rollback), as the coordinator commits it."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from tapestry.training.consortium.governance.acceptance import Validation
from tapestry.training.consortium.governance.measured import QualitySource
from tapestry.training.consortium.governance.policy import ContributionPolicy
from tapestry.training.consortium.messages import (
    ModelState,
    SovereignContribution,
    SovereignModelArtifact,
)


@dataclass(frozen=True)
class ConsortiumRoundResult:
    """Outcome of one round.

    ``rejected_nodes`` were dropped by the contribution policy (reasons in
    ``rejection_reasons``); ``failed_nodes`` maps nodes whose cycle raised or whose
    contribution failed validation to the reason. Neither kind changes the base.
    ``contributions`` holds every received contribution's metadata (its delta emptied) and
    ``quality_scores`` the scores the policy weighed, and ``quality_sources`` where each
    came from (:class:`~tapestry.training.consortium.governance.measured.QualitySource`:
    measured against the reference update where the coordinator has a reference node, else
    assessed where it has an assessment, else self-reported); each contribution keeps what
    its member said; ``delta_norms`` the deltas' L2 norms it weighed with
    them (empty where the policy weighs none), so the weights can be decided again from the
    record. ``artifacts`` are the sovereign artifacts the nodes
    that passed every check retain this round (metadata only when they came over the wire).
    ``policy`` is the policy that decided the round; the two digests are
    :func:`~tapestry.training.consortium.state_digest` of the base before and after.
    ``aborted_reason`` says why a round that met no quorum integrated nothing (the policy
    was not consulted: no node is accepted or rejected); empty when the round took effect.
    ``rolled_back_to`` is set on a round that is an operator's rollback: no node trained, and
    the new base is, bitwise, the base committed by that round (0: the initial base).
    ``strategy_state`` is the integration strategy's state in force after the round (diloco's
    outer momentum; ``None``: none, or its initial value), persisted with its base; the
    coordinator keeps these very tensors (no copy of a model's worth), so read them, never
    change them. ``validation`` is the members' validation of the round's candidate
    (:mod:`~tapestry.training.consortium.governance.acceptance`): every step tried, the
    members' evaluations and verdicts, and the step committed; ``None`` where the round ran
    none (no acceptance policy, or nothing was integrated).
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
    quality_sources: dict[str, QualitySource] = field(default_factory=dict)
    delta_norms: dict[str, float] = field(default_factory=dict)
    artifacts: dict[str, SovereignModelArtifact] = field(default_factory=dict)
    policy: ContributionPolicy | None = None
    previous_base_sha256: str = ""
    shared_base_sha256: str = ""
    started_at: datetime | None = None  # timezone-aware (UTC)
    finished_at: datetime | None = None
    aborted_reason: str = ""  # set when too few nodes contributed: nothing was integrated
    rolled_back_to: int | None = None  # set on a rollback: the round whose base is restored
    strategy_state: ModelState | None = None  # persisted with the base
    validation: Validation | None = None  # member-validated commit, where the round ran it

    @property
    def aborted(self) -> bool:
        """Whether the round was aborted for want of a quorum (the base is unchanged)."""
        return bool(self.aborted_reason)

    @property
    def outer_momentum(self) -> ModelState | None:
        """Diloco's name for :attr:`strategy_state`: its outer momentum."""
        return self.strategy_state
