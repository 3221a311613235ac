"""Byte-level views of tensors and the state digest shared by the core, the wire and stores."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

# Element dtypes a model state may hold: those safetensors can persist (so whatever crosses
# the wire can also be stored). Names are torch's without the "torch." prefix and are what
# travels on the wire; anything else is refused before any work is done.
DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in (
        "float64",
        "float32",
        "float16",
        "bfloat16",
        "int64",
        "int32",
        "int16",
        "int8",
        "uint8",
        "bool",
        "complex64",
    )
}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``; refuses dtypes outside :data:`DTYPES`."""
    name = str(dtype).removeprefix("torch.")
    if DTYPES.get(name) is not dtype:
        raise ValueError(f"unsupported tensor dtype {dtype}; supported: {sorted(DTYPES)}")
    return name


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's elements as contiguous row-major bytes (native order: little-endian on
    every platform torch supports), without copying when it is already contiguous on CPU."""
    flat = tensor.detach().to("cpu").resolve_conj().resolve_neg().contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    # A one-element slice such as t[::2] counts as contiguous yet keeps its stride, which
    # view(uint8) refuses; the bytes of a contiguous tensor are dense, so stride 1 is exact.
    flat = flat.as_strided((flat.numel(),), (1,))
    return flat.view(torch.uint8).numpy().data


class StateHasher:
    """Incremental :func:`state_digest`: announce each tensor, in sorted key order, then feed
    its bytes in as many pieces as they arrive (so a receiver hashes while it reads)."""

    def __init__(self) -> None:
        self._sha = hashlib.sha256()

    def tensor(
        self, name: str, dtype: str, shape: Sequence[int], nbytes: int, encoding: str = ""
    ) -> None:
        """Announce a tensor of ``nbytes`` bytes; ``encoding`` names how its bytes encode
        its values when they are not its own (a delta on the wire), and is then hashed too."""
        header = f"{name}\0{dtype}\0{list(shape)}\0".encode()
        if encoding:
            header += f"{encoding}\0".encode()
        self._sha.update(len(header).to_bytes(8, "little"))
        self._sha.update(header)
        self._sha.update(nbytes.to_bytes(8, "little"))

    def data(self, piece: bytes | memoryview) -> None:
        self._sha.update(piece)

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in sorted key order.

    Two states have the same digest exactly when they are bitwise identical.
    """
    hasher = StateHasher()
    for name in sorted(state):
        tensor = state[name]
        data = tensor_bytes(tensor)
        hasher.tensor(name, dtype_name(tensor.dtype), tuple(tensor.shape), len(data))
        hasher.data(data)
    return hasher.hexdigest()


@dataclass(frozen=True)
class StateLayout:
    """What a state holds, without its values: ``sha256`` over every (key, dtype, shape) in
    sorted key order, with counts for people. Members whose models would exchange weights
    key for key have the same layout; a node and the coordinator compare theirs before any
    weights move."""

    sha256: str
    tensor_count: int
    element_count: int

    def __str__(self) -> str:
        return (
            f"{self.tensor_count} tensors, {self.element_count} values (sha256 {self.sha256[:12]})"
        )


def state_layout(state: Mapping[str, torch.Tensor]) -> StateLayout:
    sha = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name]
        entry = f"{name}\0{dtype_name(tensor.dtype)}\0{list(tensor.shape)}\0".encode()
        sha.update(len(entry).to_bytes(8, "little"))
        sha.update(entry)
    return StateLayout(
        sha.hexdigest(), len(state), sum(tensor.numel() for tensor in state.values())
    )


def state_nbytes(state: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def clone_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Independent, contiguous copies (no shared storage, so tied weights and strided views
    are safe to save)."""
    return {
        name: tensor.detach()
        .resolve_conj()
        .resolve_neg()
        .clone(memory_format=torch.contiguous_format)
        for name, tensor in state.items()
    }


class Snapshot(dict[str, torch.Tensor]):
    """A model state that knows its :func:`state_digest` (``sha256``), so the many receivers
    of one round's base need not hash it again. Still a plain ``ModelState`` dict."""

    def __init__(self, state: Mapping[str, torch.Tensor], *, sha256: str) -> None:
        super().__init__(state)
        self.sha256 = sha256


def known_digest(state: Mapping[str, torch.Tensor]) -> str:
    """The state's digest, without hashing when it is a :class:`Snapshot`."""
    if isinstance(state, Snapshot) and state.sha256:
        return state.sha256
    return state_digest(state)


def state_mismatch(
    state: Mapping[str, object], reference: Mapping[str, torch.Tensor], *, what: str, against: str
) -> str | None:
    """Why ``state`` cannot stand in for ``reference`` key for key (same keys, each a tensor
    of the same dtype and shape, floating values finite), or ``None`` when it can.

    The one check shared by a node refusing a base and a coordinator refusing a delta;
    ``what`` names the state in the message ("base", "delta"), ``against`` the reference.
    """
    missing = sorted(set(reference) - set(state))
    extra = sorted(set(state) - set(reference))
    if missing or extra:
        return (
            f"{what} keys differ from {against}: missing {few_names(missing)}, "
            f"unexpected {few_names(extra)}"
        )
    for name, want in reference.items():
        got = state[name]
        if not isinstance(got, torch.Tensor):
            return f"{what} {name!r} is a {type(got).__name__}, not a tensor"
        if got.dtype != want.dtype or got.shape != want.shape:
            return (
                f"{what} {name!r}: expected {want.dtype} {tuple(want.shape)}, "
                f"got {got.dtype} {tuple(got.shape)}"
            )
        if (got.is_floating_point() or got.is_complex()) and not bool(torch.isfinite(got).all()):
            return f"{what} {name!r} holds NaN or Inf values"
    return None


def few_names(names: Sequence[str], limit: int = 5) -> str:
    """At most ``limit`` names, each cut to 100 characters, so that a message about a
    state never echoes an unbounded list back."""
    shown = ", ".join(repr(n[:100]) for n in names[:limit])
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"[{shown}{more}]"


def state_norm(state: Mapping[str, torch.Tensor]) -> float:
    """The L2 norm of a state's floating entries taken as one vector, accumulated in float64
    one tensor at a time (a spilled state is read from disk tensor by tensor); ``inf`` or
    ``nan`` when an entry is not finite."""
    total = 0.0
    for name in state:
        tensor = state[name]
        if tensor.is_floating_point() or tensor.is_complex():
            wide = torch.complex128 if tensor.is_complex() else torch.float64
            total += float(torch.linalg.vector_norm(tensor.detach(), dtype=wide)) ** 2
    return math.sqrt(total)


def all_finite(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether every floating entry of ``state`` is finite (integer entries always are)."""
    return all(
        bool(torch.isfinite(t).all())
        for t in state.values()
        if t.is_floating_point() or t.is_complex()
    )
