"""Deltas received straight to a scratch file, read back one tensor at a time.

The coordinator cannot integrate a delta when it arrives: the weights depend on every
node's score. Holding N deltas in memory would make its peak grow with the number of nodes;
spilled, a delta costs disk while it waits, and integration reads one tensor per node at a
time (:func:`tapestry.training.consortium.integrate` works key by key).
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path

import torch

from tapestry.training.consortium.tensors import (
    NORM_BLOCK_ELEMENTS,
    StateStats,
    TensorMeasure,
)
from tapestry.wire.delta_encoding import DeltaEncoding
from tapestry.wire.tensor_stream import StateAssembler, TensorSpec, tensor_from_bytes

SPILL_ALIGN = 64


class SpilledState(Mapping[str, torch.Tensor]):
    """A read-only state whose tensors live in a file; each access reads one from disk."""

    def __init__(
        self,
        path: Path,
        index: dict[str, tuple[int, int, TensorSpec]],
        stats: StateStats | None = None,
        sha256: str = "",
    ) -> None:
        """``stats``: norm and finiteness, measured as the bytes were spilled; ``sha256``:
        the digest they were checked against."""
        self.path = path
        self._index = index  # name -> (byte offset, byte length, spec)
        self.stats = stats
        self.sha256 = sha256

    def __getitem__(self, name: str) -> torch.Tensor:
        """The tensor over a private (copy-on-write) map of its bytes in the file: read
        straight from the page cache the spill has just filled, with no copy into a fresh
        buffer, and writing to it never reaches the file. The map lives as long as the
        tensor; :meth:`blocks` maps a block at a time, for a whole pass over a tensor."""
        offset, nbytes, spec = self._index[name]
        if not nbytes:
            return tensor_from_bytes(bytearray(), spec)
        return self._map(name, offset, nbytes, spec.dtype).reshape(spec.shape)

    def blocks(self, name: str, elements: int) -> Iterator[tuple[int, torch.Tensor]]:
        """``(start, block)`` over the tensor flattened, ``elements`` at a time, each block
        over its own map of the file: once the caller lets a block go its pages leave this
        process, so reading a tensor never holds more than a block of it."""
        offset, nbytes, spec = self._index[name]
        size = torch.empty((), dtype=spec.dtype).element_size()
        numel = nbytes // size
        for start in range(0, numel, elements):
            count = min(elements, numel - start)
            yield start, self._map(name, offset + start * size, count * size, spec.dtype)

    def _map(self, name: str, offset: int, nbytes: int, dtype: torch.dtype) -> torch.Tensor:
        """A flat tensor over a private (copy-on-write) map of ``nbytes`` at ``offset``."""
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        with open(self.path, "rb") as handle:
            if os.fstat(handle.fileno()).st_size < offset + nbytes:
                raise OSError(f"{self.path}: spilled tensor {name!r} is truncated")
            mapped = mmap.mmap(
                handle.fileno(), offset + nbytes - start, offset=start, access=mmap.ACCESS_COPY
            )
        return torch.frombuffer(mapped, dtype=dtype, offset=offset - start)

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)


class SpillingAssembler(StateAssembler):
    """:class:`StateAssembler` with every check, writing the bytes to ``path`` (decoded:
    an encoded delta is spilled as the tensors of its announced dtypes).

    Bytes are staged block by block (:data:`NORM_BLOCK_ELEMENTS` elements) in one reused
    buffer, measured there (norm, finiteness) and written from it: each byte is touched
    once in memory, and the spilled file is never read back to check it."""

    def __init__(
        self,
        path: Path,
        expected: Mapping[str, TensorSpec] | None = None,
        encodings: Collection[DeltaEncoding] = (),
    ) -> None:
        super().__init__(expected, encodings)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self._base = self._next = 0
        self._index: dict[str, tuple[int, int, TensorSpec]] = {}
        self._stage = bytearray()
        self._staged = self._flushed = 0
        self._dtype = torch.float32
        self._tensor_measure: TensorMeasure | None = None

    def _begin(self, nbytes: int) -> None:
        # Each tensor starts on a 64-byte boundary, so the map of it is aligned for its dtype.
        self._base = -(-self._next // SPILL_ALIGN) * SPILL_ALIGN
        assert self._spec is not None
        self._dtype = self._spec.dtype
        block = NORM_BLOCK_ELEMENTS * torch.empty((), dtype=self._dtype).element_size()
        if len(self._stage) != block:
            self._stage = bytearray(block)
        self._staged = self._flushed = 0
        floating = self._dtype.is_floating_point or self._dtype.is_complex
        self._tensor_measure = TensorMeasure() if floating else None

    def _write(self, offset: int, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            take = min(len(view), len(self._stage) - self._staged)
            self._stage[self._staged : self._staged + take] = view[:take]
            self._staged += take
            view = view[take:]
            if self._staged == len(self._stage):
                self._flush()

    def _flush(self) -> None:
        """Measure the staged block and write it after the tensor's bytes so far."""
        if not self._staged:
            return
        if self._tensor_measure is not None:
            size = torch.empty((), dtype=self._dtype).element_size()
            values = torch.frombuffer(self._stage, dtype=self._dtype, count=self._staged // size)
            self._tensor_measure.block(values)
        staged = memoryview(self._stage)[: self._staged]
        written = os.pwrite(self._fd, staged, self._base + self._flushed)
        if written != self._staged:
            raise OSError(f"{self.path}: short write while spilling")
        self._flushed += self._staged
        self._staged = 0

    def _end(self, name: str, spec: TensorSpec) -> None:
        self._flush()
        if self._tensor_measure is not None:
            self._measure.add(name, self._tensor_measure)
        self._index[name] = (self._base, self._nbytes, spec)
        self._next = self._base + self._nbytes

    def _result(self) -> SpilledState:
        self.close()
        return SpilledState(self.path, self._index, self._measure.stats(), self.digest)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()
