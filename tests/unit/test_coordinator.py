"""ConsortiumCoordinator: rounds, integration, failures and the shared base it keeps."""

from __future__ import annotations

import dataclasses
import math
import threading
from collections.abc import Callable, Sequence

import pytest
import torch
from torch import nn

from tapestry.training.consortium import (
    ConsortiumCoordinator,
    ConsortiumNode,
    ConsortiumRoundResult,
    ContributionPolicy,
    ModelState,
    RoundEvent,
    RoundStage,
    SovereignContribution,
    SovereignCycleResult,
    SovereignTrainingNode,
    integrate,
    state_digest,
)

from .conftest import MakeNode, MakeNodes, StatesEqual


class RaisingNode:
    def __init__(self, node_id: str, error: Exception) -> None:
        self.node_id = node_id
        self.error = error

    def run_sovereign_cycle(self, round_num: int, base_state: ModelState) -> SovereignCycleResult:
        raise self.error


class TamperingNode:
    """A real node whose contribution is altered on the way out."""

    def __init__(
        self,
        inner: SovereignTrainingNode,
        tamper: Callable[[SovereignContribution], SovereignContribution],
    ) -> None:
        self.node_id = inner.node_id
        self.inner = inner
        self.tamper = tamper

    def run_sovereign_cycle(self, round_num: int, base_state: ModelState) -> SovereignCycleResult:
        result = self.inner.run_sovereign_cycle(round_num, base_state)
        return dataclasses.replace(result, contribution=self.tamper(result.contribution))


class BarrierNode:
    """A real node that only trains once every node of the round has started."""

    def __init__(self, inner: SovereignTrainingNode, barrier: threading.Barrier) -> None:
        self.node_id = inner.node_id
        self.inner = inner
        self.barrier = barrier

    def run_sovereign_cycle(self, round_num: int, base_state: ModelState) -> SovereignCycleResult:
        self.barrier.wait()
        return self.inner.run_sovereign_cycle(round_num, base_state)


def run_by_hand(
    nodes: Sequence[SovereignTrainingNode],
    policy: ContributionPolicy,
    base: ModelState,
    round_num: int = 1,
) -> tuple[ModelState, dict[str, float]]:
    """One round done step by step: nodes one after another, then policy and integrate."""
    results = {node.node_id: node.run_sovereign_cycle(round_num, base) for node in nodes}
    weights = policy.weights({n: r.contribution.quality_score for n, r in results.items()})
    accepted = [node.node_id for node in nodes if node.node_id in weights]
    merged = integrate(base, [(weights[n], results[n].contribution.weight_delta) for n in accepted])
    return merged, weights


# --- construction and the shared base ------------------------------------------------------


def test_coordinator_deep_copies_the_base(base_model: nn.Module, states_equal: StatesEqual) -> None:
    before = {k: v.clone() for k, v in base_model.state_dict().items()}
    coordinator = ConsortiumCoordinator(base_model)

    with torch.no_grad():
        for parameter in base_model.parameters():
            parameter.mul_(-3.0)

    assert coordinator.base_model is not base_model
    states_equal(coordinator.shared_base_state, before)


def test_defaults(base_model: nn.Module) -> None:
    coordinator = ConsortiumCoordinator(base_model)

    assert coordinator.round_num == 0
    assert coordinator.sovereign_artifacts == {}
    policy = coordinator.contribution_policy
    assert (policy.quality_floor, policy.max_node_weight, policy.weighting) == (0.0, 1.0, "quality")


def test_shared_base_state_returns_clones(base_model: nn.Module, states_equal: StatesEqual) -> None:
    coordinator = ConsortiumCoordinator(base_model)
    before = coordinator.shared_base_state

    copy = coordinator.shared_base_state
    for tensor in copy.values():
        tensor.add_(1.0)

    states_equal(coordinator.shared_base_state, before)
    live = coordinator.base_model.state_dict()
    assert all(copy[k].data_ptr() != live[k].data_ptr() for k in live)


