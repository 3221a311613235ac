"""``CoordinatorService`` over gRPC: decode the request, call the core, encode its events and
result. The core runs the round over remote node proxies and calls this servicer's commit
step, which writes the round to the journal before the core moves to the new base."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

import grpc

from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.consortium.v1 import consortium_pb2_grpc as pb_grpc
from tapestry.coordinator.journal import CoordinatorStore, StoreError
from tapestry.coordinator.members import Members
from tapestry.coordinator.remote_node import RemoteSovereignNode
from tapestry.coordinator.session_service import SessionDoor
from tapestry.errors import Busy, NotFound
from tapestry.observe.metrics import CLIENT_PEER, CoordinatorMetrics
from tapestry.pki.access import calling_peer
from tapestry.state_files import StoredState
from tapestry.training.consortium import (
    ConsortiumCoordinator,
    ConsortiumRoundResult,
    RoundEvent,
)
from tapestry.training.consortium.models.spec import ModelSpec
from tapestry.training.consortium.round.ledger import Claimed, Recorded, RoundLedger
from tapestry.wire import codec
from tapestry.wire.pagination import PageTokens, take_page
from tapestry.wire.status import abort
from tapestry.wire.tensor_stream import send_state

log = logging.getLogger(__name__)

# How often a caller waiting on a running round's result checks that it is still there.
_RETRY_POLL_S = 1.0


def record_key(record: pb.RoundRecord) -> tuple[int, str]:
    """A journal record's round number and request id, as the round ledger indexes them."""
    return record.result.round_num, record.request_id


