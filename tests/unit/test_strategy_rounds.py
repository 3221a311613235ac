"""Strategies inside the coordinator's round: the policy still decides who counts, the
strategy how they combine; diloco's momentum is committed with the base, survives a resume
through the journal, comes back with a rollback, and a non-finite result is never committed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.coordinator.journal import CoordinatorStore, StoreError
from tapestry.training.consortium import (
    ConsortiumCoordinator,
    ConsortiumRoundResult,
    ContributionPolicy,
    ModelState,
    SovereignContribution,
    SovereignCycleResult,
    SovereignModelArtifact,
    state_digest,
)
from tapestry.training.consortium.strategies.settings import (
    IntegrationStrategy,
    OuterOptimizer,
    StrategyName,
)

MAX = torch.finfo(torch.float32).max
HAND = IntegrationStrategy(StrategyName.DILOCO, outer=OuterOptimizer(0.5, 0.5, nesterov=True))


class Vector(nn.Module):
    """A base of one float vector and one integer counter."""

    def __init__(self, *values: float) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(values))
        self.register_buffer("steps", torch.tensor([7]))


class FixedDeltaNode:
    """A member that answers every round with the delta it was given."""

    def __init__(self, node_id: str, *values: float, quality: float = 0.9) -> None:
        self.node_id, self.values, self.quality = node_id, values, quality

    def run_sovereign_cycle(self, round_num: int, base_state: ModelState) -> SovereignCycleResult:
        delta = {"w": torch.tensor(self.values), "steps": torch.tensor([0])}
        return SovereignCycleResult(
            SovereignModelArtifact(self.node_id, "J", "fixed", {}, {}, round_num=round_num),
            SovereignContribution(self.node_id, round_num, delta, self.quality, 1, {}),
        )


def nodes(*deltas: float) -> list[FixedDeltaNode]:
    return [FixedDeltaNode(f"n{i}", d) for i, d in enumerate(deltas)]


def diloco(**policy: object) -> ConsortiumCoordinator:
    return ConsortiumCoordinator(
        Vector(1.0),
        ContributionPolicy(weighting="equal", strategy=HAND, **policy),  # type: ignore[arg-type]
    )


def w(state: ModelState) -> list[float]:
    return state["w"].tolist()


def test_two_diloco_rounds_through_the_coordinator_by_hand() -> None:
    coordinator = diloco()
    committed: list[ConsortiumRoundResult] = []

    # As in test_strategies: equal weights on 2 and 4, then on 1 and 1.
    first = coordinator.run_round(nodes(2.0, 4.0), commit=committed.append)
    second = coordinator.run_round(nodes(1.0, 1.0), commit=committed.append)

    assert w(first.shared_base_state) == [3.25] and w(second.shared_base_state) == [4.375]
    assert first.outer_momentum is not None and w(first.outer_momentum) == [-3.0]
    assert second.outer_momentum is not None and w(second.outer_momentum) == [-2.5]
    assert committed == [first, second]  # the commit step saw each momentum
    assert coordinator.outer_momentum is not None and w(coordinator.outer_momentum) == [-2.5]
    assert second.shared_base_state["steps"].tolist() == [7]


def test_the_policy_still_decides_who_counts_under_any_strategy() -> None:
    for name in StrategyName:
        coordinator = ConsortiumCoordinator(
            Vector(0.0), ContributionPolicy(0.75, strategy=name.value)
        )
        low = FixedDeltaNode("low", 100.0, quality=0.5)
        result = coordinator.run_round([*nodes(1.0, 3.0, 2.0), low])
        assert result.accepted_nodes == ["n0", "n1", "n2"], name
        assert "below the floor" in result.rejection_reasons["low"]
    median = ConsortiumCoordinator(Vector(0.0), ContributionPolicy(strategy="median"))
    assert w(median.run_round(nodes(1.0, 3.0, 2.0, 100.0)).shared_base_state) == [2.5]


def test_clipping_uses_the_norm_of_each_whole_delta() -> None:
    coordinator = ConsortiumCoordinator(
        Vector(0.0, 0.0),
        ContributionPolicy(weighting="equal", strategy=IntegrationStrategy(clip_delta_norm=5.0)),
    )
    big = FixedDeltaNode("big", 30.0, 40.0)  # norm 50 -> (3, 4)
    small = FixedDeltaNode("small", 1.0, 0.0)
    assert w(coordinator.run_round([big, small]).shared_base_state) == [2.0, 2.0]


def test_a_round_that_accepts_nobody_keeps_the_momentum() -> None:
    coordinator = diloco(quality_floor=0.8)
    coordinator.run_round(nodes(2.0, 4.0))
    before = coordinator.outer_momentum

    result = coordinator.run_round([FixedDeltaNode("low", 9.0, quality=0.5)])

    assert result.accepted_nodes == [] and result.outer_momentum is not None
    assert before is not None and w(result.outer_momentum) == w(before) == [-3.0]
    assert w(result.shared_base_state) == [3.25]


def test_a_results_momentum_is_a_copy_the_caller_may_edit() -> None:
    """With copies on (the default), the states in a result are the caller's: editing the
    momentum a round returned (one that stepped, or one that accepted nobody and carried it
    on) never reaches the momentum the next round steps from."""
    coordinator = diloco()
    stepped = coordinator.run_round(nodes(2.0, 4.0))
    carried = coordinator.run_round([])
    assert stepped.outer_momentum is not None and carried.outer_momentum is not None

    stepped.outer_momentum["w"].add_(100.0)
    carried.outer_momentum["w"].add_(1000.0)

    assert coordinator.outer_momentum is not None and w(coordinator.outer_momentum) == [-3.0]
    after = coordinator.run_round(nodes(1.0, 1.0))
    assert after.outer_momentum is not None and w(after.outer_momentum) == [-2.5]


@pytest.mark.parametrize("name", ["fedavg", "median", "trimmed_mean", "diloco"])
def test_a_non_finite_result_is_never_committed(name: str) -> None:
    big = 2.0**127  # finite in float32; two of them overflow
    coordinator = ConsortiumCoordinator(Vector(big), ContributionPolicy(strategy=name))
    committed: list[ConsortiumRoundResult] = []

    result = coordinator.run_round(
        [FixedDeltaNode("a", big), FixedDeltaNode("b", big)], commit=committed.append
    )

    assert result.accepted_nodes == [] and result.rejected_nodes == ["a", "b"]
    assert "non-finite" in result.rejection_reasons["a"]
    assert result.shared_base_sha256 == result.previous_base_sha256
    assert w(committed[0].shared_base_state) == [big]
    assert committed[0].outer_momentum is None  # no step taken: still zeros
    assert coordinator.outer_momentum is None


def test_a_momentum_that_would_overflow_is_never_committed() -> None:
    coordinator = diloco()
    coordinator.load_base_state(
        {"w": torch.tensor([1.0]), "steps": torch.tensor([7])},
        4,
        momentum={"w": torch.tensor([-MAX])},
    )

    result = coordinator.run_round(nodes(MAX, MAX))  # m = 0.5·(-MAX) - MAX overflows

    assert result.accepted_nodes == [] and "non-finite" in result.rejection_reasons["n0"]
    assert result.outer_momentum is not None and w(result.outer_momentum) == [-MAX]
    assert w(result.shared_base_state) == [1.0]


def test_resume_refuses_a_momentum_that_does_not_fit_the_base() -> None:
    coordinator = diloco()
    state = {"w": torch.tensor([1.0]), "steps": torch.tensor([7])}
    with pytest.raises(ValueError, match=r"missing \['w'\], unexpected \['v'\]"):
        coordinator.load_base_state(state, 1, momentum={"v": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"outer momentum 'w': expected torch.float32 \(1,\)"):
        coordinator.load_base_state(state, 1, momentum={"w": torch.zeros(2)})
    with pytest.raises(ValueError, match="outer momentum 'w' holds NaN or Inf values"):
        coordinator.load_base_state(state, 1, momentum={"w": torch.tensor([float("nan")])})


# --- through the journal: the service's commit step -------------------------------------


class Journaled:
    """The core with the journal as its commit step, resumed as coordinator/startup.py does."""

    def __init__(self, root: Path) -> None:
        self.store = CoordinatorStore(root)
        self.core = diloco()
        self.records: list[pb.RoundRecord] = []
        resumed = self.store.latest()
        if resumed is None:
            self.store.save_initial_base(self.core.shared_base_state)
            return
        round_num, state, self.records = resumed
        self.core.load_base_state(
            state,
            round_num,
            sha256=self.records[-1].result.shared_base_sha256 if self.records else "",
            momentum=self.store.committed_momentum(round_num, self.records),
        )

    def commit(self, result: ConsortiumRoundResult) -> None:
        self.records.append(self.store.commit_round(result))

    def run_round(self, *deltas: float) -> ConsortiumRoundResult:
        return self.core.run_round(nodes(*deltas), commit=self.commit)


ROUNDS = [(2.0, 4.0), (1.0, 1.0), (-2.0, 0.5)]


def test_momentum_survives_a_restart_and_the_next_round_is_bit_for_bit_the_same(
    tmp_path: Path,
) -> None:
    uninterrupted = Journaled(tmp_path / "a")
    expected = [uninterrupted.run_round(*d) for d in ROUNDS]

    first = Journaled(tmp_path / "b")
    first.run_round(*ROUNDS[0])
    restarted = Journaled(tmp_path / "b")  # a new process: only the disk carries over
    assert restarted.core.round_num == 1
    got = [restarted.run_round(*d) for d in ROUNDS[1:]]

    for want, have in zip(expected[1:], got, strict=True):
        assert have.shared_base_sha256 == want.shared_base_sha256
        assert have.outer_momentum is not None and want.outer_momentum is not None
        assert state_digest(have.outer_momentum) == state_digest(want.outer_momentum)
    record = restarted.records[-1]
    momentum_file = restarted.store.momentum_path(3)
    assert record.result.outer_momentum_sha256 == state_digest(got[-1].outer_momentum or {})
    assert momentum_file.exists()


def test_without_its_momentum_the_next_round_would_differ(tmp_path: Path) -> None:
    """The restart test above is sensitive: zeros instead of the momentum change the bits."""
    consortium = Journaled(tmp_path)
    consortium.run_round(*ROUNDS[0])
    consortium.store.momentum_path(1).unlink()

    with pytest.raises(StoreError, match="outer momentum of round 1 .* is missing"):
        consortium.store.committed_momentum(1, consortium.records)
    # The newest round whose files are all intact is resumed: here the initial base.
    assert consortium.store.latest()[0] == 0  # type: ignore[index]


def test_a_rollback_restores_the_momentum_committed_with_that_base(tmp_path: Path) -> None:
    consortium = Journaled(tmp_path)
    first = consortium.run_round(*ROUNDS[0])
    consortium.run_round(*ROUNDS[1])
    store, records = consortium.store, consortium.records

    state, sha256 = store.committed_base(1, records)
    back = consortium.core.roll_back(
        state,
        1,
        sha256=sha256,
        commit=consortium.commit,
        momentum=store.committed_momentum(1, records),
    )
    assert back.outer_momentum is not None and first.outer_momentum is not None
    assert state_digest(back.outer_momentum) == state_digest(first.outer_momentum)
    # The round after the rollback is round 2 again, bit for bit.
    again = consortium.run_round(*ROUNDS[1])
    assert again.shared_base_sha256 == records[1].result.shared_base_sha256

    state, sha256 = store.committed_base(0, consortium.records)
    to_zero = consortium.core.roll_back(
        state,
        0,
        sha256=sha256,
        commit=consortium.commit,
        momentum=store.committed_momentum(0, consortium.records),
    )
    assert to_zero.outer_momentum is None and consortium.core.outer_momentum is None
    assert consortium.records[-1].result.outer_momentum_sha256 == ""
    # After a restart the zeros hold too: the newest record names no momentum.
    assert Journaled(tmp_path).core.outer_momentum is None
