"""The strategy comparison and the poisoned member, with the in-process core.

The same corpora, splits, model spec, seeds and policy as the service run: the core is the
services' round logic (a round through the services equals it bit for bit), so running it
in one process only saves the transport. Each run scores the base after every round with
:class:`~evidence.heldout.HeldOutScorer`, as the service run does.

**The hostile member** (``mallory``) trains every round as an honest node would (on a copy
of one member's corpus), then sends its delta times ``poison_scale`` (negative: pushed the
wrong way), and reports a high quality score, so the quality weighting gives it a full
share. Its delta is finite and, a few times an honest one, passes any absolute bound an
operator could set without refusing honest members. For these runs the policy's relative bound
(``max_delta_norm_ratio``) is **off**, so that what contains the attack is the strategy or
the clipping under test, not the bound (at ×8 it would pass the default ratio of 10 anyway).

Where a run validates (``acceptance``), the hostile member also evaluates each candidate,
and flatters it: it reports the honest loss of the base and never a rise (a lie that, under
``no_regression``, cannot hide another member's objection). With ``reference``, the
coordinator measures quality against a node of its own trained on a public corpus
(:func:`reference_node`).
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evidence.heldout import HeldOutScorer, Member
from tapestry.config import PolicyConfig
from tapestry.corpus import file_or_folder, trainable_documents, windows
from tapestry.node.startup import build_training_node
from tapestry.training.consortium.governance.acceptance import AcceptancePolicy
from tapestry.training.consortium.local.node import SovereignTrainingNode
from tapestry.training.consortium.messages import (
    ConsortiumNode,
    MemberEvaluation,
    ModelState,
    SovereignCycleResult,
)
from tapestry.training.consortium.models.spec import ModelSpec
from tapestry.training.consortium.round.coordinator import ConsortiumCoordinator
from tapestry.training.consortium.round.result import ConsortiumRoundResult
from tapestry.training.consortium.tensors import state_norm

HOSTILE = "mallory"


def honest_node(m: Member) -> SovereignTrainingNode:
    """The node a ``tapestry node serve`` of this configuration runs (one process)."""
    return build_training_node(m.config, m.corpus)


class NormRecorder:
    """Passes a node's cycle through and keeps its delta's L2 norm per round."""

    def __init__(self, node: SovereignTrainingNode) -> None:
        self.node = node
        self.node_id = node.node_id
        self.jurisdiction = node.jurisdiction
        self.norms: dict[int, float] = {}

    def run_sovereign_cycle(self, round_num: int, base_state: ModelState) -> SovereignCycleResult:
        result = self.node.run_sovereign_cycle(round_num, base_state)
        self.norms[round_num] = state_norm(result.contribution.weight_delta)
        return result

    def evaluate_candidate(self, round_num: int, candidate: ModelState) -> MemberEvaluation | None:
        return self.node.evaluate_candidate(round_num, candidate)


class ScaledDeltaNode:
    """A hostile member: trains like an honest node, then sends its delta times ``scale``
    (negative: it pushes the base away from what it learned), reporting ``quality_score``."""

    def __init__(self, node: SovereignTrainingNode, scale: float, quality_score: float) -> None:
        self.node = node
        self.node_id = node.node_id
        self.jurisdiction = node.jurisdiction
        self.scale = scale
        self.quality_score = quality_score

    def run_sovereign_cycle(self, round_num: int, base_state: ModelState) -> SovereignCycleResult:
        result = self.node.run_sovereign_cycle(round_num, base_state)
        honest = result.contribution
        delta = {
            k: v * self.scale if v.is_floating_point() else v
            for k, v in honest.weight_delta.items()
        }
        contribution = dataclasses.replace(
            honest, weight_delta=delta, quality_score=self.quality_score, evaluation=None
        )
        return SovereignCycleResult(result.artifact, contribution)

    def evaluate_candidate(self, round_num: int, candidate: ModelState) -> MemberEvaluation | None:
        """A flattering evaluation: the honest loss of the base, and never a rise."""
        honest = self.node.evaluate_candidate(round_num, candidate)
        if honest is None:
            return None
        return dataclasses.replace(
            honest, candidate_loss=min(honest.candidate_loss, honest.base_loss)
        )


def hostile_node(like: Member, scale: float, quality_score: float = 0.95) -> ScaledDeltaNode:
    """:data:`HOSTILE`, training on ``like``'s corpus, sending ``scale`` times its delta."""
    config = like.config.model_copy(update={"node_id": HOSTILE, "jurisdiction": "Nowhere"})
    return ScaledDeltaNode(honest_node(Member(config, like.corpus)), scale, quality_score)


@dataclass
class CoreRun:
    """One in-process run: the base's held-out losses after each round (index 0: round 0)
    and the accepted nodes per round."""

    base_loss: list[dict[str, float]]
    accepted: list[list[str]]
    results: list[ConsortiumRoundResult] = dataclasses.field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        final = self.base_loss[-1]
        return {
            "base_heldout_loss": final,
            "mean_heldout_loss": statistics.fmean(final.values()),
            "mean_per_round": [statistics.fmean(b.values()) for b in self.base_loss],
            "accepted": self.accepted,
        }


def reference_node(
    spec: ModelSpec, corpus: Path, training: Mapping[str, Any], seed: int
) -> SovereignTrainingNode:
    """The coordinator's own node for measured quality, as ``tapestry coordinator serve``
    builds it from ``[policy] reference_corpus`` and ``[policy.reference]`` (here: the
    members' training settings, so that its step is the size of an honest member's)."""
    sequences = windows(trainable_documents(file_or_folder(corpus)), training["max_seq_len"])
    return SovereignTrainingNode(
        "reference",
        "reference",
        spec.build(seed),
        sequences,
        1.0,  # never weighed: its update is the measure
        local_epochs=training["local_epochs"],
        lr=training["lr"],
        batch_size=training["batch_size"],
        seed=seed,
    )


def run_core(
    spec: ModelSpec,
    policy: Mapping[str, Any],
    nodes: Sequence[ConsortiumNode],
    scorer: HeldOutScorer,
    rounds: int,
    seed: int,
    say: Callable[[str], None],
    label: str,
    *,
    acceptance: AcceptancePolicy | None = None,
    reference: SovereignTrainingNode | None = None,
) -> CoreRun:
    """``rounds`` rounds of the core with the policy a consortium file would give it;
    validated with ``acceptance``, quality measured with ``reference`` (both off unless
    given, as in the core)."""
    config = PolicyConfig.model_validate(dict(policy))
    coordinator = ConsortiumCoordinator(
        spec.build(seed),
        config.policy(),
        min_nodes=config.quorum(),
        acceptance=acceptance,
        reference=reference,
    )
    run = CoreRun([scorer.losses(coordinator.shared_base_state)], [])
    for _ in range(rounds):
        result = coordinator.run_round(nodes)
        run.base_loss.append(scorer.losses(coordinator.shared_base_state))
        run.accepted.append(list(result.accepted_nodes))
        run.results.append(_light(result))
        mean = statistics.fmean(run.base_loss[-1].values())
        say(f"{label} round {result.round_num}: mean held-out loss of the base {mean:.4f}")
    return run


def _light(result: ConsortiumRoundResult) -> ConsortiumRoundResult:
    """The result without its states (what the evidence reads of it: weights, scores,
    validation), so a run keeps no model's worth per round."""
    return dataclasses.replace(
        result, previous_base_state={}, shared_base_state={}, artifacts={}, strategy_state=None
    )
