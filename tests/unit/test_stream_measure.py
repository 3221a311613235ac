"""A state's norm and finiteness, measured while its bytes stream in: the same bits as the
in-process measure wherever the chunks are cut, and no spilled delta read back to check it."""

from __future__ import annotations

import math

import pytest
import torch

from tapestry.training.consortium.governance.admission import (
    InvalidContribution,
    check_contribution,
)
from tapestry.training.consortium.messages import SovereignContribution
from tapestry.training.consortium.tensors import (
    NORM_BLOCK_ELEMENTS,
    StateStats,
    all_finite,
    known_stats,
    state_norm,
    state_stats,
)
from tapestry.wire.spill import SpillingAssembler
from tapestry.wire.tensor_stream import StateAssembler, spec_of, state_to_chunks

from .conftest import trailer_of


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {
        # Past one block, so a chunk can straddle the block boundary anywhere.
        "a.big": torch.randn(NORM_BLOCK_ELEMENTS + 1013, generator=g) * 3,
        "b.half": torch.randn(17, 5, generator=g).to(torch.float16),
        "c.bf16": torch.randn(301, generator=g).to(torch.bfloat16),
        "d.double": torch.randn(9, generator=g, dtype=torch.float64),
        "e.empty": torch.empty(0, 4),
        "f.count": torch.tensor([3, 4], dtype=torch.int64),  # not measured: not floating
    }


def _received(state, assembler, chunk_bytes):
    for chunk in state_to_chunks(state, chunk_bytes):
        assembler.add(chunk)
    return assembler.finish(trailer_of(state))


@pytest.mark.parametrize("chunk_bytes", [1, 999, 4096, 1 << 20, 3 << 20])
@pytest.mark.parametrize("where", ["memory", "spill"])
def test_streamed_stats_are_the_in_process_bits(tmp_path, where, chunk_bytes):
    state = _state()
    if chunk_bytes == 1:  # every byte its own chunk: keep it to the small tensors
        state.pop("a.big")
    assembler = (
        StateAssembler(spec_of(state))
        if where == "memory"
        else SpillingAssembler(tmp_path / "x.delta", spec_of(state))
    )
    received = _received(state, assembler, chunk_bytes)

    stats = known_stats(received)
    assert stats is not None
    expected = state_stats(state)  # measured from the tensors themselves
    assert known_stats(state) is None
    assert stats == expected
    assert stats.nonfinite is None
    # The same figure as a plain float64 norm, to rounding: the blocks change no maths.
    floating = [t.double().reshape(-1) for t in state.values() if t.is_floating_point()]
    plain = float(torch.linalg.vector_norm(torch.cat(floating)))
    assert math.isclose(stats.norm, plain, rel_tol=1e-12)


def test_a_non_finite_entry_is_named_and_the_spill_is_never_read_back(tmp_path):
    state = _state()
    state["c.bf16"][5] = float("nan")
    state["d.double"][0] = float("inf")
    received = _received(state, SpillingAssembler(tmp_path / "x.delta", spec_of(state)), 100_000)
    spill = tmp_path / "x.delta"
    # All NaN now: a check that read the file back would name "a.big", the first key.
    spill.write_bytes(b"\xff" * spill.stat().st_size)

    stats = known_stats(received)
    assert isinstance(stats, StateStats)
    assert stats.nonfinite == "c.bf16"  # the first in sorted order, not "d.double"
    assert math.isnan(stats.norm)
    assert not all_finite(received)
    assert math.isnan(state_norm(received))
    contribution = SovereignContribution(
        node_id="vn",
        round_num=1,
        weight_delta=received,
        quality_score=0.5,
        token_count=10,
        metrics={},
    )
    with pytest.raises(InvalidContribution, match=r"delta 'c\.bf16' holds NaN or Inf values"):
        check_contribution(contribution, state, node_id="vn", round_num=1)


def test_the_in_process_measure_names_the_first_key_in_sorted_order():
    state = {"z": torch.tensor([float("inf")]), "m": torch.tensor([1.0, float("nan")])}
    assert state_stats(state).nonfinite == "m"
    assert not all_finite(state)
    huge = {"w": torch.full((3,), 1e300, dtype=torch.float64)}
    assert state_norm(huge) == math.inf  # the squares overflow to inf, not an error
