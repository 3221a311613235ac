"""How the floating tensors of a delta may travel in fewer bytes, and what each way costs.

The consortium file's ``delta_encoding`` picks one (docs/operating/encodings.md):

- ``float32`` (default): every tensor raw, exact, bit for bit.
- ``bfloat16`` / ``float16``: each value rounded to nearest in that type (2 bytes a value).
  Bound per value: ``|x - x'| <= (u + 2^-24) |x| + tiny``, with ``u`` the type's unit
  roundoff (2^-8, 2^-11) and ``tiny`` half its smallest subnormal (2^-134, 2^-25); the
  2^-24 covers a float64 value's rounding through float32.
- ``int8_block``: the flattened tensor in blocks of :data:`INT8_BLOCK` values (the last one
  shorter), each sent as a float32 scale ``max|x| / 127`` and its values ``round(x / scale)``
  as int8: about 1.02 bytes a value. Bound per value: ``|x - x'| <= scale / 2`` plus float
  rounding (:func:`error_bound` states it exactly); an all-zero block has scale 0.
  Layout: all the block scales (little-endian float32), then all the int8 values, so a
  receiver knows every scale before the first value and decodes chunk by chunk.

Only a floating tensor that the encoding makes smaller and can carry within its bound is
encoded (:func:`encode`); anything else travels raw: integer tensors, a tensor already
2 bytes a value under a 2-byte encoding, a tensor with a non-finite value (the coordinator's
checks refuse it, and must see it as sent), and for ``float16`` one with a value past
float16's range, which would otherwise become infinite. The receiver decodes into a tensor
of the announced dtype (:class:`Decoder`), refusing bytes an honest sender never produces.
"""

from __future__ import annotations

import math
from enum import StrEnum

import torch

from tapestry.errors import WireError

INT8_BLOCK = 256
"""Values per int8 block: a 4-byte scale per 256 values costs 1.6 % over the int8 values
(3.94x fewer bytes than float32), and a block is short enough that one large value costs
precision to few others."""
INT8_LEVELS = 127  # int8 values in [-127, 127]: symmetric, so -x encodes as -q
SLAB = INT8_BLOCK * 4096
"""Values encoded at a time (a whole number of blocks): the float32 working copies stay
at a few MiB whatever the tensor's size, beside the one buffer of its encoded bytes."""
SCALE_BYTES = 4
FLOAT32_ROUNDOFF = 2.0**-24
# Below this a bound's relative terms are meaningless (float32 subnormals); no delta of a
# trained model holds such values, and the bound stays honest for them.
INT8_TINY = 2.0**-118


class DeltaEncoding(StrEnum):
    """A way a delta's floating tensors travel; the value is the consortium file's name."""

    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"
    INT8_BLOCK = "int8_block"


_CAST_TYPES = {DeltaEncoding.BFLOAT16: torch.bfloat16, DeltaEncoding.FLOAT16: torch.float16}


def unit_roundoff(dtype: torch.dtype) -> float:
    """Half the distance from 1 to the next value of ``dtype``: rounding to nearest moves a
    normal value by at most this times its magnitude."""
    return float(torch.finfo(dtype).eps) / 2


def half_subnormal(dtype: torch.dtype) -> float:
    """Half ``dtype``'s smallest subnormal: the most rounding moves a value near zero."""
    return float(torch.finfo(dtype).smallest_normal) * float(torch.finfo(dtype).eps) / 2


def encoded_nbytes(encoding: DeltaEncoding, numel: int) -> int:
    """The bytes ``numel`` values take in ``encoding`` (not for :attr:`~DeltaEncoding.FLOAT32`,
    which sends each tensor's own bytes)."""
    if encoding in _CAST_TYPES:
        return 2 * numel
    if encoding is DeltaEncoding.INT8_BLOCK:
        return SCALE_BYTES * math.ceil(numel / INT8_BLOCK) + numel
    raise ValueError(f"{encoding.value!r} sends raw bytes: no encoded size")


