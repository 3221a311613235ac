"""Model states as streams of :class:`TensorChunk` messages, and their validated reassembly.

A state is sent tensor by tensor in key order, each cut into byte ranges of at most
``chunk_bytes``, and closed by a :class:`StateTrailer` (count, bytes, digest), so no message
exceeds a few MiB whatever the model size, and a truncated or tampered stream is refused.
Bytes from a peer are only ever reinterpreted as plain numbers: nothing is unpickled.

A delta's floating tensors may travel encoded (:mod:`tapestry.wire.delta_encoding`): a
chunk's ``encoding`` says how, its offsets and ``total_bytes`` count the encoded bytes, and
the digest covers what travelled (each encoded tensor's encoding name and encoded bytes). A
receiver accepts only the encodings it was told to expect and decodes as the bytes arrive,
so what it assembles, in memory or spilled, is always a tensor of the announced dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
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
from tapestry.wire.codec import encoding_from_proto, encoding_to_proto
from tapestry.wire.delta_encoding import Decoder, DeltaEncoding, encode, encoded_nbytes

DEFAULT_CHUNK_BYTES = 1 << 20  # 1 MiB: well under gRPC's 4 MiB default message limit


@dataclass(frozen=True)
class TensorSpec:
    dtype: torch.dtype
    shape: tuple[int, ...]


def spec_of(state: Mapping[str, torch.Tensor]) -> dict[str, TensorSpec]:
    return {name: TensorSpec(t.dtype, tuple(t.shape)) for name, t in state.items()}


def state_to_chunks(
    state: Mapping[str, torch.Tensor],
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    encoding: DeltaEncoding = DeltaEncoding.FLOAT32,
) -> Iterator[pb.TensorChunk]:
    """Every tensor of ``state`` in sorted key order, as chunks of at most ``chunk_bytes``
    (the floating ones in ``encoding`` where it carries them)."""
    for header, piece in _pieces(state, chunk_bytes, encoding):
        header.data = piece.tobytes()
        yield header


def _pieces(
    state: Mapping[str, torch.Tensor], chunk_bytes: int, encoding: DeltaEncoding
) -> Iterator[tuple[pb.TensorChunk, memoryview]]:
    """Each chunk's header (everything but ``data``) with a view of its bytes: in the
    tensor's own memory when it travels raw, so the caller decides where the one copy into
    protobuf lands; else in the tensor's encoded bytes (one transient buffer per tensor)."""
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    for name in sorted(state):
        tensor = state[name]
        dtype = dtype_name(tensor.dtype)
        encoded = encode(tensor, encoding)
        data = tensor_bytes(tensor) if encoded is None else memoryview(encoded)
        wire = encoding_to_proto(encoding if encoded is not None else DeltaEncoding.FLOAT32)
        shape = list(tensor.shape)
        total = len(data)
        offset = 0
        while True:  # an empty tensor still sends one (empty) chunk carrying its shape
            piece = data[offset : offset + chunk_bytes]
            header = pb.TensorChunk(
                name=name,
                dtype=dtype,
                shape=shape,
                offset=offset,
                total_bytes=total,
                encoding=wire,
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
    encoding: DeltaEncoding = DeltaEncoding.FLOAT32,
) -> Iterator[Message]:
    """The one sender of a tensor stream: every chunk of ``state`` (wrapped by ``chunk``),
    then its trailer (wrapped by ``end``) with count, bytes and digest.

    Pass ``sha256`` when the digest is already known (a committed base, a delta announced
    in a header); otherwise it is computed from the bytes as they go out, with no extra pass.
    ``on_bytes`` is told each chunk's tensor bytes as it is handed to gRPC. With an
    ``encoding`` (a delta), the floating tensors it carries travel encoded.

    ``chunk`` is given each chunk's header without its bytes; the bytes are then written
    into the message it returns (into the one ``TensorChunk`` its oneof holds), so they are
    copied once from the tensor into protobuf, never from one message into another.
    """
    hasher = None if sha256 else StateHasher()
    count = total = 0
    for header, piece in _pieces(state, chunk_bytes, encoding):
        if header.offset == 0:
            count, total = count + 1, total + header.total_bytes
        if hasher is not None:
            _hash(hasher, header, piece)
        if on_bytes is not None:
            on_bytes(len(piece))
        message = chunk(header)
        _chunk_inside(message).data = piece.tobytes()
        yield message
    digest = sha256 or (hasher.hexdigest() if hasher is not None else "")
    yield end(pb.StateTrailer(tensor_count=count, total_bytes=total, sha256=digest))


def stream_digest(
    state: Mapping[str, torch.Tensor], encoding: DeltaEncoding = DeltaEncoding.FLOAT32
) -> str:
    """The digest :func:`send_state` puts in ``state``'s trailer with ``encoding``, without
    sending it: a raw state's is its :func:`state_digest`; an encoded one is encoded once to
    hash it (so a node can announce, and sign, its delta's digest in its result header, and
    stream it after with ``sha256`` given, hashing nothing twice)."""
    hasher = StateHasher()
    for header, piece in _pieces(state, DEFAULT_CHUNK_BYTES, encoding):
        _hash(hasher, header, piece)
    return hasher.hexdigest()


