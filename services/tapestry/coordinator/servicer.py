"""``Coordinator`` over gRPC: one round at a time, run by the core over remote nodes,
committed to disk before anyone sees its result."""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Iterator, Sequence

import grpc

from tapestry.atomic_files import StoredState
from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.consortium.v1 import consortium_pb2_grpc as pb_grpc
from tapestry.coordinator.journal import CoordinatorStore
from tapestry.coordinator.remote_node import ProgressListener, RemoteSovereignNode
from tapestry.training.consortium.coordinator import ConsortiumCoordinator
from tapestry.training.consortium.model import ModelSpec
from tapestry.training.consortium.tensors import state_digest
from tapestry.wire import codec
from tapestry.wire.status import Busy, NotFound, abort
from tapestry.wire.tensor_stream import state_to_chunks

log = logging.getLogger(__name__)


class CoordinatorServicer(pb_grpc.CoordinatorServicer):
    def __init__(
        self,
        core: ConsortiumCoordinator,
        nodes: Sequence[RemoteSovereignNode],
        store: CoordinatorStore,
        spec: ModelSpec,
        records: Sequence[pb.RoundRecord] = (),
        chunk_bytes: int = 1 << 20,
    ) -> None:
        self._core = core
        self._nodes = list(nodes)
        self._store = store
        self._spec = spec
        self._chunk_bytes = chunk_bytes
        self._records = list(records)
        # (round, digest) of the last commit, replaced as one tuple, so a reader always sees
        # a base with its own round number. GetBase serves it from its committed file, one
        # tensor at a time: the coordinator keeps no second copy of the base in memory.
        self._committed: tuple[int, str] = (core.round_num, state_digest(core.shared_base_state))
        self._round_lock = threading.Lock()

    # -- rounds ------------------------------------------------------------------------

    def RunRound(
        self, request: pb.RunRoundRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.RoundEvent]:
        if not self._round_lock.acquire(blocking=False):
            abort(
                context,
                Busy(
                    f"round {self._core.round_num + 1} is already running; wait for its result "
                    "(tapestry rounds) and trigger the next one after it"
                ),
            )
        events: queue.Queue[pb.RoundEvent | pb.RoundRecord | BaseException] = queue.Queue()

        def tell(node_id: str, stage: pb.NodeProgress.Stage, detail: str) -> None:
            events.put(
                pb.RoundEvent(progress=pb.NodeProgress(node_id=node_id, stage=stage, detail=detail))
            )

        def work() -> None:
            # The round runs to its commit even if the caller goes away.
            try:
                events.put(self._run_round(tell))
            except BaseException as error:
                log.exception("round failed")
                events.put(error)
            finally:
                self._round_lock.release()

        threading.Thread(target=work, name="round", daemon=True).start()
        while True:
            item = events.get()
            if isinstance(item, pb.RoundEvent):
                yield item
            elif isinstance(item, pb.RoundRecord):
                yield pb.RoundEvent(result=item.result)
                return
            else:
                abort(context, item)

    def _run_round(self, tell: ProgressListener) -> pb.RoundRecord:
        _, committed_sha256 = self._committed
        for node in self._nodes:
            node.listener = tell
            node.base_sha256 = committed_sha256
        started = time.time()
        previous_round = self._core.round_num
        previous_artifacts = dict(self._core.sovereign_artifacts)
        log.info("round %d: starting with %d nodes", previous_round + 1, len(self._nodes))
        self._store.clear_spill()
        try:
            result = self._core.run_round(self._nodes)
        finally:
            self._store.clear_spill()  # integrated or not, spilled deltas end with the round
        record = pb.RoundRecord(
            result=codec.round_result_to_proto(
                result,
                previous_base_sha256=committed_sha256,
                # Nothing accepted: the base is bitwise the committed one, digest included.
                shared_base_sha256=state_digest(result.shared_base_state)
                if result.accepted_nodes
                else committed_sha256,
                started_at=started,
                finished_at=time.time(),
            ),
            artifacts=[
                codec.artifact_to_proto(self._core.sovereign_artifacts[node_id])
                for node_id in result.contributions
            ],
        )
        try:
            self._store.commit(record, result.shared_base_state)
        except BaseException:
            # Not durable, so it did not happen: the base and artifacts go back as they were.
            self._core.load_base_state(result.previous_base_state, previous_round)
            self._core.sovereign_artifacts = previous_artifacts
            raise
        self._records.append(record)
        self._committed = (result.round_num, record.result.shared_base_sha256)
        r = record.result
        log.info(
            "round %d committed: accepted %s, rejected %s, failed %s, base %s -> %s",
            r.round_num,
            list(r.accepted_nodes),
            list(r.rejected_nodes),
            dict(r.failed_nodes),
            r.previous_base_sha256[:12],
            r.shared_base_sha256[:12],
        )
        return record

    def GetRound(
        self, request: pb.GetRoundRequest, context: grpc.ServicerContext
    ) -> pb.ConsortiumRoundResult:
        records = list(self._records)
        if not records:
            abort(context, NotFound("no round has been committed yet"))
        if request.round_num == 0:
            return records[-1].result
        for record in records:
            if record.result.round_num == request.round_num:
                return record.result
        abort(
            context,
            NotFound(
                f"round {request.round_num} not found; committed rounds: "
                f"1..{records[-1].result.round_num}"
            ),
        )

    def ListRounds(
        self, request: pb.ListRoundsRequest, context: grpc.ServicerContext
    ) -> pb.ListRoundsResponse:
        return pb.ListRoundsResponse(rounds=[record.result for record in list(self._records)])

    # -- base and artifacts ----------------------------------------------------------

    def GetBase(
        self, request: pb.GetBaseRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.BaseChunk]:
        round_num, digest = self._committed
        base = StoredState(self._store.base_path(round_num))
        yield pb.BaseChunk(
            header=pb.BaseHeader(round_num=round_num, model=codec.model_spec_to_proto(self._spec))
        )
        count = total = 0
        for chunk in state_to_chunks(base, self._chunk_bytes):
            if chunk.offset == 0:
                count, total = count + 1, total + chunk.total_bytes
            yield pb.BaseChunk(chunk=chunk)
        # The digest was computed when the base was committed; the file is checked against
        # it on resume, and the receiver checks the stream against it.
        yield pb.BaseChunk(
            end=pb.StateTrailer(tensor_count=count, total_bytes=total, sha256=digest)
        )

    def ListArtifacts(
        self, request: pb.ListArtifactsRequest, context: grpc.ServicerContext
    ) -> pb.ListArtifactsResponse:
        retained = dict(self._core.sovereign_artifacts)
        order = [node.node_id for node in self._nodes]
        ordered = [retained[n] for n in order if n in retained]
        ordered += [a for n, a in retained.items() if n not in order]
        return pb.ListArtifactsResponse(
            artifacts=[
                codec.artifact_to_proto(dataclasses.replace(a, model_state={})) for a in ordered
            ]
        )
