"""Bad input over gRPC gets a clear status and loses nothing: one case per test.

The refusals that are about what a base may hold (round number, NaN/Inf) are the core
node's own checks, so an in-process node refuses the same inputs with the same words.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest
import torch

from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.consortium.v1 import consortium_pb2_grpc as pb_grpc
from tapestry.training.consortium import InvalidBase, ModelSpec, SovereignTrainingNode
from tapestry.wire.tensor_stream import send_state

Request = pb.RunSovereignCycleRequest
Stream = list[Request]


@pytest.fixture(scope="module")
def node_stub(listening_consortium):
    with listening_consortium.channel("india", "coordinator", "") as channel:
        yield pb_grpc.SovereignNodeServiceStub(channel)


def _base() -> dict[str, torch.Tensor]:
    return ModelSpec().build(seed=1).state_dict()


def _start(round_num: int = 1) -> Request:
    return Request(start=pb.CycleStart(round_num=round_num, consortium_id="tapestry-local"))


def _stream(state: dict[str, torch.Tensor], chunk_bytes: int = 4096) -> Stream:
    return list(
        send_state(
            state,
            lambda c: Request(base_chunk=c),
            lambda t: Request(base_end=t),
            chunk_bytes=chunk_bytes,
        )
    )


def _edit_chunk(stream: Stream, index: int, **fields: object) -> Stream:
    edited = list(stream)
    chunk = pb.TensorChunk()
    chunk.CopyFrom(stream[index].base_chunk)
    for name, value in fields.items():
        setattr(chunk, name, value)
    edited[index] = Request(base_chunk=chunk)
    return edited


def _tampered_trailer(stream: Stream) -> Stream:
    trailer = pb.StateTrailer()
    trailer.CopyFrom(stream[-1].base_end)
    trailer.sha256 = "0" * 64
    return [*stream[:-1], Request(base_end=trailer)]


def _poisoned() -> dict[str, torch.Tensor]:
    state = {name: tensor.clone() for name, tensor in _base().items()}
    state["lm_head.bias"][3] = float("nan")
    return state


MALFORMED: dict[str, tuple[Callable[[], Stream], str]] = {
    "no start message": (lambda: _stream(_base()), "must begin with a CycleStart"),
    "round 0": (lambda: [_start(0), *_stream(_base())], "round_num must be an integer >= 1"),
    "stream stops before its trailer": (
        lambda: [_start(), *_stream(_base())[:-2]],
        "truncated",
    ),
    "a chunk missing before the trailer": (
        lambda: [_start(), *_stream(_base())[:-2], _stream(_base())[-1]],
        "truncated",
    ),
    "a key the model lacks": (
        lambda: [_start(), *_edit_chunk(_stream(_base()), 0, name="not.a.weight")],
        "unexpected tensor 'not.a.weight'",
    ),
    "a dtype outside the supported set": (
        lambda: [_start(), *_edit_chunk(_stream(_base()), 0, dtype="float128")],
        "unsupported dtype 'float128'",
    ),
    "a base in an encoding (only a delta may be encoded)": (
        lambda: [
            _start(),
            *_edit_chunk(_stream(_base()), 0, encoding=pb.TENSOR_ENCODING_INT8_BLOCK),
        ],
        "arrived in encoding 'int8_block'; this stream accepts raw tensors and these "
        "encodings only: none",
    ),
    "a tampered trailer digest": (
        lambda: [_start(), *_tampered_trailer(_stream(_base()))],
        "digest mismatch",
    ),
    "NaN in the base": (
        lambda: [_start(), *_stream(_poisoned())],
        "base 'lm_head.bias' holds NaN or Inf values",
    ),
    "another model's shapes": (
        lambda: [_start(), *_stream(ModelSpec(hidden_size=8).build(seed=1).state_dict())],
        "expected float32",
    ),
    "a huge peer string is not echoed back": (
        lambda: [_start(), *_edit_chunk(_stream(_base()), 0, name="x" * 100_000)],
        "(100000 characters)",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_base_stream_is_refused_and_stores_nothing(
    listening_consortium, node_stub, case: str
) -> None:
    make, fragment = MALFORMED[case]
    artifacts = listening_consortium.node_data_dir("india") / "artifacts"
    before = sorted(p.name for p in artifacts.glob("*"))

    with pytest.raises(grpc.RpcError) as caught:
        list(node_stub.RunSovereignCycle(iter(make()), timeout=60))

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in caught.value.details()
    assert len(caught.value.details()) < 1000
    assert sorted(p.name for p in artifacts.glob("*")) == before


# The base-content refusals, in-process: the same words as over the wire above.
IN_PROCESS: dict[str, tuple[int, Callable[[], dict[str, torch.Tensor]]]] = {
    "round 0": (0, _base),
    "NaN in the base": (1, _poisoned),
}


@pytest.mark.parametrize("case", list(IN_PROCESS))
def test_an_in_process_node_refuses_the_same_base(case: str) -> None:
    round_num, make = IN_PROCESS[case]
    node = SovereignTrainingNode("india", "India", ModelSpec().build(seed=1), [[1, 2, 3]], 0.9)

    with pytest.raises(InvalidBase) as caught:
        node.run_sovereign_cycle(round_num, make())

    assert MALFORMED[case][1] in str(caught.value)
    assert node.latest_artifact is None


@pytest.mark.slow
def test_an_artifact_the_node_does_not_keep_is_not_found(node_stub) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        node_stub.GetArtifact(pb.GetArtifactRequest(round_num=999))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.slow
def test_a_round_never_committed_is_not_found(listening_consortium) -> None:
    with listening_consortium.channel("coordinator") as channel:
        stub = pb_grpc.CoordinatorServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.GetRound(pb.GetRoundRequest(round_num=999))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
