"""Deltas over the wire, integrated as they stream: the same bits as the in-process core for
N = 1, 3 and 8 and for accepted/rejected mixes; a rejected delta never crosses the wire; a
delta cut off midway fails its node and leaves the base untouched.

The coordinator here is the services' core exactly as ``tapestry coordinator serve`` builds it
(``copy_states=False``, remote proxies spilling deltas to disk); each node is a real gRPC
server on 127.0.0.1 (in this process, so that eight of them start in a second).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path

import grpc
import pytest

from tapestry.node.artifacts import ArtifactStore
from tapestry.node.servicer import SovereignNodeServicer
from tapestry.training.consortium import (
    ConsortiumCoordinator,
    ContributionPolicy,
    SovereignTrainingNode,
    state_digest,
)
from tapestry.training.consortium.models.spec import ModelSpec
from tapestry.training.consortium.models.state import model_state
from tapestry.training.consortium.strategies.settings import IntegrationStrategy, StrategyName

from .node_servers import Served, served_nodes

CONSORTIUM = "tapestry-streamed"
SEED = 2026
SPEC = ModelSpec(hidden_size=64)
CHUNK_BYTES = 4096  # many chunks per tensor, several tensors cut mid-way
# Node i's score: with a floor of 0.5 the odd nodes are rejected.
SCORES = [0.9, 0.3, 0.8, 0.2, 0.7, 0.4, 0.95, 0.1]


def _node(node_id: str, score: float) -> SovereignTrainingNode:
    corpus = [list(f"{node_id} keeps its data at home, line {i}".encode()) for i in range(6)]
    return SovereignTrainingNode(
        node_id, node_id.upper(), SPEC.build(SEED), corpus, score, local_epochs=1, seed=SEED
    )


class CutOffServicer(SovereignNodeServicer):
    """A node whose delta stream stops after ``keep`` chunks (the call then fails)."""

    def __init__(self, *args: object, keep: int, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.keep = keep

    def RunSovereignCycle(self, request_iterator, context):  # noqa: N802
        chunks = 0
        for message in super().RunSovereignCycle(request_iterator, context):
            if message.WhichOneof("item") == "delta_chunk":
                chunks += 1
                if chunks > self.keep:
                    context.abort(grpc.StatusCode.UNAVAILABLE, "link lost mid-delta")
            yield message


def _served(
    root: Path, count: int, cut: dict[str, int] | None = None
) -> AbstractContextManager[Served]:
    """``count`` node servers (``cut``: node -> chunks after which its delta stops) and
    the coordinator's proxies to them."""
    servicers: dict[str, SovereignNodeServicer] = {}
    for i in range(count):
        node_id = f"n{i}"
        args = (_node(node_id, SCORES[i]), SPEC, ArtifactStore(root / node_id), CONSORTIUM)
        servicers[node_id] = (
            CutOffServicer(*args, keep=cut[node_id], chunk_bytes=CHUNK_BYTES)
            if cut and node_id in cut
            else SovereignNodeServicer(*args, chunk_bytes=CHUNK_BYTES)
        )
    return served_nodes(
        root, servicers, spec=SPEC, consortium_id=CONSORTIUM, chunk_bytes=CHUNK_BYTES
    )


def _policy(mix: str) -> ContributionPolicy:
    if mix == "all accepted":
        return ContributionPolicy(max_node_weight=1.0)
    if mix == "some rejected":
        return ContributionPolicy(quality_floor=0.5)
    if mix == "norm-clipped, some rejected":
        clipped = IntegrationStrategy(StrategyName.FEDAVG, clip_delta_norm=0.05)
        return ContributionPolicy(quality_floor=0.5, strategy=clipped)
    return ContributionPolicy(quality_floor=0.99)  # all rejected


@pytest.mark.parametrize(
    "mix", ["all accepted", "some rejected", "norm-clipped, some rejected", "all rejected"]
)
@pytest.mark.parametrize("count", [1, 3, 8])
def test_streamed_integration_is_the_in_process_core_bit_for_bit(
    tmp_path: Path, count: int, mix: str
) -> None:
    in_process = ConsortiumCoordinator(SPEC.build(SEED), _policy(mix))
    nodes = [_node(f"n{i}", SCORES[i]) for i in range(count)]
    expected = [in_process.run_round(nodes) for _ in range(2)]

    streamed = ConsortiumCoordinator(SPEC.build(SEED), _policy(mix), copy_states=False)
    with _served(tmp_path, count) as served:
        for want in expected:
            got = streamed.run_round(served.proxies)
            assert got.accepted_nodes == want.accepted_nodes
            assert got.rejected_nodes == want.rejected_nodes
            assert got.failed_nodes == {}
            assert got.shared_base_sha256 == want.shared_base_sha256
            assert state_digest(model_state(streamed.base_model)) == want.shared_base_sha256
            # A delta crosses the wire only for a node the policy accepted, unless the policy
            # weighs norms: a norm is measured from the bytes, never taken on trust.
            delta_bytes = SPEC.build(SEED).state_dict()
            size = sum(t.numel() * t.element_size() for t in delta_bytes.values())
            fetched = want.accepted_nodes if "norm" not in mix else list(served.received)
            for node_id, received in served.received.items():
                assert received == (size if node_id in fetched else 0), node_id
                served.received[node_id] = 0
            # Every digest is recorded, as its node announced it in its signed header: a
            # rejected delta's too, though its bytes never crossed (above).
            for contribution in got.contributions.values():
                assert len(contribution.weight_delta_sha256) == 64
    if mix == "all rejected":
        assert expected[-1].shared_base_sha256 == expected[0].previous_base_sha256


def test_a_delta_cut_off_midway_fails_its_node_and_the_base_is_untouched(
    tmp_path: Path,
) -> None:
    streamed = ConsortiumCoordinator(SPEC.build(SEED), ContributionPolicy(), copy_states=False)
    before = state_digest(model_state(streamed.base_model))
    with _served(tmp_path, 1, cut={"n0": 3}) as served:
        result = streamed.run_round(served.proxies)

    assert result.accepted_nodes == []
    assert list(result.failed_nodes) == ["n0"]
    assert "link lost mid-delta" in result.failed_nodes["n0"]
    assert result.shared_base_sha256 == before
    assert state_digest(model_state(streamed.base_model)) == before
    assert not any((tmp_path / "spill").glob("*.delta"))  # the partial spill is gone


def test_a_cut_off_node_is_left_out_and_the_others_integrate_as_without_it(
    tmp_path: Path,
) -> None:
    policy = ContributionPolicy(weighting="equal")
    without = ConsortiumCoordinator(SPEC.build(SEED), policy)
    expected = without.run_round([_node("n0", SCORES[0]), _node("n2", SCORES[2])])

    streamed = ConsortiumCoordinator(SPEC.build(SEED), policy, copy_states=False)
    with _served(tmp_path, 3, cut={"n1": 2}) as served:
        result = streamed.run_round(served.proxies)

    assert result.accepted_nodes == ["n0", "n2"]
    assert list(result.failed_nodes) == ["n1"]
    # Weighed again without n1: each of the two counts 1/2, as if n1 had never answered.
    assert result.contribution_weights == {"n0": 0.5, "n2": 0.5}
    assert result.shared_base_sha256 == expected.shared_base_sha256
