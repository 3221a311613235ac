"""Model states on disk: safetensors files (no pickle), written through the one atomic write
(:mod:`tapestry.atomic_files`), read whole or one tensor per access."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tapestry.atomic_files import commit, temporary
from tapestry.training.consortium.messages import ModelState
from tapestry.training.consortium.tensors import clone_state


def save_state(path: Path, state: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """Save a state with safetensors. Tied weights (one storage under two keys, which
    safetensors refuses) and strided views are stored as independent entries: such states
    are copied first; plain ones are written as they are (no extra copy of the model)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary(path)
    storages = [t.untyped_storage().data_ptr() for t in state.values() if t.numel()]
    plain = len(set(storages)) == len(storages) and all(
        t.is_contiguous() and not t.is_conj() and not t.is_neg() for t in state.values()
    )
    save_file(dict(state) if plain else clone_state(state), str(tmp), metadata=dict(metadata))
    commit(tmp, path)


def load_state(path: Path) -> tuple[ModelState, dict[str, str]]:
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
        state = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    return state, metadata


def read_metadata(path: Path) -> dict[str, str]:
    """A saved state's metadata, without reading its tensors."""
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


class StoredState(Mapping[str, torch.Tensor]):
    """A saved state read one tensor per access, so serving it never holds it whole."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with safe_open(str(path), framework="pt") as handle:
            self._keys = sorted(handle.keys())  # noqa: SIM118 - a method, not a dict

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._keys:
            raise KeyError(name)
        with safe_open(str(self.path), framework="pt") as handle:
            tensor: torch.Tensor = handle.get_tensor(name)
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)
