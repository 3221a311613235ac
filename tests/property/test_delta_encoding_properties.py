"""Hostile encoded tensors: whatever bytes a peer sends as an encoded delta tensor, a
:class:`StateAssembler` that accepts that encoding either refuses them with a short
:class:`WireError` or returns a tensor of the announced dtype and shape whose values are
all finite (an honest sender's encodings never decode to anything else)."""

from __future__ import annotations

import math

import torch
from hypothesis import given
from hypothesis import strategies as st

from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.training.consortium.tensors import StateHasher
from tapestry.wire.codec import encoding_to_proto
from tapestry.wire.delta_encoding import DeltaEncoding, encoded_nbytes
from tapestry.wire.tensor_stream import StateAssembler, TensorSpec, WireError

from .conftest import MAX_MESSAGE_CHARS

ENCODED = [e for e in DeltaEncoding if e is not DeltaEncoding.FLOAT32]
FLOATING = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16}


@given(
    encoding=st.sampled_from(ENCODED),
    dtype=st.sampled_from(sorted(FLOATING)),
    numel=st.integers(0, 600),
    seed=st.binary(min_size=0, max_size=4000),
    cut=st.integers(1, 700),
)
def test_any_bytes_as_an_encoded_tensor_decode_finite_or_are_refused(
    encoding: DeltaEncoding, dtype: str, numel: int, seed: bytes, cut: int
) -> None:
    size = encoded_nbytes(encoding, numel)
    data = (seed * (size // max(len(seed), 1) + 1))[:size] if seed else bytes(size)
    spec = {"w": TensorSpec(FLOATING[dtype], (numel,))}
    assembler = StateAssembler(spec, [encoding])
    hasher = StateHasher()
    hasher.tensor("w", dtype, [numel], size, encoding.value)
    hasher.data(data)
    trailer = pb.StateTrailer(tensor_count=1, total_bytes=size, sha256=hasher.hexdigest())
    try:
        for offset in range(0, max(size, 1), cut):
            assembler.add(
                pb.TensorChunk(
                    name="w",
                    dtype=dtype,
                    shape=[numel],
                    offset=offset,
                    data=data[offset : offset + cut],
                    total_bytes=size,
                    encoding=encoding_to_proto(encoding),
                )
            )
        state = assembler.finish(trailer)
    except WireError as refusal:
        assert len(str(refusal)) < MAX_MESSAGE_CHARS
        return
    tensor = state["w"]
    assert tensor.dtype == FLOATING[dtype] and tuple(tensor.shape) == (numel,)
    assert bool(torch.isfinite(tensor).all())
    assert math.prod(tensor.shape) == numel