class CoordinatorServicer(pb_grpc.CoordinatorServiceServicer):
    def __init__(
        self,
        core: ConsortiumCoordinator,
        nodes: Sequence[RemoteSovereignNode] | Callable[[], Sequence[RemoteSovereignNode]],
        store: CoordinatorStore,
        spec: ModelSpec,
        records: Sequence[pb.RoundRecord] = (),
        chunk_bytes: int = 1 << 20,
        page_token_key: bytes | None = None,
        metrics: CoordinatorMetrics | None = None,
        sessions: SessionDoor | None = None,
        members: Members | None = None,
    ) -> None:
        """``nodes`` are the round's nodes, or what gives them at each round's start (the
        members' sessions as they are then). Members' sessions open through ``sessions``
        (UNIMPLEMENTED without); ``members`` answers ListMembers. The journal's ``records``
        go into the core's round ledger, which answers request ids and which round runs.
        ``page_token_key`` seals the listings' page tokens (default: drawn at random, so
        tokens do not outlive this process). Rounds are counted in ``metrics``."""
        self._core = core
        self._ledger: RoundLedger[pb.RoundRecord] = RoundLedger(records, key=record_key)
        core.ledger = self._ledger
        self._nodes = nodes if callable(nodes) else (lambda fixed=list(nodes): fixed)
        self._order = [node.node_id for node in self._nodes()]  # the consortium file's
        self._sessions = sessions
        self._members = members
        self._store = store
        self._spec = spec
        self._chunk_bytes = chunk_bytes
        # (round, digest) of the last commit, replaced as one tuple, so a reader always sees
        # a base with its own round number. GetBase serves it from its committed file, one
        # tensor at a time: the coordinator keeps no second copy of the base in memory.
        self._committed: tuple[int, str] = (core.round_num, core.base_sha256)
        self._page_tokens = PageTokens(page_token_key)
        self._metrics = metrics or CoordinatorMetrics()
        self._metrics.base_round.set(core.round_num)

    # -- rounds ------------------------------------------------------------------------

    def RunRound(
        self, request: pb.RunRoundRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.RunRoundResponse]:
        """Stream the core's events, then the committed result. The round runs in its own
        thread and goes on to its commit even if the caller goes away.

        Exactly once per ``request_id`` (the core's ledger): an id the journal holds gets
        that round's result (no new round); the id of the round now running waits for its
        result."""
        try:
            request_id = codec.request_id_from_proto(request)
        except ValueError as error:
            abort(context, error)
        claim = self._ledger.claim(request_id)
        if isinstance(claim, Recorded):
            log.info(
                "request %s: already answered by round %d",
                request_id,
                claim.record.result.round_num,
            )
            yield pb.RunRoundResponse(result=claim.record.result)
            return
        if isinstance(claim, Claimed):
            yield from self._run(request_id, context, _operator(context))
            return
        if not request_id or claim.request_id != request_id:
            abort(
                context,
                Busy(
                    f"round {self._core.round_num + 1} is already running; wait for its "
                    "result (tapestry rounds) and trigger the next one after it"
                ),
            )
        context.send_initial_metadata(())  # the caller may know it is waiting
        yield pb.RunRoundResponse(result=self._await(claim.outcome, context))

    def _run(
        self, request_id: str, context: grpc.ServicerContext, operator: str
    ) -> Iterator[pb.RunRoundResponse]:
        # A round ends as its number (or its error): the result's states (the base before
        # and after) are let go once committed, not held until the next round.
        events: queue.Queue[RoundEvent | int | BaseException] = queue.Queue()

        def work() -> None:
            ended: int | BaseException = RuntimeError("the round ended without an outcome")
            began = time.monotonic()
            try:
                self._store.clear_spill()
                nodes = self._nodes()
                ended = self._core.run_round(
                    nodes,
                    events=events.put,
                    commit=lambda result: self._commit(
                        result,
                        request_id,
                        operator,
                        _signatures(nodes, result.round_num),
                        _signatures(nodes, result.round_num, "header_signatures"),
                    ),  # fmt: skip
                ).round_num
            except BaseException as error:
                log.exception("round failed")
                ended = error
                self._metrics.round_failed(time.monotonic() - began)
            else:
                self._metrics.round_duration.observe(time.monotonic() - began)
            finally:
                self._store.clear_spill()  # integrated or not, spilled deltas end with the round
                # Only now: a caller who triggers the next round on seeing this one's result
                # must find the coordinator free (and a retry of this id, its record).
                self._ledger.settle(ended)
                events.put(ended)

        try:
            threading.Thread(target=work, name="round", daemon=True).start()
        except BaseException as error:  # out of threads: the claim must not outlive the call
            self._ledger.settle(error)
            abort(context, error)
        while True:
            item = events.get()
            if isinstance(item, RoundEvent):
                yield pb.RunRoundResponse(progress=codec.round_event_to_proto(item))
            elif isinstance(item, int):
                yield pb.RunRoundResponse(result=self._recorded(item))
                return
            else:
                abort(context, item)

    def _await(
        self, outcome: Future[int], context: grpc.ServicerContext
    ) -> pb.ConsortiumRoundResult:
        """The recorded result of the running round, once it ends (a retry of its id)."""
        while True:
            try:
                round_num = outcome.result(timeout=_RETRY_POLL_S)
            except FutureTimeout:
                if not context.is_active():  # the caller went away: nobody to answer
                    abort(context, Busy("the caller cancelled while the round ran"))
                continue
            except BaseException as error:
                abort(context, error)
            return self._recorded(round_num)

    def _recorded(self, round_num: int) -> pb.ConsortiumRoundResult:
        record = self._ledger.by_round(round_num)
        if record is None:  # the commit step records before the core returns
            raise NotFound(f"round {round_num} has no record")
        return record.result

    def _commit(
        self,
        result: ConsortiumRoundResult,
        request_id: str,
        operator: str,
        signatures: Mapping[str, pb.Signature] | None = None,
        header_signatures: Mapping[str, pb.Signature] | None = None,
    ) -> None:
        """The core's commit step: the round is durable once its journal entry lands (with
        the ``operator`` who triggered it and the members' ``signatures`` over their
        contributions, and ``header_signatures`` over their result headers). Runs before the
        core changes anything, so if it raises there is nothing to undo."""
        record = self._store.commit_round(
            result, request_id, operator, signatures, header_signatures
        )
        # The base first: whoever has seen round N listed then gets round N's base.
        self._committed = (result.round_num, result.shared_base_sha256)
        self._ledger.record(record)
        self._metrics.round_recorded(record.result)
        log.info("round %d %s", result.round_num, _summary(result))

    def RollBackBase(
        self, request: pb.RollBackBaseRequest, context: grpc.ServicerContext
    ) -> pb.RollBackBaseResponse:
        """Restore round ``to_round``'s committed base as a new round, through the same
        commit step as rounds. Holds the coordinator as a round does (the ledger's claim):
        no round starts while it runs, and it is refused while one runs."""
        to_round = request.to_round
        if not isinstance(self._ledger.claim(""), Claimed):
            abort(
                context,
                Busy(
                    f"round {self._core.round_num + 1} is running; wait for its result "
                    "(tapestry rounds) and roll back after it"
                ),
            )
        outcome: int | BaseException = RuntimeError("the rollback did not finish")
        try:
            records = self._ledger.records()
            state, sha256 = self._store.committed_base(to_round, records)
            outcome = self._core.roll_back(
                state,
                to_round,
                sha256=sha256,
                commit=lambda r: self._commit(r, "", _operator(context)),
                momentum=self._store.committed_momentum(to_round, records),
            ).round_num
        except Exception as error:
            if not isinstance(error, NotFound | StoreError | ValueError):
                log.exception("rollback to round %d failed", to_round)
            outcome = error
            abort(context, error)
        finally:
            self._ledger.settle(outcome)
        return pb.RollBackBaseResponse(result=self._recorded(outcome))

    def GetRound(
        self, request: pb.GetRoundRequest, context: grpc.ServicerContext
    ) -> pb.GetRoundResponse:
        try:
            wanted = codec.selected_round(request)
        except ValueError as error:
            abort(context, error)
        records = self._ledger.records()
        if not records:
            abort(context, NotFound("no round has been committed yet"))
        if wanted is None:
            return pb.GetRoundResponse(result=records[-1].result)
        record = self._ledger.by_round(wanted)
        if record is not None:
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
        entries = ((r.result.round_num, r.result) for r in self._ledger.records())
        try:
            rounds, token = take_page(
                entries, "rounds", request.page_size, request.page_token, self._page_tokens
            )
        except ValueError as error:
            abort(context, error)
        return pb.ListRoundsResponse(rounds=rounds, next_page_token=token)

    def ListRoundRecords(
        self, request: pb.ListRoundRecordsRequest, context: grpc.ServicerContext
    ) -> pb.ListRoundRecordsResponse:
        """The journal's records as committed (signed), oldest first; a page token
        continues after the round number it carries."""
        entries = ((r.result.round_num, r) for r in self._ledger.records())
        try:
            records, token = take_page(
                entries, "records", request.page_size, request.page_token, self._page_tokens
            )
        except ValueError as error:
            abort(context, error)
        return pb.ListRoundRecordsResponse(records=records, next_page_token=token)

    # -- base and artifacts ----------------------------------------------------------

    def GetBase(
        self, request: pb.GetBaseRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GetBaseResponse]:
        round_num, digest = self._committed
        if request.HasField("round_num") and request.round_num != round_num:  # another round's
            try:
                digest = self._store.committed_digest(request.round_num, self._ledger.records())
            except (NotFound, StoreError) as error:
                abort(context, error)
            round_num = request.round_num
        base = StoredState(self._store.base_path(round_num))
        yield pb.GetBaseResponse(
            header=pb.BaseHeader(round_num=round_num, model=codec.model_spec_to_proto(self._spec))
        )
        # The digest was computed when the base was committed; the file is checked against
        # it on resume, and the receiver checks the stream against it.
        yield from send_state(
            base,
            lambda c: pb.GetBaseResponse(chunk=c),
            lambda t: pb.GetBaseResponse(end=t),
            sha256=digest,
            chunk_bytes=self._chunk_bytes,
            on_bytes=self._metrics.base_sent(CLIENT_PEER),
        )

    def ListArtifacts(
        self, request: pb.ListArtifactsRequest, context: grpc.ServicerContext
    ) -> pb.ListArtifactsResponse:
        """Members in consortium-file order, then any others the journal remembers; a page
        token continues after the place it carries in that order."""
        retained = dict(self._core.sovereign_artifacts)
        order = list(self._order)
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

    # -- members -----------------------------------------------------------------------

    def OpenSession(
        self, request_iterator: Iterator[pb.OpenSessionRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.OpenSessionResponse]:
        """A member's session (:mod:`tapestry.coordinator.session_service`)."""
        if self._sessions is None:
            context.abort(
                grpc.StatusCode.UNIMPLEMENTED, "this coordinator opens no members' sessions"
            )
        yield from self._sessions.open(request_iterator, context)

    def ListMembers(
        self, request: pb.ListMembersRequest, context: grpc.ServicerContext
    ) -> pb.ListMembersResponse:
        """Every member and its session, in the consortium file's order."""
        if self._members is None:
            return pb.ListMembersResponse(
                members=[pb.MemberSession(node_id=node_id) for node_id in self._order]
            )
        return pb.ListMembersResponse(members=self._members.listing())


def _operator(context: grpc.ServicerContext) -> str:
    """Who called, as the journal records it: the ``spiffe://`` URI of the caller's client
    certificate; empty over plaintext, where nobody is known."""
    peer = calling_peer(context)
    return peer.uri if peer is not None else ""


def _signatures(
    nodes: Sequence[object], round_num: int, kept: str = "contribution_signatures"
) -> dict[str, pb.Signature]:
    """Each remote member's checked signature over its contribution of ``round_num``: its
    delta's, or (``kept="header_signatures"``) its result header's."""
    found = {}
    for node in nodes:
        signed = getattr(node, kept, {}).pop(round_num, None)
        if signed is not None:
            found[getattr(node, "node_id", "")] = signed
    return found


def _summary(result: ConsortiumRoundResult) -> str:
    """One log line's worth of a committed round, after its number."""
    if result.rolled_back_to is not None:
        return (
            f"committed: the base of round {result.rolled_back_to} restored by an operator, "
            f"base {result.previous_base_sha256[:12]} -> {result.shared_base_sha256[:12]}"
        )
    return (
        f"{f'aborted ({result.aborted_reason})' if result.aborted else 'committed'}: "
        f"accepted {result.accepted_nodes}, rejected {result.rejected_nodes}, failed "
        f"{sorted(result.failed_nodes)}, base {result.previous_base_sha256[:12]} -> "
        f"{result.shared_base_sha256[:12]}"
    )
