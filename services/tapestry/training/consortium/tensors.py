"""Byte-level views of tensors and the state digest shared by the core, the wire and stores."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

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


@runtime_checkable
class Pending(Protocol):
    """A state known by its layout (``specs``: key -> dtype and shape) until it is
    ``fetched``: a :class:`~tapestry.training.consortium.deferred.DeferredState`."""

    specs: dict[str, tuple[torch.dtype, tuple[int, ...]]]

    @property
    def fetched(self) -> bool: ...


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
    A :class:`~tapestry.training.consortium.deferred.DeferredState` not fetched yet is
    checked by its layout alone: its values are checked by whoever fetches it.
    """
    missing = sorted(set(reference) - set(state))
    extra = sorted(set(state) - set(reference))
    if missing or extra:
        return (
            f"{what} keys differ from {against}: missing {few_names(missing)}, "
            f"unexpected {few_names(extra)}"
        )
    # A deferred state not fetched yet answers by its layout, without its bytes.
    layout = state.specs if isinstance(state, Pending) and not state.fetched else None
    for name, want in reference.items():
        if layout is not None:
            dtype, shape = layout[name]
        else:
            got = state[name]
            if not isinstance(got, torch.Tensor):
                return f"{what} {name!r} is a {type(got).__name__}, not a tensor"
            dtype, shape = got.dtype, tuple(got.shape)
        if dtype != want.dtype or shape != tuple(want.shape):
            return (
                f"{what} {name!r}: expected {want.dtype} {tuple(want.shape)}, got {dtype} {shape}"
            )
    if layout is not None:
        return None
    nonfinite = first_nonfinite(state)  # type: ignore[arg-type]  # all tensors by now
    if nonfinite is not None:
        return f"{what} {nonfinite!r} holds NaN or Inf values"
    return None


def few_names(names: Sequence[str], limit: int = 5) -> str:
    """At most ``limit`` names, each cut to 100 characters, so that a message about a
    state never echoes an unbounded list back."""
    shown = ", ".join(repr(n[:100]) for n in names[:limit])
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"[{shown}{more}]"


NORM_BLOCK_ELEMENTS = 1 << 18
"""A tensor's squared norm is summed over blocks of this many elements, in order, so a
receiver that sees the bytes in chunks gets the very bits :func:`state_norm` gets from the
whole tensor, wherever the chunks were cut."""


@dataclass(frozen=True)
class StateStats:
    """What one pass over a state's bytes measured: its :func:`state_norm`, and the first
    key (in sorted order) of a floating tensor holding NaN or Inf (``None``: all finite)."""

    norm: float
    nonfinite: str | None = None


class TensorMeasure:
    """One floating tensor's squared L2 norm (float64) and finiteness, fed block by block
    of :data:`NORM_BLOCK_ELEMENTS` elements (the last may be shorter)."""

    def __init__(self) -> None:
        self.square_sum = 0.0
        self.finite = True

    def block(self, values: torch.Tensor) -> None:
        square_sum = _square_sum(values)
        self.square_sum += square_sum
        if self.finite and not _finite_block(values, square_sum):
            self.finite = False


class StateMeasure:
    """Incremental :class:`StateStats`: :meth:`add` each floating tensor's measure in
    sorted key order."""

    def __init__(self) -> None:
        self._square_sum = 0.0
        self._nonfinite: str | None = None

    def add(self, name: str, measure: TensorMeasure) -> None:
        self._square_sum += measure.square_sum
        if not measure.finite and self._nonfinite is None:
            self._nonfinite = name

    def stats(self) -> StateStats:
        return StateStats(math.sqrt(self._square_sum), self._nonfinite)


def measured(tensor: torch.Tensor) -> bool:
    """Whether a state's stats cover ``tensor``: floating and complex entries do."""
    return tensor.is_floating_point() or tensor.is_complex()


def tensor_measure(tensor: torch.Tensor) -> TensorMeasure:
    """:class:`TensorMeasure` of a whole (floating) tensor, block by block."""
    flat = tensor.detach().reshape(-1)
    measure = TensorMeasure()
    for start in range(0, flat.numel(), NORM_BLOCK_ELEMENTS):
        measure.block(flat[start : start + NORM_BLOCK_ELEMENTS])
    return measure


