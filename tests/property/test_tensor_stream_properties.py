"""Hostile tensor streams: whatever arrives, a :class:`StateAssembler` returns exactly what a
correct sender sent, or refuses with a short :class:`WireError`; with an expected spec it
never allocates for a tensor the spec does not announce."""

from __future__ import annotations

import math
from collections.abc import Mapping

import pytest
import torch
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.training.consortium.tensors import DTYPES, state_digest, tensor_bytes
from tapestry.wire.tensor_stream import (
    StateAssembler,
    TensorSpec,
    WireError,
    receive_state,
    send_state,
    spec_of,
)

from .conftest import MAX_MESSAGE_CHARS, examples

UINT64 = st.integers(0, 2**64 - 1)
INT64 = st.integers(-(2**63), 2**63 - 1)
NAMES = st.text(min_size=0, max_size=12) | st.text(min_size=2000, max_size=3000)


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    """A small tensor of any supported dtype, from random bytes: 0-d, empty and
    non-contiguous ones included."""
    dtype = DTYPES[draw(st.sampled_from(sorted(DTYPES)))]
    shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
    nbytes = math.prod(shape) * element_size(dtype)
    data = bytearray(draw(st.binary(min_size=nbytes, max_size=nbytes)))
    if dtype is torch.bool:  # only 0 and 1 are bools; any other byte is not a bool value
        data = bytearray(b & 1 for b in data)
    flat = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
    tensor = flat.reshape(shape).clone()
    view = draw(st.sampled_from(["as is", "transposed", "strided"]))
    if view == "transposed" and tensor.dim() >= 2:
        tensor = tensor.transpose(0, 1)
    elif view == "strided" and tensor.dim() >= 1:
        tensor = tensor[::2]
    return tensor


STATES = st.dictionaries(st.text(min_size=1, max_size=8), tensors(), max_size=4)


