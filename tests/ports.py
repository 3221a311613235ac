"""Port numbers for the tests that need one before (or without) a server on it.

Every other test's server binds port 0 and every client connection gets a local port; the
kernel takes both from its ephemeral range, and with the suite's files run side by side
(scripts/test's workers) that happens while such a test waits. A port from below that range,
checked free, is one none of them can take in the meantime.
"""

from __future__ import annotations

import random
import socket
from contextlib import ExitStack
from pathlib import Path

PORT_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LINUX_DEFAULT_RANGE = (32768, 60999)
LOWEST = 10_000  # clear of the well-known and commonly configured ports


def ephemeral_range() -> tuple[int, int]:
    """The ports the kernel hands out for port 0 and for connections (inclusive)."""
    try:
        low, high = (int(word) for word in PORT_RANGE.read_text().split())
    except (OSError, ValueError):
        return LINUX_DEFAULT_RANGE
    return low, high


def free_ports(count: int = 1) -> int:
    """The first of ``count`` consecutive ports on 127.0.0.1 that are free right now and
    outside the ephemeral range."""
    low, high = ephemeral_range()
    if low - LOWEST > 100 * count:
        span = (LOWEST, low - count)
    elif 65535 - high > 100 * count:
        span = (high + 1, 65536 - count)
    else:  # a range over (nearly) everything: any free ports will do
        span = (1024, 65536 - count)
    choose = random.Random()  # unseeded: two runs on one machine pick apart
    for _ in range(200):
        first = choose.randrange(*span)
        with ExitStack() as held:
            try:
                for port in range(first, first + count):
                    held.enter_context(socket.socket()).bind(("127.0.0.1", port))
            except OSError:
                continue
            return first
    raise RuntimeError(f"no {count} consecutive free ports found in {span}")
