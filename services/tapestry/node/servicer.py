"""``SovereignNodeService`` over gRPC: check the cycle's start (:mod:`tapestry.node.guard`),
decode the base within its deadline, run the core node's cycle, persist the full artifact,
stream back only the delta within its deadline."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import torch

from tapestry.config import NodeLimits
from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.consortium.v1 import consortium_pb2_grpc as pb_grpc
from tapestry.errors import Busy, NotFound, WireError, quoted
from tapestry.limits import NODE_PROGRESS_REPORTS
from tapestry.node.artifacts import ArtifactStore
from tapestry.node.base_trust import BaseTrust
from tapestry.node.candidates import Candidates, assemble, new_assembler
from tapestry.node.cycle_progress import reporting
from tapestry.node.guard import CycleRefused, check_cycle_start
from tapestry.node.receipts import Receipts
from tapestry.observe.metrics import NodeMetrics
from tapestry.pki.signing import Signer
from tapestry.pki.statements import contribution_statement, sign_evaluation
from tapestry.training.consortium.local.node import Persist, SovereignTrainingNode
from tapestry.training.consortium.messages import SovereignCycleResult, SovereignModelArtifact
from tapestry.training.consortium.models.spec import ModelSpec
from tapestry.training.consortium.models.state import model_state
from tapestry.training.consortium.progress import CyclePhase, CycleProgress, ProgressThrottle
from tapestry.training.consortium.round.validation import step
from tapestry.training.consortium.tensors import (
    state_digest,
    state_layout,
    state_nbytes,
)
from tapestry.wire import codec
from tapestry.wire.deadlines import ReceiveDeadline, SendDeadline
from tapestry.wire.delta_encoding import DeltaEncoding
from tapestry.wire.spill import SpilledState
from tapestry.wire.status import abort
from tapestry.wire.tensor_stream import send_state, spec_of, stream_digest

log = logging.getLogger(__name__)
HELD_BASE = "held-base-{}.spill"  # in the scratch directory, numbered by arrival
# The coordinator ends a cycle's call without waiting for this node to unwind it (a declined
# delta; a fetched one, cancelled once its trailer is in), so its next round may arrive while
# the last call's handler is still finishing: a new cycle waits this long before it is Busy.
BUSY_GRACE_S = 5.0
# The chunks a node cuts its delta into, by default.
DELTA_CHUNK_BYTES = 1 << 20


class SovereignNodeServicer(pb_grpc.SovereignNodeServiceServicer):
    def __init__(
        self,
        node: SovereignTrainingNode,
        spec: ModelSpec,
        store: ArtifactStore,
        consortium_id: str,
        limits: NodeLimits | None = None,
        chunk_bytes: int = DELTA_CHUNK_BYTES,
        metrics: NodeMetrics | None = None,
        scratch_dir: Path | None = None,
        signer: Signer | None = None,
        trust: BaseTrust | None = None,
        receipts: Receipts | None = None,
    ) -> None:
        """``consortium_id`` is the one this node serves; ``limits`` bound what a caller
        may ask of it (:class:`~tapestry.config.NodeLimits`); cycles are counted in
        ``metrics``. With ``scratch_dir`` the received base is kept in a file there
        (:data:`HELD_BASE`) and read back a tensor at a time, not held in memory: the
        node's peak is then its model, its optimizer state and the delta. A base that does
        not arrive whole then leaves the one held before in place (in memory it is dropped
        first, so that the node never holds two). ``signer`` signs its evaluations of a
        round's candidate (:mod:`tapestry.pki.statements`); ``trust`` decides which bases it
        trains from (:mod:`tapestry.node.base_trust`; without it, any the coordinator
        sends); ``receipts`` keeps the coordinator's signed records each cycle's start
        carries (:mod:`tapestry.node.receipts`)."""
        self._node = node
        self._spec = spec
        self._store = store
        self._consortium_id = consortium_id
        self._limits = limits or NodeLimits()
        self._chunk_bytes = chunk_bytes
        state = model_state(node.model)
        self._expected = spec_of(state)
        self._layout = codec.state_layout_to_proto(state_layout(state))
        self._busy = threading.Lock()
        self._metrics = metrics or NodeMetrics(node.node_id)
        # The base of the last cycle, kept so an unchanged base need not cross the wire
        # again (the coordinator reads its digest in Describe); one model's worth, on disk
        # with a scratch directory.
        self._held: _Held | None = None
        self._scratch = scratch_dir
        self._arrivals = itertools.count(1)
        if scratch_dir is not None:
            scratch_dir.mkdir(parents=True, exist_ok=True)
            for stale in scratch_dir.glob(HELD_BASE.format("*")):  # held before a restart
                stale.unlink()
        # The newest round's candidate, while its members validate it.
        self._candidates = Candidates(node.node_id, self._expected, scratch_dir)
        self._signer = signer
        self._trust = trust
        self._receipts = receipts

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
            state_layout=self._layout,
            held_base_sha256=self._held.sha256 if self._held is not None else "",
            held_step_sha256=self._candidates.step_digests(),
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
        """Check the start (consortium, round), decode the base within
        ``receive_timeout_s``, run the core node's cycle (which checks its input), persist
        the artifact, send the result header, wait for the coordinator's decision on the
        delta within ``decision_timeout_s``, and when it is wanted stream it within
        ``send_timeout_s``. A call that begins with an ``EvaluationStart`` is an evaluation
        of the round's candidate instead (:meth:`_evaluate`). The node is free again
        however the call ends."""
        if not self._busy.acquire(timeout=BUSY_GRACE_S):
            self._metrics.cycle_ended("busy")
            abort(context, Busy(f"node {self._node.node_id!r} is already running a cycle"))
        began = time.monotonic()
        completed = False
        requests = ReceiveDeadline(
            request_iterator, self._limits.receive_timeout_s, "the base", "receive_timeout_s"
        )
        sending: SendDeadline | None = None
        evaluating = False  # an evaluation is not counted as a cycle
        try:
            try:
                first = next(requests, None)
            except Exception as error:
                abort(context, error)
            if first is not None and first.WhichOneof("item") == "evaluate":
                evaluating = True
                yield self._evaluated(first.evaluate, requests, context)
                return
            try:
                round_num, result, header, encoding = yield from self._trained(first, requests)
                delta = result.contribution.weight_delta
            except Exception as error:
                log.warning("cycle refused or failed: %s", error)
                abort(context, error)
            log.info("round %d: artifact stored, result sent, awaiting the decision", round_num)
            yield pb.RunSovereignCycleResponse(result=header)
            try:
                wanted = self._decision(requests)
            except Exception as error:
                log.warning("no decision on the delta: %s", error)
                abort(context, error)
            if not wanted:
                log.info("round %d: the coordinator did not want the delta", round_num)
                completed = True
                return
            log.info("round %d: streaming the delta (%s)", round_num, encoding.value)
            sending = SendDeadline(self._limits.send_timeout_s, lambda: self._drop(context))
            for message in send_state(
                delta,
                lambda c: pb.RunSovereignCycleResponse(delta_chunk=c),
                lambda t: pb.RunSovereignCycleResponse(delta_end=self._signed(t, header)),
                sha256=header.contribution.weight_delta_sha256,
                chunk_bytes=self._chunk_bytes,
                on_bytes=self._metrics.delta_sent(),
                encoding=encoding,
            ):
                # Complete once the trailer is handed over: the caller may cancel the call
                # as soon as it has it, before this generator is resumed again.
                completed = message.HasField("delta_end")
                yield message
        finally:
            if not evaluating:
                outcome = "completed" if completed else "failed"
                self._metrics.cycle_ended(outcome, time.monotonic() - began)
            if sending is not None:
                sending.stop()
            requests.close()
            self._busy.release()

    def _sign_header(self, contribution: pb.SovereignContribution) -> None:
        """Sign what the result header claims (its ContributionStatement: the delta's
        digest it announces, its held-out numbers, quality and tokens) when this node has a
        key: the node's signed word, whether or not its delta is then wanted."""
        held = self._held
        if self._signer is None or held is None:
            return
        payload = contribution_statement(
            self._consortium_id,
            contribution.round_num,
            held.sha256,
            contribution,
            contribution.weight_delta_sha256,
        )
        signed = self._signer.sign(payload)
        contribution.header_signature.CopyFrom(
            pb.Signature(certificate=signed.certificate, signature=signed.signature)
        )

    def _signed(self, trailer: pb.StateTrailer, header: pb.SovereignCycleResult) -> pb.StateTrailer:
        """The delta's trailer, signed over its ContributionStatement when this node has a
        key (:mod:`tapestry.pki.statements`): the header's signature, over the very same
        statement (the trailer carries the digest the header announced)."""
        contribution = header.contribution
        if contribution.HasField("header_signature"):
            trailer.signature.CopyFrom(contribution.header_signature)
        return trailer

    def _evaluated(
        self,
        start: pb.EvaluationStart,
        requests: Iterator[pb.RunSovereignCycleRequest],
        context: grpc.ServicerContext,
    ) -> pb.RunSovereignCycleResponse:
        """The reply to an evaluation, or the call aborted with what was wrong."""
        try:
            evaluation = self._evaluate(start, requests)
        except Exception as error:
            log.warning("evaluation refused or failed: %s", error)
            abort(context, error)
        return pb.RunSovereignCycleResponse(evaluation=evaluation)

    def _evaluate(
        self, start: pb.EvaluationStart, requests: Iterator[pb.RunSovereignCycleRequest]
    ) -> pb.MemberEvaluation:
        """Evaluate the step ``start`` names, computed from the base this node trained
        from in the newest round it trained (:mod:`tapestry.node.candidates`)."""
        rounds = self._store.rounds()
        newest = rounds[-1] if rounds else 0
        check_cycle_start(
            self._node.node_id,
            start.consortium_id,
            start.round_num,
            own_consortium_id=self._consortium_id,
            newest_round=newest,
            max_round_gap=0,
        )
        held = self._held
        if start.round_num != newest or held is None or held.sha256 != start.base_sha256:
            raise CycleRefused(
                f"node {self._node.node_id!r} did not train round {start.round_num} from a "
                f"base with digest {quoted(start.base_sha256)}: it evaluates only the "
                f"candidate of the round it trained last (round {newest}), from its base"
            )
        scale = start.scale
        if not 0.0 < scale <= 1.0:  # NaN too
            raise WireError(f"EvaluationStart.scale {scale!r} is not in (0, 1]")
        candidate = self._candidates.take(start, requests, self._metrics.candidate_received())
        state = step(dict(held.state), dict(candidate.state), scale)
        digest = candidate.sha256 if scale == 1.0 else state_digest(state)
        evaluation = self._node.evaluate_candidate(start.round_num, state)
        if evaluation is None:
            raise CycleRefused(
                f"node {self._node.node_id!r} holds no held-out split: it cannot evaluate "
                "a candidate ([training] heldout_fraction)"
            )
        self._candidates.evaluated(candidate, digest, scale)
        answer = codec.member_evaluation_to_proto(replace(evaluation, state_sha256=digest))
        if self._signer is not None:
            sign_evaluation(
                self._signer, self._consortium_id, start.round_num, start.base_sha256, answer
            )
        log.info(
            "round %d: step %g toward the candidate evaluated, held-out loss %.4f -> %.4f",
            start.round_num,
            scale,
            evaluation.base_loss,
            evaluation.candidate_loss,
        )
        return answer

    def _trained(
        self,
        first: pb.RunSovereignCycleRequest | None,
        requests: ReceiveDeadline[pb.RunSovereignCycleRequest],
    ) -> Generator[
        pb.RunSovereignCycleResponse,
        None,
        tuple[int, SovereignCycleResult, pb.SovereignCycleResult, DeltaEncoding],
    ]:
        """Receive the base, train, persist the artifact: ``(round, result, its header,
        the delta's encoding)``, reporting the base's arrival on the way."""
        round_num, base, encoding = self._receive_base(first, requests)
        log.info("round %d: base received, training", round_num)
        received = CycleProgress(
            CyclePhase.BASE_RECEIVED,
            state_bytes=state_nbytes(base),
            tensor_count=len(base),
        )
        yield pb.RunSovereignCycleResponse(progress=codec.cycle_progress_to_proto(received))
        started = time.perf_counter()
        persisting = _Timed(self._store.save)
        # Persisted inside the cycle, straight from the model's own tensors (no copy
        # of the trained model is kept in memory), and before replying: a
        # contribution is only sent for a model we keep.
        result = yield from self._train(round_num, base, persisting)
        # The core's own work (what the in-process round also does, so the artifact's
        # save is left out); the benchmark reads it to split a round into training
        # and the services' overhead.
        took = time.perf_counter() - started - persisting.seconds
        log.info("round %d: cycle took %.6f s", round_num, took)
        log.info("round %d: artifact saved in %.6f s", round_num, persisting.seconds)
        self._store.record_evaluation(round_num, result.contribution.evaluation)
        self._metrics.trained(round_num, result.contribution)
        # The delta's digest is announced, and signed, in the header: hashed here, so the
        # stream that may follow hashes nothing again (raw deltas: no extra pass).
        digest = stream_digest(result.contribution.weight_delta, encoding)
        header = codec.cycle_result_to_proto(result, digest)
        self._sign_header(header.contribution)
        return round_num, result, header, encoding

    def _train(
        self, round_num: int, base: Mapping[str, torch.Tensor], persist: Persist
    ) -> Generator[pb.RunSovereignCycleResponse, None, SovereignCycleResult]:
        """The core node's cycle, its artifact stored by ``persist``; its training reports,
        throttled (at most one every 0.5 s, :data:`NODE_PROGRESS_REPORTS` in all, and the
        last step), are yielded as they come, before the result."""
        reports = reporting(
            lambda on_progress: self._node.run_sovereign_cycle(
                round_num, base, on_progress=on_progress, persist=persist
            ),
            ProgressThrottle(max_reports=NODE_PROGRESS_REPORTS),
        )
        try:
            while True:
                try:
                    progress = next(reports)
                except StopIteration as ended:
                    result: SovereignCycleResult = ended.value
                    return result
                yield pb.RunSovereignCycleResponse(progress=codec.cycle_progress_to_proto(progress))
        finally:
            reports.close()  # waits for the cycle however this call ends

    def _decision(self, requests: ReceiveDeadline[pb.RunSovereignCycleRequest]) -> bool:
        """Whether the coordinator wants the delta: the next request, within
        ``decision_timeout_s`` of the result header (the other nodes may still be
        training)."""
        requests.renew(
            self._limits.decision_timeout_s,
            "the coordinator's decision on the delta",
            "decision_timeout_s",
        )
        message = next(requests, None)
        if message is None or message.WhichOneof("item") != "delta_decision":
            raise WireError(
                "after the base, the request stream must carry the coordinator's "
                "DeltaDecision and nothing else"
            )
        return message.delta_decision.send

    def _drop(self, context: grpc.ServicerContext) -> None:
        log.warning(
            "the caller did not take the delta within send_timeout_s = %g s; call cancelled",
            self._limits.send_timeout_s,
        )
        context.cancel()

    def _keep_receipts(self, receipts: Sequence[pb.RoundRecord]) -> None:
        """Keep the receipts whose signature holds; nothing about them fails the cycle."""
        if self._receipts is None:
            return
        try:
            self._receipts.keep(receipts)
        except Exception:
            log.exception("the cycle's receipts could not be kept")

    def _receive_base(
        self,
        first: pb.RunSovereignCycleRequest | None,
        requests: Iterator[pb.RunSovereignCycleRequest],
    ) -> tuple[int, Mapping[str, torch.Tensor], DeltaEncoding]:
        """The round number, the base, assembled against this node's own keys, dtypes
        and shapes (so a peer cannot make it allocate more than one model), and how to
        encode the delta. The start is checked before any of the base is read
        (:func:`check_cycle_start`; an encoding this release does not know is a
        :class:`WireError`); what the base must hold to be trained on is the core node's
        check, not this one's."""
        if first is None or first.WhichOneof("item") != "start":
            raise WireError("the request stream must begin with a CycleStart message")
        rounds = self._store.rounds()
        check_cycle_start(
            self._node.node_id,
            first.start.consortium_id,
            first.start.round_num,
            own_consortium_id=self._consortium_id,
            newest_round=rounds[-1] if rounds else 0,
            max_round_gap=self._limits.max_round_gap,
        )
        start = first.start
        self._keep_receipts(start.receipts)
        try:
            encoding = codec.encoding_from_proto(start.delta_encoding, "CycleStart.delta_encoding")
        except ValueError as error:
            raise WireError(f"{error} (an encoding this node's release does not know)") from None
        if self._trust is not None and start.base_sha256:  # refused before it crosses
            self._trust.check(start.base_sha256, start.base_proofs)
        if start.base_held:
            base = self._held_base(start.base_sha256)
            self._trusted(start.base_sha256)
            return start.round_num, base, encoding
        if self._scratch is None:
            self._held = None  # dropped before a new base is assembled: one base at a time
            self._candidates.drop()
        # With a scratch directory, a new file: the held one stays whole, and no map of it
        # is truncated.
        assembler = new_assembler(
            self._expected, self._scratch, HELD_BASE.format(next(self._arrivals))
        )
        base = assemble(
            requests,
            ("base_chunk", "base_end"),
            assembler,
            (start.base_sha256, "CycleStart"),
            "base",
            self._metrics.base_received(),
        )
        if self._trust is not None and not start.base_sha256:  # unannounced: checked now
            try:  # a malformed base is said to be one first (the core's check)
                self._node.check_base(start.round_num, base)
                self._trust.check(assembler.digest, start.base_proofs)
            except Exception:
                if isinstance(base, SpilledState):
                    base.discard()
                raise
        self._hold(_Held(base, assembler.digest))
        self._trusted(assembler.digest)
        return start.round_num, base, encoding

    def _trusted(self, sha256: str) -> None:
        if self._trust is not None:
            self._trust.trained_from(sha256)

    def _hold(self, held: _Held) -> None:
        """``held`` is the base of this node's newest cycle: the one before, and the
        candidate of the round before, are let go."""
        earlier, self._held = self._held, held
        if earlier is not None and isinstance(earlier.state, SpilledState):
            earlier.state.discard()
        self._candidates.drop()

    def _held_base(self, sha256: str) -> Mapping[str, torch.Tensor]:
        """The base this node holds, or the step toward the last round's candidate that it
        evaluated, once hashed again and found to be ``sha256`` (what it trains from must
        be exactly the round's base, however long it was held)."""
        held = self._held
        if held is not None and sha256 and held.sha256 != sha256:
            stepped = self._candidates.step_to(held.state, sha256)
            if stepped is not None:  # the round committed a step this node evaluated
                self._hold(_Held(stepped, sha256))
                return stepped
        if held is None or not sha256 or state_digest(held.state) != sha256:
            raise CycleRefused(
                f"node {self._node.node_id!r} holds no base with digest {quoted(sha256)}; "
                "send the base"
            )
        return held.state


class _Timed:
    """``persist`` that also adds up the seconds it took (the save, apart from training)."""

    def __init__(self, persist: Persist) -> None:
        self._persist = persist
        self.seconds = 0.0

    def __call__(self, artifact: SovereignModelArtifact) -> SovereignModelArtifact:
        started = time.perf_counter()
        try:
            return self._persist(artifact)
        finally:
            self.seconds += time.perf_counter() - started


@dataclass(frozen=True)
class _Held:
    """The base of the last cycle (in memory, or a :class:`SpilledState`) and its digest."""

    state: Mapping[str, torch.Tensor]
    sha256: str