def encodes(encoding: DeltaEncoding, dtype: torch.dtype) -> bool:
    """Whether ``encoding`` may carry tensors of ``dtype``: floating ones it makes smaller."""
    if encoding is DeltaEncoding.FLOAT32 or not dtype.is_floating_point:
        return False
    size = torch.empty((), dtype=dtype).element_size()
    return size > 2 if encoding in _CAST_TYPES else size >= 2


def encode(tensor: torch.Tensor, encoding: DeltaEncoding) -> bytearray | None:
    """``tensor``'s values in ``encoding`` (one buffer of :func:`encoded_nbytes`, filled
    :data:`SLAB` values at a time), or ``None`` when it must travel raw (see the module
    docstring for when)."""
    if not encodes(encoding, tensor.dtype) or tensor.numel() == 0:
        return None
    flat = tensor.detach().to("cpu").reshape(-1)
    count = flat.numel()
    out = bytearray(encoded_nbytes(encoding, count))
    cast = _CAST_TYPES.get(encoding)
    if cast is not None:
        encoded = torch.frombuffer(out, dtype=cast)
        for start in range(0, count, SLAB):
            # Through float32 first: one rounding path for float32 and float64 alike.
            piece = flat[start : start + SLAB].to(torch.float32).to(cast)
            if not bool(torch.isfinite(piece).all()):
                return None  # non-finite, or past the type's range: raw, never made infinite
            encoded[start : start + piece.numel()] = piece
        return out
    blocks = math.ceil(count / INT8_BLOCK)
    scales = torch.frombuffer(out, dtype=torch.float32, count=blocks)
    ints = torch.frombuffer(out, dtype=torch.int8, offset=SCALE_BYTES * blocks)
    for start in range(0, count, SLAB):
        piece = flat[start : start + SLAB].to(torch.float32)
        if not bool(torch.isfinite(piece).all()):
            return None  # non-finite, or a float64 value past float32's range
        first = start // INT8_BLOCK
        piece_scales, piece_ints = _int8_slab(piece)
        scales[first : first + piece_scales.numel()] = piece_scales
        ints[start : start + piece.numel()] = piece_ints
    return out


