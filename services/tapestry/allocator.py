"""Keep a server's memory near what it holds, not what it once touched (the coordinator and
the node alike).

A round moves every tensor through short-lived buffers (chunks out and in, spilled deltas
read back, the integrated base, the commit). With glibc's defaults each of the per-stream
threads gets its own malloc arena and freed blocks stay with the process, so the resident
size climbs round after round to many times the model (benchmarks/RESULTS.md). Capping the
arenas and returning freed memory above a small threshold holds the peak near the live data.

glibc only (``mallopt``); elsewhere this is a no-op. Settings must be made before the
threads that allocate are started: call it first thing at start-up.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_ARENA_MAX = -8


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library, loaded once (``find_library`` may run a subprocess to look for it);
    ``None`` where it cannot be loaded."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def tune_allocator(arena_max: int, trim_threshold_bytes: int) -> bool:
    """Apply the settings; False (and a debug log line) when the C library lacks mallopt."""
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:
        log.debug("no mallopt in this C library: allocator left as it is")
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    applied = bool(mallopt(_M_ARENA_MAX, arena_max)) and bool(
        mallopt(_M_TRIM_THRESHOLD, trim_threshold_bytes)
    )
    # Debug: a server that then fails its start-up checks says one line, the reason.
    log.debug(
        "allocator: arena_max=%d trim_threshold=%d bytes (%s)",
        arena_max,
        trim_threshold_bytes,
        "applied" if applied else "refused",
    )
    return applied


def release_free_memory() -> None:
    """Hand the pages of freed blocks back to the system (glibc's ``malloc_trim``), also
    those in the middle of the heap, which the trim threshold alone never returns: the
    streams of a round leave them behind just before integration allocates a new state."""
    malloc_trim = getattr(_libc(), "malloc_trim", None)
    if malloc_trim is not None:  # glibc only
        malloc_trim(ctypes.c_size_t(0))