def bits(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    return {k: (str(t.dtype), tuple(t.shape), bytes(tensor_bytes(t))) for k, t in state.items()}


def stream_of(state: Mapping[str, torch.Tensor], chunk_bytes: int) -> list[pb.GetBaseResponse]:
    return list(
        send_state(
            state,
            lambda c: pb.GetBaseResponse(chunk=c),
            lambda e: pb.GetBaseResponse(end=e),
            chunk_bytes=chunk_bytes,
        )
    )


class RecordingAssembler(StateAssembler):
    """Records every allocation the assembler asks for, by tensor name."""

    def __init__(self, expected: Mapping[str, TensorSpec] | None = None) -> None:
        super().__init__(expected)
        self.allocations: list[tuple[str, int]] = []

    def _begin(self, nbytes: int) -> None:
        assert self._name is not None
        self.allocations.append((self._name, nbytes))
        super()._begin(nbytes)


def assemble(
    messages: list[pb.GetBaseResponse], expected: Mapping[str, TensorSpec] | None
) -> tuple[Mapping[str, torch.Tensor] | WireError, RecordingAssembler]:
    """What the receiver makes of ``messages``: a state, or the WireError it raised. Any
    other exception escapes, and fails the property."""
    assembler = RecordingAssembler(expected)
    try:
        return receive_state(iter(messages), "chunk", "end", assembler), assembler
    except WireError as error:
        return error, assembler


def check_outcome(
    outcome: Mapping[str, torch.Tensor] | WireError,
    assembler: RecordingAssembler,
    sent: Mapping[str, torch.Tensor],
    expected: Mapping[str, TensorSpec] | None,
) -> None:
    if isinstance(outcome, WireError):
        assert len(str(outcome)) <= MAX_MESSAGE_CHARS, str(outcome)[:200]
    else:
        assert bits(outcome) == bits(sent)
        assert assembler.digest == state_digest(sent)
    if expected is not None:  # never more than the spec announces, and only for its keys
        for name, nbytes in assembler.allocations:
            spec = expected[name]
            assert nbytes == math.prod(spec.shape) * element_size(spec.dtype)


@given(state=STATES, chunk_bytes=st.integers(1, 64))
def test_a_state_survives_the_round_trip_bit_for_bit(
    state: dict[str, torch.Tensor], chunk_bytes: int
) -> None:
    for expected in (None, spec_of(state)):
        received, assembler = assemble(stream_of(state, chunk_bytes), expected)
        assert not isinstance(received, WireError), received
        assert bits(received) == bits(state)
        assert assembler.digest == state_digest(state)


# A chunk with any field replaced: supported and unsupported dtypes, negative and huge
# dimensions, any offset, size, name or data.
CHUNK_FIELDS = st.one_of(
    st.tuples(st.just("name"), NAMES),
    st.tuples(st.just("dtype"), st.sampled_from(sorted(DTYPES)) | st.text(max_size=2000)),
    st.tuples(
        st.just("shape"),
        st.lists(st.integers(-3, 5) | INT64, max_size=6)
        | st.lists(st.integers(0, 1), min_size=2000, max_size=3000),
    ),
    st.tuples(st.just("offset"), st.integers(0, 70) | UINT64),
    st.tuples(st.just("total_bytes"), st.integers(0, 70) | UINT64),
    st.tuples(st.just("data"), st.binary(max_size=80)),
)
TRAILER_FIELDS = st.one_of(
    st.tuples(st.just("tensor_count"), st.integers(0, 6) | st.integers(0, 2**32 - 1)),
    st.tuples(st.just("total_bytes"), st.integers(0, 300) | UINT64),
    st.tuples(st.just("sha256"), st.text(max_size=3000)),
)


@st.composite
def mutations(draw: st.DrawFn, messages: list[pb.GetBaseResponse]) -> list[pb.GetBaseResponse]:
    """``messages`` after a few hostile edits: dropped, duplicated, reordered or truncated
    messages, and chunks or trailers with wrong fields."""
    out = [type(m).FromString(m.SerializeToString()) for m in messages]
    for _ in range(draw(st.integers(1, 3))):
        if not out:
            break
        i = draw(st.integers(0, len(out) - 1))
        j = draw(st.integers(0, len(out) - 1))
        edit = draw(st.sampled_from(["drop", "duplicate", "swap", "truncate"] + ["field"] * 4))
        if edit == "drop":
            del out[i]
        elif edit == "duplicate":
            out.insert(j, type(out[i]).FromString(out[i].SerializeToString()))
        elif edit == "swap":
            out[i], out[j] = out[j], out[i]
        elif edit == "truncate":
            out = out[:i]
        elif out[i].HasField("chunk"):
            field, value = draw(CHUNK_FIELDS)
            if field == "shape":
                out[i].chunk.ClearField("shape")
                out[i].chunk.shape.extend(value)
            else:
                setattr(out[i].chunk, field, value)
        else:
            field, value = draw(TRAILER_FIELDS)
            setattr(out[i].end, field, value)
    return out


@settings(max_examples=examples(500))
@given(data=st.data(), state=STATES, chunk_bytes=st.integers(1, 64))
def test_a_tampered_stream_is_refused_briefly_or_yields_what_was_sent(
    data: st.DataObject, state: dict[str, torch.Tensor], chunk_bytes: int
) -> None:
    messages = data.draw(mutations(stream_of(state, chunk_bytes)))
    for expected in (None, spec_of(state)):
        outcome, assembler = assemble(messages, expected)
        check_outcome(outcome, assembler, state, expected)


@settings(max_examples=examples(300))
@given(
    state=STATES,
    chunk_bytes=st.integers(1, 64),
    noise=st.lists(st.tuples(st.booleans(), st.binary(max_size=200)), max_size=8),
)
def test_random_bytes_as_chunks_and_trailers_are_refused_briefly(
    state: dict[str, torch.Tensor], chunk_bytes: int, noise: list[tuple[bool, bytes]]
) -> None:
    """Random bytes decoded as TensorChunk / StateTrailer (those protobuf can decode at
    all), appended to or replacing a correct stream."""
    messages = stream_of(state, chunk_bytes)[:-1]
    for is_chunk, raw in noise:
        try:
            if is_chunk:
                messages.append(pb.GetBaseResponse(chunk=pb.TensorChunk.FromString(raw)))
            else:
                messages.append(pb.GetBaseResponse(end=pb.StateTrailer.FromString(raw)))
        except DecodeError:
            continue
    for expected in (None, spec_of(state)):
        outcome, assembler = assemble(messages, expected)
        check_outcome(outcome, assembler, state, expected)


@pytest.mark.parametrize("expected", [None, {"w": TensorSpec(torch.float32, (2,))}])
def test_a_huge_announced_tensor_costs_nothing_before_its_bytes_arrive(
    expected: Mapping[str, TensorSpec] | None,
) -> None:
    """Regression: without an expected spec the assembler allocated ``total_bytes`` as soon
    as a peer announced it (2**43 bytes here), before a single byte arrived."""
    shape = [2**40]
    chunk = pb.TensorChunk(name="w", dtype="float64", shape=shape, total_bytes=2**43)
    assembler = RecordingAssembler(expected)
    if expected is not None:
        with pytest.raises(WireError, match="expected float32"):
            assembler.add(chunk)
        assert assembler.allocations == []
        return
    assembler.add(chunk)  # refused only when the stream stops short of its size
    with pytest.raises(WireError, match="truncated"):
        assembler.finish(pb.StateTrailer())


def test_a_refusal_does_not_echo_a_huge_shape() -> None:
    """Regression: a shape of thousands of dimensions was echoed whole in the refusal."""
    chunk = pb.TensorChunk(name="w", dtype="float32", shape=[-1] * 5000)
    with pytest.raises(WireError) as refused:
        StateAssembler().add(chunk)
    assert len(str(refused.value)) <= MAX_MESSAGE_CHARS
    assert "5000 dimensions" in str(refused.value)


def test_a_one_element_strided_tensor_is_sent() -> None:
    """Regression: ``t[::2]`` of two bf16 elements counts as contiguous but keeps stride 2,
    and reading its bytes failed with a RuntimeError before anything was sent."""
    state = {"w": torch.tensor([1.5, 2.5], dtype=torch.bfloat16)[::2]}
    received, _ = assemble(stream_of(state, 1), spec_of(state))
    assert not isinstance(received, WireError)
    assert bits(received) == bits(state)


def test_a_truncated_tensor_with_a_huge_name_is_refused_briefly() -> None:
    """Regression: the truncation refusal repr'd the peer's tensor name uncut."""
    assembler = StateAssembler()
    assembler.add(pb.TensorChunk(name="w" * 100_000, dtype="float32", shape=[2], total_bytes=8))
    with pytest.raises(WireError, match="truncated") as refused:
        assembler.finish(pb.StateTrailer())
    assert len(str(refused.value)) <= MAX_MESSAGE_CHARS
