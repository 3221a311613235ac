"""No single member captures or breaks the base: a quality ceiling, bounds on delta norms,
and a base that would overflow is never taken (issue: trust, members)."""

from __future__ import annotations

import dataclasses
import math
import threading

import pytest
import torch
from torch import nn

from tapestry.training.consortium import (
    ConsortiumCoordinator,
    ContributionPolicy,
    ModelState,
    RoundEvent,
    RoundStage,
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
            SovereignModelArtifact(
                self.node_id, "Nowhere", "continued_pretraining", {}, {}, round_num=round_num
            ),
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


def test_two_enormous_scores_do_not_crash_the_policy() -> None:
    """1e308 + 1e308 overflows the sum; the shares are still computed, by the largest."""
    assert ContributionPolicy().weights({"a": 1e308, "b": 1e308}) == {"a": 0.5, "b": 0.5}


class LyingNode:
    """A real node whose cycle result is altered on the way out by ``edit``."""

    def __init__(self, inner, edit) -> None:  # type: ignore[no-untyped-def]
        self.node_id, self.jurisdiction, self.inner, self.edit = (
            inner.node_id,
            inner.jurisdiction,
            inner,
            edit,
        )

    def run_sovereign_cycle(self, round_num: int, base_state: ModelState) -> SovereignCycleResult:
        return self.edit(self.inner.run_sovereign_cycle(round_num, base_state))


def _contribution(**changes: object):  # type: ignore[no-untyped-def]
    return lambda r: dataclasses.replace(
        r, contribution=dataclasses.replace(r.contribution, **changes)
    )


def _artifact(**changes: object):  # type: ignore[no-untyped-def]
    return lambda r: dataclasses.replace(r, artifact=dataclasses.replace(r.artifact, **changes))


LIES = {
    "a thousand metrics": (
        _contribution(metrics={f"m{i}": 1.0 for i in range(1000)}),
        "invalid contribution: 1000 metrics, more than MAX_METRICS = 32",
    ),
    "a metric that is not a number": (
        _contribution(metrics={"loss": "low"}),
        "invalid contribution: metric 'loss' is a str, not a number",
    ),
    "an infinite metric": (
        _contribution(metrics={"loss": math.inf}),
        "invalid contribution: metric 'loss' is inf, not a finite number",
    ),
    "a huge metric name": (
        _contribution(metrics={"x" * 100_000: 1.0}),
        "invalid contribution: a metric name is not a string of 1 to MAX_NAME_CHARS = 128",
    ),
    "a token count past the bound": (
        _contribution(token_count=2**63),
        "invalid contribution: token_count must be an integer in [0, MAX_TOKEN_COUNT = ",
    ),
    "a million-character node id": (
        _contribution(node_id="v" * 1_000_000),
        "(1000000 characters) but came from 'vn'",
    ),
    "an artifact of another jurisdiction": (
        _artifact(jurisdiction="Switzerland"),
        "invalid artifact: it claims jurisdiction 'Switzerland', not 'Vietnam'",
    ),
    "an artifact of another round": (
        _artifact(round_num=999),
        "invalid artifact: it is for round 999, expected round 1",
    ),
    "an artifact with a huge stage": (
        _artifact(stage="s" * 10_000),
        "invalid artifact: stage must be a string of 1 to MAX_NAME_CHARS = 128 characters",
    ),
}


@pytest.mark.parametrize("lie", list(LIES))
def test_a_member_sending_unbounded_or_foreign_metadata_fails_alone(
    base_model: nn.Module, make_nodes: MakeNodes, lie: str
) -> None:
    edit, reason = LIES[lie]
    vn, ch, in_ = make_nodes()
    coordinator = ConsortiumCoordinator(base_model)

    result = coordinator.run_round([LyingNode(vn, edit), ch, in_])

    assert result.accepted_nodes == ["ch", "in"]
    assert reason in result.failed_nodes["vn"]
    assert len(result.failed_nodes["vn"]) <= 1100
    assert "vn" not in coordinator.sovereign_artifacts


def test_a_node_error_of_a_million_characters_is_cut_in_the_result(base_model: nn.Module) -> None:
    class Loud:
        node_id, jurisdiction = "loud", "Nowhere"

        def run_sovereign_cycle(self, round_num: int, base_state: ModelState) -> None:
            raise RuntimeError("x" * 1_000_000)

    result = ConsortiumCoordinator(base_model).run_round([Loud()])  # type: ignore[list-item]

    reason = result.failed_nodes["loud"]
    assert reason.startswith("RuntimeError: xxx")
    assert reason.endswith("… (cut from 1000014 characters)")
    assert len(reason) < 1100


def test_a_node_that_fails_at_once_is_reported_before_the_slowest_finishes(
    base_model: nn.Module, make_nodes: MakeNodes
) -> None:
    from .test_round_transaction import BlockingNode

    class Down:
        node_id, jurisdiction = "down", "Nowhere"

        def run_sovereign_cycle(self, round_num: int, base_state: ModelState) -> None:
            raise ConnectionError("nobody there")

    slow = BlockingNode(make_nodes(["vn"])[0])
    failed = threading.Event()

    def sink(event: RoundEvent) -> None:
        if event.stage is RoundStage.NODE_FAILED and event.node_id == "down":
            failed.set()

    coordinator = ConsortiumCoordinator(base_model)
    round_thread = threading.Thread(
        target=coordinator.run_round, args=([slow, Down()],), kwargs={"events": sink}
    )
    round_thread.start()
    try:
        assert failed.wait(timeout=30), "the failure waited for the slow node"
        assert not slow.release.is_set()
    finally:
        slow.release.set()
        round_thread.join(timeout=60)
    assert coordinator.round_num == 1