# --- a round -----------------------------------------------------------------------------


def test_round_result_fields(
    base_model: nn.Module, make_nodes: MakeNodes, states_equal: StatesEqual
) -> None:
    policy = ContributionPolicy(quality_floor=0.75, max_node_weight=0.5)
    coordinator = ConsortiumCoordinator(base_model, policy)
    before = coordinator.shared_base_state

    result = coordinator.run_round(make_nodes())

    assert isinstance(result, ConsortiumRoundResult)
    assert result.round_num == 1 == coordinator.round_num
    states_equal(result.previous_base_state, before)
    states_equal(result.shared_base_state, coordinator.shared_base_state)
    assert state_digest(result.shared_base_state) != state_digest(before)
    assert result.accepted_nodes == ["vn", "ch", "in"]
    assert result.rejected_nodes == []
    assert result.contribution_weights == pytest.approx(
        {"vn": 15 / 44, "ch": 43 / 132, "in": 1 / 3}, abs=1e-15
    )
    assert result.rejection_reasons == {}
    assert result.failed_nodes == {}
    assert list(result.contributions) == ["vn", "ch", "in"]


def test_integration_is_base_plus_weighted_deltas(
    base_model: nn.Module, make_nodes: MakeNodes, states_equal: StatesEqual
) -> None:
    policy = ContributionPolicy(max_node_weight=0.4)
    base = base_model.state_dict()
    coordinator = ConsortiumCoordinator(base_model, policy)

    result = coordinator.run_round(make_nodes())

    # bit for bit what the documented steps give when done by hand ...
    expected, weights = run_by_hand(make_nodes(), policy, base)
    states_equal(coordinator.shared_base_state, expected)
    assert result.contribution_weights == weights
    # ... and numerically base + Σ wᵢ·Δᵢ, summed here in float64
    deltas = {
        n.node_id: n.run_sovereign_cycle(1, base).contribution.weight_delta for n in make_nodes()
    }
    for name, tensor in base.items():
        by_hand = tensor.double() + sum(weights[n] * deltas[n][name].double() for n in deltas)
        assert torch.allclose(coordinator.shared_base_state[name].double(), by_hand, atol=1e-6)


def test_parallel_round_matches_nodes_run_one_after_another(
    base_model: nn.Module, make_nodes: MakeNodes, states_equal: StatesEqual
) -> None:
    policy = ContributionPolicy(quality_floor=0.75, max_node_weight=0.5)
    base = base_model.state_dict()
    coordinator = ConsortiumCoordinator(base_model, policy)

    coordinator.run_round(make_nodes())

    sequential, _ = run_by_hand(make_nodes(), policy, base)
    states_equal(coordinator.shared_base_state, sequential)


def test_same_setup_gives_the_same_bits_every_time(
    base_model: nn.Module, make_nodes: MakeNodes
) -> None:
    def three_rounds() -> list[str]:
        coordinator = ConsortiumCoordinator(base_model, ContributionPolicy(max_node_weight=0.5))
        nodes = make_nodes()
        return [state_digest(coordinator.run_round(nodes).shared_base_state) for _ in range(3)]

    first, second = three_rounds(), three_rounds()

    assert first == second
    assert len(set(first)) == 3


def test_nodes_run_concurrently(base_model: nn.Module, make_nodes: MakeNodes) -> None:
    barrier = threading.Barrier(3, timeout=30)  # broken unless all three cycles overlap
    nodes = [BarrierNode(node, barrier) for node in make_nodes()]

    result = ConsortiumCoordinator(base_model).run_round(nodes)

    assert result.failed_nodes == {}
    assert result.accepted_nodes == ["vn", "ch", "in"]


