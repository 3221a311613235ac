"""A trigger with a request id runs its round at most once (AIP-155): a retry gets the round
it started, while it runs, after it committed, and after the coordinator restarted."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest

from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.consortium.v1 import consortium_pb2_grpc as pb_grpc
from tapestry.coordinator import servicer as coordinator_servicer
from tapestry.coordinator.client import CoordinatorClient
from tapestry.coordinator.journal import CoordinatorStore
from tapestry.coordinator.servicer import CoordinatorServicer
from tapestry.demo.launcher import LocalConsortium
from tapestry.limits import MAX_REQUEST_ID_CHARS
from tapestry.training.consortium import ConsortiumCoordinator, ModelSpec
from tapestry.wire.grpc_plumbing import build_server

from .conftest import POLICY, round_run
from .fake_nodes import BlockingNode, FakeNode, serve


@contextmanager
def coordinator_over_fakes(root: Path) -> Iterator[tuple[LocalConsortium, list[FakeNode]]]:
    """A coordinator process over two in-process fake nodes (quick: no training)."""
    nodes = [FakeNode("alpha"), FakeNode("beta")]
    with (
        serve(nodes) as members,
        LocalConsortium(root, [], policy=POLICY, extra_members=members, tls=False) as consortium,
    ):
        yield consortium, nodes


@pytest.fixture
def fake_consortium(tmp_path: Path) -> Iterator[tuple[LocalConsortium, list[FakeNode]]]:
    with coordinator_over_fakes(tmp_path) as started:
        yield started


@pytest.fixture(scope="module")
def untouched_consortium(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[LocalConsortium, list[FakeNode]]]:
    """One for the refused triggers, which must leave it as they found it: no round, no
    cycle (each of them checks)."""
    with coordinator_over_fakes(tmp_path_factory.mktemp("untouched")) as started:
        yield started


def test_a_retry_with_the_same_id_returns_the_committed_round_even_after_a_restart(
    fake_consortium,
):
    consortium, nodes = fake_consortium
    with consortium.client() as client:
        first = client.run_round(request_id="trigger-1")
        again = client.run_round(request_id="trigger-1")
        assert [r.round_num for r in client.list_rounds()] == [1]
    assert again == first
    assert [n.cycles for n in nodes] == [1, 1]  # no node trained twice

    consortium.restart_coordinator()
    with consortium.client() as client:
        after_restart = client.run_round(request_id="trigger-1")
        other = client.run_round(request_id="trigger-2")
        rounds = [r.round_num for r in client.list_rounds()]
    assert after_restart == first
    assert other.round_num == 2
    assert rounds == [1, 2]
    assert [n.cycles for n in nodes] == [2, 2]


def test_calls_without_an_id_each_run_a_round(fake_consortium):
    consortium, _ = fake_consortium
    with consortium.client() as client:
        assert [client.run_round().round_num for _ in range(2)] == [1, 2]


@pytest.mark.parametrize(
    ("request_id", "message"),
    [
        (
            "x" * (MAX_REQUEST_ID_CHARS + 1),
            f"ValueError: request_id is {MAX_REQUEST_ID_CHARS + 1} characters long; at most "
            f"MAX_REQUEST_ID_CHARS = {MAX_REQUEST_ID_CHARS} are allowed (send a UUID)",
        ),
        (
            "two words",
            "ValueError: request_id must be printable ASCII without spaces or control "
            "characters (send a UUID)",
        ),
    ],
)
def test_a_bad_request_id_is_refused_without_echoing_it(untouched_consortium, request_id, message):
    consortium, nodes = untouched_consortium
    with consortium.client() as client:
        with pytest.raises(grpc.RpcError) as refused:
            client.run_round(request_id=request_id)
        assert client.list_rounds() == []
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details() == message
    assert [n.cycles for n in nodes] == [0, 0]


def test_a_retry_while_its_round_runs_waits_for_that_rounds_result(tmp_path):
    """The round is held open by a node that answers only when released; the retry is
    attached (its headers arrive) before the release, so it is answered by the running
    round, not from the journal. Another id meanwhile is refused."""
    blocking = BlockingNode("slow")
    with (
        serve([blocking, FakeNode("fast")]) as members,
        LocalConsortium(
            tmp_path, [], policy=POLICY, extra_members=members, tls=False
        ) as consortium,
        consortium.client() as client,
        consortium.channel("coordinator") as channel,
    ):
        outcome: list[pb.ConsortiumRoundResult] = []
        first = threading.Thread(target=lambda: outcome.append(client.run_round(request_id="held")))
        first.start()
        try:
            assert blocking.started.wait(timeout=60)
            stub = pb_grpc.CoordinatorServiceStub(channel)
            retry = stub.RunRound(pb.RunRoundRequest(request_id="held"), timeout=60)
            retry.initial_metadata()  # the coordinator has taken the retry in
            with pytest.raises(grpc.RpcError) as refused:
                list(stub.RunRound(pb.RunRoundRequest(request_id="another"), timeout=60))
        finally:
            blocking.release.set()
            first.join(timeout=60)
        replies = list(retry)
        rounds = client.list_rounds()

    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "round 1 is already running" in refused.value.details()
    assert [r.WhichOneof("event") for r in replies] == ["result"]
    assert replies[0].result == outcome[0]
    assert outcome[0].round_num == 1
    assert sorted(outcome[0].accepted_nodes) == ["fast", "slow"]
    assert [r.round_num for r in rounds] == [1]
    assert blocking.cycles == 1


@pytest.mark.slow
def test_the_cli_retries_a_round_with_request_id_and_draws_a_fresh_id_otherwise(
    fake_consortium,
):
    consortium, _ = fake_consortium
    ran = [round_run(consortium, "--json", "--request-id", "cli-retry") for _ in range(2)]
    fresh = round_run(consortium, "--json")
    assert [r.returncode for r in (*ran, fresh)] == [0, 0, 0], [r.stderr for r in ran]
    assert [json.loads(r.stdout)["round_num"] for r in (*ran, fresh)] == [1, 1, 2]


@contextmanager
def memberless_coordinator(root: Path) -> Iterator[str]:
    """A coordinator servicer with no members (a round commits in milliseconds) behind a
    real server on 127.0.0.1; yields its address."""
    spec = ModelSpec(hidden_size=4)
    core = ConsortiumCoordinator(spec.build(seed=1), copy_states=False)
    store = CoordinatorStore(root)
    store.save_initial_base(core.shared_base_state)
    servicer = CoordinatorServicer(core, [], store, spec)
    server, port, _ = build_server(
        "127.0.0.1:0",
        [lambda s: pb_grpc.add_CoordinatorServiceServicer_to_server(servicer, s)],
        ["tapestry.consortium.v1.CoordinatorService"],
    )
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(0)


class NoThreads:
    """A process out of threads: ``start`` fails as CPython's does."""

    def __init__(self, **_: object) -> None:
        pass

    def start(self) -> None:
        raise RuntimeError("can't start new thread")


def test_a_round_that_cannot_start_its_thread_leaves_the_coordinator_free(tmp_path, monkeypatch):
    """The claim a trigger takes is always settled: a round whose thread cannot start is that
    call's error, and the next trigger (its retry included) runs the round, where a leaked
    claim would refuse every later round and rollback as busy until a restart."""
    with memberless_coordinator(tmp_path) as address, CoordinatorClient(address) as client:
        monkeypatch.setattr(coordinator_servicer, "threading", SimpleNamespace(Thread=NoThreads))
        with pytest.raises(grpc.RpcError) as failed:
            client.run_round(request_id="out-of-threads", timeout_s=30)
        monkeypatch.undo()
        retried = client.run_round(request_id="out-of-threads", timeout_s=30)
        rolled_back = client.roll_back_base(0)

    assert failed.value.code() == grpc.StatusCode.INTERNAL
    assert failed.value.details() == "RuntimeError: can't start new thread"
    assert (retried.round_num, rolled_back.round_num) == (1, 2)
