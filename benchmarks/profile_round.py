"""Where a round's CPU goes: py-spy records the coordinator and node n0 (all threads, raw
stacks) during rounds on loopback, after a warm-up round, and prints each one's top
functions by self time.

    PYTHONPATH=services .venv/bin/python benchmarks/profile_round.py --params 25M \\
        --out /tmp/profile [--gil]

``--gil`` samples only the thread that holds the GIL: what Python itself costs, against the
native work (gRPC's C core, hashing, torch) that runs without it. py-spy is not a project
dependency: `.venv/bin/pip install py-spy` first; it needs ptrace rights over the processes
(run it as their user).
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from round_bench import consortium, hidden_for, parse_params

IDLE = ("wait (threading", "_wait_once", "select (", "poll (", "sleep")


def top(raw: Path, count: int = 12) -> list[tuple[float, str]]:
    """The ``count`` functions with the most self samples (idle waits left out), as shares."""
    totals: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, samples = line.rpartition(" ")
        if not stack:
            continue
        leaf = stack.split(";")[-1]
        if any(idle in leaf for idle in IDLE):
            continue
        totals[re.sub(r" \(.*\)$", "", leaf)] += int(samples)
    whole = sum(totals.values()) or 1
    return [(n / whole, name) for name, n in totals.most_common(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="25M")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("profile"))
    parser.add_argument("--gil", action="store_true", help="only the thread holding the GIL")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    beside = Path(sys.executable).with_name("py-spy")
    spy = str(beside) if beside.exists() else shutil.which("py-spy")
    if spy is None:
        sys.exit("py-spy not found: .venv/bin/pip install py-spy")
    extra = ["--gil"] if args.gil else []
    with tempfile.TemporaryDirectory() as tmp:
        hidden = hidden_for(parse_params(args.params))
        with consortium(Path(tmp), hidden, 3, "synthetic") as local, local.client() as client:
            client.run_round()  # warm-up
            names = ("coordinator", "n0")
            recorders = [
                subprocess.Popen(
                    [spy, "record", "--pid", str(local.processes[name].popen.pid)]
                    + ["--rate", "100", "--format", "raw", "--threads", "--nonblocking"]
                    + [*extra, "-o", str(args.out / f"{name}.txt")],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                for name in names
            ]
            time.sleep(1.0)
            for _ in range(args.rounds):
                start = time.perf_counter()
                result = client.run_round()
                print(f"round {result.round_num}: {time.perf_counter() - start:.2f} s")
            for recorder in recorders:
                recorder.send_signal(2)  # py-spy writes its file on SIGINT
            for recorder in recorders:
                recorder.wait(60)
    for name in names:
        samples = sum(
            int(line.rpartition(" ")[2])
            for line in (args.out / f"{name}.txt").read_text().splitlines()
            if line.strip()
        )
        print(f"{name}: {samples} samples at 100 Hz")
        for share, function in top(args.out / f"{name}.txt"):
            print(f"  {share:6.1%} {function}")


if __name__ == "__main__":
    main()
