"""Nodes that send bad deltas over the wire are reported as failed, with the reason, and
the round commits with the honest nodes."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc
import pytest

from tapestry.coordinator.client import CoordinatorClient
from tapestry.training.consortium import ModelSpec

from .fake_nodes import BlockingNode, FakeNode, serve

BEHAVIOURS = {
    "nan": "invalid contribution: delta 'embedding.weight' holds NaN or Inf values",
    "truncated": "the tensor stream ended before its trailer (truncated)",
    "extra-key": "unexpected tensor 'backdoor.weight'",
    "impostor": "invalid contribution: contribution claims node_id 'vietnam' but came from "
    "'impostor'",
    "tampered": "delta trailer digest differs from the announced one",
}


@pytest.fixture
def misbehaving_members() -> Iterator[list[dict[str, str]]]:
    with serve([FakeNode(behaviour, behaviour) for behaviour in BEHAVIOURS]) as members:
        yield members


def test_bad_deltas_fail_their_node_and_the_round_commits_the_rest(
    consortium_factory, misbehaving_members
):
    consortium = consortium_factory(extra_members=misbehaving_members)
    with CoordinatorClient(consortium.coordinator_address) as client:
        result = client.run_round()
        _, base = client.get_base()

    assert list(result.accepted_nodes) == ["vietnam", "switzerland", "india"]
    assert sorted(result.failed_nodes) == sorted(BEHAVIOURS)
    for behaviour, reason in BEHAVIOURS.items():
        assert reason in result.failed_nodes[behaviour], result.failed_nodes[behaviour]
    assert sum(result.contribution_weights.values()) == pytest.approx(1.0, abs=1e-12)
    assert result.previous_base_sha256 != result.shared_base_sha256
    assert "backdoor.weight" not in base
    assert not (consortium.coordinator_data_dir / "spill").exists()


def test_a_node_that_is_not_who_or_what_the_file_says_gets_no_weights(consortium_factory):
    """Describe is checked before a round sends any weights: a server answering with
    another node's id, or training another model, fails the round's check and is never
    sent the base."""
    impostor = FakeNode("vietnam")  # listed below as "ghost"
    other_model = FakeNode("wide", model=ModelSpec(hidden_size=64))
    with serve([impostor, other_model]) as members:
        members[0]["node_id"] = "ghost"
        consortium = consortium_factory(extra_members=members)
        with CoordinatorClient(consortium.coordinator_address) as client:
            result = client.run_round()

    assert list(result.accepted_nodes) == ["vietnam", "switzerland", "india"]
    assert "node_id 'vietnam', expected 'ghost'" in result.failed_nodes["ghost"]
    assert "hidden_size=64" in result.failed_nodes["wide"]
    assert "hidden_size=32" in result.failed_nodes["wide"]
    assert impostor.cycles == other_model.cycles == 0


def test_a_second_round_while_one_runs_is_refused(consortium_factory):
    """Round 1 is held open by a node that does not answer until released, so the second
    trigger certainly arrives while it runs."""
    blocking = BlockingNode("slow")
    with serve([blocking]) as members:
        consortium = consortium_factory(extra_members=members)
        with CoordinatorClient(consortium.coordinator_address) as client:
            outcome: list[object] = []
            first = threading.Thread(target=lambda: outcome.append(client.run_round()))
            first.start()
            try:
                assert blocking.started.wait(timeout=60)
                with (
                    CoordinatorClient(consortium.coordinator_address) as other,
                    pytest.raises(grpc.RpcError) as refused,
                ):
                    other.run_round()
            finally:
                blocking.release.set()
                first.join(timeout=60)
            rounds = client.list_rounds()

    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "round 1 is already running" in refused.value.details()
    assert [r.round_num for r in rounds] == [1]
    assert "slow" in outcome[0].accepted_nodes
