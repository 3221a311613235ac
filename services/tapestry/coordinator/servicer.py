"""``CoordinatorService`` over gRPC: one round at a time, run by the core over remote nodes,
committed to disk before anyone sees its result."""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime

import grpc

from tapestry.atomic_files import StoredState
from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.consortium.v1 import consortium_pb2_grpc as pb_grpc
from tapestry.consortium.v1 import journal_pb2 as jpb
from tapestry.coordinator.journal import CoordinatorStore
from tapestry.coordinator.remote_node import ProgressListener, RemoteSovereignNode
from tapestry.training.consortium.coordinator import ConsortiumCoordinator
from tapestry.training.consortium.model import ModelSpec
from tapestry.training.consortium.tensors import state_digest
from tapestry.wire import codec
from tapestry.wire.pagination import PageTokens, take_page
from tapestry.wire.status import Busy, NotFound, abort
from tapestry.wire.tensor_stream import state_to_chunks

log = logging.getLogger(__name__)


class CoordinatorServicer(pb_grpc.CoordinatorServiceServicer):
    def __init__(
        self,
        core: ConsortiumCoordinator,
        nodes: Sequence[RemoteSovereignNode],
        store: CoordinatorStore,
        spec: ModelSpec,
        records: Sequence[jpb.RoundRecord] = (),
        chunk_bytes: int = 1 << 20,
        page_token_key: bytes | None = None,
    ) -> None:
        """``page_token_key`` seals the listings' page tokens (default: drawn at random, so
        tokens do not outlive this process)."""
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
        self._page_tokens = PageTokens(page_token_key)

    # -- rounds ------------------------------------------------------------------------

    def RunRound(
        self, request: pb.RunRoundRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.RunRoundResponse]:
        if not self._round_lock.acquire(blocking=False):
            abort(
                context,
                Busy(
                    f"round {self._core.round_num + 1} is already running; wait for its result "
                    "(tapestry rounds) and trigger the next one after it"
                ),
            )
        events: queue.Queue[pb.RunRoundResponse | jpb.RoundRecord | BaseException] = queue.Queue()
        round_num = self._core.round_num + 1

        def tell(node_id: str, stage: pb.RoundStage, detail: str) -> None:
            progress = pb.RoundProgress(
                round_num=round_num, stage=stage, node_id=node_id, detail=detail
            )
            events.put(pb.RunRoundResponse(progress=progress))

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
            if isinstance(item, pb.RunRoundResponse):
                yield item
            elif isinstance(item, jpb.RoundRecord):
                yield pb.RunRoundResponse(result=item.result)
                return
            else:
                abort(context, item)

    def _run_round(self, tell: ProgressListener) -> jpb.RoundRecord:
        _, committed_sha256 = self._committed
        for node in self._nodes:
            node.listener = tell
            node.base_sha256 = committed_sha256
        started = datetime.now(UTC)
        previous_round = self._core.round_num
        previous_artifacts = dict(self._core.sovereign_artifacts)
        log.info("round %d: starting with %d nodes", previous_round + 1, len(self._nodes))
        self._store.clear_spill()
        try:
            result = self._core.run_round(self._nodes)
        finally:
            self._store.clear_spill()  # integrated or not, spilled deltas end with the round
        result = dataclasses.replace(
            result,
            previous_base_sha256=committed_sha256,
            # Nothing accepted: the base is bitwise the committed one, digest included.
            shared_base_sha256=state_digest(result.shared_base_state)
            if result.accepted_nodes
            else committed_sha256,
            started_at=started,
            finished_at=datetime.now(UTC),
        )
        record = jpb.RoundRecord(result=codec.round_result_to_proto(result))
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
    ) -> pb.GetRoundResponse:
        try:
            wanted = codec.selected_round(request)
        except ValueError as error:
            abort(context, error)
        records = list(self._records)
        if not records:
            abort(context, NotFound("no round has been committed yet"))
        if wanted is None:
            return pb.GetRoundResponse(result=records[-1].result)
        for record in records:
            if record.result.round_num == wanted:
                return pb.GetRoundResponse(result=record.result)
        abort(
            context,
            NotFound(
                f"round {wanted} not found; committed rounds: "
                f"{records[0].result.round_num}..{records[-1].result.round_num}"
            ),
        )

    def ListRounds(
        self, request: pb.ListRoundsRequest, context: grpc.ServicerContext
    ) -> pb.ListRoundsResponse:
        """Oldest first; a page token continues after the round number it carries."""
        entries = ((r.result.round_num, r.result) for r in list(self._records))
        try:
            rounds, token = take_page(
                entries, "rounds", request.page_size, request.page_token, self._page_tokens
            )
        except ValueError as error:
            abort(context, error)
        return pb.ListRoundsResponse(rounds=rounds, next_page_token=token)

    # -- base and artifacts ----------------------------------------------------------

    def GetBase(
        self, request: pb.GetBaseRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GetBaseResponse]:
        round_num, digest = self._committed
        base = StoredState(self._store.base_path(round_num))
        yield pb.GetBaseResponse(
            header=pb.BaseHeader(round_num=round_num, model=codec.model_spec_to_proto(self._spec))
        )
        count = total = 0
        for chunk in state_to_chunks(base, self._chunk_bytes):
            if chunk.offset == 0:
                count, total = count + 1, total + chunk.total_bytes
            yield pb.GetBaseResponse(chunk=chunk)
        # The digest was computed when the base was committed; the file is checked against
        # it on resume, and the receiver checks the stream against it.
        yield pb.GetBaseResponse(
            end=pb.StateTrailer(tensor_count=count, total_bytes=total, sha256=digest)
        )

    def ListArtifacts(
        self, request: pb.ListArtifactsRequest, context: grpc.ServicerContext
    ) -> pb.ListArtifactsResponse:
        """Members in consortium-file order, then any others the journal remembers; a page
        token continues after the place it carries in that order."""
        retained = dict(self._core.sovereign_artifacts)
        order = [node.node_id for node in self._nodes]
        order += [n for n in retained if n not in order]
        entries = (
            (place, codec.artifact_to_proto(retained[node_id]))
            for place, node_id in enumerate(order, start=1)
            if node_id in retained
        )
        try:
            artifacts, token = take_page(
                entries, "artifacts", request.page_size, request.page_token, self._page_tokens
            )
        except ValueError as error:
            abort(context, error)
        return pb.ListArtifactsResponse(artifacts=artifacts, next_page_token=token)
