"""The coordinator asks a node who it is again when the node is UNAVAILABLE (gRPC's retry
policy on Describe), and never retries a cycle once the base has been sent."""

from __future__ import annotations

import socket
import threading
import time
from concurrent import futures

import grpc
import pytest
import torch

from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.consortium.v1 import consortium_pb2_grpc as pb_grpc
from tapestry.coordinator.remote_node import DESCRIBE_TIMEOUT_S, NodeCallFailed, RemoteSovereignNode
from tapestry.training.consortium import ModelSpec
from tapestry.wire.grpc_plumbing import NODE_SERVICE
from tapestry.wire.tensor_stream import StateAssembler, receive_state

from ..ports import free_ports
from .fake_nodes import FakeNode, serve


class FlakyNode(FakeNode):
    """Answers its first ``failures`` Describes with UNAVAILABLE; its cycle takes the whole
    base in, then fails UNAVAILABLE when ``cycle_fails``."""

    def __init__(self, node_id: str, failures: int = 0, cycle_fails: bool = False) -> None:
        super().__init__(node_id)
        self.failures = failures
        self.cycle_fails = cycle_fails
        self.describes = 0

    def Describe(self, request, context):  # noqa: N802
        self.describes += 1
        if self.describes <= self.failures:
            context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        return super().Describe(request, context)

    def RunSovereignCycle(self, request_iterator, context):  # noqa: N802
        if not self.cycle_fails:
            yield from super().RunSovereignCycle(request_iterator, context)
            return
        self.cycles += 1
        next(request_iterator)
        receive_state(request_iterator, "base_chunk", "base_end", StateAssembler())
        context.abort(grpc.StatusCode.UNAVAILABLE, "dropped after the base")


def _remote(member: dict[str, str]) -> RemoteSovereignNode:
    return RemoteSovereignNode(
        member["node_id"], member["jurisdiction"], member["address"], model=ModelSpec()
    )


def test_the_retried_method_is_the_nodes_describe():
    service = pb.DESCRIPTOR.services_by_name["SovereignNodeService"]
    assert service.full_name == NODE_SERVICE
    assert "Describe" in service.methods_by_name


def test_describe_is_asked_again_after_unavailable():
    flaky = FlakyNode("flaky", failures=2)
    with serve([flaky]) as members:
        node = _remote(members[0])
        try:
            node.check_identity()
        finally:
            node.close()
    assert flaky.describes == 3


def test_describe_gives_up_after_five_attempts_with_the_nodes_status():
    flaky = FlakyNode("flaky", failures=10)
    with serve([flaky]) as members:
        node = _remote(members[0])
        try:
            with pytest.raises(NodeCallFailed) as failed:
                node.check_identity()
        finally:
            node.close()
    assert flaky.describes == 5
    assert str(failed.value) == (
        f"the sovereign node at {members[0]['address']} went away during the call "
        "(UNAVAILABLE: warming up)"
    )


def test_a_cycle_that_fails_after_the_base_was_sent_is_not_retried():
    flaky = FlakyNode("flaky", cycle_fails=True)
    base = {"w": torch.zeros(4)}
    with serve([flaky]) as members:
        node = _remote(members[0])
        try:
            with pytest.raises(NodeCallFailed, match=r"UNAVAILABLE: dropped after the base"):
                node.run_sovereign_cycle(1, base)
        finally:
            node.close()
    assert (flaky.describes, flaky.cycles) == (1, 1)


def test_a_node_that_comes_up_after_the_first_attempt_is_still_reached():
    """The first attempt meets a listener that drops the connection (nobody serves gRPC
    there yet); only then does the node start on that port."""
    port = free_ports(1)  # out of reach of other tests' servers while it is between owners
    with socket.create_server(("127.0.0.1", port)) as listener:
        node = RemoteSovereignNode("late", "Nowhere", f"127.0.0.1:{port}", model=ModelSpec())
        outcome: list[BaseException | None] = []

        def identify() -> None:
            try:
                node.check_identity()
                outcome.append(None)
            except BaseException as error:
                outcome.append(error)

        started = time.monotonic()
        asking = threading.Thread(target=identify)
        asking.start()
        listener.settimeout(DESCRIBE_TIMEOUT_S)
        first, _ = listener.accept()
        first.close()
    server = grpc.server(futures.ThreadPoolExecutor(2))
    try:
        pb_grpc.add_SovereignNodeServiceServicer_to_server(FakeNode("late"), server)
        assert server.add_insecure_port(f"127.0.0.1:{port}") == port
        server.start()
        asking.join(timeout=DESCRIBE_TIMEOUT_S + 5)
    finally:
        server.stop(0)
        node.close()
    assert outcome == [None]
    assert time.monotonic() - started < DESCRIBE_TIMEOUT_S
