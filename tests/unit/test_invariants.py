"""The proof of concept's four invariants, each as one named test."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from torch import nn

from tapestry.training.consortium import (
    ConsortiumCoordinator,
    ContributionPolicy,
    HeldOutEvaluation,
    ModelState,
    SovereignContribution,
    SovereignModelArtifact,
    SovereignTrainingNode,
    integrate,
    state_digest,
)

from .conftest import MakeNode, MakeNodes, StatesEqual


class AccessRecorder:
    """Stands in for a node and records every attribute the coordinator reads from it."""

    __slots__ = ("_inner", "_read", "_sent")

    def __init__(self, inner: SovereignTrainingNode) -> None:
        object.__setattr__(self, "_inner", inner)
        object.__setattr__(self, "_read", set())
        object.__setattr__(self, "_sent", [])

    def __getattr__(self, name: str) -> Any:
        self._read.add(name)
        if name != "run_sovereign_cycle":
            return getattr(self._inner, name)

        def cycle(round_num: int, base_state: Any) -> Any:
            result = self._inner.run_sovereign_cycle(round_num, base_state)
            self._sent.append(result.contribution)  # exactly what the coordinator receives
            return result

        return cycle


def test_invariant_1_n_plus_one_outcome(base_model: nn.Module, make_nodes: MakeNodes) -> None:
    """After a round: one shared base plus one sovereign artifact per node, all distinct."""
    nodes = make_nodes()
    coordinator = ConsortiumCoordinator(
        base_model, ContributionPolicy(quality_floor=0.75, max_node_weight=0.5)
    )

    result = coordinator.run_round(nodes)

    assert set(coordinator.sovereign_artifacts) == {node.node_id for node in nodes}
    base_digest = state_digest(coordinator.shared_base_state)
    assert state_digest(result.shared_base_state) == base_digest
    artifact_digests = []
    for node in nodes:
        artifact = coordinator.sovereign_artifacts[node.node_id]
        assert artifact is node.latest_artifact
        assert (artifact.node_id, artifact.stage) == (node.node_id, "continued_pretraining")
        assert list(artifact.model_state) == list(coordinator.shared_base_state)
        artifact_digests.append(state_digest(artifact.model_state))
    # N + 1 distinct models: the base differs from every artifact, the artifacts from each other
    assert len({base_digest, *artifact_digests}) == len(nodes) + 1


def test_invariant_2_only_deltas_are_contributed(
    base_model: nn.Module, make_nodes: MakeNodes
) -> None:
    """A contribution is trained − base and metadata; the coordinator never sees a corpus."""
    nodes = make_nodes()
    base = base_model.state_dict()
    recorders = [AccessRecorder(node) for node in nodes]
    as_nodes: list[Any] = list(recorders)

    ConsortiumCoordinator(base_model).run_round(as_nodes)
    sent: list[SovereignContribution] = [r._sent[0] for r in recorders]

    # The coordinator asks a node for its id, its jurisdiction (to check the artifact it
    # claims) and its cycle, nothing else (no corpus).
    for recorder in recorders:
        assert recorder._read <= {"node_id", "jurisdiction", "run_sovereign_cycle"}
    # What a node sends holds no corpus field and no token lists ...
    assert [f.name for f in dataclasses.fields(SovereignContribution)] == [
        "node_id",
        "round_num",
        "weight_delta",
        "quality_score",
        "token_count",
        "metrics",
        "weight_delta_sha256",
        "evaluation",
    ]
    # Its held-out evaluation is numbers only: never held-out text.
    assert {f.name: f.type for f in dataclasses.fields(HeldOutEvaluation)} == {
        "base_loss": "float",
        "base_perplexity": "float",
        "sovereign_loss": "float",
        "sovereign_perplexity": "float",
        "tokens": "int",
    }
    for node, contribution in zip(nodes, sent, strict=True):
        assert contribution.node_id == node.node_id
        assert isinstance(contribution.token_count, int)
        assert dict(contribution.metrics).keys() == {"loss"}
        assert all(isinstance(v, float) for v in contribution.metrics.values())
        # ... and its tensors are exactly trained − base, key for key.
        artifact = node.latest_artifact
        assert artifact is not None
        assert list(contribution.weight_delta) == list(base)
        for name, delta in contribution.weight_delta.items():
            assert torch.equal(delta, artifact.model_state[name] - base[name]), name
    # The full sovereign state stays in the artifact, which the node keeps.
    assert "model_state" in {f.name for f in dataclasses.fields(SovereignModelArtifact)}


def test_invariant_3_weights_sum_to_one_and_respect_the_cap(
    base_model: nn.Module, make_node: MakeNode, states_equal: StatesEqual
) -> None:
    """Accepted weights sum to 1, none exceeds the cap, and they are what the base used."""
    nodes = [
        make_node("vn", quality_score=0.9),
        make_node("ch", quality_score=0.3),
        make_node("in", quality_score=0.2),
    ]
    base = base_model.state_dict()
    coordinator = ConsortiumCoordinator(base_model, ContributionPolicy(max_node_weight=0.5))

    result = coordinator.run_round(nodes)

    # shares 9/14, 3/14, 2/14: vn is held at 0.5, the other 0.5 is split 3 : 2
    weights = result.contribution_weights
    assert weights == pytest.approx({"vn": 0.5, "ch": 0.3, "in": 0.2}, abs=1e-12)
    assert sum(weights.values()) == pytest.approx(1.0, abs=1e-12)
    assert max(weights.values()) <= 0.5 + 1e-12
    deltas = [
        (
            weights[node.node_id],
            make_node(node.node_id, quality_score=node.quality_score)
            .run_sovereign_cycle(1, base)
            .contribution.weight_delta,
        )
        for node in nodes
    ]
    states_equal(coordinator.shared_base_state, integrate(base, deltas))


class Broken:
    def __init__(self, node_id: str) -> None:
        self.node_id = node_id

    def run_sovereign_cycle(self, round_num: int, base_state: ModelState) -> Any:
        raise ConnectionError("node unreachable")


@pytest.mark.parametrize("why", ["below-floor", "infeasible-cap", "all-failed"])
def test_invariant_4_rejecting_everything_leaves_the_base_bitwise_identical(
    why: str, base_model: nn.Module, make_nodes: MakeNodes, states_equal: StatesEqual
) -> None:
    policy = {
        "below-floor": ContributionPolicy(quality_floor=0.95),
        "infeasible-cap": ContributionPolicy(max_node_weight=0.3),
        "all-failed": ContributionPolicy(),
    }[why]
    nodes: list[Any] = (
        [Broken(n) for n in ("vn", "ch", "in")] if why == "all-failed" else make_nodes()
    )
    coordinator = ConsortiumCoordinator(base_model, policy)
    before = coordinator.shared_base_state
    digest_before = state_digest(before)

    results = [coordinator.run_round(nodes) for _ in range(2)]

    for result in results:
        assert result.accepted_nodes == [] and result.contribution_weights == {}
        states_equal(result.shared_base_state, before)
    states_equal(coordinator.shared_base_state, before)
    states_equal(coordinator.shared_base_state, base_model.state_dict())
    assert state_digest(coordinator.shared_base_state) == digest_before
    assert coordinator.round_num == 2
