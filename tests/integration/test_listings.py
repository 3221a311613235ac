"""The coordinator's read side over a real gRPC server on 127.0.0.1: paginated listings and
explicit round selection, with a journal of any size put in place of real rounds."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.consortium.v1 import consortium_pb2_grpc as pb_grpc
from tapestry.coordinator.client import CoordinatorClient
from tapestry.coordinator.journal import CoordinatorStore
from tapestry.coordinator.servicer import CoordinatorServicer
from tapestry.limits import MAX_MESSAGE_BYTES, MAX_PAGE_BYTES
from tapestry.training.consortium import (
    ConsortiumCoordinator,
    ModelSpec,
    SovereignModelArtifact,
)
from tapestry.wire.grpc_plumbing import build_server, open_channel

SPEC = ModelSpec(hidden_size=4)
INVALID = grpc.StatusCode.INVALID_ARGUMENT


@dataclass
class Member:
    node_id: str


def record(round_num: int, metrics: int = 0) -> pb.RoundRecord:
    """A committed round whose member reported ``metrics`` long-named metrics."""
    return pb.RoundRecord(
        result=pb.ConsortiumRoundResult(
            round_num=round_num,
            accepted_nodes=["vn"],
            contributions=[
                pb.SovereignContribution(
                    node_id="vn",
                    token_count=1 << 40,
                    metrics={f"metric-{i:05d}-{'x' * 40}": i / 7 for i in range(metrics)},
                )
            ],
        )
    )


def artifact(node_id: str) -> SovereignModelArtifact:
    return SovereignModelArtifact(
        node_id, node_id.title(), "continued_pretraining", {}, {"loss": 1.5}, round_num=2
    )


class Coordinator:
    """A coordinator servicer behind a real server; its journal and artifacts are set by
    the test."""

    def __init__(self, root: Path, records: list[pb.RoundRecord], members: list[str]) -> None:
        self.core = ConsortiumCoordinator(SPEC.build(seed=1))
        self.servicer = CoordinatorServicer(
            self.core,
            [Member(m) for m in members],  # type: ignore[misc]
            CoordinatorStore(root),
            SPEC,
            records,
        )
        self.server, port, _ = build_server(
            "127.0.0.1:0",
            [lambda s: pb_grpc.add_CoordinatorServiceServicer_to_server(self.servicer, s)],
            ["tapestry.consortium.v1.CoordinatorService"],
        )
        self.server.start()
        self.address = f"127.0.0.1:{port}"

    def stub(self, channel: grpc.Channel) -> pb_grpc.CoordinatorServiceStub:
        return pb_grpc.CoordinatorServiceStub(channel)


@pytest.fixture
def coordinator_with(tmp_path: Path) -> Iterator:
    started: list[Coordinator] = []

    def start(records: list[pb.RoundRecord], members: Sequence[str] = ()) -> Coordinator:
        coordinator = Coordinator(tmp_path / str(len(started)), records, list(members))
        started.append(coordinator)
        return coordinator

    yield start
    for coordinator in started:
        coordinator.server.stop(0)


def refusal(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


# -- ListRounds -------------------------------------------------------------------------


def test_rounds_come_in_pages_of_the_requested_size(coordinator_with):
    coordinator = coordinator_with([record(n) for n in range(1, 8)])
    with CoordinatorClient(coordinator.address) as client:
        first = client.list_rounds_page(page_size=3)
        second = client.list_rounds_page(page_size=3, page_token=first.next_page_token)
        third = client.list_rounds_page(page_size=3, page_token=second.next_page_token)
        every = client.list_rounds(page_size=2)

    assert [r.round_num for r in first.rounds] == [1, 2, 3]
    assert [r.round_num for r in second.rounds] == [4, 5, 6]
    assert [r.round_num for r in third.rounds] == [7]
    assert third.next_page_token == ""
    assert [r.round_num for r in every] == list(range(1, 8))


def test_default_and_maximum_page_sizes(coordinator_with):
    coordinator = coordinator_with([record(n) for n in range(1, 1203)])
    with CoordinatorClient(coordinator.address) as client:
        default = client.list_rounds_page()
        capped = client.list_rounds_page(page_size=2**31 - 1)
        everything = client.list_rounds()

    assert len(default.rounds) == 50 and default.next_page_token
    assert len(capped.rounds) == 1000 and capped.next_page_token
    assert [r.round_num for r in everything] == list(range(1, 1203))


def test_a_page_of_rounds_stays_under_the_message_limit_whatever_members_reported(
    coordinator_with,
):
    # ~130 KB per round: 100 rounds are ~13 MB, past the 8 MiB message limit in one reply.
    coordinator = coordinator_with([record(n, metrics=2000) for n in range(1, 101)])
    with CoordinatorClient(coordinator.address) as client:
        pages, token = [], ""
        while True:
            page = client.list_rounds_page(page_size=1000, page_token=token)
            pages.append(page)
            token = page.next_page_token
            if not token:
                break
        listed = client.list_rounds(page_size=1000)

    assert len(pages) >= 4
    assert all(page.ByteSize() <= MAX_PAGE_BYTES < MAX_MESSAGE_BYTES for page in pages)
    assert [r.round_num for page in pages for r in page.rounds] == list(range(1, 101))
    assert [r.round_num for r in listed] == list(range(1, 101))


def test_rounds_committed_between_pages_are_neither_skipped_nor_repeated(coordinator_with):
    coordinator = coordinator_with([record(n) for n in range(1, 4)])
    with CoordinatorClient(coordinator.address) as client:
        first = client.list_rounds_page(page_size=2)
        for later in (record(4), record(5)):  # committed while the client pages
            coordinator.servicer._ledger.record(later)
        rest = list(client.iter_rounds(page_size=2))
        second = client.list_rounds_page(page_size=2, page_token=first.next_page_token)

    assert [r.round_num for r in first.rounds] == [1, 2]
    assert [r.round_num for r in second.rounds] == [3, 4]
    assert [r.round_num for r in rest] == [1, 2, 3, 4, 5]


def test_bad_page_requests_are_invalid_arguments_that_name_the_bound(coordinator_with):
    coordinator = coordinator_with([record(n) for n in range(1, 4)])
    with open_channel(coordinator.address) as channel:
        stub = coordinator.stub(channel)
        negative = refusal(lambda: stub.ListRounds(pb.ListRoundsRequest(page_size=-5)))
        forged_token = "Z" * 40
        forged = refusal(lambda: stub.ListRounds(pb.ListRoundsRequest(page_token=forged_token)))
        huge_token = "Q" * 100_000
        huge = refusal(lambda: stub.ListRounds(pb.ListRoundsRequest(page_token=huge_token)))
        rounds_token = stub.ListRounds(pb.ListRoundsRequest(page_size=1)).next_page_token
        crossed = refusal(
            lambda: stub.ListArtifacts(pb.ListArtifactsRequest(page_token=rounds_token))
        )

    assert negative.code() == INVALID
    assert negative.details() == (
        "InvalidPageRequest: page_size must be >= 0 (0 means the default of 50; "
        "at most 1000 are returned per page), got -5"
    )
    assert forged.code() == INVALID
    assert forged.details() == (
        "InvalidPageRequest: page_token is not one this server issued (garbled, forged, or "
        "from before a restart); pass next_page_token back unchanged, or leave page_token "
        "empty to start from the first page"
    )
    assert forged_token not in forged.details()
    assert huge.code() == INVALID
    assert "longer than 256 characters" in huge.details()
    assert len(huge.details()) < 200
    assert crossed.code() == INVALID
    assert "belongs to the rounds listing, not to artifacts" in crossed.details()


def test_a_token_does_not_outlive_the_coordinator_that_issued_it(coordinator_with):
    records = [record(n) for n in range(1, 4)]
    first = coordinator_with(records)
    restarted = coordinator_with(records)
    with CoordinatorClient(first.address) as client:
        token = client.list_rounds_page(page_size=1).next_page_token
    with CoordinatorClient(restarted.address) as client:
        error = refusal(lambda: client.list_rounds_page(page_size=1, page_token=token))
        again = client.list_rounds()
    assert error.code() == INVALID and "from before a restart" in error.details()
    assert [r.round_num for r in again] == [1, 2, 3]


# -- ListArtifacts ------------------------------------------------------------------------


def test_artifacts_are_listed_in_consortium_order_page_by_page(coordinator_with):
    coordinator = coordinator_with([], members=["vn", "ch", "in", "br"])
    coordinator.core.sovereign_artifacts.update(
        {"in": artifact("in"), "vn": artifact("vn"), "old": artifact("old")}
    )
    with CoordinatorClient(coordinator.address) as client:
        first = client.list_artifacts_page(page_size=1)
        # "ch" retains its first artifact between the pages: it comes next, nothing repeats.
        coordinator.core.sovereign_artifacts["ch"] = artifact("ch")
        rest = client.list_artifacts_page(page_size=10, page_token=first.next_page_token)
        every = client.list_artifacts(page_size=2)

    assert [a.node_id for a in first.artifacts] == ["vn"]
    assert [a.node_id for a in rest.artifacts] == ["ch", "in", "old"]
    assert rest.next_page_token == ""
    assert [a.node_id for a in every] == ["vn", "ch", "in", "old"]
    assert every[0].metrics["loss"] == 1.5 and every[0].stage == "continued_pretraining"


def test_no_artifacts_is_one_empty_page(coordinator_with):
    coordinator = coordinator_with([], members=["vn"])
    with CoordinatorClient(coordinator.address) as client:
        page = client.list_artifacts_page()
    assert list(page.artifacts) == [] and page.next_page_token == ""


# -- GetRound -----------------------------------------------------------------------------


def test_get_round_selects_a_number_or_the_latest_explicitly(coordinator_with):
    coordinator = coordinator_with([record(n) for n in range(1, 4)])
    with CoordinatorClient(coordinator.address) as client:
        assert client.get_round(2).round_num == 2
        assert client.get_round().round_num == 3  # latest
    with open_channel(coordinator.address) as channel:
        stub = coordinator.stub(channel)
        latest = stub.GetRound(pb.GetRoundRequest(latest=True)).result
        nothing = refusal(lambda: stub.GetRound(pb.GetRoundRequest()))
        zero = refusal(lambda: stub.GetRound(pb.GetRoundRequest(round_num=0)))
        not_latest = refusal(lambda: stub.GetRound(pb.GetRoundRequest(latest=False)))
        missing = refusal(lambda: stub.GetRound(pb.GetRoundRequest(round_num=999)))

    assert latest.round_num == 3
    assert (nothing.code(), nothing.details()) == (
        INVALID,
        "ValueError: select a round: set round_num (>= 1) or latest=true",
    )
    assert (zero.code(), zero.details()) == (
        INVALID,
        "ValueError: round_num must be >= 1 (rounds are numbered from 1); "
        "to select the newest, set latest=true instead",
    )
    assert (not_latest.code(), not_latest.details()) == (
        INVALID,
        "ValueError: latest must be true when set; to select a round, set round_num",
    )
    assert (missing.code(), missing.details()) == (
        grpc.StatusCode.NOT_FOUND,
        "NotFound: round 999 not found; committed rounds: 1..3",
    )


def test_get_round_before_any_round_is_not_found(coordinator_with):
    coordinator = coordinator_with([])
    with CoordinatorClient(coordinator.address) as client:
        error = refusal(lambda: client.get_round())
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert error.details() == "NotFound: no round has been committed yet"