def _int8_slab(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The scales and int8 values of ``values`` (float32, starting on a block boundary)."""
    count = values.numel()
    blocks = math.ceil(count / INT8_BLOCK)
    padded = torch.zeros(blocks * INT8_BLOCK, dtype=torch.float32)
    padded[:count] = values
    grid = padded.view(blocks, INT8_BLOCK)  # (blocks, INT8_BLOCK)
    scales = grid.abs().amax(dim=1) / INT8_LEVELS  # (blocks,)
    divisor = torch.where(scales > 0, scales, torch.ones_like(scales))
    quantised = torch.round(grid / divisor[:, None]).clamp_(-INT8_LEVELS, INT8_LEVELS)
    return scales, quantised.to(torch.int8).reshape(-1)[:count]


def decoded_scales(data: bytes, dtype: torch.dtype) -> torch.Tensor:
    """The int8 blocks' scales from their bytes, refused (:class:`WireError`) when one is
    not finite, negative, or so large that 127 times it is past the range of ``dtype``
    (float32 for float64): no honest sender makes such a scale."""
    if not data:  # an empty tensor has no blocks
        return torch.empty(0, dtype=torch.float32)
    scales = torch.frombuffer(bytearray(data), dtype=torch.float32)
    bounding = dtype if dtype.itemsize <= 4 else torch.float32  # scales are float32
    limit = float(torch.finfo(bounding).max) / INT8_LEVELS
    bad = ~torch.isfinite(scales) | (scales < 0) | (scales > limit)
    if bool(bad.any()):
        index = int(bad.nonzero()[0, 0])
        raise WireError(
            f"int8 block {index} has scale {float(scales[index])!r}: a scale must be finite, "
            f">= 0 and at most {limit:.6g} (max of {bounding} / {INT8_LEVELS})"
        )
    return scales


class Decoder:
    """Decodes one encoded tensor as its bytes arrive, in pieces cut anywhere: each
    :meth:`feed` returns the values of ``dtype`` that its bytes complete, in order."""

    def __init__(self, encoding: DeltaEncoding, dtype: torch.dtype, numel: int) -> None:
        if not encodes(encoding, dtype):
            raise WireError(f"encoding {encoding.value!r} does not carry {dtype} tensors")
        self.encoding = encoding
        self.dtype = dtype
        self.numel = numel
        self._carry = b""  # the bytes of a value (or of the scales) not yet complete
        self._decoded = 0
        self._scales: torch.Tensor | None = None
        self._scale_bytes = SCALE_BYTES * math.ceil(numel / INT8_BLOCK)

    def feed(self, data: bytes) -> torch.Tensor:
        """The values ``data`` completes (flat, of ``dtype``; possibly none)."""
        cast = _CAST_TYPES.get(self.encoding)
        if cast is not None:
            return self._feed_cast(data, cast)
        return self._feed_int8(data)

    def _feed_cast(self, data: bytes, cast: torch.dtype) -> torch.Tensor:
        data = self._carry + data
        whole = len(data) - len(data) % 2
        self._carry = data[whole:]
        if not whole:
            return torch.empty(0, dtype=self.dtype)
        values = torch.frombuffer(bytearray(data[:whole]), dtype=cast)
        if not bool(torch.isfinite(values).all()):
            raise WireError(
                f"a non-finite value in a {self.encoding.value} tensor (an honest sender "
                "sends a tensor with non-finite values raw)"
            )
        self._decoded += values.numel()
        return values.to(self.dtype)

    def _feed_int8(self, data: bytes) -> torch.Tensor:
        if self._scales is None:
            data = self._carry + data
            if len(data) < self._scale_bytes:
                self._carry = data
                return torch.empty(0, dtype=self.dtype)
            self._scales = decoded_scales(data[: self._scale_bytes], self.dtype)
            self._carry, data = b"", data[self._scale_bytes :]
        if not data:
            return torch.empty(0, dtype=self.dtype)
        ints = torch.frombuffer(bytearray(data), dtype=torch.int8)
        if bool((ints < -INT8_LEVELS).any()):
            raise WireError(f"an int8 value of -128, outside [-{INT8_LEVELS}, {INT8_LEVELS}]")
        index = torch.arange(self._decoded, self._decoded + ints.numel()) // INT8_BLOCK
        self._decoded += ints.numel()
        return (ints.to(torch.float32) * self._scales[index]).to(self.dtype)

    def finish(self) -> None:
        """Refuse a tensor whose bytes ended inside a value (the caller checks the count)."""
        if self._carry or self._decoded != self.numel:
            raise WireError(
                f"{self.encoding.value} tensor decoded to {self._decoded} of {self.numel} values"
            )


def decode(data: bytes, encoding: DeltaEncoding, dtype: torch.dtype, numel: int) -> torch.Tensor:
    """A whole encoded tensor's values (flat), decoded in one piece."""
    decoder = Decoder(encoding, dtype, numel)
    values = decoder.feed(data)
    decoder.finish()
    return values


def error_bound(original: torch.Tensor, encoding: DeltaEncoding) -> torch.Tensor:
    """The most each decoded value may differ from ``original``'s (flat, float64), as the
    module docstring states it; zero where the tensor travels raw."""
    flat = original.detach().reshape(-1).to(torch.float64)
    if encode(original, encoding) is None:
        return torch.zeros_like(flat)
    cast = _CAST_TYPES.get(encoding)
    if cast is not None:
        return (unit_roundoff(cast) + FLOAT32_ROUNDOFF) * flat.abs() + half_subnormal(cast)
    count = flat.numel()
    blocks = math.ceil(count / INT8_BLOCK)
    padded = torch.zeros(blocks * INT8_BLOCK, dtype=torch.float64)
    padded[:count] = flat.abs()
    absmax = padded.view(blocks, INT8_BLOCK).amax(dim=1).repeat_interleave(INT8_BLOCK)[:count]
    # scale/2, float32 arithmetic (x/scale, q*scale, a float64 x through float32: a few
    # 2^-24 of 127 scales, within 2^-16 of the block's max), the target's own rounding.
    rounding = 2.0**-16 + unit_roundoff(original.dtype)
    return absmax / INT8_LEVELS / 2 + rounding * absmax + half_subnormal(original.dtype) + INT8_TINY