def test_every_node_trains_from_the_same_snapshot(
    base_model: nn.Module, make_nodes: MakeNodes, states_equal: StatesEqual
) -> None:
    coordinator = ConsortiumCoordinator(base_model)
    coordinator.run_round(make_nodes())
    before_round_2 = coordinator.shared_base_state
    nodes = make_nodes()

    result = coordinator.run_round(nodes)

    states_equal(result.previous_base_state, before_round_2)
    for node in nodes:
        assert result.contributions[node.node_id].round_num == 2
        artifact = node.latest_artifact
        assert artifact is not None
        # trained = snapshot + delta, so the node started from exactly the snapshot
        rerun = make_nodes([node.node_id])[0].run_sovereign_cycle(2, before_round_2)
        states_equal(artifact.model_state, rerun.artifact.model_state)


def test_accepted_nodes_keep_the_order_they_were_given(
    base_model: nn.Module, make_nodes: MakeNodes
) -> None:
    result = ConsortiumCoordinator(base_model).run_round(make_nodes(["in", "vn", "ch"]))

    assert result.accepted_nodes == ["in", "vn", "ch"]
    assert list(result.contribution_weights) == ["in", "vn", "ch"]


def test_every_artifact_is_retained_including_rejected_nodes(
    base_model: nn.Module, make_node: MakeNode
) -> None:
    nodes = [make_node("vn"), make_node("ch", quality_score=0.5), make_node("in")]
    coordinator = ConsortiumCoordinator(base_model, ContributionPolicy(quality_floor=0.75))

    result = coordinator.run_round(nodes)

    assert result.accepted_nodes == ["vn", "in"]
    assert result.rejected_nodes == ["ch"]
    assert result.rejection_reasons == {"ch": "quality score 0.5 is below the floor 0.75"}
    assert set(result.contribution_weights) == {"vn", "in"}
    assert sum(result.contribution_weights.values()) == pytest.approx(1.0, abs=1e-12)
    assert list(coordinator.sovereign_artifacts) == ["vn", "ch", "in"]
    for node in nodes:
        assert coordinator.sovereign_artifacts[node.node_id] is node.latest_artifact


def test_rejected_node_does_not_move_the_base(
    base_model: nn.Module, make_node: MakeNode, make_nodes: MakeNodes, states_equal: StatesEqual
) -> None:
    policy = ContributionPolicy(quality_floor=0.75)
    with_rejected = ConsortiumCoordinator(base_model, policy)
    with_rejected.run_round([make_node("vn"), make_node("ch", quality_score=0.1), make_node("in")])
    without = ConsortiumCoordinator(base_model, policy)
    without.run_round(make_nodes(["vn", "in"]))

    states_equal(with_rejected.shared_base_state, without.shared_base_state)


def test_artifacts_are_replaced_each_round(
    base_model: nn.Module, make_nodes: MakeNodes, states_equal: StatesEqual
) -> None:
    coordinator = ConsortiumCoordinator(base_model)
    nodes = make_nodes()

    first = coordinator.run_round(nodes)
    first_artifacts = dict(coordinator.sovereign_artifacts)
    second = coordinator.run_round(nodes)

    assert (first.round_num, second.round_num, coordinator.round_num) == (1, 2, 2)
    states_equal(second.previous_base_state, first.shared_base_state)
    for node_id, artifact in coordinator.sovereign_artifacts.items():
        assert artifact.round_num == 2
        assert artifact.model_state_sha256 != first_artifacts[node_id].model_state_sha256


def test_round_numbers_continue_from_the_one_given(
    base_model: nn.Module, make_nodes: MakeNodes
) -> None:
    coordinator = ConsortiumCoordinator(base_model, round_num=5)

    result = coordinator.run_round(make_nodes())

    assert result.round_num == 6 == coordinator.round_num
    assert all(c.round_num == 6 for c in result.contributions.values())


