"""A node protects itself, with real node processes on 127.0.0.1: a caller posing as the
coordinator replays, forges or stalls, and each attempt is refused with its status and
message while the node's files stay as they were; the real coordinator's rounds go on.
One case per test."""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.consortium.v1 import consortium_pb2_grpc as pb_grpc
from tapestry.demo.launcher import LocalConsortium
from tapestry.training.consortium import ModelSpec
from tapestry.wire.tensor_stream import send_state

from .conftest import POLICY, node_specs

pytestmark = pytest.mark.slow  # whole consortia of training processes

CONSORTIUM = "tapestry-guarded"
RECEIVE_TIMEOUT_S = 2.0
Request = pb.RunSovereignCycleRequest


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalConsortium]:
    """Three nodes with a short receive deadline, after two committed rounds."""
    root = tmp_path_factory.mktemp("guarded")
    specs = [
        dataclasses.replace(spec, limits={"receive_timeout_s": RECEIVE_TIMEOUT_S})
        for spec in node_specs(root)
    ]
    # The node listens: a caller posing as its coordinator reaches its port.
    consortium = LocalConsortium(
        root, specs, consortium_id=CONSORTIUM, policy=POLICY, dial_out=False
    )
    try:
        consortium.start()
        with consortium.client() as client:
            for _ in range(2):
                assert client.run_round().accepted_nodes == ["vietnam", "switzerland", "india"]
        yield consortium
    finally:
        consortium.stop()


@pytest.fixture
def india(guarded: LocalConsortium) -> Iterator[pb_grpc.SovereignNodeServiceStub]:
    with guarded.channel("india", "coordinator", "") as channel:
        yield pb_grpc.SovereignNodeServiceStub(channel)


def _files(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _start(round_num: int, consortium_id: str = CONSORTIUM) -> Request:
    return Request(start=pb.CycleStart(round_num=round_num, consortium_id=consortium_id))


def _base() -> list[Request]:
    return list(
        send_state(
            ModelSpec().build(seed=1).state_dict(),
            lambda c: Request(base_chunk=c),
            lambda t: Request(base_end=t),
        )
    )


# The message of each refusal, given the node's newest retained round.
ATTACKS: dict[str, tuple[Request, str]] = {
    "a replay of round 1": (
        _start(1),
        "CycleRefused: node 'india' refuses round 1: it is below the node's newest retained "
        "round {newest}, and a node never rewrites its history (only round {newest} may run "
        "again)",
    ),
    "a forged round far ahead": (
        _start(5000),
        "CycleRefused: node 'india' refuses round 5000: it is more than max_round_gap = 1000 "
        "rounds past the node's newest retained round {newest} (at most round {most}); raise "
        "[limits] max_round_gap in the node's config if the consortium really is that far ahead",
    ),
    "another consortium": (
        _start(3, "someone-else"),
        "CycleRefused: node 'india' does not serve consortium 'someone-else': "
        "CycleStart.consortium_id must equal the consortium_id of the node's config (the "
        "coordinator's consortium file and the node's config must name the same one)",
    ),
}


@pytest.mark.parametrize("case", list(ATTACKS))
def test_a_posing_coordinator_is_refused_and_the_node_keeps_its_artifacts(
    guarded: LocalConsortium, india: pb_grpc.SovereignNodeServiceStub, case: str
) -> None:
    start, message = ATTACKS[case]
    artifacts = guarded.node_data_dir("india") / "artifacts"
    before = _files(artifacts)
    newest = india.Describe(pb.DescribeRequest()).latest_round
    assert newest >= 2

    with pytest.raises(grpc.RpcError) as caught:
        list(india.RunSovereignCycle(iter([start, *_base()]), timeout=60))

    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert caught.value.details() == message.format(newest=newest, most=newest + 1000)
    assert _files(artifacts) == before


def test_a_stream_that_sends_only_its_start_does_not_hold_the_node(
    guarded: LocalConsortium, india: pb_grpc.SovereignNodeServiceStub
) -> None:
    artifacts = guarded.node_data_dir("india") / "artifacts"
    before = _files(artifacts)
    release = threading.Event()

    def idle() -> Iterator[Request]:
        yield _start(4)
        release.wait(timeout=60)  # open and silent until the node has dropped the call

    try:
        with pytest.raises(grpc.RpcError) as caught:
            list(india.RunSovereignCycle(idle(), timeout=60))
    finally:
        release.set()

    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert caught.value.details() == (
        "TimeoutError: the base did not arrive within receive_timeout_s = 2 s; "
        "the node dropped the call"
    )
    assert _files(artifacts) == before
    # The node is free again: the real coordinator's next round has every node in it.
    with guarded.client() as client:
        result = client.run_round()
    assert result.accepted_nodes == ["vietnam", "switzerland", "india"]
    assert dict(result.failed_nodes) == {}
