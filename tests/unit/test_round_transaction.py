"""A round is a transaction of the core: events from the core, a commit step that runs
before any in-memory state changes, and nothing to undo when it fails."""

from __future__ import annotations

import threading
from datetime import UTC

import pytest
from torch import nn

from tapestry.training.consortium import (
    ConsortiumCoordinator,
    ConsortiumRoundResult,
    ContributionPolicy,
    ModelState,
    RoundEvent,
    RoundStage,
    SovereignCycleResult,
    SovereignTrainingNode,
    state_digest,
)

from .conftest import MakeNodes


class BlockingNode:
    """A real node that waits for ``release`` before training, so a round stays open."""

    def __init__(self, inner: SovereignTrainingNode) -> None:
        self.node_id = inner.node_id
        self.inner = inner
        self.started = threading.Event()
        self.release = threading.Event()

    def run_sovereign_cycle(self, round_num: int, base_state: ModelState) -> SovereignCycleResult:
        self.started.set()
        assert self.release.wait(timeout=60), "the test never released the node"
        return self.inner.run_sovereign_cycle(round_num, base_state)


def test_events_follow_the_round_from_start_to_commit(
    base_model: nn.Module, make_nodes: MakeNodes
) -> None:
    events: list[RoundEvent] = []
    coordinator = ConsortiumCoordinator(base_model, ContributionPolicy(quality_floor=0.87))

    coordinator.run_round(make_nodes(), events=events.append)

    assert {e.round_num for e in events} == {1}
    per_node = [(e.stage, e.node_id) for e in events if e.node_id]
    for node_id in ("vn", "ch", "in"):
        mine = [stage for stage, n in per_node if n == node_id]
        # In-process nodes report training progress too, between start and contribution.
        assert mine[0] is RoundStage.NODE_STARTED and mine[-1] is RoundStage.NODE_CONTRIBUTED
        assert set(mine[1:-1]) == {RoundStage.NODE_PROGRESS}
        assert mine.count(RoundStage.NODE_PROGRESS) >= 1  # the last step at least
    assert [e.stage for e in events[-2:]] == [RoundStage.INTEGRATED, RoundStage.COMMITTED]
    assert events[-2].detail.startswith("accepted 2, rejected 1, failed 0; base ")


def test_commit_sees_the_finished_round_before_the_coordinator_changes(
    base_model: nn.Module, make_nodes: MakeNodes
) -> None:
    coordinator = ConsortiumCoordinator(base_model)
    before = coordinator.shared_base_state
    seen: dict[str, object] = {}

    def commit(result: ConsortiumRoundResult) -> None:
        seen["round_num"] = coordinator.round_num
        seen["base"] = state_digest(coordinator.shared_base_state)
        seen["artifacts"] = dict(coordinator.sovereign_artifacts)
        seen["result"] = result

    result = coordinator.run_round(make_nodes(), commit=commit)

    assert seen["round_num"] == 0
    assert seen["base"] == state_digest(before)
    assert seen["artifacts"] == {}
    assert seen["result"] is result
    assert coordinator.round_num == 1
    assert state_digest(coordinator.shared_base_state) == result.shared_base_sha256


def test_a_failed_commit_leaves_the_coordinator_as_it_was(
    base_model: nn.Module, make_nodes: MakeNodes
) -> None:
    coordinator = ConsortiumCoordinator(base_model)
    before = state_digest(coordinator.shared_base_state)
    events: list[RoundEvent] = []

    def disk_full(result: ConsortiumRoundResult) -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left on device"):
        coordinator.run_round(make_nodes(), events=events.append, commit=disk_full)

    assert coordinator.round_num == 0
    assert state_digest(coordinator.shared_base_state) == before
    assert coordinator.base_sha256 == before
    assert coordinator.sovereign_artifacts == {}
    assert RoundStage.COMMITTED not in {e.stage for e in events}

    again = coordinator.run_round(make_nodes())
    assert again.round_num == 1
    assert again.previous_base_sha256 == before


def test_the_result_records_digests_policy_times_and_artifacts(
    base_model: nn.Module, make_nodes: MakeNodes
) -> None:
    policy = ContributionPolicy(quality_floor=0.5, max_node_weight=0.5)
    coordinator = ConsortiumCoordinator(base_model, policy)

    result = coordinator.run_round(make_nodes())

    assert result.previous_base_sha256 == state_digest(result.previous_base_state)
    assert result.shared_base_sha256 == state_digest(result.shared_base_state)
    assert result.previous_base_sha256 != result.shared_base_sha256
    assert result.policy is policy
    assert result.started_at is not None and result.finished_at is not None
    assert result.started_at.tzinfo is UTC
    assert result.started_at <= result.finished_at
    assert sorted(result.artifacts) == ["ch", "in", "vn"]
    assert result.artifacts["vn"] is coordinator.sovereign_artifacts["vn"]


def test_nothing_accepted_keeps_the_digest_without_hashing_a_new_base(
    base_model: nn.Module, make_nodes: MakeNodes
) -> None:
    coordinator = ConsortiumCoordinator(base_model, ContributionPolicy(quality_floor=0.99))

    result = coordinator.run_round(make_nodes())

    assert result.accepted_nodes == []
    assert result.shared_base_sha256 == result.previous_base_sha256
    assert result.shared_base_sha256 == state_digest(coordinator.shared_base_state)


def test_a_sink_that_raises_does_not_decide_the_round(
    base_model: nn.Module, make_nodes: MakeNodes
) -> None:
    calls: list[RoundEvent] = []

    def broken(event: RoundEvent) -> None:
        calls.append(event)
        raise RuntimeError("the client went away")

    coordinator = ConsortiumCoordinator(base_model)
    result = coordinator.run_round(make_nodes(), events=broken)

    assert result.accepted_nodes == ["vn", "ch", "in"]
    assert coordinator.round_num == 1
    assert len(calls) == 1  # the first failure silences the sink for the round


def test_a_second_round_while_one_runs_is_refused(
    base_model: nn.Module, make_nodes: MakeNodes
) -> None:
    coordinator = ConsortiumCoordinator(base_model)
    blocking = BlockingNode(make_nodes(["vn"])[0])
    outcome: list[ConsortiumRoundResult] = []
    first = threading.Thread(target=lambda: outcome.append(coordinator.run_round([blocking])))
    first.start()
    try:
        assert blocking.started.wait(timeout=30)
        with pytest.raises(RuntimeError, match="round 1 is already running"):
            coordinator.run_round(make_nodes(["ch"]))
    finally:
        blocking.release.set()
        first.join(timeout=60)
    assert outcome[0].round_num == 1 == coordinator.round_num


def test_resume_loads_base_digest_and_artifacts_through_the_core(
    base_model: nn.Module, make_nodes: MakeNodes
) -> None:
    first = ConsortiumCoordinator(base_model)
    result = first.run_round(make_nodes())
    resumed = ConsortiumCoordinator(base_model)

    resumed.load_base_state(
        result.shared_base_state,
        1,
        sha256=result.shared_base_sha256,
        artifacts=result.artifacts,
    )

    assert resumed.round_num == 1
    assert resumed.base_sha256 == result.shared_base_sha256
    assert resumed.sovereign_artifacts == result.artifacts
    assert resumed.run_round(make_nodes()).previous_base_sha256 == result.shared_base_sha256
