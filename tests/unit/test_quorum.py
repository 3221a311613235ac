"""The quorum is the core's: a round with too few contributions is aborted and recorded, the
base untouched; without ``min_nodes`` every round takes effect, as in the proof of concept."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tapestry.config import ConfigError, ConsortiumConfig, build_config
from tapestry.training.consortium import (
    ConsortiumCoordinator,
    ConsortiumRoundResult,
    ContributionPolicy,
    ModelState,
    RoundEvent,
    RoundStage,
    SovereignCycleResult,
)

from .conftest import MakeNodes


class DownNode:
    """A member that cannot be reached."""

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id

    def run_sovereign_cycle(self, round_num: int, base_state: ModelState) -> SovereignCycleResult:
        raise ConnectionError("nobody there")


def _same(a: ModelState, b: ModelState) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_without_min_nodes_a_round_nobody_answered_commits_as_before(
    base_model: nn.Module,
) -> None:
    coordinator = ConsortiumCoordinator(base_model)
    result = coordinator.run_round([DownNode("a"), DownNode("b")])
    assert (result.aborted, result.aborted_reason) == (False, "")
    assert coordinator.min_nodes == 0
    assert coordinator.round_num == 1
    assert result.failed_nodes == {
        "a": "ConnectionError: nobody there",
        "b": "ConnectionError: nobody there",
    }


def test_too_few_contributions_abort_the_round_which_is_recorded_with_the_base_unchanged(
    base_model: nn.Module, make_nodes: MakeNodes
) -> None:
    vn, _, _ = make_nodes()
    coordinator = ConsortiumCoordinator(
        base_model, ContributionPolicy(max_node_weight=1.0), min_nodes=2
    )
    before = coordinator.shared_base_state
    digest = coordinator.base_sha256
    events: list[RoundEvent] = []
    committed: list[ConsortiumRoundResult] = []

    result = coordinator.run_round(
        [vn, DownNode("ch"), DownNode("in")], events=events.append, commit=committed.append
    )

    reason = (
        "quorum not met: 1 of 3 node(s) contributed and min_nodes is 2; nothing was "
        "integrated and the base is unchanged"
    )
    assert result.aborted and result.aborted_reason == reason
    assert committed == [result]  # the commit step records the aborted round
    assert (result.accepted_nodes, result.rejected_nodes) == ([], [])
    assert (result.contribution_weights, result.rejection_reasons) == ({}, {})
    assert sorted(result.failed_nodes) == ["ch", "in"]
    assert list(result.contributions) == ["vn"]  # who answered, metadata only
    assert result.shared_base_sha256 == result.previous_base_sha256 == digest
    assert _same(coordinator.shared_base_state, before)
    assert _same(result.shared_base_state, before)
    assert coordinator.round_num == 1  # the aborted round keeps its number
    assert "vn" in coordinator.sovereign_artifacts  # vn does keep its trained model
    stages = [e.stage for e in events if not e.node_id]
    assert stages == [RoundStage.ABORTED]
    assert events[-1].detail == reason


def test_a_met_quorum_counts_contributions_whatever_the_policy_makes_of_them(
    base_model: nn.Module, make_nodes: MakeNodes
) -> None:
    """Two contributions meet a quorum of 2 even when the floor rejects one of them."""
    vn, ch, _ = make_nodes()
    coordinator = ConsortiumCoordinator(
        base_model, ContributionPolicy(quality_floor=0.88), min_nodes=2
    )
    result = coordinator.run_round([vn, ch, DownNode("in")])
    assert not result.aborted
    assert (result.accepted_nodes, result.rejected_nodes) == (["vn"], ["ch"])
    assert result.shared_base_sha256 != result.previous_base_sha256


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_min_nodes_must_be_a_count(base_model: nn.Module, bad: object) -> None:
    with pytest.raises(ValueError, match=r"min_nodes must be an integer >= 0, got "):
        ConsortiumCoordinator(base_model, min_nodes=bad)  # type: ignore[arg-type]


def _config(policy: dict[str, object], members: int = 3) -> ConsortiumConfig:
    nodes = [
        {"node_id": f"n{i}", "jurisdiction": f"J{i}", "address": f"127.0.0.1:{50061 + i}"}
        for i in range(members)
    ]
    return build_config(
        ConsortiumConfig, {"consortium_id": "c", "policy": policy, "nodes": nodes}, "test"
    )


def test_the_services_quorum_defaults_to_the_caps_and_can_be_set() -> None:
    assert _config({}).policy.quorum() == 2  # cap 0.5
    assert _config({"max_node_weight": 1.0}).policy.quorum() == 1
    assert _config({"max_node_weight": 0.34}).policy.quorum() == 3
    assert _config({"min_nodes": 3}).policy.quorum() == 3
    assert _config({"min_nodes": 1}).policy.quorum() == 1


def test_a_quorum_no_round_can_meet_is_refused() -> None:
    with pytest.raises(ConfigError) as refused:
        _config({"min_nodes": 4})
    assert str(refused.value) == (
        "test: (file): policy.min_nodes = 4 can never be met with the 3 "
        "configured node(s): every round would be aborted; lower it to at most 3 or add members"
    )
    with pytest.raises(
        ConfigError, match=r"policy\.min_nodes: Input should be greater than or equal to 1"
    ):
        _config({"min_nodes": 0})
