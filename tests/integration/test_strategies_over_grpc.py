"""DiLoCo through real coordinator and node processes: the outer momentum is committed with
the base, survives a coordinator restart, and comes back with a rollback."""

from __future__ import annotations

import torch

from tapestry.config import ConsortiumConfig, load_config
from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.demo.launcher import LocalConsortium
from tapestry.state_files import load_state
from tapestry.training.consortium import ModelState, state_digest
from tapestry.training.consortium.strategies.base import Integrated
from tapestry.training.consortium.strategies.registry import make_strategy

from .conftest import POLICY

# Validation off: these tests recompute each round's full outer step, which a shortened
# step (member-validated commit, tested in test_validation_over_grpc) would not be.
DILOCO = {
    **POLICY,
    "strategy": "diloco",
    "diloco": {"outer_lr": 0.8, "momentum": 0.9},
    "acceptance": {"rule": "off"},
}


def delta_of(consortium: LocalConsortium, node_id: str, round_num: int, base: ModelState):
    """A node's delta of a round, read back from the full model the node retains: what the
    node sent is ``trained - base``, bit for bit."""
    folder = consortium.node_data_dir(node_id) / "artifacts" / f"round-{round_num:06d}"
    trained, _ = load_state(folder / "model.safetensors")
    return {name: trained[name] - base[name] for name in trained}


def uninterrupted_step(
    consortium: LocalConsortium,
    result: pb.ConsortiumRoundResult,
    base: ModelState,
    momentum: ModelState | None,
) -> Integrated:
    """What a coordinator that never stopped computes for ``result``'s round: the same
    strategy over the same accepted deltas, weights and momentum."""
    policy = load_config(consortium.consortium_config_path, ConsortiumConfig).policy.policy()
    weighted = [
        (result.contribution_weights[n], delta_of(consortium, n, result.round_num, base))
        for n in result.accepted_nodes
    ]
    strategy = make_strategy(policy.strategy)
    strategy.adopt(momentum)  # the momentum committed with the round before
    return strategy.apply(base, weighted)


def test_diloco_momentum_survives_a_coordinator_restart_and_a_rollback(consortium_factory):
    consortium = consortium_factory(policy=DILOCO)
    with consortium.client() as client:
        _, base0 = client.get_base()
        first = client.run_round()
    momentum_dir = consortium.coordinator_data_dir / "momentum"
    momentum1, _ = load_state(momentum_dir / "round-000001.safetensors")
    step1 = uninterrupted_step(consortium, first, base0, None)
    assert first.policy.outer.lr == 0.8 and len(first.accepted_nodes) == 3
    assert first.outer_momentum_sha256 == state_digest(momentum1)
    assert step1.strategy_state is not None
    assert state_digest(step1.strategy_state) == first.outer_momentum_sha256
    assert state_digest(step1.state) == first.shared_base_sha256

    consortium.restart_coordinator()  # only the disk carries the momentum over
    with consortium.client() as client:
        _, base1 = client.get_base()
        second = client.run_round()
        _, base2 = client.get_base()

    step2 = uninterrupted_step(consortium, second, base1, step1.strategy_state)
    assert second.previous_base_sha256 == first.shared_base_sha256
    assert state_digest(base2) == second.shared_base_sha256 == state_digest(step2.state)
    assert step2.strategy_state is not None
    assert second.outer_momentum_sha256 == state_digest(step2.strategy_state)
    # Had the restart lost the momentum (zeros), the round would have differed.
    forgetful = uninterrupted_step(consortium, second, base1, None)
    assert state_digest(forgetful.state) != second.shared_base_sha256

    with consortium.client() as client:
        back = client.roll_back_base(1)
    assert back.rolled_back_to == 1 and back.shared_base_sha256 == first.shared_base_sha256
    assert back.outer_momentum_sha256 == first.outer_momentum_sha256
    restored, _ = load_state(momentum_dir / f"round-{back.round_num:06d}.safetensors")
    assert all(torch.equal(restored[k], momentum1[k]) for k in momentum1)
