"""Model states as streams of :class:`TensorChunk` messages, and their validated reassembly.

A state is sent tensor by tensor in key order, each cut into byte ranges of at most
``chunk_bytes``, and closed by a :class:`StateTrailer` (count, bytes, digest), so no message
exceeds a few MiB whatever the model size, and a truncated or tampered stream is refused.
Bytes from a peer are only ever reinterpreted as plain numbers: nothing is unpickled.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TypeVar

import torch
from google.protobuf.message import Message as ProtoMessage

from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.errors import WireError, quoted
from tapestry.training.consortium.messages import ModelState
from tapestry.training.consortium.tensors import (
    DTYPES,
    MeasuredState,
    StateHasher,
    StateMeasure,
    dtype_name,
    measured,
    tensor_bytes,
    tensor_measure,
)

DEFAULT_CHUNK_BYTES = 1 << 20  # 1 MiB: well under gRPC's 4 MiB default message limit


@dataclass(frozen=True)
class TensorSpec:
    dtype: torch.dtype
    shape: tuple[int, ...]


def spec_of(state: Mapping[str, torch.Tensor]) -> dict[str, TensorSpec]:
    return {name: TensorSpec(t.dtype, tuple(t.shape)) for name, t in state.items()}


def state_to_chunks(
    state: Mapping[str, torch.Tensor], chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Iterator[pb.TensorChunk]:
    """Every tensor of ``state`` in sorted key order, as chunks of at most ``chunk_bytes``."""
    for header, piece in _pieces(state, chunk_bytes):
        header.data = piece.tobytes()
        yield header


def _pieces(
    state: Mapping[str, torch.Tensor], chunk_bytes: int
) -> Iterator[tuple[pb.TensorChunk, memoryview]]:
    """Each chunk's header (everything but ``data``) with a view of its bytes in the
    tensor's own memory: the caller decides where the one copy into protobuf lands."""
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    for name in sorted(state):
        tensor = state[name]
        dtype = dtype_name(tensor.dtype)
        data = tensor_bytes(tensor)
        shape = list(tensor.shape)
        total = len(data)
        offset = 0
        while True:  # an empty tensor still sends one (empty) chunk carrying its shape
            piece = data[offset : offset + chunk_bytes]
            header = pb.TensorChunk(
                name=name, dtype=dtype, shape=shape, offset=offset, total_bytes=total
            )
            yield header, piece
            offset += len(piece)
            if offset >= total:
                break


Message = TypeVar("Message", bound=ProtoMessage)
ByteCount = Callable[[int], None]
"""Told the tensor bytes of each chunk as it crosses (e.g. a metrics counter's ``inc``)."""


def send_state(
    state: Mapping[str, torch.Tensor],
    chunk: Callable[[pb.TensorChunk], Message],
    end: Callable[[pb.StateTrailer], Message],
    *,
    sha256: str = "",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    on_bytes: ByteCount | None = None,
) -> Iterator[Message]:
    """The one sender of a tensor stream: every chunk of ``state`` (wrapped by ``chunk``),
    then its trailer (wrapped by ``end``) with count, bytes and digest.

    Pass ``sha256`` when the digest is already known (a committed base, a delta announced
    in a header); otherwise it is computed from the bytes as they go out, with no extra pass.
    ``on_bytes`` is told each chunk's tensor bytes as it is handed to gRPC.

    ``chunk`` is given each chunk's header without its bytes; the bytes are then written
    into the message it returns (into the one ``TensorChunk`` its oneof holds), so they are
    copied once from the tensor into protobuf, never from one message into another.
    """
    hasher = None if sha256 else StateHasher()
    count = total = 0
    for header, piece in _pieces(state, chunk_bytes):
        if header.offset == 0:
            count, total = count + 1, total + header.total_bytes
            if hasher is not None:
                hasher.tensor(header.name, header.dtype, header.shape, header.total_bytes)
        if hasher is not None:
            hasher.data(piece)
        if on_bytes is not None:
            on_bytes(len(piece))
        message = chunk(header)
        _chunk_inside(message).data = piece.tobytes()
        yield message
    digest = sha256 or (hasher.hexdigest() if hasher is not None else "")
    yield end(pb.StateTrailer(tensor_count=count, total_bytes=total, sha256=digest))


def _chunk_inside(message: ProtoMessage) -> pb.TensorChunk:
    """The ``TensorChunk`` that ``message`` carries: itself, or the one its oneof holds."""
    if isinstance(message, pb.TensorChunk):
        return message
    field = message.WhichOneof(message.DESCRIPTOR.oneofs[0].name)
    inner = getattr(message, field) if field else None
    if not isinstance(inner, pb.TensorChunk):
        raise TypeError(f"{type(message).__name__} does not carry the TensorChunk it was given")
    return inner


