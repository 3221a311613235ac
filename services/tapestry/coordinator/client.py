"""A small client for the coordinator: what the CLI, the demo and the tests use."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import grpc

from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.consortium.v1 import consortium_pb2_grpc as pb_grpc
from tapestry.errors import NotFound, WireError
from tapestry.training.consortium.messages import ModelState
from tapestry.wire.grpc_plumbing import open_channel
from tapestry.wire.tensor_stream import StateAssembler, receive_state

Item = TypeVar("Item")


@dataclass(frozen=True)
class FetchedBase:
    """The shared base as GetBase served it: its round, model spec and verified digest."""

    round_num: int
    model: pb.ModelSpec
    state: ModelState
    sha256: str  # the state digest the stream's trailer carried, checked on arrival


class CoordinatorClient:
    def __init__(self, address: str, credentials: grpc.ChannelCredentials | None = None) -> None:
        """A client of the coordinator at ``address``: mutual TLS with ``credentials`` (an
        operator's to run rounds; any member's to read), plaintext without."""
        self.address = address
        self._channel = open_channel(address, credentials)
        self._stub = pb_grpc.CoordinatorServiceStub(self._channel)

    def __enter__(self) -> CoordinatorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def run_round(
        self,
        on_progress: Callable[[pb.RoundProgress], None] | None = None,
        timeout_s: float | None = None,
        request_id: str = "",
    ) -> pb.ConsortiumRoundResult:
        """Trigger a round and return its result. With ``request_id`` the trigger runs at
        most once: calling again with the same id (after a lost reply, say) returns the
        result of the round it started, without progress events."""
        request = pb.RunRoundRequest(request_id=request_id)
        for event in self._stub.RunRound(request, timeout=timeout_s):
            if event.WhichOneof("event") == "result":
                return event.result
            if on_progress is not None:
                on_progress(event.progress)
        raise WireError("RunRound ended without a result")

    def get_round(self, round_num: int | None = None) -> pb.ConsortiumRoundResult:
        """Round ``round_num`` (>= 1), or the latest when it is ``None``."""
        request = (
            pb.GetRoundRequest(latest=True)
            if round_num is None
            else pb.GetRoundRequest(round_num=round_num)
        )
        return self._stub.GetRound(request).result

    def roll_back_base(self, to_round: int) -> pb.ConsortiumRoundResult:
        """Make round ``to_round``'s committed base the shared base again (0: the initial
        base); returns the new round that records it."""
        return self._stub.RollBackBase(pb.RollBackBaseRequest(to_round=to_round)).result

    # -- listings: one page, every page as an iterator, or every page as a list ---------

    def list_rounds_page(self, page_size: int = 0, page_token: str = "") -> pb.ListRoundsResponse:
        return self._stub.ListRounds(
            pb.ListRoundsRequest(page_size=page_size, page_token=page_token)
        )

    def iter_rounds(self, page_size: int = 0) -> Iterator[pb.ConsortiumRoundResult]:
        """Every committed round, oldest first, fetched page by page as it is consumed."""

        def fetch(token: str) -> tuple[Sequence[pb.ConsortiumRoundResult], str]:
            page = self.list_rounds_page(page_size, token)
            return page.rounds, page.next_page_token

        return _every_page(fetch)

    def list_rounds(self, page_size: int = 0) -> list[pb.ConsortiumRoundResult]:
        return list(self.iter_rounds(page_size))

    def iter_round_records(self, page_size: int = 0) -> Iterator[pb.RoundRecord]:
        """The journal's signed records, oldest first, fetched page by page (an operator's
        or a member node's certificate)."""

        def fetch(token: str) -> tuple[Sequence[pb.RoundRecord], str]:
            page = self._stub.ListRoundRecords(
                pb.ListRoundRecordsRequest(page_size=page_size, page_token=token)
            )
            return page.records, page.next_page_token

        return _every_page(fetch)

    def list_members(self, timeout_s: float | None = None) -> list[pb.MemberSession]:
        """Every member and its session, in the consortium file's order."""
        reply = self._stub.ListMembers(pb.ListMembersRequest(), timeout=timeout_s)
        return list(reply.members)

    def list_artifacts_page(
        self, page_size: int = 0, page_token: str = ""
    ) -> pb.ListArtifactsResponse:
        return self._stub.ListArtifacts(
            pb.ListArtifactsRequest(page_size=page_size, page_token=page_token)
        )

    def iter_artifacts(self, page_size: int = 0) -> Iterator[pb.SovereignModelArtifact]:
        """Every member's retained artifact (metadata), fetched page by page."""

        def fetch(token: str) -> tuple[Sequence[pb.SovereignModelArtifact], str]:
            page = self.list_artifacts_page(page_size, token)
            return page.artifacts, page.next_page_token

        return _every_page(fetch)

    def list_artifacts(self, page_size: int = 0) -> list[pb.SovereignModelArtifact]:
        return list(self.iter_artifacts(page_size))

    def get_base(self) -> tuple[int, ModelState]:
        """``(rounds committed, base state)``, verified against the stream's digest."""
        base = self.fetch_base()
        return base.round_num, base.state

    def base_header(self) -> pb.BaseHeader:
        """The current base's round and model spec, without its weights: GetBase's stream
        is cancelled after its header."""
        stream = self._stub.GetBase(pb.GetBaseRequest())
        try:
            return _header(stream)
        finally:
            stream.cancel()

    def fetch_base(self, round_num: int | None = None) -> FetchedBase:
        """The newest committed base, or the one round ``round_num`` committed (0: the
        initial base), with its header and verified digest. A header naming another round
        (a coordinator that serves only its newest base) is refused (:class:`NotFound`)
        before any weights are read."""
        request = (
            pb.GetBaseRequest() if round_num is None else pb.GetBaseRequest(round_num=round_num)
        )
        stream = self._stub.GetBase(request)
        try:
            header = _header(stream)
            if round_num is not None and header.round_num != round_num:
                raise NotFound(
                    f"the coordinator serves the base of round {header.round_num}, not of round "
                    f"{round_num}: it serves only its newest base (a release from before "
                    "GetBase took a round?)"
                )
            assembler = StateAssembler()
            state = receive_state(stream, "chunk", "end", assembler)
        finally:
            stream.cancel()  # a no-op once the stream has ended
        return FetchedBase(header.round_num, header.model, dict(state), assembler.digest)


def _header(stream: Iterator[pb.GetBaseResponse]) -> pb.BaseHeader:
    first = next(stream, None)
    if first is None or first.WhichOneof("item") != "header":
        raise WireError("the GetBase stream must begin with its header")
    return first.header


def _every_page(fetch: Callable[[str], tuple[Sequence[Item], str]]) -> Iterator[Item]:
    """Items of every page: ``fetch(token)`` returns a page's items and the next token."""
    token = ""
    while True:
        items, next_token = fetch(token)
        yield from items
        if not next_token:
            return
        if next_token == token:
            raise WireError("the server returned the same page token twice; stopping")
        token = next_token
