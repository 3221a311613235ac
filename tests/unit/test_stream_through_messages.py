"""The one sender and receiver of tensor streams, through serialised stream messages as gRPC
carries them: every dtype over many chunks, elements split across chunk boundaries, a
stream cut off midway, and each chunk's bytes copied once into the message that carries it."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import pytest
import torch

from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.errors import WireError
from tapestry.training.consortium.tensors import DTYPES, state_digest, tensor_bytes
from tapestry.wire.tensor_stream import StateAssembler, receive_state, send_state, spec_of


def any_state(dtype: torch.dtype, numel: int = 1000) -> dict[str, torch.Tensor]:
    raw = torch.randint(0, 256, (numel * torch.empty((), dtype=dtype).element_size(),))
    values = raw.to(torch.uint8).view(dtype)  # every bit pattern, NaNs included
    return {"a.weight": values.reshape(10, -1), "b.bias": values[:7].clone(), "c": values[:0]}


def wire(state: Mapping[str, torch.Tensor], chunk_bytes: int) -> list[bytes]:
    """The stream as the bytes gRPC would carry: each message serialised."""
    return [
        message.SerializeToString()
        for message in send_state(
            state,
            lambda c: pb.RunSovereignCycleRequest(base_chunk=c),
            lambda t: pb.RunSovereignCycleRequest(base_end=t),
            chunk_bytes=chunk_bytes,
        )
    ]


def parsed(frames: list[bytes]) -> Iterator[pb.RunSovereignCycleRequest]:
    return (pb.RunSovereignCycleRequest.FromString(frame) for frame in frames)


def received(frames: list[bytes], state: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    assembler = StateAssembler(spec_of(state))
    return receive_state(parsed(frames), "base_chunk", "base_end", assembler)


@pytest.mark.parametrize("dtype", sorted(DTYPES.values(), key=str))
def test_every_dtype_crosses_many_chunks_bit_for_bit(dtype: torch.dtype) -> None:
    state = any_state(dtype)
    frames = wire(state, chunk_bytes=64)
    assert len(frames) > 10
    got = received(frames, state)
    assert state_digest(got) == state_digest(state)
    for name, tensor in state.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape
        assert bytes(tensor_bytes(got[name])) == bytes(tensor_bytes(tensor))


def test_elements_split_across_chunk_boundaries_are_rejoined_exactly() -> None:
    state = {"w": torch.arange(101, dtype=torch.float64) / 7}  # 808 bytes, 7-byte chunks
    frames = wire(state, chunk_bytes=7)
    offsets = [pb.RunSovereignCycleRequest.FromString(f).base_chunk.offset for f in frames[:-1]]
    assert offsets == list(range(0, 808, 7))
    assert torch.equal(received(frames, state)["w"], state["w"])


def test_a_stream_cut_off_midway_is_refused_and_leaves_the_sender_alone() -> None:
    state = {"w": torch.arange(1000, dtype=torch.float32)}
    before = state["w"].clone()
    frames = wire(state, chunk_bytes=256)
    with pytest.raises(WireError, match=r"the tensor stream ended before its trailer"):
        received(frames[: len(frames) // 2], state)
    with pytest.raises(WireError, match=r"tensor 'w' truncated: 2048 of 4000 bytes"):
        received([*frames[:8], frames[-1]], state)
    assert torch.equal(state["w"], before)


def test_each_chunk_is_wrapped_before_its_bytes_are_written_into_the_wrapper() -> None:
    state = {"w": torch.arange(64, dtype=torch.int32)}
    seen: list[bytes] = []

    def wrap(chunk: pb.TensorChunk) -> pb.GetBaseResponse:
        seen.append(chunk.data)
        return pb.GetBaseResponse(chunk=chunk)

    messages = list(send_state(state, wrap, lambda t: pb.GetBaseResponse(end=t), chunk_bytes=100))
    assert seen == [b"", b"", b""]  # headers only: the bytes were never copied twice
    data = b"".join(m.chunk.data for m in messages[:-1])
    assert data == bytes(tensor_bytes(state["w"]))
    assert messages[-1].end.sha256 == state_digest(state)


def test_a_wrapper_that_carries_no_chunk_is_refused() -> None:
    with pytest.raises(TypeError, match="does not carry the TensorChunk"):
        list(send_state({"w": torch.ones(2)}, lambda c: pb.GetBaseResponse(), lambda t: t))