def test_events_report_each_valid_contribution_and_each_failure(
    base_model: nn.Module, make_nodes: MakeNodes
) -> None:
    seen: list[RoundEvent] = []
    nodes: list[ConsortiumNode] = [*make_nodes(), RaisingNode("down", RuntimeError("down"))]

    ConsortiumCoordinator(base_model).run_round(nodes, events=seen.append)

    contributed = [e.node_id for e in seen if e.stage is RoundStage.NODE_CONTRIBUTED]
    failed = [(e.node_id, e.detail) for e in seen if e.stage is RoundStage.NODE_FAILED]
    assert sorted(contributed) == ["ch", "in", "vn"]  # in the order they finish
    assert failed == [("down", "RuntimeError: down")]


# --- nothing accepted ---------------------------------------------------------------------


def test_round_counter_advances_even_when_everything_is_rejected(
    base_model: nn.Module, make_nodes: MakeNodes, states_equal: StatesEqual
) -> None:
    coordinator = ConsortiumCoordinator(base_model, ContributionPolicy(quality_floor=0.99))
    before = coordinator.shared_base_state

    result = coordinator.run_round(make_nodes())

    assert result.round_num == 1 == coordinator.round_num
    assert result.accepted_nodes == []
    assert result.rejected_nodes == ["vn", "ch", "in"]
    assert result.contribution_weights == {}
    assert result.rejection_reasons == {
        "vn": "quality score 0.9 is below the floor 0.99",
        "ch": "quality score 0.86 is below the floor 0.99",
        "in": "quality score 0.88 is below the floor 0.99",
    }
    states_equal(coordinator.shared_base_state, before)
    assert state_digest(coordinator.shared_base_state) == state_digest(before)
    assert set(coordinator.sovereign_artifacts) == {"vn", "ch", "in"}


def test_infeasible_cap_leaves_the_base_bitwise_unchanged(
    base_model: nn.Module, make_nodes: MakeNodes, states_equal: StatesEqual
) -> None:
    coordinator = ConsortiumCoordinator(base_model, ContributionPolicy(max_node_weight=0.4))
    before = coordinator.shared_base_state

    result = coordinator.run_round(make_nodes(["vn", "ch"]))

    why = (
        "cap max_node_weight=0.4 cannot hold with 2 accepted node(s); it needs at least 3, "
        "so nothing was integrated this round"
    )
    assert result.accepted_nodes == []
    assert result.rejected_nodes == ["vn", "ch"]
    assert result.rejection_reasons == {"vn": why, "ch": why}
    assert result.contribution_weights == {}
    assert coordinator.round_num == 1
    states_equal(coordinator.shared_base_state, before)
    states_equal(result.shared_base_state, before)


def test_a_round_with_no_nodes_changes_nothing_but_the_counter(
    base_model: nn.Module, states_equal: StatesEqual
) -> None:
    coordinator = ConsortiumCoordinator(base_model)
    before = coordinator.shared_base_state

    result = coordinator.run_round([])

    assert (result.round_num, result.accepted_nodes, result.rejected_nodes) == (1, [], [])
    states_equal(coordinator.shared_base_state, before)


# --- failures -----------------------------------------------------------------------------


def test_a_node_that_raises_is_failed_and_the_round_goes_on(
    base_model: nn.Module, make_nodes: MakeNodes, states_equal: StatesEqual
) -> None:
    coordinator = ConsortiumCoordinator(base_model)
    vn, ch, india = make_nodes()

    result = coordinator.run_round(
        [vn, RaisingNode("down", RuntimeError("disk on fire")), ch, india]
    )

    assert result.failed_nodes == {"down": "RuntimeError: disk on fire"}
    assert result.accepted_nodes == ["vn", "ch", "in"]
    assert "down" not in result.rejected_nodes
    assert "down" not in coordinator.sovereign_artifacts
    reference = ConsortiumCoordinator(base_model)
    reference.run_round(make_nodes())
    states_equal(coordinator.shared_base_state, reference.shared_base_state)


