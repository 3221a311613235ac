"""Spilled deltas: the same checks and the same bits as in memory, one tensor at a time."""

from __future__ import annotations

import pytest
import torch

from tapestry.training.consortium import integrate, state_digest
from tapestry.training.consortium.tensors import tensor_blocks
from tapestry.wire.spill import SPILL_ALIGN, SpilledState, SpillingAssembler
from tapestry.wire.tensor_stream import (
    StateAssembler,
    WireError,
    spec_of,
    state_to_chunks,
)

from .conftest import trailer_of


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(300, 7, generator=g),
        "b.bias": torch.randn(5, generator=g).to(torch.bfloat16),
        "c.empty": torch.empty(0, 3),
        "d.count": torch.tensor(7, dtype=torch.int64),
    }


def _spill(tmp_path, state, chunk_bytes=1000) -> SpilledState:
    assembler = SpillingAssembler(tmp_path / "spill" / "vn.delta", spec_of(state))
    for chunk in state_to_chunks(state, chunk_bytes):
        assembler.add(chunk)
    return assembler.finish(trailer_of(state))


def test_a_spilled_state_reads_back_bit_for_bit(tmp_path):
    state = _state()
    spilled = _spill(tmp_path, state)
    assert isinstance(spilled, SpilledState)
    assert list(spilled) == sorted(state)
    assert len(spilled) == len(state)
    for name, tensor in state.items():
        assert spilled[name].dtype == tensor.dtype and spilled[name].shape == tensor.shape
        assert torch.equal(spilled[name], tensor)
    assert state_digest(spilled) == state_digest(state)
    held = sum(t.numel() * t.element_size() for t in state.values())
    assert held <= spilled.path.stat().st_size < held + SPILL_ALIGN * len(state)  # + alignment


def test_a_spilled_tensor_is_writable_without_touching_the_file_and_a_cut_file_is_refused(
    tmp_path,
):
    state = _state()
    spilled = _spill(tmp_path, state)
    on_disk = spilled.path.read_bytes()
    spilled["a.weight"].add_(1.0)  # a private map: the file keeps the delta as received
    assert spilled.path.read_bytes() == on_disk
    assert torch.equal(spilled["a.weight"], state["a.weight"])
    with open(spilled.path, "r+b") as handle:
        handle.truncate(100)
    with pytest.raises(OSError, match="spilled tensor 'b.bias' is truncated"):
        spilled["b.bias"]
    spilled.discard()
    assert not spilled.path.exists()


def test_integration_from_spilled_deltas_gives_the_same_bits(tmp_path):
    base = {"w": torch.randn(64, 8), "b": torch.randn(8)}
    deltas = [{k: torch.randn_like(v) for k, v in base.items()} for _ in range(3)]
    weights = [0.5, 0.3, 0.2]
    in_memory = integrate(base, list(zip(weights, deltas, strict=True)))
    spilled = [_spill(tmp_path / str(i), d, 100) for i, d in enumerate(deltas)]
    from_disk = integrate(base, list(zip(weights, spilled, strict=True)))
    for name in base:
        assert torch.equal(in_memory[name], from_disk[name])


def test_spilling_keeps_every_check(tmp_path):
    state = _state()
    chunks = list(state_to_chunks(state, 1000))
    assembler = SpillingAssembler(tmp_path / "x.delta", spec_of(state))
    assembler.add(chunks[0])
    with pytest.raises(WireError, match="chunk at byte 0, expected byte 1000"):
        assembler.add(chunks[0])
    assembler = SpillingAssembler(tmp_path / "y.delta", spec_of(state))
    for chunk in chunks:
        assembler.add(chunk)
    tampered = trailer_of(state)
    tampered.sha256 = "0" * 64
    with pytest.raises(WireError, match="state digest mismatch"):
        assembler.finish(tampered)


def test_memory_and_spill_assemblers_agree(tmp_path):
    state = _state()
    memory = StateAssembler(spec_of(state))
    for chunk in state_to_chunks(state, 512):
        memory.add(chunk)
    assert state_digest(memory.finish(trailer_of(state))) == state_digest(
        _spill(tmp_path, state, 512)
    )


def test_a_spilled_tensor_is_read_in_blocks_that_cover_it_exactly(tmp_path):
    state = _state()
    spilled = _spill(tmp_path, state)
    for name, tensor in state.items():
        blocks = list(spilled.blocks(name, 512))
        flat = tensor.reshape(-1)
        assert [start for start, _ in blocks] == list(range(0, flat.numel(), 512))
        joined = torch.cat([b for _, b in blocks]) if blocks else flat[:0]
        assert torch.equal(joined, flat), name


def test_integrating_in_blocks_changes_no_bit(tmp_path, monkeypatch):
    import tapestry.training.consortium.strategies.fedavg as integration

    g = torch.Generator().manual_seed(3)
    base = {"w": torch.randn(1_000_003, generator=g), "m": torch.randn(37, 11, generator=g)}
    deltas = [{k: torch.randn(v.shape, generator=g) * 1e-3 for k, v in base.items()}]
    deltas.append({k: torch.randn(v.shape, generator=g) * 1e-3 for k, v in base.items()})
    weights = (1 / 3, 2 / 3)
    whole = {k: v.clone() for k, v in base.items()}
    for w, d in zip(weights, deltas, strict=True):
        for k in whole:
            whole[k].add_(d[k], alpha=w)  # the whole tensor at once, as integrate used to

    monkeypatch.setattr(integration, "INTEGRATION_BLOCK_ELEMENTS", 4099)  # odd blocks
    spilled = [_spill(tmp_path / str(i), d) for i, d in enumerate(deltas)]
    in_blocks = integrate(base, list(zip(weights, spilled, strict=True)))

    assert state_digest(in_blocks) == state_digest(whole)


def test_a_deferred_spilled_delta_is_still_read_in_blocks(tmp_path):
    from tapestry.training.consortium.deferred import DeferredState

    state = _state()
    spilled = _spill(tmp_path, state)
    mapped: list[int] = []
    original = spilled._map

    def counting(name, offset, nbytes, dtype):
        mapped.append(nbytes)
        return original(name, offset, nbytes, dtype)

    spilled._map = counting  # type: ignore[method-assign]
    specs = {n: (t.dtype, tuple(t.shape)) for n, t in state.items()}
    deferred = DeferredState(specs, lambda: spilled, lambda: None)

    blocks = list(tensor_blocks(deferred, "a.weight", 64))

    assert torch.equal(torch.cat([b for _, b in blocks]), state["a.weight"].reshape(-1))
    assert mapped and max(mapped) == 64 * 4  # never the whole tensor (300 x 7 floats)
