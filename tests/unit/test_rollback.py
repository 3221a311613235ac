"""An operator's rollback is a transaction of the core like a round: a new, recorded round
whose base is an earlier one, committed before anything changes, one at a time with rounds."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from tapestry.training.consortium import (
    ConsortiumCoordinator,
    ConsortiumRoundResult,
    ContributionPolicy,
    RoundEvent,
    RoundStage,
    state_digest,
)

from .conftest import MakeNodes
from .test_round_transaction import BlockingNode


def _after_two_rounds(
    base_model: nn.Module, make_nodes: MakeNodes
) -> tuple[ConsortiumCoordinator, list[ConsortiumRoundResult]]:
    coordinator = ConsortiumCoordinator(base_model, ContributionPolicy(quality_floor=0.5))
    results = [coordinator.run_round(make_nodes()), coordinator.run_round(make_nodes())]
    assert results[0].shared_base_sha256 != results[1].shared_base_sha256
    return coordinator, results


def test_a_rollback_is_a_new_round_whose_base_is_the_earlier_one(
    base_model: nn.Module, make_nodes: MakeNodes
) -> None:
    coordinator, (first, second) = _after_two_rounds(base_model, make_nodes)

    result = coordinator.roll_back(first.shared_base_state, 1)

    assert result.round_num == 3
    assert result.rolled_back_to == 1
    assert result.previous_base_sha256 == second.shared_base_sha256
    assert result.shared_base_sha256 == first.shared_base_sha256
    assert (result.accepted_nodes, result.rejected_nodes, result.failed_nodes) == ([], [], {})
    assert result.contribution_weights == {} and result.artifacts == {}
    assert result.policy is coordinator.contribution_policy
    assert result.started_at is not None and result.finished_at is not None
    assert coordinator.round_num == 3
    assert coordinator.base_sha256 == first.shared_base_sha256
    assert state_digest(coordinator.shared_base_state) == first.shared_base_sha256
    assert sorted(coordinator.sovereign_artifacts) == ["ch", "in", "vn"]  # the nodes' history


def test_a_round_after_a_rollback_trains_from_the_restored_base(
    base_model: nn.Module, make_nodes: MakeNodes
) -> None:
    coordinator, (first, _) = _after_two_rounds(base_model, make_nodes)
    coordinator.roll_back(first.shared_base_state, 1)

    fourth = coordinator.run_round(make_nodes())

    assert fourth.round_num == 4
    assert fourth.previous_base_sha256 == first.shared_base_sha256


def test_the_commit_sees_the_rollback_before_the_coordinator_changes(
    base_model: nn.Module, make_nodes: MakeNodes
) -> None:
    coordinator, (first, second) = _after_two_rounds(base_model, make_nodes)
    seen: dict[str, object] = {}

    def commit(result: ConsortiumRoundResult) -> None:
        seen["round_num"] = coordinator.round_num
        seen["base"] = state_digest(coordinator.shared_base_state)
        seen["result"] = result

    result = coordinator.roll_back(first.shared_base_state, 1, commit=commit)

    assert seen == {"round_num": 2, "base": second.shared_base_sha256, "result": result}


def test_a_failed_commit_leaves_the_coordinator_as_it_was(
    base_model: nn.Module, make_nodes: MakeNodes
) -> None:
    coordinator, (first, second) = _after_two_rounds(base_model, make_nodes)
    events: list[RoundEvent] = []

    def disk_full(result: ConsortiumRoundResult) -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left on device"):
        coordinator.roll_back(first.shared_base_state, 1, events=events.append, commit=disk_full)

    assert coordinator.round_num == 2
    assert coordinator.base_sha256 == second.shared_base_sha256
    assert state_digest(coordinator.shared_base_state) == second.shared_base_sha256
    assert events == []
    assert coordinator.run_round(make_nodes()).round_num == 3


def test_a_rollback_reports_one_rolled_back_event(
    base_model: nn.Module, make_nodes: MakeNodes
) -> None:
    coordinator, (first, second) = _after_two_rounds(base_model, make_nodes)
    events: list[RoundEvent] = []

    coordinator.roll_back(first.shared_base_state, 1, events=events.append)

    assert events == [
        RoundEvent(
            3,
            RoundStage.ROLLED_BACK,
            "",
            f"base {second.shared_base_sha256[:12]} -> {first.shared_base_sha256[:12]}, "
            "the base of round 1",
        )
    ]


def test_rolling_back_to_the_current_round_is_a_recorded_no_op(
    base_model: nn.Module, make_nodes: MakeNodes
) -> None:
    coordinator, (_, second) = _after_two_rounds(base_model, make_nodes)

    result = coordinator.roll_back(second.shared_base_state, 2)

    assert (result.round_num, result.rolled_back_to) == (3, 2)
    assert result.previous_base_sha256 == result.shared_base_sha256 == second.shared_base_sha256


def test_a_given_digest_is_recorded_without_hashing_again(
    base_model: nn.Module, make_nodes: MakeNodes
) -> None:
    coordinator, (first, _) = _after_two_rounds(base_model, make_nodes)

    result = coordinator.roll_back(first.shared_base_state, 1, sha256="ab" * 32)

    assert result.shared_base_sha256 == "ab" * 32
    assert coordinator.base_sha256 == "ab" * 32


def test_a_rollback_is_refused_while_a_round_runs(
    base_model: nn.Module, make_nodes: MakeNodes
) -> None:
    coordinator = ConsortiumCoordinator(base_model)
    initial = coordinator.shared_base_state
    blocking = BlockingNode(make_nodes()[0])
    running = threading.Thread(target=coordinator.run_round, args=([blocking],))
    running.start()
    try:
        assert blocking.started.wait(timeout=60)
        with pytest.raises(RuntimeError) as refused:
            coordinator.roll_back(initial, 0)
    finally:
        blocking.release.set()
        running.join()

    assert str(refused.value) == "round 1 is already running; roll back after it"
    assert coordinator.round_num == 1  # the round went on; no rollback was recorded


def test_a_round_that_does_not_exist_yet_is_refused(
    base_model: nn.Module, make_nodes: MakeNodes
) -> None:
    coordinator, (first, _) = _after_two_rounds(base_model, make_nodes)

    with pytest.raises(ValueError) as refused:
        coordinator.roll_back(first.shared_base_state, 3)

    assert str(refused.value) == ("cannot roll back to round 3: the newest committed round is 2")
    assert coordinator.round_num == 2


def test_a_state_with_other_keys_is_refused(base_model: nn.Module, make_nodes: MakeNodes) -> None:
    coordinator, (first, second) = _after_two_rounds(base_model, make_nodes)
    state = first.shared_base_state
    name = sorted(state)[0]
    del state[name]

    with pytest.raises(ValueError) as refused:
        coordinator.roll_back(state, 1)

    assert str(refused.value) == (
        f"rollback base keys differ from the current base: missing [{name!r}], unexpected []"
    )
    assert coordinator.base_sha256 == second.shared_base_sha256


def test_a_non_finite_state_is_refused(base_model: nn.Module, make_nodes: MakeNodes) -> None:
    coordinator, (first, second) = _after_two_rounds(base_model, make_nodes)
    state = dict(first.shared_base_state)
    name = next(n for n, t in state.items() if t.is_floating_point())
    state[name] = state[name].clone()
    state[name].view(-1)[0] = torch.nan

    with pytest.raises(ValueError) as refused:
        coordinator.roll_back(state, 1)

    assert str(refused.value) == f"rollback base {name!r} holds NaN or Inf values"
    assert coordinator.round_num == 2
    assert coordinator.base_sha256 == second.shared_base_sha256


def test_a_negative_round_is_refused(base_model: nn.Module) -> None:
    coordinator = ConsortiumCoordinator(base_model)

    with pytest.raises(ValueError, match=r"^to_round must be an integer >= 0, got -1$"):
        coordinator.roll_back(coordinator.shared_base_state, -1)
