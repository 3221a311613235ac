"""No single member captures or breaks the base: a quality ceiling, bounds on delta norms,
and a base that would overflow is never taken (issue: trust, members)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tapestry.training.consortium import (
    ConsortiumCoordinator,
    ContributionPolicy,
    ModelState,
    SovereignContribution,
    SovereignCycleResult,
    SovereignModelArtifact,
    state_digest,
)
from tapestry.training.consortium.tensors import state_norm

from .conftest import MakeNodes


def test_the_proof_of_concepts_policy_has_no_ceiling_or_norm_bound() -> None:
    policy = ContributionPolicy()
    assert (policy.max_quality, policy.max_delta_norm, policy.max_delta_norm_ratio) == (
        None,
        None,
        None,
    )
    assert policy.weights({"a": 3.0, "b": 1.0}) == {"a": 0.75, "b": 0.25}


def test_a_score_above_the_ceiling_is_refused_with_a_reason() -> None:
    decision = ContributionPolicy(max_quality=1.0).decide({"honest": 0.9, "greedy": 1e300})

    assert decision.weights == {"honest": 1.0}
    assert decision.rejection_reasons == {
        "greedy": "quality score 1e+300 is above max_quality = 1.0"
    }


@pytest.mark.parametrize(
    ("keyword", "value", "least"),
    [
        ("max_quality", 0.0, "0.0"),
        ("max_quality", math.inf, "0.0"),
        ("max_delta_norm", -1.0, "0.0"),
        ("max_delta_norm", math.nan, "0.0"),
        ("max_delta_norm_ratio", 1.0, "1.0"),
    ],
)
def test_bounds_that_make_no_sense_are_refused(keyword: str, value: float, least: str) -> None:
    with pytest.raises(ValueError, match=f"{keyword} must be None or a finite number > {least}"):
        ContributionPolicy(**{keyword: value})  # type: ignore[arg-type]


def test_a_delta_above_the_absolute_bound_is_refused_before_weights() -> None:
    policy = ContributionPolicy(max_delta_norm=10.0)

    decision = policy.decide({"a": 0.9, "b": 0.8}, {"a": 1.0, "b": 10.5})

    assert decision.weights == {"a": 1.0}
    assert decision.rejection_reasons == {"b": "delta norm 10.5 is above max_delta_norm = 10"}


def test_a_delta_far_above_the_rounds_median_is_refused() -> None:
    policy = ContributionPolicy(max_delta_norm_ratio=10.0)
    norms = {"a": 1.0, "b": 1.2, "c": 0.9, "hostile": 3e38}

    decision = policy.decide(dict.fromkeys(norms, 0.9), norms)

    assert sorted(decision.weights) == ["a", "b", "c"]
    assert decision.rejection_reasons["hostile"] == (
        "delta norm 3e+38 is above max_delta_norm_ratio = 10 × the round's median 1.1"
    )


def test_a_policy_with_norm_bounds_needs_every_norm() -> None:
    with pytest.raises(ValueError, match="every node's delta norm is needed"):
        ContributionPolicy(max_delta_norm=1.0).decide({"a": 0.9}, {})


def test_a_run_round_applies_the_norm_bound_to_real_deltas(
    base_model: nn.Module, make_nodes: MakeNodes
) -> None:
    coordinator = ConsortiumCoordinator(base_model, ContributionPolicy(max_delta_norm=1e-9))

    result = coordinator.run_round(make_nodes())

    assert result.accepted_nodes == []
    assert all("is above max_delta_norm = 1e-09" in r for r in result.rejection_reasons.values())
    assert result.shared_base_sha256 == result.previous_base_sha256


class ConstantDeltaNode:
    """Contributes ``value`` in every weight, whatever the base."""

    def __init__(self, node_id: str, value: float) -> None:
        self.node_id, self.value = node_id, value

    def run_sovereign_cycle(self, round_num: int, base_state: ModelState) -> SovereignCycleResult:
        delta = {k: torch.full_like(v, self.value) for k, v in base_state.items()}
        return SovereignCycleResult(
            SovereignModelArtifact(self.node_id, "Nowhere", "continued_pretraining", {}, {}),
            SovereignContribution(self.node_id, round_num, delta, 0.9, 1, {}),
        )


def test_a_base_that_would_overflow_is_never_taken() -> None:
    """Each delta is finite, but base + delta passes float32's range (3.4e38)."""
    near_the_edge = nn.Linear(2, 2)
    with torch.no_grad():
        near_the_edge.weight.fill_(3e38)
        near_the_edge.bias.fill_(3e38)
    coordinator = ConsortiumCoordinator(near_the_edge)
    before = state_digest(coordinator.shared_base_state)

    result = coordinator.run_round([ConstantDeltaNode("a", 1e38), ConstantDeltaNode("b", 1e38)])

    assert result.accepted_nodes == []
    assert result.rejected_nodes == ["a", "b"]
    assert all("made the base non-finite" in r for r in result.rejection_reasons.values())
    assert result.contribution_weights == {}
    assert state_digest(coordinator.shared_base_state) == before == result.shared_base_sha256
    assert coordinator.round_num == 1


def test_state_norm_is_the_l2_norm_of_every_floating_entry() -> None:
    state = {"w": torch.tensor([3.0, 0.0]), "b": torch.tensor([4.0]), "n": torch.tensor([7])}
    assert state_norm(state) == 5.0
    assert math.isinf(state_norm({"w": torch.tensor([math.inf])}))
