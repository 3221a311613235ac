"""Bad input over gRPC gets a clear status and loses nothing."""

from __future__ import annotations

import grpc
import pytest

from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.consortium.v1 import consortium_pb2_grpc as pb_grpc
from tapestry.training.consortium import ModelSpec
from tapestry.wire.grpc_plumbing import insecure_channel
from tapestry.wire.tensor_stream import state_to_chunks, state_trailer


@pytest.fixture(scope="module")
def node_stub(shared_consortium):
    with insecure_channel(shared_consortium.processes["india"].address) as channel:
        yield pb_grpc.SovereignNodeServiceStub(channel)


def _cycle(stub, messages):
    return list(stub.RunSovereignCycle(iter(messages), timeout=60))


def _base():
    return ModelSpec().build(seed=1).state_dict()


def _start(round_num=1):
    return pb.RunSovereignCycleRequest(start=pb.CycleStart(round_num=round_num))


def _expect(status, fragment, call):
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert caught.value.code() == status
    assert fragment in caught.value.details()


def _artifact_rounds(consortium):
    return sorted(p.name for p in (consortium.node_data_dir("india") / "artifacts").glob("*"))


def test_malformed_base_streams_are_refused_and_store_nothing(shared_consortium, node_stub):
    base = _base()
    chunks = [pb.RunSovereignCycleRequest(base_chunk=c) for c in state_to_chunks(base, 4096)]
    end = pb.RunSovereignCycleRequest(base_end=state_trailer(base))
    before = _artifact_rounds(shared_consortium)
    invalid = grpc.StatusCode.INVALID_ARGUMENT

    _expect(invalid, "must begin with a CycleStart", lambda: _cycle(node_stub, chunks + [end]))
    _expect(invalid, "round_num must be >= 1", lambda: _cycle(node_stub, [_start(0)]))
    _expect(invalid, "truncated", lambda: _cycle(node_stub, [_start(), *chunks[:-1]]))
    _expect(invalid, "truncated", lambda: _cycle(node_stub, [_start(), *chunks[:-1], end]))

    wrong_key = pb.TensorChunk()
    wrong_key.CopyFrom(chunks[0].base_chunk)
    wrong_key.name = "not.a.weight"
    _expect(
        invalid,
        "unexpected tensor 'not.a.weight'",
        lambda: _cycle(node_stub, [_start(), pb.RunSovereignCycleRequest(base_chunk=wrong_key)]),
    )

    bad_dtype = pb.TensorChunk()
    bad_dtype.CopyFrom(chunks[0].base_chunk)
    bad_dtype.dtype = "float128"
    _expect(
        invalid,
        "unsupported dtype 'float128'",
        lambda: _cycle(node_stub, [_start(), pb.RunSovereignCycleRequest(base_chunk=bad_dtype)]),
    )

    tampered = pb.StateTrailer()
    tampered.CopyFrom(end.base_end)
    tampered.sha256 = "0" * 64
    _expect(
        invalid,
        "digest mismatch",
        lambda: _cycle(
            node_stub, [_start(), *chunks, pb.RunSovereignCycleRequest(base_end=tampered)]
        ),
    )

    poisoned = {name: tensor.clone() for name, tensor in base.items()}
    poisoned["lm_head.bias"][3] = float("nan")
    _expect(
        invalid,
        "base tensor 'lm_head.bias' holds NaN or Inf values",
        lambda: _cycle(
            node_stub,
            [
                _start(),
                *[pb.RunSovereignCycleRequest(base_chunk=c) for c in state_to_chunks(poisoned)],
                pb.RunSovereignCycleRequest(base_end=state_trailer(poisoned)),
            ],
        ),
    )

    wrong_shape = ModelSpec(hidden_size=8).build(seed=1).state_dict()
    _expect(
        invalid,
        "expected float32",
        lambda: _cycle(
            node_stub,
            [
                _start(),
                *[pb.RunSovereignCycleRequest(base_chunk=c) for c in state_to_chunks(wrong_shape)],
            ],
        ),
    )

    assert _artifact_rounds(shared_consortium) == before


def test_missing_things_are_not_found(shared_consortium, node_stub):
    with pytest.raises(grpc.RpcError) as caught:
        node_stub.GetArtifact(pb.GetArtifactRequest(round_num=999))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with insecure_channel(shared_consortium.coordinator_address) as channel:
        stub = pb_grpc.CoordinatorServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.GetRound(pb.GetRoundRequest(round_num=999))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
