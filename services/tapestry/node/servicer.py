"""``SovereignNodeService`` over gRPC: decode the base, run the core node's cycle, persist
the full artifact, stream back only the delta."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Mapping

import grpc
import torch

from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.consortium.v1 import consortium_pb2_grpc as pb_grpc
from tapestry.errors import Busy, NotFound, WireError
from tapestry.node.artifacts import ArtifactStore
from tapestry.training.consortium.model import ModelSpec
from tapestry.training.consortium.node import SovereignTrainingNode
from tapestry.training.consortium.tensors import state_digest
from tapestry.wire import codec
from tapestry.wire.status import abort
from tapestry.wire.tensor_stream import StateAssembler, receive_state, send_state, spec_of

log = logging.getLogger(__name__)


class SovereignNodeServicer(pb_grpc.SovereignNodeServiceServicer):
    def __init__(
        self,
        node: SovereignTrainingNode,
        spec: ModelSpec,
        store: ArtifactStore,
        chunk_bytes: int = 1 << 20,
    ) -> None:
        self._node = node
        self._spec = spec
        self._store = store
        self._chunk_bytes = chunk_bytes
        self._expected = spec_of(node.model.state_dict())
        self._busy = threading.Lock()

    def Describe(
        self, request: pb.DescribeRequest, context: grpc.ServicerContext
    ) -> pb.DescribeResponse:
        latest = self._store.get()
        return pb.DescribeResponse(
            node_id=self._node.node_id,
            jurisdiction=self._node.jurisdiction,
            model=codec.model_spec_to_proto(self._spec),
            token_count=self._node.token_count,
            quality_score=self._node.quality_score,
            latest_round=latest.round_num if latest else 0,
        )

    def GetArtifact(
        self, request: pb.GetArtifactRequest, context: grpc.ServicerContext
    ) -> pb.GetArtifactResponse:
        try:
            wanted = codec.selected_round(request)
        except ValueError as error:
            abort(context, error)
        artifact = self._store.get(0 if wanted is None else wanted)  # the store's 0: latest
        if artifact is None:
            which = "any round" if wanted is None else f"round {wanted}"
            abort(context, NotFound(f"node {self._node.node_id!r} retains no artifact for {which}"))
        return pb.GetArtifactResponse(artifact=codec.artifact_to_proto(artifact))

    def RunSovereignCycle(
        self,
        request_iterator: Iterator[pb.RunSovereignCycleRequest],
        context: grpc.ServicerContext,
    ) -> Iterator[pb.RunSovereignCycleResponse]:
        """Decode the base, run the core node's cycle (which checks its input), persist the
        artifact, then stream back the result header and the delta."""
        if not self._busy.acquire(blocking=False):
            abort(context, Busy(f"node {self._node.node_id!r} is already running a cycle"))
        try:
            try:
                round_num, base = self._receive_base(request_iterator)
                log.info("round %d: base received, training", round_num)
                result = self._node.run_sovereign_cycle(round_num, base)
                # Persist before replying: a contribution is only sent for a model we keep.
                artifact = self._store.save(result.artifact)
                delta = result.contribution.weight_delta
                delta_sha256 = state_digest(delta)  # announced in the header, before the delta
                header = codec.cycle_result_to_proto(result, delta_sha256)
                header.artifact.CopyFrom(codec.artifact_to_proto(artifact))
            except Exception as error:
                log.warning("cycle refused or failed: %s", error)
                abort(context, error)
            log.info("round %d: artifact stored, streaming the delta", round_num)
            yield pb.RunSovereignCycleResponse(result=header)
            yield from send_state(
                delta,
                lambda c: pb.RunSovereignCycleResponse(delta_chunk=c),
                lambda t: pb.RunSovereignCycleResponse(delta_end=t),
                sha256=delta_sha256,
                chunk_bytes=self._chunk_bytes,
            )
        finally:
            self._busy.release()

    def _receive_base(
        self, requests: Iterator[pb.RunSovereignCycleRequest]
    ) -> tuple[int, Mapping[str, torch.Tensor]]:
        """The round number and the base, assembled against this node's own keys, dtypes
        and shapes (so a peer cannot make it allocate more than one model). What the base
        must hold to be trained on is the core node's check, not this one's."""
        first = next(requests, None)
        if first is None or first.WhichOneof("item") != "start":
            raise WireError("the request stream must begin with a CycleStart message")
        assembler = StateAssembler(self._expected)
        return first.start.round_num, receive_state(requests, "base_chunk", "base_end", assembler)
