"""Delta encodings (issue 8): every encoding round-trips multi-chunk tensors of every dtype
within its stated bound, chunks cut anywhere (inside a value, inside the int8 scales), in
memory and spilled; and every byte an honest sender never produces is refused, before any
allocation the shape does not imply."""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tapestry.config import ConfigError, ConsortiumConfig, DeltaEncodingName, build_config
from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.training.consortium.tensors import DTYPES, state_digest, tensor_bytes
from tapestry.wire.delta_encoding import (
    INT8_BLOCK,
    SLAB,
    DeltaEncoding,
    decode,
    encode,
    encoded_nbytes,
    error_bound,
)
from tapestry.wire.spill import SpillingAssembler
from tapestry.wire.tensor_stream import StateAssembler, WireError, send_state, spec_of

ENCODED = [e for e in DeltaEncoding if e is not DeltaEncoding.FLOAT32]
FLOATING = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
Stream = list[pb.TensorChunk | pb.StateTrailer]


def stream(state: Mapping[str, torch.Tensor], encoding: DeltaEncoding, chunk_bytes: int) -> Stream:
    return list(
        send_state(state, lambda c: c, lambda t: t, chunk_bytes=chunk_bytes, encoding=encoding)
    )


def assemble(
    messages: Stream,
    expected: Mapping[str, object] | None,
    encodings: Collection[DeltaEncoding],
    assembler: StateAssembler | None = None,
) -> Mapping[str, torch.Tensor]:
    assembler = assembler or StateAssembler(expected, encodings)  # type: ignore[arg-type]
    *chunks, trailer = messages
    for chunk in chunks:
        assert isinstance(chunk, pb.TensorChunk)
        assembler.add(chunk)
    assert isinstance(trailer, pb.StateTrailer)
    return assembler.finish(trailer)