def _hash(hasher: StateHasher, header: pb.TensorChunk, piece: memoryview) -> None:
    """Feed one chunk of a stream to ``hasher``: its tensor's header with its first piece."""
    if header.offset == 0:
        hasher.tensor(
            header.name,
            header.dtype,
            header.shape,
            header.total_bytes,
            _encoding_label(encoding_from_proto(header.encoding)),
        )
    hasher.data(piece)


def _encoding_label(encoding: DeltaEncoding) -> str:
    """What the digest hashes of a tensor's encoding: nothing for a raw tensor (so a raw
    stream's digest is the state's own :func:`state_digest`), else the encoding's name."""
    return "" if encoding is DeltaEncoding.FLOAT32 else encoding.value


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
    expected state's bytes. ``encodings`` are those (besides raw) a tensor may arrive in;
    an encoded tensor is decoded as its bytes arrive, into a tensor of its announced dtype.
    """

    def __init__(
        self,
        expected: Mapping[str, TensorSpec] | None = None,
        encodings: Collection[DeltaEncoding] = (),
    ) -> None:
        self._expected = expected
        self._encodings = frozenset(encodings) - {DeltaEncoding.FLOAT32}
        self._done: dict[str, TensorSpec] = {}
        self._total = 0
        self._name: str | None = None
        self._spec: TensorSpec | None = None
        self._nbytes = 0  # of the tensor as assembled (decoded)
        self._filled = 0  # bytes of the tensor received, as they travel
        self._wire_nbytes = 0  # of the tensor as it travels: _nbytes unless encoded
        self._wire_encoding = 0  # the tensor's TensorEncoding number
        self._written = 0  # decoded bytes written
        self._decoder: Decoder | None = None
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
        if chunk.encoding != self._wire_encoding:
            raise WireError(
                f"tensor {quoted(chunk.name)}: chunk encoding {int(chunk.encoding)} differs "
                f"from the encoding {self._wire_encoding} its first chunk announced"
            )
        if chunk.offset != self._filled:
            raise WireError(
                f"tensor {quoted(chunk.name)}: chunk at byte {chunk.offset}, expected byte "
                f"{self._filled} (chunks must arrive in order, without gaps or overlaps)"
            )
        end = self._filled + len(data)
        if end > self._wire_nbytes:
            raise WireError(
                f"tensor {quoted(chunk.name)}: {end} bytes received, more than its "
                f"{self._wire_nbytes} bytes"
            )
        if self._decoder is None:
            self._write(self._filled, data)
            self._written = end
        else:
            values = tensor_bytes(self._decoder.feed(data))
            self._write(self._written, values)
            self._written += len(values)
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
        encoding = self._encoding_of(chunk)
        numel = math.prod(shape)
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if encoding is DeltaEncoding.FLOAT32:
            wire, decoder, how = nbytes, None, ""
        else:
            wire, how = encoded_nbytes(encoding, numel), f" in {encoding.value}"
            decoder = Decoder(encoding, dtype, numel)  # refuses a dtype it cannot carry
        if chunk.total_bytes != wire:
            raise WireError(
                f"tensor {quoted(name)}: total_bytes {chunk.total_bytes} does not match "
                f"{quoted(chunk.dtype)} {_shape(shape)}{how} ({_number(wire)} bytes)"
            )
        self._name, self._spec = name, TensorSpec(dtype, shape)
        self._hasher.tensor(name, chunk.dtype, shape, wire, _encoding_label(encoding))
        self._nbytes, self._wire_nbytes, self._wire_encoding = nbytes, wire, chunk.encoding
        self._filled = self._written = 0
        self._decoder = decoder
        self._begin(nbytes)

    def _encoding_of(self, chunk: pb.TensorChunk) -> DeltaEncoding:
        """The chunk's encoding, refused unless raw or one this stream accepts."""
        try:
            encoding = encoding_from_proto(chunk.encoding)
        except ValueError as error:
            raise WireError(f"tensor {quoted(chunk.name)}: {error}") from None
        if encoding is not DeltaEncoding.FLOAT32 and encoding not in self._encodings:
            accepted = ", ".join(sorted(e.value for e in self._encodings)) or "none"
            raise WireError(
                f"tensor {quoted(chunk.name)} arrived in encoding {encoding.value!r}; this "
                f"stream accepts raw tensors and these encodings only: {accepted}"
            )
        return encoding

    def _close_current(self) -> None:
        if self._name is None or self._spec is None:
            return
        if self._filled != self._wire_nbytes:
            raise WireError(
                f"tensor {quoted(self._name)} truncated: {self._filled} of "
                f"{self._wire_nbytes} bytes"
            )
        if self._decoder is not None:
            self._decoder.finish()
            self._decoder = None
        self._end(self._name, self._spec)
        self._done[self._name] = self._spec
        self._total += self._wire_nbytes
        self._name, self._spec = None, None

    # Where the bytes go: memory here, a scratch file in SpillingAssembler. ---------------

    def _begin(self, nbytes: int) -> None:
        # Only an expected spec bounds the size up front; without one the buffer grows as
        # bytes arrive (chunks come in order, so each write appends), and a peer that
        # announces a huge tensor costs nothing until it sends the bytes.
        self._buffer = bytearray(nbytes) if self._expected is not None else bytearray()

    def _write(self, offset: int, data: bytes | memoryview) -> None:
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
