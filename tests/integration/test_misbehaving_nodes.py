"""Nodes that send bad deltas over the wire are reported as failed, with the reason, and
the round commits with the honest nodes."""

from __future__ import annotations

from concurrent import futures

import grpc
import pytest

from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.consortium.v1 import consortium_pb2_grpc as pb_grpc
from tapestry.coordinator.client import CoordinatorClient
from tapestry.wire.tensor_stream import StateAssembler, state_to_chunks, state_trailer

BEHAVIOURS = {
    "nan": "invalid contribution: delta 'embedding.weight' holds NaN or Inf values",
    "truncated": "the delta stream ended before its trailer (truncated)",
    "extra-key": "unexpected tensor 'backdoor.weight'",
    "impostor": "invalid contribution: contribution claims node_id 'vietnam' but came from "
    "'impostor'",
    "tampered": "delta trailer digest differs from the announced one",
}


class MisbehavingNode(pb_grpc.SovereignNodeServiceServicer):
    """Speaks the protocol but answers with the one fault it is named after."""

    def __init__(self, behaviour: str) -> None:
        self.behaviour = behaviour

    def RunSovereignCycle(self, request_iterator, context):  # noqa: N802
        start = next(request_iterator).start
        assembler = StateAssembler()
        for message in request_iterator:
            if message.WhichOneof("item") == "base_chunk":
                assembler.add(message.base_chunk)
            else:
                base = assembler.finish(message.base_end)
        delta = {name: tensor * 0.0 + 0.01 for name, tensor in base.items()}
        node_id = "vietnam" if self.behaviour == "impostor" else self.behaviour
        if self.behaviour == "nan":
            delta["embedding.weight"][0, 0] = float("nan")
        if self.behaviour == "extra-key":
            delta["backdoor.weight"] = delta["lm_head.bias"].clone()
        trailer = state_trailer(delta)
        announced = "0" * 64 if self.behaviour == "tampered" else trailer.sha256
        yield pb.RunSovereignCycleResponse(
            result=pb.SovereignCycleResult(
                artifact=pb.SovereignModelArtifact(node_id=node_id, round_num=start.round_num),
                contribution=pb.SovereignContribution(
                    node_id=node_id,
                    round_num=start.round_num,
                    weight_delta_sha256=announced,
                    quality_score=1.0,
                    token_count=1,
                ),
            )
        )
        chunks = list(state_to_chunks(delta, 4096))
        if self.behaviour == "truncated":
            chunks = chunks[: len(chunks) // 2]
        for chunk in chunks:
            yield pb.RunSovereignCycleResponse(delta_chunk=chunk)
        if self.behaviour != "truncated":
            yield pb.RunSovereignCycleResponse(delta_end=trailer)


@pytest.fixture
def misbehaving_members():
    servers, members = [], []
    for behaviour in BEHAVIOURS:
        server = grpc.server(futures.ThreadPoolExecutor(2))
        pb_grpc.add_SovereignNodeServiceServicer_to_server(MisbehavingNode(behaviour), server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        members.append(
            {"node_id": behaviour, "jurisdiction": "Nowhere", "address": f"127.0.0.1:{port}"}
        )
    yield members
    for server in servers:
        server.stop(0)


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
