"""Tensor streams: states cut into chunks and reassembled bit for bit, or refused with a
message that says what was wrong."""

from __future__ import annotations

import math
from collections.abc import Mapping

import pytest
import torch

from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.training.consortium.tensors import (
    DTYPES,
    clone_state,
    dtype_name,
    state_digest,
    state_nbytes,
    tensor_bytes,
)
from tapestry.wire.tensor_stream import (
    DEFAULT_CHUNK_BYTES,
    StateAssembler,
    TensorSpec,
    WireError,
    spec_of,
    state_to_chunks,
)

from .conftest import trailer_of

GRPC_DEFAULT_MAX_MESSAGE = 4 * 1024 * 1024


def roundtrip(
    state: Mapping[str, torch.Tensor],
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    expected: Mapping[str, TensorSpec] | None = None,
) -> dict[str, torch.Tensor]:
    assembler = StateAssembler(expected)
    for chunk in state_to_chunks(state, chunk_bytes):
        assembler.add(chunk)
    return assembler.finish(trailer_of(state))


def assert_bit_equal(received: torch.Tensor, sent: torch.Tensor) -> None:
    assert received.dtype == sent.dtype
    assert received.shape == sent.shape
    assert bytes(tensor_bytes(received)) == bytes(tensor_bytes(sent))


def assert_states_bit_equal(
    received: Mapping[str, torch.Tensor], sent: Mapping[str, torch.Tensor]
) -> None:
    assert sorted(received) == sorted(sent)
    for name in sent:
        assert_bit_equal(received[name], sent[name])


def sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Values that use every byte of the element (not just zeros and small integers)."""
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    if dtype.is_complex:
        return torch.randn(shape, generator=gen, dtype=dtype) * 1e3
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * 1e3).to(dtype)
    info = torch.iinfo(dtype)
    values = torch.randint(info.min, info.max, shape, generator=gen, dtype=torch.int64)
    values.view(-1)[:2] = torch.tensor([info.min, info.max])[: values.numel()]
    return values.to(dtype)


def one_chunk(name: str, tensor: torch.Tensor) -> pb.TensorChunk:
    (chunk,) = state_to_chunks({name: tensor}, max(1, tensor.numel() * tensor.element_size()))
    return chunk


# ---------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------


# every dtype a model state commonly holds; complex128 may be left out (safetensors cannot
# store it, and what crosses the wire must be storable: see tests/unit/test_storage.py)
COMMON_DTYPES = [
    "float32", "float16", "bfloat16", "float64",
    "int64", "int32", "int16", "int8", "uint8", "bool",
    "complex64",
]  # fmt: skip


def test_supported_dtypes() -> None:
    assert set(COMMON_DTYPES) <= set(DTYPES) <= {*COMMON_DTYPES, "complex128"}
    for name, dtype in DTYPES.items():
        assert dtype == getattr(torch, name)
        assert dtype_name(dtype) == name


@pytest.mark.parametrize("name", sorted(DTYPES))
def test_every_dtype_round_trips_bit_exact(name: str) -> None:
    dtype = DTYPES[name]
    state = {"weight": sample(dtype, (5, 7)), "bias": sample(dtype, (7,), seed=1)}

    # 3 bytes per chunk: element boundaries fall inside chunks for every multi-byte dtype
    for chunk_bytes in (3, DEFAULT_CHUNK_BYTES):
        received = roundtrip(state, chunk_bytes)
        assert_states_bit_equal(received, state)
        for key in state:
            assert torch.equal(received[key], state[key])
        assert state_digest(received) == state_digest(state) == trailer_of(state).sha256

    # the bytes are the plain row-major little-endian storage, as numpy sees it
    weight = state["weight"]
    as_numpy = weight.view(torch.int16) if dtype == torch.bfloat16 else weight
    assert bytes(tensor_bytes(weight)) == as_numpy.numpy().tobytes()


@pytest.mark.parametrize("name", sorted(DTYPES))
def test_zero_dim_and_empty_tensors_round_trip(name: str) -> None:
    dtype = DTYPES[name]
    state = {
        "scalar": sample(dtype, ()),
        "empty": torch.empty((0,), dtype=dtype),
        "empty_rows": torch.empty((3, 0), dtype=dtype),
    }
    chunks = list(state_to_chunks(state))

    # an empty tensor still travels, as one empty chunk that carries its shape
    empty = [c for c in chunks if c.name.startswith("empty")]
    assert [(c.name, list(c.shape), c.data, c.total_bytes) for c in empty] == [
        ("empty", [0], b"", 0),
        ("empty_rows", [3, 0], b"", 0),
    ]
    (scalar,) = [c for c in chunks if c.name == "scalar"]
    assert list(scalar.shape) == []

    received = roundtrip(state)
    assert_states_bit_equal(received, state)
    assert received["scalar"].shape == torch.Size([])
    assert received["empty_rows"].shape == torch.Size([3, 0])
    assert state_digest(received) == state_digest(state)


def _non_contiguous() -> dict[str, torch.Tensor]:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    complex_base = torch.randn(
        3, 4, dtype=torch.complex64, generator=torch.Generator().manual_seed(3)
    )
    return {
        "transposed": base.t(),
        "strided_slice": base[::2, 1::3],
        "expanded": torch.arange(3, dtype=torch.int64).expand(4, 3),
        "column": base[:, 2],
        "permuted": torch.arange(60, dtype=torch.int16).reshape(3, 4, 5).permute(2, 0, 1),
        "complex_transposed": complex_base.t(),
        # lazy views torch resolves only when the values are read
        "conjugate_view": complex_base.conj(),
        "negative_view": complex_base.conj().imag,
    }


@pytest.mark.parametrize("name", sorted(_non_contiguous()))
def test_non_contiguous_tensors_round_trip_as_their_values(name: str) -> None:
    view = _non_contiguous()[name]
    dense = view.resolve_conj().resolve_neg().contiguous()

    received = roundtrip({name: view}, chunk_bytes=5)

    assert received[name].dtype == view.dtype
    assert received[name].shape == view.shape
    assert torch.equal(received[name], dense)
    assert bytes(tensor_bytes(view)) == bytes(tensor_bytes(dense))
    assert state_digest({name: view}) == state_digest({name: dense})


def test_special_float_values_are_preserved_bitwise() -> None:
    # per format: quiet NaN with payload, signalling NaN, -0.0, +inf, -inf, negative NaN
    # with payload; as unsigned bit patterns
    patterns = {
        "f64": (
            torch.float64,
            torch.int64,
            64,
            [
                0x7FF8000000000ABC,
                0x7FF0000000000001,
                0x8000000000000000,
                0x7FF0000000000000,
                0xFFF0000000000000,
                0xFFF8000000000FFF,
            ],
        ),
        "f32": (
            torch.float32,
            torch.int32,
            32,
            [
                0x7FC00001,
                0x7F800001,
                0x80000000,
                0x7F800000,
                0xFF800000,
                0xFFC12345,
            ],
        ),
        "f16": (torch.float16, torch.int16, 16, [0x7E01, 0x7C01, 0x8000, 0x7C00, 0xFC00, 0xFE01]),
        "bf16": (torch.bfloat16, torch.int16, 16, [0x7FC1, 0x7F81, 0x8000, 0x7F80, 0xFF80, 0xFFC1]),
    }
    signed = {
        key: [b - (1 << width) if b >> (width - 1) else b for b in bits]
        for key, (_, _, width, bits) in patterns.items()
    }
    state = {
        key: torch.tensor(signed[key], dtype=int_dtype).view(float_dtype)
        for key, (float_dtype, int_dtype, _, _) in patterns.items()
    }
    state["c64"] = torch.stack([state["f32"], state["f32"].flip(0)], dim=-1).view(torch.complex64)
    assert state["f32"].isnan().tolist() == [True, True, False, False, False, True]
    assert state["f32"][2] == 0 and torch.signbit(state["f32"][2])
    assert state["f32"][3] == math.inf and state["f32"][4] == -math.inf

    received = roundtrip(state, chunk_bytes=3)

    assert_states_bit_equal(received, state)
    for key, (_, int_dtype, _, _) in patterns.items():
        assert received[key].view(int_dtype).tolist() == signed[key]
    assert bytes(tensor_bytes(received["c64"])) == bytes(tensor_bytes(state["c64"]))
    assert state_digest(received) == state_digest(state)


def test_digest_distinguishes_every_bit_of_name_dtype_shape_and_value() -> None:
    zero = torch.zeros(4)
    state = {"w": zero}
    digest = state_digest(state)

    assert state_digest({"w": zero.clone()}) == digest
    variants = [
        {"w": torch.tensor([-0.0, 0.0, 0.0, 0.0])},  # == as numbers, not as bits
        {"v": zero},
        {"w": zero.reshape(2, 2)},
        {"w": zero.view(torch.int32)},  # same bytes, other dtype
        {"w": zero, "b": torch.empty(0)},  # an empty tensor still counts
    ]
    digests = {state_digest(v) for v in variants}
    assert digest not in digests
    assert len(digests) == len(variants)

    # the order keys were inserted in does not matter
    a, b = torch.ones(2), torch.zeros(3)
    assert state_digest({"a": a, "b": b}) == state_digest({"b": b, "a": a})


def test_chunks_follow_sorted_keys_with_increasing_offsets_and_bounded_data() -> None:
    state = {
        "lm_head.weight": sample(torch.float32, (5, 3)),
        "embedding.weight": sample(torch.float64, (4, 4)),
        "bias": sample(torch.int8, (9,)),
        "step": torch.tensor(17, dtype=torch.int64),
    }
    chunk_bytes = 16
    chunks = list(state_to_chunks(state, chunk_bytes))

    names = [c.name for c in chunks]
    assert sorted(set(names)) == sorted(state)
    # each tensor's chunks are consecutive, and tensors come in sorted key order
    assert [n for i, n in enumerate(names) if i == 0 or names[i - 1] != n] == sorted(state)
    for name, tensor in state.items():
        mine = [c for c in chunks if c.name == name]
        total = tensor.numel() * tensor.element_size()
        assert [c.offset for c in mine] == list(range(0, total, chunk_bytes))
        assert all(0 < len(c.data) <= chunk_bytes for c in mine)
        assert all(c.total_bytes == total for c in mine)
        assert all(c.dtype == dtype_name(tensor.dtype) for c in mine)
        assert all(list(c.shape) == list(tensor.shape) for c in mine)
        assert b"".join(c.data for c in mine) == bytes(tensor_bytes(tensor))
    assert len([c for c in chunks if c.name == "lm_head.weight"]) == math.ceil(60 / 16)


def test_state_larger_than_grpc_limit_travels_in_small_messages() -> None:
    big = torch.randn(3_000_000, generator=torch.Generator().manual_seed(11))
    state = {"big": big, "small": torch.arange(10, dtype=torch.int32)}
    assert state_nbytes(state) > GRPC_DEFAULT_MAX_MESSAGE

    chunks = list(state_to_chunks(state))

    assert len(chunks) == math.ceil(12_000_000 / DEFAULT_CHUNK_BYTES) + 1
    assert all(len(c.data) <= DEFAULT_CHUNK_BYTES for c in chunks)
    assert max(c.ByteSize() for c in chunks) < DEFAULT_CHUNK_BYTES + 1024
    assert max(c.ByteSize() for c in chunks) < GRPC_DEFAULT_MAX_MESSAGE // 2
    assert trailer_of(state).ByteSize() < 1024
    # messages survive serialization, as they would on the wire
    assembler = StateAssembler(spec_of(state))
    for chunk in chunks:
        assembler.add(pb.TensorChunk.FromString(chunk.SerializeToString()))
    received = assembler.finish(pb.StateTrailer.FromString(trailer_of(state).SerializeToString()))
    assert_states_bit_equal(received, state)
    assert torch.equal(received["big"], big)


def test_trailer_describes_the_state() -> None:
    state = {"a": torch.ones(3), "b": torch.zeros(2, 2, dtype=torch.float64), "e": torch.empty(0)}
    trailer = trailer_of(state)
    assert (trailer.tensor_count, trailer.total_bytes, trailer.sha256) == (
        3,
        12 + 32,
        state_digest(state),
    )
    assert state_nbytes(state) == 44


def test_empty_state_round_trips() -> None:
    assert list(state_to_chunks({})) == []
    assert roundtrip({}) == {}
    assert roundtrip({}, expected={}) == {}


def test_expected_spec_accepts_the_matching_state() -> None:
    state = {"w": sample(torch.bfloat16, (3, 2)), "n": torch.tensor(5)}
    assert spec_of(state) == {
        "w": TensorSpec(torch.bfloat16, (3, 2)),
        "n": TensorSpec(torch.int64, ()),
    }
    assert_states_bit_equal(roundtrip(state, 4, expected=spec_of(state)), state)


def test_received_tensors_are_independent_of_each_other_and_of_the_sender() -> None:
    state = {"a": torch.ones(4), "b": torch.ones(4)}
    received = roundtrip(state)
    received["a"].add_(1)
    assert torch.equal(received["b"], torch.ones(4))
    assert torch.equal(state["a"], torch.ones(4))


def test_clone_state_gives_independent_copies() -> None:
    shared = torch.arange(6.0)
    state = {"wte.weight": shared, "lm_head.weight": shared, "t": shared.reshape(2, 3).t()}
    clone = clone_state(state)

    assert_states_bit_equal(clone, state)
    storages = {t.untyped_storage().data_ptr() for t in clone.values()}
    assert len(storages) == 3
    assert shared.untyped_storage().data_ptr() not in storages
    clone["wte.weight"].add_(1)
    assert torch.equal(clone["lm_head.weight"], torch.arange(6.0))
    assert torch.equal(shared, torch.arange(6.0))


# ---------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_bytes", [0, -1])
def test_chunk_size_below_one_is_refused(chunk_bytes: int) -> None:
    with pytest.raises(ValueError, match=f"chunk_bytes must be >= 1, got {chunk_bytes}"):
        next(state_to_chunks({"a": torch.ones(1)}, chunk_bytes))


def test_dtype_outside_the_supported_set_is_refused() -> None:
    assert hasattr(torch, "float8_e4m3fn")
    with pytest.raises(
        ValueError, match="unsupported tensor dtype torch.float8_e4m3fn; supported: "
    ):
        dtype_name(torch.float8_e4m3fn)
    assert hasattr(torch, "uint16")
    with pytest.raises(
        ValueError, match=r"unsupported tensor dtype torch.uint16; supported: \['bfloat16'"
    ):
        dtype_name(torch.uint16)
    with pytest.raises(ValueError, match="unsupported tensor dtype torch.float8_e4m3fn"):
        next(state_to_chunks({"w": torch.zeros(2, dtype=torch.float8_e4m3fn)}))


def chunk(
    name: str = "w",
    dtype: str = "float32",
    shape: tuple[int, ...] = (3,),
    offset: int = 0,
    data: bytes = b"",
    total_bytes: int | None = None,
) -> pb.TensorChunk:
    if total_bytes is None:
        total_bytes = math.prod(shape) * DTYPES[dtype].itemsize if dtype in DTYPES else 0
    return pb.TensorChunk(
        name=name,
        dtype=dtype,
        shape=list(shape),
        offset=offset,
        data=data,
        total_bytes=total_bytes,
    )


def test_unknown_dtype_string_is_refused() -> None:
    with pytest.raises(WireError, match=r"tensor 'w': unsupported dtype 'float8'; supported: \["):
        StateAssembler().add(chunk(dtype="float8", total_bytes=3))
    with pytest.raises(WireError, match="unsupported dtype 'torch.float32'"):
        StateAssembler().add(chunk(dtype="torch.float32", total_bytes=12))


def test_negative_dimension_is_refused() -> None:
    with pytest.raises(WireError, match=r"tensor 'w': negative dimension in shape \(2, -3\)"):
        StateAssembler().add(chunk(shape=(2, -3), total_bytes=0))


def test_chunk_without_a_name_is_refused() -> None:
    with pytest.raises(WireError, match="tensor chunk without a name"):
        StateAssembler().add(chunk(name=""))


@pytest.mark.parametrize("total_bytes", [0, 8, 13, 24])
def test_total_bytes_must_match_dtype_and_shape(total_bytes: int) -> None:
    with pytest.raises(
        WireError,
        match=rf"tensor 'w': total_bytes {total_bytes} does not match 'float32' \(3,\) \(12 bytes\)",
    ):
        StateAssembler().add(chunk(total_bytes=total_bytes))


def pieces(tensor: torch.Tensor, size: int) -> list[pb.TensorChunk]:
    return list(state_to_chunks({"w": tensor}, size))


W = torch.arange(3, dtype=torch.float32)  # 12 bytes: chunks at 0, 4, 8 with size 4


@pytest.mark.parametrize(
    ("order", "at", "want"),
    [
        ([1], 4, 0),  # out of order: the second chunk first
        ([0, 2], 8, 4),  # gap
        ([0, 1, 1], 4, 8),  # overlap: a chunk repeated
        ([0, 0], 0, 4),
    ],
)
def test_chunks_must_arrive_in_order_without_gaps_or_overlaps(
    order: list[int], at: int, want: int
) -> None:
    sent = pieces(W, 4)
    assembler = StateAssembler()
    for index in order[:-1]:
        assembler.add(sent[index])
    with pytest.raises(
        WireError,
        match=rf"tensor 'w': chunk at byte {at}, expected byte {want} \(chunks must arrive in "
        r"order, without gaps or overlaps\)",
    ):
        assembler.add(sent[order[-1]])


def test_overlapping_chunk_with_a_shifted_offset_is_refused() -> None:
    assembler = StateAssembler()
    assembler.add(chunk(data=bytes(8)))
    with pytest.raises(WireError, match="tensor 'w': chunk at byte 6, expected byte 8"):
        assembler.add(chunk(offset=6, data=bytes(6)))


def test_more_bytes_than_the_tensor_holds_are_refused() -> None:
    with pytest.raises(WireError, match="tensor 'w': 16 bytes received, more than its 12 bytes"):
        StateAssembler().add(chunk(data=bytes(16)))
    assembler = StateAssembler()
    assembler.add(chunk(data=bytes(8)))
    with pytest.raises(WireError, match="tensor 'w': 13 bytes received, more than its 12 bytes"):
        assembler.add(chunk(offset=8, data=bytes(5)))


def test_chunk_that_changes_dtype_or_shape_mid_tensor_is_refused() -> None:
    assembler = StateAssembler()
    assembler.add(chunk(data=bytes(4)))
    with pytest.raises(
        WireError,
        match=r"tensor 'w': chunk says 'int32' \(3,\) but the tensor began as float32 \(3,\)",
    ):
        assembler.add(chunk(dtype="int32", offset=4, data=bytes(4)))
    with pytest.raises(
        WireError,
        match=r"tensor 'w': chunk says 'float32' \(1, 3\) but the tensor began as float32 \(3,\)",
    ):
        assembler.add(chunk(shape=(1, 3), offset=4, data=bytes(4)))


def test_tensor_truncated_when_the_next_one_starts() -> None:
    assembler = StateAssembler()
    assembler.add(pieces(W, 4)[0])
    with pytest.raises(WireError, match="tensor 'w' truncated: 4 of 12 bytes"):
        assembler.add(one_chunk("x", torch.ones(2)))


def test_tensor_truncated_at_finish() -> None:
    state = {"w": W}
    assembler = StateAssembler()
    for sent in pieces(W, 4)[:2]:
        assembler.add(sent)
    with pytest.raises(WireError, match="tensor 'w' truncated: 8 of 12 bytes"):
        assembler.finish(trailer_of(state))


def test_same_tensor_sent_twice_is_refused() -> None:
    assembler = StateAssembler()
    assembler.add(one_chunk("a", torch.ones(2)))
    assembler.add(one_chunk("b", torch.ones(2)))
    with pytest.raises(WireError, match="tensor 'a' sent twice"):
        assembler.add(one_chunk("a", torch.ones(2)))


def test_unexpected_key_is_refused_against_expected() -> None:
    expected = spec_of({"a": torch.ones(2), "b": torch.ones(3)})
    with pytest.raises(WireError, match=r"unexpected tensor 'x'; expected keys: \['a', 'b'\]"):
        StateAssembler(expected).add(one_chunk("x", torch.ones(2)))


def test_wrong_shape_or_dtype_is_refused_against_expected() -> None:
    expected = spec_of({"a": torch.ones(2, 3)})
    with pytest.raises(
        WireError, match=r"tensor 'a': expected float32 \(2, 3\), got 'float32' \(3, 2\)"
    ):
        StateAssembler(expected).add(one_chunk("a", torch.ones(3, 2)))
    with pytest.raises(
        WireError, match=r"tensor 'a': expected float32 \(2, 3\), got 'float64' \(2, 3\)"
    ):
        StateAssembler(expected).add(one_chunk("a", torch.ones(2, 3, dtype=torch.float64)))
    # refused from the header alone, before anything the size of the claim is allocated
    huge = chunk(name="a", shape=(1 << 40, 1 << 20), total_bytes=0)
    with pytest.raises(
        WireError, match=r"tensor 'a': expected float32 \(2, 3\), got 'float32' \(1099511627776, "
    ):
        StateAssembler(expected).add(huge)


def test_missing_tensors_at_finish_are_refused_against_expected() -> None:
    state = {"a": torch.ones(2), "b": torch.ones(3), "c": torch.ones(1)}
    assembler = StateAssembler(spec_of(state))
    assembler.add(one_chunk("b", state["b"]))
    with pytest.raises(WireError, match=r"stream ended without tensors \['a', 'c'\]"):
        assembler.finish(trailer_of(state))


def _assembled(state: Mapping[str, torch.Tensor]) -> StateAssembler:
    assembler = StateAssembler()
    for sent in state_to_chunks(state):
        assembler.add(sent)
    return assembler


def test_trailer_count_mismatch_is_refused() -> None:
    state = {"a": torch.ones(2), "b": torch.ones(1, dtype=torch.float64)}
    trailer = trailer_of(state)
    trailer.tensor_count = 3
    with pytest.raises(
        WireError, match="trailer announces 3 tensors / 16 bytes, stream carried 2 / 16"
    ):
        _assembled(state).finish(trailer)


def test_trailer_bytes_mismatch_is_refused() -> None:
    state = {"a": torch.ones(2), "b": torch.ones(1, dtype=torch.float64)}
    trailer = trailer_of(state)
    trailer.total_bytes = 24
    with pytest.raises(
        WireError, match="trailer announces 2 tensors / 24 bytes, stream carried 2 / 16"
    ):
        _assembled(state).finish(trailer)


def test_trailer_digest_mismatch_is_refused_when_one_byte_flips() -> None:
    state = {"a": sample(torch.float32, (64,)), "b": sample(torch.int64, (8,))}
    trailer = trailer_of(state)
    chunks = list(state_to_chunks(state, 32))
    tampered = bytearray(chunks[3].data)
    tampered[5] ^= 0x01
    chunks[3].data = bytes(tampered)

    assembler = StateAssembler(spec_of(state))
    for sent in chunks:
        assembler.add(sent)
    with pytest.raises(
        WireError,
        match=f"state digest mismatch: trailer '{trailer.sha256}', received [0-9a-f]{{64}}",
    ):
        assembler.finish(trailer)


def test_chunk_after_finish_is_refused() -> None:
    state = {"a": torch.ones(2)}
    assembler = _assembled(state)
    assembler.finish(trailer_of(state))
    with pytest.raises(WireError, match="tensor 'z' arrived after the stream's trailer"):
        assembler.add(one_chunk("z", torch.ones(2)))


def test_wire_error_is_a_value_error() -> None:
    assert issubclass(WireError, ValueError)


def test_tensors_out_of_sorted_order_are_refused() -> None:
    state = {"a": torch.zeros(2), "b": torch.ones(2)}
    chunks = list(state_to_chunks(state))
    assembler = StateAssembler()
    assembler.add(chunks[1])
    with pytest.raises(
        WireError, match="tensor 'a' arrived after 'b': tensors must be sent in sorted key order"
    ):
        assembler.add(chunks[0])


@pytest.mark.parametrize("encoding", ["float32", "bfloat16", "float16", "int8_block"])
def test_the_digest_announced_before_a_stream_is_the_one_its_trailer_carries(encoding) -> None:
    """A node hashes its delta before its header (``stream_digest``), then streams it with
    the digest given: the trailer must carry what a receiver hashes of the bytes."""
    from tapestry.wire.delta_encoding import DeltaEncoding
    from tapestry.wire.tensor_stream import send_state, stream_digest

    state = {
        "w": torch.linspace(-3, 3, 5000).reshape(50, 100),
        "b": torch.arange(7, dtype=torch.int64),
    }
    chosen = DeltaEncoding(encoding)
    streamed = list(send_state(state, lambda c: c, lambda t: t, chunk_bytes=4096, encoding=chosen))
    assert stream_digest(state, chosen) == streamed[-1].sha256
    if chosen is DeltaEncoding.FLOAT32:
        assert stream_digest(state, chosen) == state_digest(state)