def test_every_node_failing_leaves_the_base_unchanged(
    base_model: nn.Module, states_equal: StatesEqual
) -> None:
    coordinator = ConsortiumCoordinator(base_model)
    before = coordinator.shared_base_state

    result = coordinator.run_round(
        [RaisingNode("a", ValueError("no data")), RaisingNode("b", OSError("unreachable"))]
    )

    assert result.failed_nodes == {"a": "ValueError: no data", "b": "OSError: unreachable"}
    assert (result.accepted_nodes, result.rejected_nodes) == ([], [])
    assert coordinator.round_num == 1
    states_equal(coordinator.shared_base_state, before)


def _with_delta(
    c: SovereignContribution, drop: Sequence[str] = (), put: dict[str, torch.Tensor] | None = None
) -> SovereignContribution:
    """``c`` with the delta keys in ``drop`` removed and those in ``put`` set."""
    delta = {k: v for k, v in c.weight_delta.items() if k not in drop} | (put or {})
    return dataclasses.replace(c, weight_delta=delta)


def _bias(c: SovereignContribution) -> torch.Tensor:
    return c.weight_delta["lm_head.bias"]


def _poisoned(c: SovereignContribution, value: float) -> torch.Tensor:
    bias = _bias(c).clone()
    bias[7] = value
    return bias


TAMPERS: dict[str, tuple[Callable[[SovereignContribution], SovereignContribution], str]] = {
    "other-node-id": (
        lambda c: dataclasses.replace(c, node_id="vn"),
        "contribution claims node_id 'vn' but came from 'ch'",
    ),
    "other-round": (
        lambda c: dataclasses.replace(c, round_num=7),
        "contribution is for round 7, expected round 1",
    ),
    "missing-key": (
        lambda c: _with_delta(c, drop=["lm_head.bias"]),
        "delta keys differ from the base: missing ['lm_head.bias'], unexpected []",
    ),
    "extra-key": (
        lambda c: _with_delta(c, put={"extra": torch.zeros(2)}),
        "delta keys differ from the base: missing [], unexpected ['extra']",
    ),
    "renamed-key": (
        lambda c: _with_delta(c, drop=["lm_head.bias"], put={"lm_head.b": _bias(c)}),
        "delta keys differ from the base: missing ['lm_head.bias'], unexpected ['lm_head.b']",
    ),
    "shape": (
        lambda c: _with_delta(c, put={"lm_head.bias": _bias(c)[:-1]}),
        "delta 'lm_head.bias': expected torch.float32 (256,), got torch.float32 (255,)",
    ),
    "dtype": (
        lambda c: _with_delta(c, put={"lm_head.bias": _bias(c).double()}),
        "delta 'lm_head.bias': expected torch.float32 (256,), got torch.float64 (256,)",
    ),
    "nan": (
        lambda c: _with_delta(c, put={"lm_head.bias": _poisoned(c, math.nan)}),
        "delta 'lm_head.bias' holds NaN or Inf values",
    ),
    "inf": (
        lambda c: _with_delta(c, put={"lm_head.bias": _poisoned(c, -math.inf)}),
        "delta 'lm_head.bias' holds NaN or Inf values",
    ),
}


@pytest.mark.parametrize("tamper", list(TAMPERS))
def test_an_invalid_contribution_is_failed_and_does_not_touch_the_base(
    tamper: str, base_model: nn.Module, make_nodes: MakeNodes, states_equal: StatesEqual
) -> None:
    change, reason = TAMPERS[tamper]
    vn, ch, india = make_nodes()
    coordinator = ConsortiumCoordinator(base_model, ContributionPolicy(max_node_weight=0.5))

    result = coordinator.run_round([vn, TamperingNode(ch, change), india])

    assert result.failed_nodes == {"ch": f"invalid contribution: {reason}"}
    assert result.accepted_nodes == ["vn", "in"]
    assert result.rejected_nodes == []
    assert "ch" not in result.contribution_weights and "ch" not in result.contributions
    reference = ConsortiumCoordinator(base_model, ContributionPolicy(max_node_weight=0.5))
    reference.run_round(make_nodes(["vn", "in"]))
    states_equal(coordinator.shared_base_state, reference.shared_base_state)


