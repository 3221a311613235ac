"""Streaming a model state over gRPC (TensorChunk stream + validated reassembly) against raw
loopback TCP moving the same bytes. DESIGN §4: the wire's overhead should stay within 2x.

    .venv/bin/python benchmarks/wire_throughput.py [--mib 64 256] [--repeats 3] \
        [--chunk-kib 1024 2048 4096]

Both sides run in one process on 127.0.0.1 (server in a thread), like the CI machine's
loopback; numbers are the median of --repeats; one row per state size and chunk size.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import threading
import time
from concurrent import futures

import grpc
import torch

from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.consortium.v1 import consortium_pb2_grpc as pb_grpc
from tapestry.training.consortium.tensors import state_digest, tensor_bytes
from tapestry.wire.grpc_plumbing import CHANNEL_OPTIONS, SERVER_OPTIONS
from tapestry.wire.tensor_stream import StateAssembler, receive_state, send_state, spec_of


def make_state(mib: int) -> dict[str, torch.Tensor]:
    per = mib * (1 << 20) // 4 // 4
    g = torch.Generator().manual_seed(0)
    return {f"layer{i}.weight": torch.randn(per, generator=g) for i in range(4)}


class BaseServer(pb_grpc.CoordinatorServiceServicer):
    def __init__(self, state: dict[str, torch.Tensor], chunk_bytes: int) -> None:
        self.state = state
        self.chunk_bytes = chunk_bytes
        self.sha256 = state_digest(state)  # known in advance, as the coordinator's base is

    def GetBase(self, request, context):  # noqa: N802 - gRPC method name
        yield pb.GetBaseResponse(header=pb.BaseHeader(round_num=0))
        yield from send_state(
            self.state,
            lambda c: pb.GetBaseResponse(chunk=c),
            lambda t: pb.GetBaseResponse(end=t),
            sha256=self.sha256,
            chunk_bytes=self.chunk_bytes,
        )


def grpc_seconds(state: dict[str, torch.Tensor], chunk_bytes: int) -> float:
    server = grpc.server(futures.ThreadPoolExecutor(4), options=SERVER_OPTIONS)
    pb_grpc.add_CoordinatorServiceServicer_to_server(BaseServer(state, chunk_bytes), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS) as channel:
            stub = pb_grpc.CoordinatorServiceStub(channel)
            start = time.perf_counter()
            stream = stub.GetBase(pb.GetBaseRequest())
            next(stream)  # the header
            # Includes the digest check, as every receiver does.
            received = receive_state(stream, "chunk", "end", StateAssembler(spec_of(state)))
            elapsed = time.perf_counter() - start
        assert state_digest(received) == state_digest(state)
        return elapsed
    finally:
        server.stop(0)


def tcp_seconds(state: dict[str, torch.Tensor]) -> float:
    payload = [tensor_bytes(t) for t in state.values()]
    total = sum(len(p) for p in payload)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def send() -> None:
        conn, _ = listener.accept()
        with conn:
            for part in payload:
                conn.sendall(part)

    sender = threading.Thread(target=send)
    sender.start()
    buffer = bytearray(total)
    view = memoryview(buffer)
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as conn:
        got = 0
        while got < total:
            n = conn.recv_into(view[got:], min(1 << 20, total - got))
            if n == 0:
                raise RuntimeError("short read")
            got += n
    elapsed = time.perf_counter() - start
    sender.join()
    listener.close()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-kib", type=int, nargs="+", default=[1024])
    args = parser.parse_args()
    print("| state | chunk | raw TCP | gRPC stream (chunks + checks + digest) | ratio |")
    print("|---|---|---|---|---|")
    for mib in args.mib:
        state = make_state(mib)
        tcp = statistics.median(tcp_seconds(state) for _ in range(args.repeats))
        for kib in args.chunk_kib:
            rpc = statistics.median(grpc_seconds(state, kib << 10) for _ in range(args.repeats))
            print(
                f"| {mib} MiB | {kib} KiB | {tcp:.3f} s ({mib / tcp:.0f} MiB/s) | "
                f"{rpc:.3f} s ({mib / rpc:.0f} MiB/s) | {rpc / tcp:.2f}x |"
            )


if __name__ == "__main__":
    main()
