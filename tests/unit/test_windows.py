"""Flow-control windows follow the link: 2 x bandwidth x round trip, a power of two, at
least 4 MiB, and within the process's budget shared by its streams."""

from __future__ import annotations

import pytest

from tapestry.config import LinkConfig
from tapestry.limits import MIN_WINDOW_BYTES
from tapestry.wire.windows import window_bytes, window_options

MIB = 1 << 20


@pytest.mark.parametrize(
    ("bandwidth_mbit", "rtt_ms", "streams", "mib"),
    [
        (1000, 200, 1, 64),  # 2 x 25 MB = 50 MB -> 64 MiB
        (1000, 200, 3, 32),  # 3 streams share the 96 MiB budget: 168 MB/s each at 200 ms
        (1000, 200, 8, 12),  # 8 streams share it too
        (1000, 100, 1, 32),
        (200, 200, 1, 16),
        (10, 1, 1, 4),  # never below gRPC's usual 4 MiB
        (100_000, 300, 1, 96),  # never above the budget
    ],
)
def test_a_window_is_twice_the_bandwidth_delay_product_within_the_budget(
    bandwidth_mbit, rtt_ms, streams, mib
):
    link = LinkConfig(bandwidth_mbit=bandwidth_mbit, rtt_ms=rtt_ms)
    assert window_bytes(link, streams) == mib * MIB


def test_the_memory_windows_cost_is_flat_in_the_number_of_members():
    link = LinkConfig()  # 1 Gbit/s, 200 ms, 96 MiB
    for members in (3, 8, 32, 100):
        assert members * window_bytes(link, members) <= max(
            link.window_budget_mib * MIB, members * MIN_WINDOW_BYTES
        )


def test_at_the_defaults_three_members_and_eight_share_the_same_budget():
    # The budget binds from three members up, so what windows may hold does not grow with
    # the members (it did: 3 x 64 MiB at three, 8 x 32 MiB at eight, with a 256 MiB budget),
    # and each of three members' windows still fills the default link (>= its BDP, 25 MB).
    link = LinkConfig()
    budget = link.window_budget_mib * MIB
    for members in (3, 8):
        assert budget - members < members * window_bytes(link, members) <= budget
    assert window_bytes(link, 3) >= 1000e6 / 8 * 0.2


def test_the_window_is_fixed_and_gRPCs_probe_is_off():
    assert window_options(64 * MIB) == [
        ("grpc.http2.bdp_probe", 0),
        ("grpc.http2.lookahead_bytes", 64 * MIB),
    ]