def delta_like(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Values like a trained delta's: signed, magnitudes spread over several decades."""
    generator = torch.Generator().manual_seed(seed)
    numel = math.prod(shape)
    values = torch.randn(numel, generator=generator, dtype=torch.float64)
    decades = torch.logspace(-6, 0, numel, dtype=torch.float64)
    return (values * decades).to(dtype).reshape(shape)


def assert_within_bound(
    received: torch.Tensor, sent: torch.Tensor, encoding: DeltaEncoding
) -> None:
    assert received.dtype == sent.dtype and received.shape == sent.shape
    error = (received.double() - sent.double()).abs().reshape(-1)
    bound = error_bound(sent, encoding)
    worst = int((error - bound).argmax()) if error.numel() else 0
    assert bool((error <= bound).all()), (
        f"{encoding.value} {sent.dtype}: value {worst} off by {float(error[worst])!r}, "
        f"bound {float(bound[worst])!r}"
    )


# --- round trips within the bound ---------------------------------------------------------

# 1000 bytes: a 2-byte value, a 4-byte scale and the scales/values boundary all fall
# inside chunks of an odd size somewhere in these tensors.
CHUNK_SIZES = [7, 333, 1 << 20]


@pytest.mark.parametrize("chunk_bytes", CHUNK_SIZES)
@pytest.mark.parametrize("encoding", list(DeltaEncoding), ids=str)
def test_every_dtype_round_trips_within_the_encodings_bound(
    encoding: DeltaEncoding, chunk_bytes: int
) -> None:
    # 3 x 300 = 900 values: four int8 blocks, the last one partial.
    state = {
        f"{name}.weight": delta_like(dtype, (3, 300), seed=i)
        for i, (name, dtype) in enumerate(DTYPES.items())
        if dtype.is_floating_point
    }
    state["counts"] = torch.arange(12, dtype=torch.int64).reshape(3, 4)
    state["mask"] = torch.tensor([True, False, True])
    state["phase"] = torch.tensor([1 + 2j, -3j], dtype=torch.complex64)
    state["scalar"] = torch.tensor(0.3141)
    state["empty"] = torch.empty(0, 5)
    messages = stream(state, encoding, chunk_bytes)
    assert len(messages) > len(state) + 1 or chunk_bytes == 1 << 20  # tensors cut in pieces

    received = assemble(messages, spec_of(state), [encoding])

    assert sorted(received) == sorted(state)
    for name, sent in state.items():
        if sent.dtype.is_floating_point:
            assert_within_bound(received[name], sent, encoding)
        else:  # integers, bools, complex: always raw, exact
            assert bytes(tensor_bytes(received[name])) == bytes(tensor_bytes(sent))


@pytest.mark.parametrize("encoding", ENCODED, ids=str)
def test_the_bounds_are_what_the_module_states_and_not_vacuous(encoding: DeltaEncoding) -> None:
    sent = delta_like(torch.float32, (4096,))
    bound = error_bound(sent, encoding)
    received = decode(encode(sent, encoding) or b"", encoding, torch.float32, sent.numel())
    error = (received.double() - sent.double()).abs()
    if encoding is DeltaEncoding.INT8_BLOCK:
        absmax = sent.double().abs().reshape(-1, INT8_BLOCK).amax(1).repeat_interleave(INT8_BLOCK)
        # scale/2 = max|x|/254, plus float rounding well under 1 % of it
        assert bool((bound <= absmax / 254 * 1.01 + 2.0**-110).all())
    else:
        u = {DeltaEncoding.BFLOAT16: 2.0**-8, DeltaEncoding.FLOAT16: 2.0**-11}[encoding]
        assert bool((bound <= 1.01 * u * sent.double().abs() + 2.0**-25).all())
    # The error reaches most of the bound somewhere: a looser encoding would fail it.
    assert float((error / bound).max()) > 0.5


@pytest.mark.parametrize("encoding", ENCODED, ids=str)
def test_a_tensor_split_across_chunk_boundaries_decodes_as_in_one_piece(
    encoding: DeltaEncoding, tmp_path: Path
) -> None:
    sent = {"w": delta_like(torch.float32, (INT8_BLOCK * 3 + 17,))}
    whole = assemble(stream(sent, encoding, 1 << 20), spec_of(sent), [encoding])
    for chunk_bytes in (1, 3, 5, 1 + encoded_nbytes(encoding, sent["w"].numel()) // 2):
        pieces = stream(sent, encoding, chunk_bytes)
        assert len(pieces) - 1 == math.ceil(
            encoded_nbytes(encoding, sent["w"].numel()) / chunk_bytes
        )
        in_memory = assemble(pieces, spec_of(sent), [encoding])
        spilled = assemble(
            pieces,
            None,
            (),
            SpillingAssembler(tmp_path / f"{chunk_bytes}.delta", spec_of(sent), [encoding]),
        )
        assert torch.equal(in_memory["w"], whole["w"])
        assert torch.equal(spilled["w"], whole["w"])


@settings(max_examples=40, deadline=None, derandomize=True)  # a loaded CI machine is slow
@given(
    values=st.lists(
        st.floats(-1e4, 1e4, allow_nan=False, width=32) | st.just(0.0), min_size=1, max_size=700
    ),
    dtype=st.sampled_from(FLOATING),
    encoding=st.sampled_from(list(DeltaEncoding)),
    chunk_bytes=st.integers(1, 600),
)
def test_any_finite_tensor_round_trips_within_its_bound(
    values: list[float], dtype: torch.dtype, encoding: DeltaEncoding, chunk_bytes: int
) -> None:
    sent = {"t": torch.tensor(values, dtype=torch.float32).to(dtype)}
    received = assemble(stream(sent, encoding, chunk_bytes), spec_of(sent), [encoding])
    assert_within_bound(received["t"], sent["t"], encoding)


# --- what travels raw, and how many bytes the rest take ----------------------------------


def wire_encodings(messages: Stream) -> dict[str, int]:
    return {m.name: m.encoding for m in messages if isinstance(m, pb.TensorChunk)}


def test_float16_past_its_range_and_non_finite_tensors_travel_raw_and_exact() -> None:
    state = {
        "large": torch.tensor([1.0, 70000.0, -3.0]),  # 70000 would become inf in float16
        "nan": torch.tensor([1.0, float("nan")]),
        "small": torch.tensor([0.5, -0.25]),
    }
    messages = stream(state, DeltaEncoding.FLOAT16, 1 << 20)
    assert wire_encodings(messages) == {
        "large": pb.TENSOR_ENCODING_UNSPECIFIED,
        "nan": pb.TENSOR_ENCODING_UNSPECIFIED,
        "small": pb.TENSOR_ENCODING_FLOAT16,
    }
    received = assemble(messages, spec_of(state), [DeltaEncoding.FLOAT16])
    assert torch.equal(received["large"], state["large"])
    assert received["nan"].isnan().tolist() == [False, True]


def test_an_encoding_that_would_not_save_bytes_leaves_the_tensor_raw() -> None:
    state = {"half": torch.ones(8, dtype=torch.float16), "bf": torch.ones(8, dtype=torch.bfloat16)}
    assert set(wire_encodings(stream(state, DeltaEncoding.BFLOAT16, 64)).values()) == {0}
    assert set(wire_encodings(stream(state, DeltaEncoding.INT8_BLOCK, 64)).values()) == {
        pb.TENSOR_ENCODING_INT8_BLOCK
    }


def wire_bytes(messages: Stream) -> int:
    return sum(len(m.data) for m in messages if isinstance(m, pb.TensorChunk))


def test_int8_blocks_take_over_3_5_times_fewer_bytes_than_float32() -> None:
    # The demo model's delta: tiny-causal, vocab 256, hidden 32.
    state = {
        "embedding.weight": delta_like(torch.float32, (256, 32)),
        "lm_head.weight": delta_like(torch.float32, (256, 32), seed=1),
        "lm_head.bias": delta_like(torch.float32, (256,), seed=2),
    }
    raw = wire_bytes(stream(state, DeltaEncoding.FLOAT32, 4096))
    assert raw == 4 * 16640
    assert wire_bytes(stream(state, DeltaEncoding.BFLOAT16, 4096)) * 2 == raw
    assert wire_bytes(stream(state, DeltaEncoding.FLOAT16, 4096)) * 2 == raw
    int8 = wire_bytes(stream(state, DeltaEncoding.INT8_BLOCK, 4096))
    assert int8 == 16640 + 4 * (16640 // INT8_BLOCK)
    assert raw / int8 >= 3.5


def test_the_digest_covers_the_encoding_and_a_raw_stream_keeps_the_states_digest() -> None:
    state = {"w": delta_like(torch.float32, (600,))}
    raw = stream(state, DeltaEncoding.FLOAT32, 1 << 20)
    assert raw[-1].sha256 == state_digest(state)  # type: ignore[union-attr]
    bf16 = stream(state, DeltaEncoding.BFLOAT16, 1 << 20)
    assert bf16[-1].sha256 != state_digest(state)  # type: ignore[union-attr]
    # The same bytes relabelled float16 (same size) decode to other values: the digest,
    # which hashes the encoding's name, refuses them.
    relabelled = [pb.TensorChunk(), pb.StateTrailer()]
    relabelled[0].CopyFrom(bf16[0])
    relabelled[0].encoding = pb.TENSOR_ENCODING_FLOAT16  # type: ignore[union-attr]
    relabelled[1].CopyFrom(bf16[1])
    with pytest.raises(WireError, match="state digest mismatch"):
        assemble(relabelled, spec_of(state), [DeltaEncoding.BFLOAT16, DeltaEncoding.FLOAT16])


# --- what a hostile sender cannot do -------------------------------------------------------


def one_chunk(
    data: bytes,
    encoding: int = pb.TENSOR_ENCODING_INT8_BLOCK,
    dtype: str = "float32",
    shape: tuple[int, ...] = (300,),
    total_bytes: int | None = None,
) -> pb.TensorChunk:
    return pb.TensorChunk(
        name="w",
        dtype=dtype,
        shape=list(shape),
        offset=0,
        data=data,
        total_bytes=len(data) if total_bytes is None else total_bytes,
        encoding=encoding,  # type: ignore[arg-type]
    )


def refusal(chunk: pb.TensorChunk, encodings: Collection[DeltaEncoding] = ENCODED) -> str:
    assembler = StateAssembler(None, encodings)
    with pytest.raises(WireError) as caught:
        assembler.add(chunk)
        assembler.finish(pb.StateTrailer(tensor_count=1, total_bytes=chunk.total_bytes))
    return str(caught.value)


def int8_bytes(scales: list[float], values: list[int]) -> bytes:
    return (
        torch.tensor(scales, dtype=torch.float32).numpy().tobytes()
        + torch.tensor(values, dtype=torch.int8).numpy().tobytes()
    )


HOSTILE: dict[str, tuple[pb.TensorChunk, str]] = {
    "a size the shape does not imply": (
        one_chunk(b"", total_bytes=1 << 40),
        "tensor 'w': total_bytes 1099511627776 does not match 'float32' (300,) in int8_block "
        "(308 bytes)",
    ),
    "the raw size announced for an encoded tensor": (
        one_chunk(b"", total_bytes=1200),
        "tensor 'w': total_bytes 1200 does not match 'float32' (300,) in int8_block (308 bytes)",
    ),
    "a huge shape": (
        one_chunk(b"", shape=(1 << 40, 1 << 20), total_bytes=5),
        "tensor 'w': total_bytes 5 does not match 'float32' (1099511627776, 1048576) in "
        "int8_block (1170935903116328960 bytes)",
    ),
    "an encoding this release does not know": (
        one_chunk(b"", encoding=9),
        "tensor 'w': encoding must be one of TENSOR_ENCODING_UNSPECIFIED, "
        "TENSOR_ENCODING_BFLOAT16, TENSOR_ENCODING_FLOAT16, TENSOR_ENCODING_INT8_BLOCK; got "
        "enum number 9",
    ),
    "an encoded integer tensor": (
        one_chunk(b"", dtype="int64", total_bytes=308),
        "encoding 'int8_block' does not carry torch.int64 tensors",
    ),
    "a float16 tensor in bfloat16 (no smaller)": (
        one_chunk(b"", encoding=pb.TENSOR_ENCODING_BFLOAT16, dtype="float16", total_bytes=600),
        "encoding 'bfloat16' does not carry torch.float16 tensors",
    ),
    "an infinite scale": (
        one_chunk(int8_bytes([1.0, float("inf")], [1] * 300)),
        "int8 block 1 has scale inf: a scale must be finite, >= 0 and at most 2.67939e+36 "
        "(max of torch.float32 / 127)",
    ),
    "a NaN scale": (
        one_chunk(int8_bytes([float("nan"), 1.0], [1] * 300)),
        "int8 block 0 has scale nan: a scale must be finite, >= 0 and at most 2.67939e+36 "
        "(max of torch.float32 / 127)",
    ),
    "a negative scale": (
        one_chunk(int8_bytes([-1.0, 1.0], [1] * 300)),
        "int8 block 0 has scale -1.0: a scale must be finite, >= 0 and at most 2.67939e+36 "
        "(max of torch.float32 / 127)",
    ),
    "a scale whose values would overflow float16": (
        one_chunk(int8_bytes([600.0, 1.0], [1] * 300), dtype="float16"),
        "int8 block 0 has scale 600.0: a scale must be finite, >= 0 and at most 515.78 "
        "(max of torch.float16 / 127)",
    ),
    "a float64 tensor's scale is float32: bounded by float32's range": (
        one_chunk(int8_bytes([1.0, float("inf")], [1] * 300), dtype="float64"),
        "int8 block 1 has scale inf: a scale must be finite, >= 0 and at most 2.67939e+36 "
        "(max of torch.float32 / 127)",
    ),
    "an int8 value of -128": (
        one_chunk(int8_bytes([1.0, 1.0], [-128] + [0] * 299)),
        "an int8 value of -128, outside [-127, 127]",
    ),
    "an infinite float16 value": (
        one_chunk(
            torch.tensor([float("inf")] * 300, dtype=torch.float16)
            .view(torch.int16)
            .numpy()
            .tobytes(),
            encoding=pb.TENSOR_ENCODING_FLOAT16,
        ),
        "a non-finite value in a float16 tensor (an honest sender sends a tensor with "
        "non-finite values raw)",
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_bytes_no_honest_sender_produces_are_refused(case: str) -> None:
    chunk, message = HOSTILE[case]
    assert refusal(chunk) == message


def test_an_encoding_the_receiver_did_not_ask_for_is_refused() -> None:
    chunk = one_chunk(int8_bytes([1.0, 1.0], [1] * 300))
    assert refusal(chunk, encodings=[DeltaEncoding.BFLOAT16]) == (
        "tensor 'w' arrived in encoding 'int8_block'; this stream accepts raw tensors and "
        "these encodings only: bfloat16"
    )
    # A base stream (and any stream not told otherwise) accepts raw tensors only.
    assert refusal(chunk, encodings=()) == (
        "tensor 'w' arrived in encoding 'int8_block'; this stream accepts raw tensors and "
        "these encodings only: none"
    )


def test_an_encoding_that_changes_inside_a_tensor_is_refused() -> None:
    pieces = stream({"w": delta_like(torch.float32, (300,))}, DeltaEncoding.INT8_BLOCK, 100)
    second = pieces[1]
    assert isinstance(second, pb.TensorChunk)
    second.encoding = pb.TENSOR_ENCODING_UNSPECIFIED
    with pytest.raises(WireError, match="chunk encoding 0 differs from the encoding 3"):
        assemble(pieces, None, ENCODED)


def test_a_truncated_encoded_tensor_is_refused() -> None:
    pieces = stream({"w": delta_like(torch.float32, (300,))}, DeltaEncoding.FLOAT16, 100)
    with pytest.raises(WireError, match="tensor 'w' truncated: 500 of 600 bytes"):
        assemble([*pieces[:5], pieces[-1]], None, ENCODED)


# --- the setting ---------------------------------------------------------------------------


def test_the_consortium_file_names_exactly_the_encodings_the_wire_knows() -> None:
    assert list(DeltaEncodingName.__args__) == [e.value for e in DeltaEncoding]  # type: ignore[attr-defined]


def consortium(**settings: object) -> ConsortiumConfig:
    nodes = [
        {"node_id": n, "jurisdiction": n, "address": f"127.0.0.1:{5000 + i}"}
        for i, n in enumerate("ab")
    ]
    return build_config(
        ConsortiumConfig, {"consortium_id": "c", "nodes": nodes, **settings}, "test.toml"
    )


def test_float32_is_the_default_and_an_unknown_encoding_is_a_config_error() -> None:
    assert consortium().delta_encoding == "float32"
    assert consortium(delta_encoding="int8_block").delta_encoding == "int8_block"
    with pytest.raises(ConfigError) as caught:
        consortium(delta_encoding="int4")
    assert str(caught.value) == (
        "test.toml: delta_encoding: Input should be 'float32', 'bfloat16', 'float16' or "
        "'int8_block'"
    )


@pytest.mark.parametrize("encoding", ENCODED, ids=str)
def test_a_tensor_longer_than_a_slab_is_encoded_slab_by_slab_within_the_bound(
    encoding: DeltaEncoding,
) -> None:
    sent = {"w": delta_like(torch.float32, (SLAB + INT8_BLOCK + 5,))}
    messages = stream(sent, encoding, 1 << 20)
    assert set(wire_encodings(messages).values()) != {pb.TENSOR_ENCODING_UNSPECIFIED}
    received = assemble(messages, spec_of(sent), [encoding])
    assert_within_bound(received["w"], sent["w"], encoding)


def test_a_value_past_float16s_range_in_a_later_slab_still_sends_the_tensor_raw() -> None:
    sent = {"w": torch.zeros(SLAB + 10)}
    sent["w"][SLAB + 3] = 1e6
    messages = stream(sent, DeltaEncoding.FLOAT16, 1 << 20)
    assert set(wire_encodings(messages).values()) == {pb.TENSOR_ENCODING_UNSPECIFIED}
    assert torch.equal(assemble(messages, spec_of(sent), [DeltaEncoding.FLOAT16])["w"], sent["w"])
