"""Node servers on 127.0.0.1 in the test's own process, and the coordinator's proxies to
them: rounds through the real wire that start in a second, even with eight nodes or a node
whose servicer misbehaves from the inside."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from tapestry.consortium.v1 import consortium_pb2_grpc as pb_grpc
from tapestry.coordinator.remote_node import RemoteSovereignNode
from tapestry.node.servicer import SovereignNodeServicer
from tapestry.training.consortium.models.spec import ModelSpec
from tapestry.wire.grpc_plumbing import build_server


@dataclass
class Served:
    proxies: list[RemoteSovereignNode]
    received: dict[str, int]  # delta bytes the coordinator received, per node
    servicers: dict[str, SovereignNodeServicer]


@contextmanager
def served_nodes(
    root: Path,
    servicers: Mapping[str, SovereignNodeServicer],
    *,
    spec: ModelSpec,
    consortium_id: str,
    chunk_bytes: int,
    timeout_s: Mapping[str, float] | None = None,
) -> Iterator[Served]:
    """A server per ``servicers`` entry (node id -> servicer) and a proxy to each, spilling
    to ``root/spill`` and counting the delta bytes it receives; ``timeout_s`` sets a node's
    proxy call deadline (120 s by default). Every server is stopped on the way out."""
    received: dict[str, int] = {}
    proxies = []
    with ExitStack() as stack:
        for node_id, servicer in servicers.items():
            server, port, _ = build_server(
                "127.0.0.1:0",
                [lambda s, v=servicer: pb_grpc.add_SovereignNodeServiceServicer_to_server(v, s)],
                [],
            )
            server.start()
            stack.callback(lambda s=server: s.stop(None).wait())
            received[node_id] = 0

            def count_received(n: int, node_id: str = node_id) -> None:
                received[node_id] += n

            proxy = RemoteSovereignNode(
                node_id,
                node_id.upper(),
                f"127.0.0.1:{port}",
                model=spec,
                consortium_id=consortium_id,
                timeout_s=(timeout_s or {}).get(node_id, 120.0),
                chunk_bytes=chunk_bytes,
                spill_dir=root / "spill",
                count_received=count_received,
            )
            stack.callback(proxy.close)
            proxies.append(proxy)
        yield Served(proxies, received, dict(servicers))
