"""Crash-safe files: every write goes to a temporary file, is fsynced, then renamed over the
target (and the directory fsynced), so a reader sees the old file or the new one, never half.

Model states are stored with safetensors (no pickle), manifests as JSON.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tapestry.training.consortium.messages import ModelState
from tapestry.training.consortium.tensors import clone_state


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(tmp: Path, target: Path) -> None:
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, target)
    _fsync_dir(target.parent)


# This module's temporary names (``.<name>.tmp``) and safetensors' own (``.tmpXXXXXX``,
# random, written before it renames to ours).
TEMPORARY = re.compile(r"\.(.+\.tmp|tmp[A-Za-z0-9_]{6,})")


def remove_temporaries(directory: Path) -> list[Path]:
    """Delete the temporary files that writes cut short (a crash, SIGKILL) left in
    ``directory``; nothing else, even in a data directory shared with other files. Only for
    a directory no write is using (a store opening at start-up). Returns what it removed."""
    removed = [p for p in directory.glob(".*") if TEMPORARY.fullmatch(p.name) and p.is_file()]
    for path in removed:
        path.unlink()
    return removed


def write_json(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    _commit(tmp, path)


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    _commit(tmp, path)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def save_state(path: Path, state: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """Save a state with safetensors. Tied weights (one storage under two keys, which
    safetensors refuses) and strided views are stored as independent entries: such states
    are copied first; plain ones are written as they are (no extra copy of the model)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    storages = [t.untyped_storage().data_ptr() for t in state.values() if t.numel()]
    plain = len(set(storages)) == len(storages) and all(
        t.is_contiguous() and not t.is_conj() and not t.is_neg() for t in state.values()
    )
    save_file(dict(state) if plain else clone_state(state), str(tmp), metadata=dict(metadata))
    _commit(tmp, path)


def load_state(path: Path) -> tuple[ModelState, dict[str, str]]:
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
        state = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    return state, metadata


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