def test_duplicate_node_ids_are_refused(
    base_model: nn.Module, make_node: MakeNode, states_equal: StatesEqual
) -> None:
    coordinator = ConsortiumCoordinator(base_model)
    before = coordinator.shared_base_state

    expected = r"^node ids must be unique in a round, got \['vn', 'ch', 'vn'\]$"
    with pytest.raises(ValueError, match=expected):
        coordinator.run_round([make_node("vn"), make_node("ch"), make_node("vn")])

    assert coordinator.round_num == 0
    states_equal(coordinator.shared_base_state, before)


class MalformedNode:
    """A node whose cycle returns something that is not a well-formed cycle result."""

    def __init__(self, inner: SovereignTrainingNode, kind: str) -> None:
        self.node_id = inner.node_id
        self.inner = inner
        self.kind = kind

    def run_sovereign_cycle(self, round_num: int, base_state: ModelState) -> SovereignCycleResult:
        result = self.inner.run_sovereign_cycle(round_num, base_state)
        if self.kind == "no-result":
            return None  # type: ignore[return-value]
        delta: dict[str, object] = dict(result.contribution.weight_delta)
        delta["lm_head.bias"] = [0.0] * 256  # a list, not a tensor
        contribution = dataclasses.replace(result.contribution, weight_delta=delta)  # type: ignore[arg-type]
        return dataclasses.replace(result, contribution=contribution)


@pytest.mark.parametrize("kind", ["no-result", "non-tensor-delta"])
def test_a_malformed_cycle_result_fails_the_node_not_the_round(
    kind: str, base_model: nn.Module, make_nodes: MakeNodes, states_equal: StatesEqual
) -> None:
    # A node raising or sending an invalid contribution goes to failed_nodes and the round
    # continues; a result that is not even well-formed must not escape as an AttributeError
    # (which used to abort the round after storing the other nodes' artifacts).
    vn, ch, india = make_nodes()
    coordinator = ConsortiumCoordinator(base_model)

    result = coordinator.run_round([vn, MalformedNode(ch, kind), india])

    assert set(result.failed_nodes) == {"ch"}
    assert result.failed_nodes["ch"].startswith("invalid contribution: ")
    assert result.accepted_nodes == ["vn", "in"]
    assert coordinator.round_num == 1
    assert "ch" not in coordinator.sovereign_artifacts
    reference = ConsortiumCoordinator(base_model)
    reference.run_round(make_nodes(["vn", "in"]))
    states_equal(coordinator.shared_base_state, reference.shared_base_state)


def test_assessed_quality_replaces_the_self_reported_score(make_nodes) -> None:
    """A documented fix: the consortium's own assessment, where it has one, is what the
    policy weighs; nodes without one keep their self-reported score."""
    from tapestry.training.consortium import ConsortiumCoordinator, ContributionPolicy, ModelSpec

    nodes = make_nodes()
    ids = [n.node_id for n in nodes]
    coordinator = ConsortiumCoordinator(
        ModelSpec().build(seed=3),
        ContributionPolicy(quality_floor=0.5),
        assessed_quality={ids[0]: 0.1},
    )
    result = coordinator.run_round(nodes)

    assert result.quality_scores[ids[0]] == 0.1
    assert ids[0] in result.rejected_nodes
    assert "quality score 0.1 is below the floor 0.5" in result.rejection_reasons[ids[0]]
    for node in nodes[1:]:
        assert result.quality_scores[node.node_id] == node.quality_score
        assert node.node_id in result.accepted_nodes
    # The node's own report is kept in the contribution's metadata.
    assert result.contributions[ids[0]].quality_score == nodes[0].quality_score