def tensor_blocks(
    state: Mapping[str, torch.Tensor], name: str, elements: int
) -> Iterator[tuple[int, torch.Tensor]]:
    """``(start, block)`` over ``state[name]`` flattened (row-major), ``elements`` at a time.
    A state that reads from disk (its ``blocks`` method, as spilled states have) maps one
    block at a time, so a huge tensor is never resident whole."""
    blocks = getattr(state, "blocks", None)
    if callable(blocks):
        yield from blocks(name, elements)
        return
    flat = state[name].detach().reshape(-1)
    for start in range(0, flat.numel(), elements):
        yield start, flat[start : start + elements]


def known_stats(state: Mapping[str, object]) -> StateStats | None:
    """The stats a receiver measured while the state's bytes streamed in (the ``stats`` of
    a :class:`MeasuredState` or a spilled state), else ``None``."""
    stats = getattr(state, "stats", None)
    return stats if isinstance(stats, StateStats) else None


class MeasuredState(dict[str, torch.Tensor]):
    """A received state with the :class:`StateStats` measured as its bytes arrived, and
    the :func:`state_digest` they were checked against."""

    def __init__(
        self, state: Mapping[str, torch.Tensor], *, stats: StateStats, sha256: str
    ) -> None:
        super().__init__(state)
        self.stats = stats
        self.sha256 = sha256


def state_stats(state: Mapping[str, torch.Tensor]) -> StateStats:
    """Norm and finiteness of a state in one pass over it, or none where they are known."""
    known = known_stats(state)
    if known is not None:
        return known
    measure = StateMeasure()
    for name in sorted(state):
        tensor = state[name]
        if measured(tensor):
            measure.add(name, tensor_measure(tensor))
    return measure.stats()


def state_norm(state: Mapping[str, torch.Tensor]) -> float:
    """The L2 norm of a state's floating entries taken as one vector: squared norms summed
    in float64 block by block (:data:`NORM_BLOCK_ELEMENTS`) and tensor by tensor in sorted
    key order, so a state measured as it streamed in (:func:`known_stats`) gives the same
    bits; ``inf`` or ``nan`` when an entry is not finite."""
    return state_stats(state).norm


def first_nonfinite(state: Mapping[str, torch.Tensor]) -> str | None:
    """The first key, in sorted order, of a floating entry holding NaN or Inf (``None``:
    all finite); known without a pass where the state was measured as it arrived."""
    known = known_stats(state)
    if known is not None:
        return known.nonfinite
    return next(
        (name for name in sorted(state) if measured(state[name]) and not finite(state[name])),
        None,
    )


def finite(tensor: torch.Tensor) -> bool:
    """Whether every entry of a floating tensor is finite, checked block by block
    (:data:`NORM_BLOCK_ELEMENTS`), so the check's temporaries stay a few MiB however large
    the tensor."""
    flat = tensor.detach().reshape(-1)
    for start in range(0, flat.numel(), NORM_BLOCK_ELEMENTS):
        block = flat[start : start + NORM_BLOCK_ELEMENTS]
        if not _finite_block(block, _square_sum(block)):
            return False
    return True


def _square_sum(values: torch.Tensor) -> float:
    """Σ|x|² of a block in float64 (complex128 for complex entries): one dot product, the
    one formula every measure of a state shares."""
    if values.is_complex():
        wide = values.to(torch.complex128)
        return float(torch.vdot(wide, wide).real)
    wide = values.to(torch.float64)
    return float(torch.dot(wide, wide))


def _finite_block(values: torch.Tensor, square_sum: float) -> bool:
    """Whether a block's entries are finite, given its :func:`_square_sum`: a finite sum
    says so at once (a NaN or Inf entry makes it NaN or Inf); only a sum that is not finite
    needs a look at the entries, since float64 squares of finite float64 values can
    overflow (those of every narrower dtype cannot, over a block)."""
    return math.isfinite(square_sum) or bool(torch.isfinite(values).all())


def all_finite(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether every floating entry of ``state`` is finite (integer entries always are)."""
    return first_nonfinite(state) is None
