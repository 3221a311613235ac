"""The coordinator's resident memory after each of several rounds (does it come back down?).

    .venv/bin/python benchmarks/rss_over_rounds.py [--rounds 10] [--hidden 8192]

Prints "RSS/peak" in MiB after every round. Allocator settings can be compared by setting
TAPESTRY_ARENA_MAX / TAPESTRY_TRIM_THRESHOLD (read by `tapestry coordinator serve`).
"""

from __future__ import annotations

import argparse

from round_profile import bench_consortium, kib


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=8192)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    with bench_consortium(args.hidden, args.nodes) as consortium:
        pid = consortium.processes["coordinator"].popen.pid
        readings = [f"idle {kib(pid, 'VmRSS') // 1024}"]
        with consortium.client() as client:
            for _ in range(args.rounds):
                client.run_round()
                readings.append(f"{kib(pid, 'VmRSS') // 1024}/{kib(pid, 'VmHWM') // 1024}")
    print("coordinator RSS/peak MiB after each round:", " ".join(readings))


if __name__ == "__main__":
    main()
