"""What each delta encoding costs in CPU: one float32 tensor sent and received in memory.

    .venv/bin/python benchmarks/encoding_codec.py --mib 64 --repeats 3

``send`` is :func:`~tapestry.wire.tensor_stream.send_state` (encode, chunk, sha256 of what
travels); ``receive`` is a :class:`~tapestry.wire.tensor_stream.StateAssembler` fed every
chunk (checks, decode, sha256). One torch thread, best of ``--repeats``; no network.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.wire.delta_encoding import DeltaEncoding
from tapestry.wire.tensor_stream import StateAssembler, send_state, spec_of


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64, help="the float32 tensor's size")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    state = {"w": torch.randn(args.mib << 18, generator=torch.Generator().manual_seed(0)) * 1e-3}
    print(f"load average before: {os.getloadavg()}")
    print("| encoding | on the wire | send | receive |\n|---|---|---|---|")
    for encoding in DeltaEncoding:
        send = receive = float("inf")
        for _ in range(args.repeats):
            started = time.perf_counter()
            messages = list(send_state(state, lambda c: c, lambda t: t, encoding=encoding))
            sent = time.perf_counter()
            assembler = StateAssembler(spec_of(state), [encoding])
            *chunks, trailer = messages
            for chunk in chunks:
                assert isinstance(chunk, pb.TensorChunk)
                assembler.add(chunk)
            assert isinstance(trailer, pb.StateTrailer)
            assembler.finish(trailer)
            send = min(send, sent - started)
            receive = min(receive, time.perf_counter() - sent)
        wire = sum(len(c.data) for c in chunks if isinstance(c, pb.TensorChunk)) / 2**20
        print(f"| {encoding.value} | {wire:.1f} MiB | {send:.3f} s | {receive:.3f} s |")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
