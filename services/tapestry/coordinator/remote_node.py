"""A remote node that honours the core's ``run_sovereign_cycle`` contract over gRPC.

The core coordinator cannot tell it from an in-process :class:`SovereignTrainingNode`,
except that the returned artifact is metadata only: the node keeps its weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import grpc

from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.consortium.v1 import consortium_pb2_grpc as pb_grpc
from tapestry.training.consortium.messages import ModelState, SovereignCycleResult
from tapestry.training.consortium.tensors import state_digest, state_nbytes
from tapestry.wire import codec
from tapestry.wire.grpc_plumbing import insecure_channel
from tapestry.wire.spill import SpillingAssembler
from tapestry.wire.tensor_stream import (
    DEFAULT_CHUNK_BYTES,
    StateAssembler,
    WireError,
    spec_of,
    state_to_chunks,
)

ProgressListener = Callable[[str, "pb.RoundStage", str], None]


class NodeCallFailed(RuntimeError):
    """The node could not be reached or refused the cycle; the message has its status."""


class RemoteSovereignNode:
    def __init__(
        self,
        node_id: str,
        jurisdiction: str,
        address: str,
        *,
        consortium_id: str = "",
        timeout_s: float = 3600.0,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        spill_dir: Path | None = None,
    ) -> None:
        """With ``spill_dir``, the delta is written to ``<spill_dir>/<node_id>.delta`` as it
        arrives instead of being held in memory (see :mod:`tapestry.wire.spill`)."""
        self.node_id = node_id
        self.jurisdiction = jurisdiction
        self.address = address
        self.consortium_id = consortium_id
        self.timeout_s = timeout_s
        self.chunk_bytes = chunk_bytes
        self.spill_dir = spill_dir
        self.listener: ProgressListener | None = None
        # Digest of the base this round sends, when the caller already knows it (the
        # coordinator does: it is the last committed base's), to save a hash pass per node.
        self.base_sha256 = ""
        self._channel = insecure_channel(address)
        self._stub = pb_grpc.SovereignNodeServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def _tell(self, stage: pb.RoundStage, detail: str) -> None:
        if self.listener is not None:
            self.listener(self.node_id, stage, detail)

    def run_sovereign_cycle(self, round_num: int, base_state: ModelState) -> SovereignCycleResult:
        self._tell(pb.ROUND_STAGE_NODE_STARTED, f"sending base to {self.address}")
        try:
            result = self._cycle(round_num, base_state)
        except grpc.RpcError as error:
            failure = NodeCallFailed(
                f"{self.address}: {error.code().name}: {error.details()}"  # type: ignore[attr-defined]
            )
            self._tell(pb.ROUND_STAGE_NODE_FAILED, str(failure))
            raise failure from None
        except Exception as error:
            self._tell(pb.ROUND_STAGE_NODE_FAILED, f"{type(error).__name__}: {error}")
            raise
        contribution = result.contribution
        loss = contribution.metrics.get("loss", float("nan"))
        self._tell(
            pb.ROUND_STAGE_NODE_CONTRIBUTED,
            f"delta received (loss {loss:.4f}, quality {contribution.quality_score:.2f}, "
            f"{contribution.token_count} tokens)",
        )
        return result

    def _cycle(self, round_num: int, base_state: ModelState) -> SovereignCycleResult:
        def requests() -> Iterator[pb.RunSovereignCycleRequest]:
            yield pb.RunSovereignCycleRequest(
                start=pb.CycleStart(round_num=round_num, consortium_id=self.consortium_id)
            )
            for chunk in state_to_chunks(base_state, self.chunk_bytes):
                yield pb.RunSovereignCycleRequest(base_chunk=chunk)
            yield pb.RunSovereignCycleRequest(
                base_end=pb.StateTrailer(
                    tensor_count=len(base_state),
                    total_bytes=state_nbytes(base_state),
                    sha256=self.base_sha256 or state_digest(base_state),
                )
            )

        # The delta must match the base key for key: anything else is refused on arrival.
        expected = spec_of(base_state)
        assembler = (
            SpillingAssembler(self.spill_dir / f"{self.node_id}.delta", expected)
            if self.spill_dir is not None
            else StateAssembler(expected)
        )
        responses = self._stub.RunSovereignCycle(requests(), timeout=self.timeout_s)
        try:
            first = next(responses, None)
            if first is None or first.WhichOneof("item") != "result":
                raise WireError("the node's reply must begin with its cycle result")
            header = first.result
            for message in responses:
                kind = message.WhichOneof("item")
                if kind == "delta_chunk":
                    assembler.add(message.delta_chunk)
                elif kind == "delta_end":
                    if message.delta_end.sha256 != header.contribution.weight_delta_sha256:
                        raise WireError("delta trailer digest differs from the announced one")
                    delta = assembler.finish(message.delta_end)
                    return codec.cycle_result_from_proto(header, delta)
                else:
                    raise WireError(f"unexpected {kind!r} message in the delta stream")
            raise WireError("the delta stream ended before its trailer (truncated)")
        except BaseException:
            if isinstance(assembler, SpillingAssembler):
                assembler.close()
                assembler.path.unlink(missing_ok=True)
            raise
        finally:
            responses.cancel()
