"""HTTP/2 flow-control windows sized from the link, so one connection fills it.

A receiver lets a sender have at most its window in flight: over a link of bandwidth B and
round trip T, a window below B·T caps the stream at window/T whatever B is (4 MiB over
200 ms: ~20 MB/s on a 1 Gbit/s link). gRPC's BDP probe grows the window only as pings come
back, so a fresh connection starts slow, and its window has no bound we choose. So the probe
is off and the window fixed at 2·B·T, rounded up to a power of two, at least
:data:`~tapestry.limits.MIN_WINDOW_BYTES`, and at most the process's budget divided by the
streams it may receive at once: what a receiver that falls behind can be made to hold is
then that budget, whatever the number of members (benchmarks/RESULTS.md, "Issue 15 (4)":
64 MiB reaches the plain socket's time at 1 Gbit/s and 200 ms, today's 4 MiB takes 5.1x).

The receiver's window is what counts: the node's channel options for the base it downloads,
the coordinator's server options for the deltas it receives.
"""

from __future__ import annotations

from tapestry.config import LinkConfig
from tapestry.limits import MIN_WINDOW_BYTES


def window_bytes(link: LinkConfig, sessions: int = 1) -> int:
    """The window of each stream a process receives over ``link`` from ``sessions``
    sessions at once, each spread over the link's ``streams`` connections (lanes): a lane
    carries its share of the link, so needs its share of the bandwidth-delay product."""
    lanes = max(1, link.streams)
    bdp = link.bandwidth_mbit * 1e6 / 8 * link.rtt_ms / 1e3 / lanes
    wanted = 1 << max(0, int(2 * bdp - 1).bit_length())  # 2·BDP, a power of two
    share = (link.window_budget_mib << 20) // (max(1, sessions) * lanes)
    return max(MIN_WINDOW_BYTES, min(wanted, share))


def window_options(window: int) -> list[tuple[str, int]]:
    """The channel or server options that fix the receive window at ``window`` bytes."""
    return [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", window)]
