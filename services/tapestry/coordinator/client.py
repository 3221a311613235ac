"""A small client for the coordinator: what the CLI, the demo and the tests use."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.consortium.v1 import consortium_pb2_grpc as pb_grpc
from tapestry.training.consortium.messages import ModelState
from tapestry.wire.grpc_plumbing import insecure_channel
from tapestry.wire.tensor_stream import StateAssembler, WireError


class CoordinatorClient:
    def __init__(self, address: str) -> None:
        self.address = address
        self._channel = insecure_channel(address)
        self._stub = pb_grpc.CoordinatorStub(self._channel)

    def __enter__(self) -> CoordinatorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def run_round(
        self,
        on_progress: Callable[[pb.NodeProgress], None] | None = None,
        timeout_s: float | None = None,
    ) -> pb.ConsortiumRoundResult:
        for event in self._stub.RunRound(pb.RunRoundRequest(), timeout=timeout_s):
            if event.WhichOneof("event") == "result":
                return event.result
            if on_progress is not None:
                on_progress(event.progress)
        raise WireError("RunRound ended without a result")

    def get_round(self, round_num: int = 0) -> pb.ConsortiumRoundResult:
        return self._stub.GetRound(pb.GetRoundRequest(round_num=round_num))

    def list_rounds(self) -> list[pb.ConsortiumRoundResult]:
        return list(self._stub.ListRounds(pb.ListRoundsRequest()).rounds)

    def list_artifacts(self) -> list[pb.SovereignModelArtifact]:
        return list(self._stub.ListArtifacts(pb.ListArtifactsRequest()).artifacts)

    def get_base(self) -> tuple[int, ModelState]:
        """``(rounds committed, base state)``, verified against the stream's digest."""
        stream: Iterator[pb.BaseChunk] = self._stub.GetBase(pb.GetBaseRequest())
        assembler = StateAssembler()
        round_num = 0
        for message in stream:
            kind = message.WhichOneof("item")
            if kind == "header":
                round_num = message.header.round_num
            elif kind == "chunk":
                assembler.add(message.chunk)
            elif kind == "end":
                return round_num, dict(assembler.finish(message.end))
        raise WireError("GetBase stream ended before its trailer (truncated)")