def receive_state(
    stream: Iterator[Message],
    chunk_field: str,
    end_field: str,
    assembler: StateAssembler,
    on_bytes: ByteCount | None = None,
) -> Mapping[str, torch.Tensor]:
    """The one receiver of a tensor stream: feeds every ``chunk_field`` message of
    ``stream`` to ``assembler`` and returns the state its ``end_field`` trailer confirms.
    Anything else in the stream, or a stream that stops before its trailer, is refused.
    ``on_bytes`` is told each chunk's tensor bytes as it arrives, refused or not."""
    for message in stream:
        kind = message.WhichOneof(message.DESCRIPTOR.oneofs[0].name)
        if kind == chunk_field:
            piece: pb.TensorChunk = getattr(message, chunk_field)
            data = piece.data  # each read of a bytes field copies it: read once
            if on_bytes is not None:
                on_bytes(len(data))
            assembler.add(piece, data)
        elif kind == end_field:
            return assembler.finish(getattr(message, end_field))
        else:
            raise WireError(f"unexpected {kind!r} message inside a tensor stream")
    raise WireError("the tensor stream ended before its trailer (truncated)")


class StateAssembler:
    """Rebuilds a state from chunks, checking every chunk before it is accepted.

    Tensors must arrive in sorted key order (as :func:`state_to_chunks` sends them); the
    digest is computed as the bytes arrive, so checking the trailer costs no second pass,
    and so are the state's norm and finiteness (:class:`~tapestry.training.consortium.
    tensors.StateStats`, on the result as ``stats``), so no check needs another.
    With ``expected`` (name -> dtype and shape), anything else is refused as it arrives, so a
    peer can neither send unexpected keys nor make the receiver allocate more than the
    expected state's bytes.
    """

    def __init__(self, expected: Mapping[str, TensorSpec] | None = None) -> None:
        self._expected = expected
        self._done: dict[str, TensorSpec] = {}
        self._total = 0
        self._name: str | None = None
        self._spec: TensorSpec | None = None
        self._nbytes = 0
        self._filled = 0
        self._finished = False
        self._hasher = StateHasher()
        self._measure = StateMeasure()
        self._last = ""
        self._state: ModelState = {}
        self._buffer = bytearray()
        self.digest = ""  # the state digest, once finish() has confirmed it

    def add(self, chunk: pb.TensorChunk, data: bytes | None = None) -> None:
        """Check ``chunk`` and take its bytes (``data``: ``chunk.data`` already read, since
        every read of a protobuf bytes field is a fresh copy)."""
        if data is None:
            data = chunk.data
        if self._finished:
            raise WireError(f"tensor {quoted(chunk.name)} arrived after the stream's trailer")
        if chunk.name != self._name:
            self._close_current()
            self._open(chunk)
        assert self._spec is not None
        if chunk.dtype != dtype_name(self._spec.dtype) or tuple(chunk.shape) != self._spec.shape:
            raise WireError(
                f"tensor {quoted(chunk.name)}: chunk says {quoted(chunk.dtype)} "
                f"{_shape(chunk.shape)} but the "
                f"tensor began as {dtype_name(self._spec.dtype)} {_shape(self._spec.shape)}"
            )
        if chunk.offset != self._filled:
            raise WireError(
                f"tensor {quoted(chunk.name)}: chunk at byte {chunk.offset}, expected byte "
                f"{self._filled} (chunks must arrive in order, without gaps or overlaps)"
            )
        end = self._filled + len(data)
        if end > self._nbytes:
            raise WireError(
                f"tensor {quoted(chunk.name)}: {end} bytes received, more than its "
                f"{self._nbytes} bytes"
            )
        self._write(self._filled, data)
        self._hasher.data(data)
        self._filled = end

    def finish(self, trailer: pb.StateTrailer) -> Mapping[str, torch.Tensor]:
        """The whole state, once the trailer confirms count, size and digest."""
        self._close_current()
        self._finished = True
        if self._expected is not None:
            missing = sorted(set(self._expected) - set(self._done))
            if missing:
                raise WireError(f"stream ended without tensors {_first(missing)}")
        if trailer.tensor_count != len(self._done) or trailer.total_bytes != self._total:
            raise WireError(
                f"trailer announces {trailer.tensor_count} tensors / {trailer.total_bytes} "
                f"bytes, stream carried {len(self._done)} / {self._total}"
            )
        digest = self._hasher.hexdigest()
        if trailer.sha256 != digest:
            raise WireError(
                f"state digest mismatch: trailer {quoted(trailer.sha256)}, received {digest}"
            )
        self.digest = digest
        return self._result()

    def _open(self, chunk: pb.TensorChunk) -> None:
        name = chunk.name
        if not name:
            raise WireError("tensor chunk without a name")
        if name in self._done:
            raise WireError(f"tensor {quoted(name)} sent twice")
        if self._done and name < self._last:
            raise WireError(
                f"tensor {quoted(name)} arrived after {quoted(self._last)}: tensors must be "
                "sent in sorted key order"
            )
        self._last = name
        dtype = DTYPES.get(chunk.dtype)
        if dtype is None:
            raise WireError(
                f"tensor {quoted(name)}: unsupported dtype {quoted(chunk.dtype)}; "
                f"supported: {sorted(DTYPES)}"
            )
        shape = tuple(int(d) for d in chunk.shape)
        if any(d < 0 for d in shape):
            raise WireError(f"tensor {quoted(name)}: negative dimension in shape {_shape(shape)}")
        if self._expected is not None:
            want = self._expected.get(name)
            if want is None:
                raise WireError(
                    f"unexpected tensor {quoted(name)}; expected keys: {_first(self._expected)}"
                )
            if (want.dtype, want.shape) != (dtype, shape):
                raise WireError(
                    f"tensor {quoted(name)}: expected {dtype_name(want.dtype)} {want.shape}, "
                    f"got {quoted(chunk.dtype)} {_shape(shape)}"
                )
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if chunk.total_bytes != nbytes:
            raise WireError(
                f"tensor {quoted(name)}: total_bytes {chunk.total_bytes} does not match "
                f"{quoted(chunk.dtype)} {_shape(shape)} ({_number(nbytes)} bytes)"
            )
        self._name, self._spec = name, TensorSpec(dtype, shape)
        self._hasher.tensor(name, chunk.dtype, shape, nbytes)
        self._nbytes, self._filled = nbytes, 0
        self._begin(nbytes)

    def _close_current(self) -> None:
        if self._name is None or self._spec is None:
            return
        if self._filled != self._nbytes:
            raise WireError(
                f"tensor {quoted(self._name)} truncated: {self._filled} of {self._nbytes} bytes"
            )
        self._end(self._name, self._spec)
        self._done[self._name] = self._spec
        self._total += self._nbytes
        self._name, self._spec = None, None

    # Where the bytes go: memory here, a scratch file in SpillingAssembler. ---------------

    def _begin(self, nbytes: int) -> None:
        # Only an expected spec bounds the size up front; without one the buffer grows as
        # bytes arrive (chunks come in order, so each write appends), and a peer that
        # announces a huge tensor costs nothing until it sends the bytes.
        self._buffer = bytearray(nbytes) if self._expected is not None else bytearray()

    def _write(self, offset: int, data: bytes) -> None:
        self._buffer[offset : offset + len(data)] = data

    def _end(self, name: str, spec: TensorSpec) -> None:
        tensor = tensor_from_bytes(self._buffer, spec)
        if measured(tensor):
            self._measure.add(name, tensor_measure(tensor))
        self._state[name] = tensor
        self._buffer = bytearray()

    def _result(self) -> Mapping[str, torch.Tensor]:
        return MeasuredState(self._state, stats=self._measure.stats(), sha256=self.digest)


def tensor_from_bytes(buffer: bytearray, spec: TensorSpec) -> torch.Tensor:
    """A tensor over ``buffer`` (no copy) with the given dtype and shape."""
    if buffer:
        flat = torch.frombuffer(buffer, dtype=spec.dtype)
    else:
        flat = torch.empty(0, dtype=spec.dtype)
    return flat.reshape(spec.shape)


def _shape(shape: Iterable[int], limit: int = 8) -> str:
    """A shape from a peer, cut to its first ``limit`` dimensions, so a refusal stays short
    however many dimensions were announced."""
    dims = tuple(shape)
    more = f" ... ({len(dims)} dimensions)" if len(dims) > limit else ""
    return f"{dims[:limit]}{more}"


def _number(n: int) -> str:
    """A size computed from a peer's shape: its product can run to thousands of digits."""
    text = str(n)
    return text if len(text) <= 24 else f"{text[:12]}...({len(text)} digits)"


def _first(names: Iterable[str], limit: int = 5) -> str:
    """Our own key names, sorted, at most ``limit`` of them: a message stays short even for
    a model with thousands of tensors."""
    ordered = sorted(names)
    more = f" and {len(ordered) - limit} more" if len(ordered) > limit else ""
    return f"{ordered[:limit]}{more}"
