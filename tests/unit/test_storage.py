"""Crash-safe files: states through safetensors bit for bit, JSON replaced atomically."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tapestry.atomic_files import read_json, write_json
from tapestry.state_files import load_state, save_state
from tapestry.training.consortium.tensors import DTYPES, state_digest, tensor_bytes


def assert_states_bit_equal(
    loaded: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]
) -> None:
    assert sorted(loaded) == sorted(saved)
    for name, tensor in saved.items():
        assert loaded[name].dtype == tensor.dtype, name
        assert loaded[name].shape == tensor.shape, name
        assert bytes(tensor_bytes(loaded[name])) == bytes(tensor_bytes(tensor)), name


def sample_state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return {
        "embedding.weight": torch.randn(16, 8, generator=gen),
        "lm_head.bias": torch.randn(16, generator=gen, dtype=torch.float64),
        "norm.weight": torch.randn(8, generator=gen).to(torch.bfloat16),
        "steps": torch.tensor(12345678901, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.empty(3, 0),
        # -0.0 and a NaN payload: bits, not just values
        "special": torch.tensor([0x80000000 - (1 << 32), 0x7FC00ABC], dtype=torch.int32).view(
            torch.float32
        ),
    }


def files_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_state_round_trips_bit_exact_with_metadata(tmp_path: Path) -> None:
    state = sample_state()
    metadata = {"round_num": "3", "node_id": "vn", "sha256": state_digest(state)}
    path = tmp_path / "artifacts" / "round-0003.safetensors"  # parent created on demand

    save_state(path, state, metadata)
    loaded, loaded_metadata = load_state(path)

    assert_states_bit_equal(loaded, state)
    assert loaded_metadata == metadata
    assert state_digest(loaded) == state_digest(state)


@pytest.mark.parametrize("name", sorted(DTYPES))
def test_every_wire_dtype_can_be_stored(name: str, tmp_path: Path) -> None:
    # a state the wire accepts must also be one a node or the coordinator can persist
    dtype = DTYPES[name]
    state = {"t": torch.arange(6).reshape(2, 3).to(dtype)}
    path = tmp_path / "state.safetensors"

    save_state(path, state, {})
    loaded, _ = load_state(path)

    assert_states_bit_equal(loaded, state)


def test_tied_weights_are_saved_as_two_entries(tmp_path: Path) -> None:
    shared = torch.randn(10, 4, generator=torch.Generator().manual_seed(2))
    state = {"wte.weight": shared, "lm_head.weight": shared}
    path = tmp_path / "tied.safetensors"

    save_state(path, state, {"tied": "yes"})
    loaded, metadata = load_state(path)

    assert metadata == {"tied": "yes"}
    assert_states_bit_equal(loaded, state)
    assert loaded["wte.weight"].data_ptr() != loaded["lm_head.weight"].data_ptr()
    assert state["wte.weight"] is state["lm_head.weight"]  # the caller's state is untouched


def test_non_contiguous_tensors_are_saved_as_their_values(tmp_path: Path) -> None:
    base = torch.arange(12.0).reshape(3, 4)
    state = {
        "transposed": base.t(),
        "strided": base[:, ::2],
        "expanded": torch.arange(4.0).expand(2, 4),
    }
    path = tmp_path / "views.safetensors"

    save_state(path, state, {})
    loaded, _ = load_state(path)

    assert_states_bit_equal(loaded, state)
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor), name


def test_save_leaves_no_temporary_files_and_replaces_the_old_state(tmp_path: Path) -> None:
    path = tmp_path / "base.safetensors"
    save_state(path, {"w": torch.zeros(4)}, {"round_num": "1"})
    save_state(path, {"w": torch.ones(2, 2)}, {"round_num": "2"})

    assert files_in(tmp_path) == ["base.safetensors"]
    loaded, metadata = load_state(path)
    assert metadata == {"round_num": "2"}
    assert_states_bit_equal(loaded, {"w": torch.ones(2, 2)})


def test_write_json_round_trips_and_creates_parents(tmp_path: Path) -> None:
    payload = {"round_num": 3, "weights": {"vn": 1 / 3, "ch": 2 / 3}, "nodes": ["vn", "ch"]}
    path = tmp_path / "journal" / "round-0003.json"

    write_json(path, payload)

    assert read_json(path) == payload
    assert path.read_text(encoding="utf-8").endswith("}\n")
    assert files_in(path.parent) == ["round-0003.json"]


def test_write_json_replaces_the_file_atomically(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    write_json(path, {"version": 1, "padding": "x" * 4096})
    old_inode = path.stat().st_ino

    with path.open(encoding="utf-8") as reader:  # a reader that opened the old file ...
        write_json(path, {"version": 2})
        # ... still reads the old file whole: the new one was renamed over it, not written into it
        assert json.loads(reader.read()) == {"version": 1, "padding": "x" * 4096}

    assert path.stat().st_ino != old_inode
    assert read_json(path) == {"version": 2}
    assert files_in(tmp_path) == ["manifest.json"]


def test_a_node_never_overwrites_a_stored_artifact(tmp_path: Path) -> None:
    from tapestry.node.artifacts import ArtifactStore
    from tapestry.training.consortium import SovereignModelArtifact, state_digest

    def artifact(value: float) -> SovereignModelArtifact:
        state = {"w": torch.full((2,), value)}
        return SovereignModelArtifact(
            "vn",
            "Vietnam",
            "continued_pretraining",
            state,
            {"loss": value},
            round_num=2,
            model_state_sha256=state_digest(state),
            model_state_bytes=8,
        )

    store = ArtifactStore(tmp_path)
    first = store.save(artifact(1.0))
    second = store.save(artifact(2.0))

    assert store.rounds() == [2]
    latest = store.get()
    assert latest is not None and latest.model_state_sha256 == second.model_state_sha256
    aside = tmp_path / "artifacts" / f"round-000002.superseded-{first.model_state_sha256[:16]}"
    kept, _ = load_state(aside / "model.safetensors")
    assert torch.equal(kept["w"], torch.full((2,), 1.0))


def test_a_stored_state_is_read_one_tensor_at_a_time(tmp_path: Path) -> None:
    from tapestry.state_files import StoredState

    state = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.tensor([1, 2], dtype=torch.int64)}
    save_state(tmp_path / "s.safetensors", state, {})
    stored = StoredState(tmp_path / "s.safetensors")
    assert list(stored) == ["a", "b"] and len(stored) == 2
    assert state_digest(stored) == state_digest(state)
    with pytest.raises(KeyError):
        stored["missing"]
