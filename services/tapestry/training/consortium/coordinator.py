"""The consortium coordinator: runs rounds over any nodes with ``run_sovereign_cycle``."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import torch
from torch import nn

from tapestry.training.consortium.integration import check_contribution, integrate
from tapestry.training.consortium.messages import (
    ConsortiumRoundResult,
    ModelState,
    SovereignContribution,
    SovereignCycleResult,
    SovereignModelArtifact,
)
from tapestry.training.consortium.policy import ContributionPolicy
from tapestry.training.consortium.tensors import clone_state


class ConsortiumNode(Protocol):
    """What the coordinator needs of a node: in-process or a remote proxy alike."""

    node_id: str

    def run_sovereign_cycle(
        self, round_num: int, base_state: ModelState
    ) -> SovereignCycleResult: ...


def describe_failure(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


class ConsortiumCoordinator:
    """Keeps the shared base and runs rounds: every node trains from the same snapshot (in
    parallel threads), the policy weighs their contributions, and the accepted deltas are
    integrated as ``base + Σ wᵢ·Δᵢ`` in the order the nodes were given.

    A node whose cycle raises, or whose contribution fails :func:`check_contribution`, is
    reported in ``failed_nodes`` and the round goes on with the others. With no accepted
    node the base stays bitwise identical.
    """

    def __init__(
        self,
        base_model: nn.Module,
        contribution_policy: ContributionPolicy | None = None,
        *,
        round_num: int = 0,
        assessed_quality: Mapping[str, float] | None = None,
    ) -> None:
        """``assessed_quality`` (node id -> score) is the consortium's own assessment of a
        member, e.g. from evaluation on held-out data; where given it replaces the score the
        node reports about itself when the policy weighs contributions."""
        self.base_model = copy.deepcopy(base_model)
        self.assessed_quality = dict(assessed_quality or {})
        self.contribution_policy = contribution_policy or ContributionPolicy()
        self.round_num = round_num
        self.sovereign_artifacts: dict[str, SovereignModelArtifact] = {}

    @property
    def shared_base_state(self) -> ModelState:
        """A copy of the current base (clones: changing it leaves the base alone)."""
        return clone_state(self.base_model.state_dict())

    def load_base_state(self, state: ModelState, round_num: int) -> None:
        """Resume from a committed base (e.g. after a restart)."""
        self.base_model.load_state_dict(state)
        self.round_num = round_num

    def run_round(
        self,
        nodes: Sequence[ConsortiumNode],
        on_contribution: Callable[[SovereignContribution], None] | None = None,
    ) -> ConsortiumRoundResult:
        node_ids = [node.node_id for node in nodes]
        if len(set(node_ids)) != len(node_ids):
            raise ValueError(f"node ids must be unique in a round, got {node_ids}")
        round_num = self.round_num + 1
        snapshot = self.shared_base_state  # what every node trains from
        outcomes = self._run_cycles(nodes, round_num, snapshot)
        # Deltas are checked against and integrated into the coordinator's own base, which
        # no node can reach; a node that edited its input in place shifts nothing.
        base = {name: t.detach() for name, t in self.base_model.state_dict().items()}
        if any(not torch.equal(snapshot[name], base[name]) for name in base):
            snapshot = self.shared_base_state

        contributions: dict[str, SovereignContribution] = {}
        failed: dict[str, str] = {}
        for node_id, outcome in zip(node_ids, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                failed[node_id] = describe_failure(outcome)
                continue
            if not isinstance(outcome, SovereignCycleResult):
                failed[node_id] = (
                    f"invalid contribution: run_sovereign_cycle returned "
                    f"{type(outcome).__name__}, not a SovereignCycleResult"
                )
                continue
            try:
                check_contribution(outcome.contribution, base, node_id=node_id, round_num=round_num)
            except ValueError as error:
                failed[node_id] = f"invalid contribution: {error}"
                continue
            self.sovereign_artifacts[node_id] = outcome.artifact
            contributions[node_id] = outcome.contribution
            if on_contribution is not None:
                on_contribution(outcome.contribution)

        scores = {
            node_id: self.assessed_quality.get(node_id, c.quality_score)
            for node_id, c in contributions.items()
        }
        decision = self.contribution_policy.decide(scores)
        accepted = [n for n in node_ids if n in decision.weights]
        rejected = [n for n in node_ids if n in contributions and n not in decision.weights]
        weighted = [(decision.weights[n], contributions[n].weight_delta) for n in accepted]
        # Metadata only from here on: the deltas are dropped once they are integrated.
        received = {n: dataclasses.replace(c, weight_delta={}) for n, c in contributions.items()}
        del outcomes, contributions
        if weighted:
            new_state = integrate(base, weighted)
            del weighted
            self.base_model.load_state_dict(new_state)
        else:
            new_state = clone_state(snapshot)
        self.round_num = round_num
        return ConsortiumRoundResult(
            round_num=round_num,
            previous_base_state=snapshot,
            shared_base_state=new_state,
            accepted_nodes=accepted,
            rejected_nodes=rejected,
            contribution_weights={n: decision.weights[n] for n in accepted},
            rejection_reasons={n: decision.rejection_reasons[n] for n in rejected},
            failed_nodes=failed,
            quality_scores=scores,
            contributions=received,
        )

    @staticmethod
    def _run_cycles(
        nodes: Sequence[ConsortiumNode], round_num: int, snapshot: ModelState
    ) -> list[SovereignCycleResult | BaseException]:
        if not nodes:
            return []

        def cycle(node: ConsortiumNode) -> SovereignCycleResult | BaseException:
            try:
                return node.run_sovereign_cycle(round_num, snapshot)
            except Exception as error:  # a node's failure must not sink the round
                return error

        with ThreadPoolExecutor(max_workers=len(nodes)) as pool:
            return list(pool.map(cycle, nodes))
