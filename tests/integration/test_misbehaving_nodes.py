"""Nodes that send bad deltas over the wire are reported as failed, with the reason, and
the round commits with the honest nodes."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc
import pytest

from tapestry.demo.launcher import LocalConsortium
from tapestry.training.consortium import ModelSpec

from .conftest import POLICY
from .fake_nodes import BlockingNode, FakeNode, serve

pytestmark = pytest.mark.slow  # whole consortia of training processes

BEHAVIOURS = {
    "nan": "invalid contribution: delta 'embedding.weight' holds NaN or Inf values",
    "truncated": "the tensor stream ended before its trailer (truncated)",
    "extra-key": "unexpected tensor 'backdoor.weight'",
    "impostor": "invalid contribution: contribution claims node_id 'vietnam' but came from "
    "'impostor'",
    "tampered": "delta trailer digest differs from the announced one",
    "unasked-encoding": "tensor 'embedding.weight' arrived in encoding 'int8_block'; this "
    "stream accepts raw tensors and these encodings only: none",
}


@pytest.fixture
def misbehaving_members() -> Iterator[list[dict[str, str]]]:
    with serve([FakeNode(behaviour, behaviour) for behaviour in BEHAVIOURS]) as members:
        yield members


def test_bad_deltas_fail_their_node_and_the_round_commits_the_rest(
    consortium_factory, misbehaving_members
):
    consortium = consortium_factory(extra_members=misbehaving_members, tls=False)
    with consortium.client() as client:
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
        consortium = consortium_factory(extra_members=members, tls=False)
        with consortium.client() as client:
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
        consortium = consortium_factory(extra_members=members, tls=False)
        with consortium.client() as client:
            outcome: list[object] = []
            first = threading.Thread(target=lambda: outcome.append(client.run_round()))
            first.start()
            try:
                assert blocking.started.wait(timeout=60)
                with (
                    consortium.client() as other,
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


def test_a_member_cannot_capture_the_base_with_its_score_or_one_huge_delta(consortium_factory):
    """The services' policy: quality scores in [0, 1], and a delta more than ten times the
    round's median norm is refused, each with its reason; the honest nodes integrate."""
    with serve([FakeNode("greedy", "greedy"), FakeNode("huge", "huge")]) as members:
        consortium = consortium_factory(extra_members=members, tls=False)
        with consortium.client() as client:
            result = client.run_round()
            _, base = client.get_base()

    assert list(result.accepted_nodes) == ["vietnam", "switzerland", "india"]
    assert list(result.rejected_nodes) == ["greedy", "huge"]
    assert result.rejection_reasons["greedy"] == "quality score 1e+300 is above max_quality = 1.0"
    assert result.rejection_reasons["huge"].startswith("delta norm ")
    assert (
        "above max_delta_norm_ratio = 10 × the round's median" in result.rejection_reasons["huge"]
    )
    assert result.policy.max_quality == 1.0
    assert result.policy.max_delta_norm_ratio == 10.0
    assert all(bool(t.abs().max() < 100) for t in base.values())


def test_a_delta_sent_again_is_refused_in_every_later_round_even_after_a_restart(tmp_path):
    """The copycat sends its round-1 delta every round (the same bits, the same digest):
    counted once, then refused with the round it came in, also once the coordinator has
    restarted and knows it only from its journal."""
    fakes = [
        FakeNode("alpha"),
        FakeNode("beta"),
        FakeNode("copycat", "replay"),  # refused on its header's digest
        FakeNode("quiet", "replay-unannounced"),  # refused on its trailer's
    ]
    with (
        serve(fakes) as members,
        LocalConsortium(
            tmp_path / "c", [], policy=POLICY, extra_members=members, tls=False
        ) as consortium,
    ):
        with consortium.client() as client:
            first, second = client.run_round(), client.run_round()
        consortium.restart_coordinator()
        with consortium.client() as client:
            third = client.run_round()

    assert list(first.accepted_nodes) == ["alpha", "beta", "copycat", "quiet"]
    sent = {c.node_id: c.weight_delta_sha256 for c in first.contributions}
    assert sent["copycat"] == sent["quiet"]  # the same bits
    for later in (second, third):
        assert list(later.accepted_nodes) == ["alpha", "beta"]
        for node in ("copycat", "quiet"):
            assert later.failed_nodes[node] == (
                f"invalid contribution: node {node} sent this delta (sha256 "
                f"{sent[node][:16]}…) in round 1 already: a delta is counted once"
            )
        assert later.previous_base_sha256 != later.shared_base_sha256
    assert [fake.cycles for fake in fakes] == [3, 3, 3, 3]
