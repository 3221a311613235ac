"""A remote node that honours the core's ``run_sovereign_cycle`` contract over gRPC.

The core coordinator cannot tell it from an in-process :class:`SovereignTrainingNode`,
except that the returned artifact is metadata only: the node keeps its weights.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import grpc
import torch

from tapestry.allocator import release_free_memory
from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.coordinator.candidate_evaluation import ask_evaluation
from tapestry.coordinator.node_links import CycleCall, DialedLink, NodeLink
from tapestry.coordinator.sent_deltas import SentDeltas
from tapestry.coordinator.transfer_meter import TransferMeter
from tapestry.errors import WireError, quoted
from tapestry.limits import (
    DEFAULT_EVALUATION_TIMEOUT_S,
    MAX_PEER_NAME_CHARS,
    MAX_PROGRESS_MESSAGE_BYTES,
    MAX_PROGRESS_MESSAGES,
)
from tapestry.pki.layout import node_server_name
from tapestry.pki.server_check import ServerCertificateCheck, ServerNotTrusted
from tapestry.pki.statements import SignatureCheck, contribution_statement
from tapestry.training.consortium.deferred import DeferredState
from tapestry.training.consortium.messages import (
    MemberEvaluation,
    ModelState,
    SovereignCycleResult,
)
from tapestry.training.consortium.models.spec import ModelSpec, spec_differences
from tapestry.training.consortium.progress import CyclePhase, CycleProgress, ProgressCallback
from tapestry.training.consortium.tensors import StateLayout, known_digest, state_nbytes
from tapestry.wire import codec
from tapestry.wire.delta_encoding import DeltaEncoding
from tapestry.wire.spill import SpillingAssembler
from tapestry.wire.status import NODE, describe_rpc_error
from tapestry.wire.tensor_stream import (
    DEFAULT_CHUNK_BYTES,
    ByteCount,
    StateAssembler,
    receive_state,
    send_state,
    spec_of,
)

# A node told its delta is not wanted ends the call at once; past this it is cancelled.
DECLINE_GRACE_S = 10.0
# A node answers Describe from memory; a few seconds is plenty even across continents. The
# deadline covers every attempt: a node still unreachable after it has failed this round.
DESCRIBE_TIMEOUT_S = 10.0
# The steps toward a candidate a node may say it holds that are read (one per step tried).
MAX_HELD_STEPS = 16


class NodeCallFailed(RuntimeError):
    """The node could not be reached or refused the cycle; the message has its status."""


class NodeMismatch(RuntimeError):
    """The server at a member's address is not the member the consortium file names."""


class MemberMisnamed(NodeMismatch):
    """The server at a member's address is another node, or serves another jurisdiction,
    than the consortium file names: ``node_id`` and ``jurisdiction`` are what it says it
    is (a peer's text, cut to 64 characters)."""

    def __init__(self, message: str, node_id: str, jurisdiction: str) -> None:
        super().__init__(message)
        self.node_id = node_id[:MAX_PEER_NAME_CHARS]
        self.jurisdiction = jurisdiction[:MAX_PEER_NAME_CHARS]


def _ignore(progress: CycleProgress) -> None:
    """The progress callback of a cycle nobody follows."""


def _result_after_progress(
    responses: Iterator[pb.RunSovereignCycleResponse], on_progress: ProgressCallback
) -> pb.SovereignCycleResult:
    """The cycle result that opens a node's reply, after the progress messages that may
    precede it, each decoded, checked and handed to ``on_progress``. A node that sends more
    than :data:`MAX_PROGRESS_MESSAGES` of them, one larger than
    :data:`MAX_PROGRESS_MESSAGE_BYTES`, a phase the coordinator marks itself, or numbers out
    of range is refused (:class:`WireError`, naming the bound)."""
    for received, message in enumerate(responses):
        kind = message.WhichOneof("item")
        if kind == "result":
            return message.result
        if kind != "progress":
            break
        if received >= MAX_PROGRESS_MESSAGES:
            raise WireError(
                f"the node sent more than MAX_PROGRESS_MESSAGES = {MAX_PROGRESS_MESSAGES} "
                "progress messages in one cycle (flooding)"
            )
        if message.ByteSize() > MAX_PROGRESS_MESSAGE_BYTES:
            raise WireError(
                f"a progress message of {message.ByteSize()} bytes, more than "
                f"MAX_PROGRESS_MESSAGE_BYTES = {MAX_PROGRESS_MESSAGE_BYTES}"
            )
        try:
            progress = codec.cycle_progress_from_proto(message.progress, codec.NODE_PHASES)
        except ValueError as error:
            raise WireError(f"invalid progress message {received + 1}: {error}") from None
        on_progress(progress)
    raise WireError("the node's reply must begin with its cycle result (after any progress)")


class RemoteSovereignNode:
    def __init__(
        self,
        node_id: str,
        jurisdiction: str,
        link: NodeLink | str,
        *,
        model: ModelSpec | None = None,
        state_layout: StateLayout | None = None,
        consortium_id: str = "",
        timeout_s: float = 3600.0,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        spill_dir: Path | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        server_check: ServerCertificateCheck | None = None,
        count_sent: ByteCount | None = None,
        count_received: ByteCount | None = None,
        delta_encoding: DeltaEncoding = DeltaEncoding.FLOAT32,
        sent_deltas: SentDeltas | None = None,
        evaluation_timeout_s: float = DEFAULT_EVALUATION_TIMEOUT_S,
        count_candidate_sent: ByteCount | None = None,
        signatures: SignatureCheck | None = None,
        base_proofs: Callable[[int], list[pb.BaseProof]] | None = None,
        receipts: Callable[[int], list[pb.RoundRecord]] | None = None,
    ) -> None:
        """``link`` reaches the node: its session (it dialed out) or, given as an address,
        a :class:`~tapestry.coordinator.node_links.DialedLink` to a node that listens
        there. ``model`` is the consortium's model spec: before any weights are sent, the
        node must describe itself as ``node_id`` in ``jurisdiction`` training that model, and
        ``state_layout`` (the base's, when given) as the layout of its state. With
        ``spill_dir``, the delta is written to ``<spill_dir>/<node_id>.delta`` as it
        arrives instead of being held in memory (see :mod:`tapestry.wire.spill`). With
        ``credentials`` (the coordinator's) a dialed channel is mutual TLS and the handshake
        refuses a server whose certificate is not this node's
        (:func:`~tapestry.pki.layout.node_server_name`); ``server_check`` then refuses one
        whose certificate the CRL lists, which gRPC's handshake does not check.
        ``count_sent`` and ``count_received`` are told the tensor bytes of the base sent and
        the delta received (the coordinator's metrics), as they travel. ``delta_encoding``
        is asked of the node for its delta's floating tensors
        (:mod:`tapestry.wire.delta_encoding`); its stream may hold raw tensors and that
        encoding, nothing else, and is decoded as it arrives. ``sent_deltas`` remembers
        the member's deltas, so that one sent again is refused
        (:mod:`tapestry.coordinator.sent_deltas`). ``evaluation_timeout_s`` bounds each of
        its evaluations of a round's candidate (:meth:`evaluate_step`), the candidate's
        transfer included; ``count_candidate_sent`` is told the candidate's bytes. With
        ``signatures`` (the consortium CA's check), an evaluation counts only signed by this
        member (:mod:`tapestry.pki.statements`). ``base_proofs`` gives, for the newest round
        the node trained, the proofs that lead from its base to the round's
        (:mod:`tapestry.coordinator.base_proofs`), sent with each cycle's start, and
        ``receipts`` the journal's signed records since that round (the member's receipts)."""
        self.node_id = node_id
        self.jurisdiction = jurisdiction
        self.model = model
        self.state_layout = state_layout
        self.consortium_id = consortium_id
        self.timeout_s = timeout_s
        self.chunk_bytes = chunk_bytes
        self.spill_dir = spill_dir
        self.server_check = server_check
        self._count_sent = count_sent
        self._count_received = count_received
        self.delta_encoding = delta_encoding
        self.sent_deltas = sent_deltas
        self._link = DialedLink(node_id, link, credentials) if isinstance(link, str) else link
        self.held_base_sha256 = ""  # the base the node said it holds (Describe)
        # The steps toward the last candidate it evaluated, which it can compute (Describe).
        self.held_step_sha256: frozenset[str] = frozenset()
        self.evaluation_timeout_s = evaluation_timeout_s
        self._count_candidate_sent = count_candidate_sent
        self.signatures = signatures
        self._base_proofs = base_proofs
        self._receipts = receipts
        self.latest_round = 0  # the newest round the node trained (Describe)
        # Round -> the node's signature over its newest contribution, checked (for the
        # record); a dialed member's proxy outlives rounds, so it holds one at most.
        self.contribution_signatures: dict[int, pb.Signature] = {}
        self.header_signatures: dict[int, pb.Signature] = {}
        self._candidate_sent: tuple[int, str] | None = None  # (round, digest) it holds
        self._evaluation_failed = 0  # the round whose validation it failed a step of

    @property
    def address(self) -> str:
        return self._link.address

    def close(self) -> None:
        self._link.close()

    def check_identity(self, *, again: bool = True) -> None:
        """Ask the node who it is (``Describe``) and refuse a server that is not this
        member or trains another model, by spec or by state layout (:class:`NodeMismatch`,
        naming the fields that differ; :class:`MemberMisnamed` when it is another node or
        serves another jurisdiction), or that presents a revoked certificate
        (``server_check``, once it answered; also :class:`NodeMismatch`); unreachable is
        :class:`NodeCallFailed`. The channel retries an UNAVAILABLE ``Describe`` with
        backoff (:func:`~tapestry.wire.grpc_plumbing.node_channel`), all within
        :data:`DESCRIBE_TIMEOUT_S`; a member's session that drops meanwhile is waited for
        and asked again, unless not ``again`` (``NodeLink.describe``); the cycle that
        follows is never retried."""
        try:
            described = self._link.describe(DESCRIBE_TIMEOUT_S, again=again)
        except grpc.RpcError as error:
            raise NodeCallFailed(describe_rpc_error(error, self.address, NODE)) from None
        problems = []
        if described.node_id != self.node_id:
            problems.append(
                f"node_id {quoted(described.node_id, MAX_PEER_NAME_CHARS)}, "
                f"expected {self.node_id!r}"
            )
        if described.jurisdiction != self.jurisdiction:
            problems.append(
                f"jurisdiction {quoted(described.jurisdiction, MAX_PEER_NAME_CHARS)}, "
                f"expected {self.jurisdiction!r}"
            )
        problems.extend(self._model_problems(described))
        if problems:
            message = (
                f"the server at {self.address} describes itself with {'; '.join(problems)}; "
                "fix the member's entry in the consortium file or the node's own config"
            )
            if (described.node_id, described.jurisdiction) != (self.node_id, self.jurisdiction):
                raise MemberMisnamed(message, described.node_id, described.jurisdiction)
            raise NodeMismatch(message)
        self.held_base_sha256 = described.held_base_sha256
        self.latest_round = described.latest_round
        # A handful at most are honest (one per step tried); a longer list is cut, not read.
        self.held_step_sha256 = frozenset(described.held_step_sha256[:MAX_HELD_STEPS])
        if self.server_check is not None:
            try:
                self.server_check.check(
                    self.address, node_server_name(self.node_id), DESCRIBE_TIMEOUT_S
                )
            except ServerNotTrusted as problem:
                raise NodeMismatch(str(problem)) from None

    def _model_problems(self, described: pb.DescribeResponse) -> list[str]:
        """How the node's model differs from the consortium's, one cause said once: a spec
        that differs (which explains any layout), else a layout that differs under the same
        spec (model code of another release)."""
        if self.model is not None:
            differences = spec_differences(codec.model_spec_from_proto(described.model), self.model)
            if differences:
                return [
                    f"model {', '.join(differences)} (the node file's [model] must match the "
                    "consortium file's)"
                ]
        if self.state_layout is None:
            return []
        if not described.HasField("state_layout"):
            return [f"no state layout, expected {self.state_layout}"]
        theirs = codec.state_layout_from_proto(described.state_layout)
        if theirs == self.state_layout:
            return []
        return [
            f"state layout {theirs}, expected {self.state_layout} (the same spec with other "
            "keys, dtypes or shapes: model code of another release)"
        ]

    def run_sovereign_cycle(
        self,
        round_num: int,
        base_state: ModelState,
        *,
        on_progress: ProgressCallback | None = None,
    ) -> SovereignCycleResult:
        """The node's cycle over gRPC. ``on_progress`` is told the node's own reports
        (base received, training) as they arrive, and ``SENDING_DELTA``/``DELTA_RECEIVED``
        around its delta stream, which this proxy marks itself."""
        self.check_identity()  # before any weights leave the coordinator
        try:
            return self._cycle(round_num, base_state, on_progress or _ignore)
        except grpc.RpcError as error:
            raise NodeCallFailed(describe_rpc_error(error, self.address, NODE)) from None

    def evaluate_step(
        self, round_num: int, base: ModelState, candidate: ModelState, scale: float
    ) -> MemberEvaluation:
        """The node's evaluation of the step of ``scale`` toward round ``round_num``'s
        ``candidate`` from ``base`` (:mod:`~tapestry.coordinator.candidate_evaluation`): the
        candidate is sent with the round's first evaluation and named held after. One that
        is not this member's, or of another state than the candidate at scale 1, is a
        :class:`NodeMismatch`; a refusal or a timeout is :class:`NodeCallFailed`. A member
        that failed a step of a round is not asked its later ones, so one that never answers
        holds a round's validation up for one ``evaluation_timeout_s``, not one per step."""
        if self._evaluation_failed == round_num:
            raise NodeCallFailed(
                f"node {self.node_id!r} failed an earlier step of round {round_num}'s validation"
            )
        try:
            return self._evaluate_step(round_num, base, candidate, scale)
        except Exception:
            self._evaluation_failed = round_num
            raise

    def _evaluate_step(
        self, round_num: int, base: ModelState, candidate: ModelState, scale: float
    ) -> MemberEvaluation:
        digest = known_digest(candidate)
        held = self._candidate_sent == (round_num, digest)
        start = pb.EvaluationStart(
            round_num=round_num,
            consortium_id=self.consortium_id,
            base_sha256=known_digest(base),
            candidate_sha256=digest,
            candidate_held=held,
            scale=scale,
        )
        try:
            evaluation = ask_evaluation(
                self._link,
                start,
                None if held else candidate,
                self.evaluation_timeout_s,
                self.chunk_bytes,
                self._count_candidate_sent,
            )
        except grpc.RpcError as error:
            raise NodeCallFailed(describe_rpc_error(error, self.address, NODE)) from None
        self._candidate_sent = (round_num, digest)
        if evaluation.node_id != self.node_id:
            raise NodeMismatch(
                f"the node at {self.address} answered an evaluation as "
                f"{quoted(evaluation.node_id, MAX_PEER_NAME_CHARS)}, not {self.node_id!r}"
            )
        if scale == 1.0 and evaluation.state_sha256 not in ("", digest):
            raise NodeMismatch(
                f"node {self.node_id!r} evaluated a state with digest "
                f"{evaluation.state_sha256}, not the candidate {digest}"
            )
        if self.signatures is not None:
            problem = self.signatures.evaluation_problem(
                self.consortium_id,
                round_num,
                start.base_sha256,
                codec.member_evaluation_to_proto(evaluation),
            )
            if problem is not None:
                raise NodeMismatch(f"node {self.node_id!r}: {problem}")
        return evaluation

    def _cycle(
        self, round_num: int, base_state: ModelState, on_progress: ProgressCallback
    ) -> SovereignCycleResult:
        """Send the start and the base, read the progress and the result header, and hand
        the core a result whose delta is deferred: the call stays open until the core
        fetches the delta (the node is told to send it) or releases it (told not to)."""
        digest = known_digest(base_state)  # the round's digest: hashed once per round
        # A node that holds this very base (it said so in Describe) is not sent it again;
        # it hashes what it holds before training from it.
        held = digest == self.held_base_sha256 or digest in self.held_step_sha256
        decisions: queue.Queue[bool] = queue.Queue(maxsize=1)
        meters: list[TransferMeter] = []  # the base's, once it streams

        def requests() -> Iterator[pb.RunSovereignCycleRequest]:
            yield pb.RunSovereignCycleRequest(
                start=pb.CycleStart(
                    round_num=round_num,
                    consortium_id=self.consortium_id,
                    base_sha256=digest,
                    base_held=held,
                    delta_encoding=codec.encoding_to_proto(self.delta_encoding),
                    base_proofs=self._base_proofs(self.latest_round) if self._base_proofs else [],
                    receipts=self._receipts(self.latest_round) if self._receipts else [],
                )
            )
            if not held:
                # Made here, on the sending thread, once the call is open: its first report
                # says the base is on its way.
                meters.append(
                    self._meter(CyclePhase.SENDING_BASE, state_nbytes(base_state), on_progress)
                )
                yield from send_state(
                    base_state,
                    lambda c: pb.RunSovereignCycleRequest(base_chunk=c),
                    lambda t: pb.RunSovereignCycleRequest(base_end=t),
                    sha256=digest,
                    chunk_bytes=self.chunk_bytes,
                    on_bytes=meters[0],
                )
            # Held open (on gRPC's sending thread) until the core decides on the delta; a
            # decision that never comes ends the stream, and the node then ends the call.
            try:
                send = decisions.get(timeout=self.timeout_s)
            except queue.Empty:
                return
            yield pb.RunSovereignCycleRequest(delta_decision=pb.DeltaDecision(send=send))

        responses = self._link.cycle(requests(), self.timeout_s)
        try:
            header = _result_after_progress(responses, _settling(meters, on_progress))
            self._check_header(header, base_state)
            for meter in meters:
                meter.finish()  # a node that reported nothing before its result
            specs = {name: (t.dtype, tuple(t.shape)) for name, t in base_state.items()}
            deferred = DeferredState(
                specs,
                lambda: self._receive_delta(responses, header, base_state, decisions, on_progress),
                lambda: self._decline_delta(responses, decisions),
            )
            return codec.cycle_result_from_proto(header, deferred)
        except BaseException:
            responses.cancel()
            _offer(decisions, False)  # frees the sending thread, if it waits for one
            raise

    def _check_header(self, header: pb.SovereignCycleResult, base_state: ModelState) -> None:
        """With ``signatures``, refuse a result header its node did not sign over its
        ContributionStatement (with the digest it announces for its delta, which the delta
        must then match); keep the signature for the round's record
        (:attr:`header_signatures`)."""
        contribution = header.contribution
        signature = contribution.header_signature
        if self.signatures is not None:
            if not contribution.HasField("header_signature"):
                raise WireError("the result header is not signed (ContributionStatement)")
            if not contribution.weight_delta_sha256:
                raise WireError("the signed result header announces no delta digest")
            payload = contribution_statement(
                self.consortium_id,
                contribution.round_num,
                known_digest(base_state),
                contribution,
                contribution.weight_delta_sha256,
            )
            problem = self.signatures.signed_by(signature, payload, self.node_id)
            if problem is not None:
                raise WireError(f"the result header's signature does not hold: {problem}")
        if contribution.HasField("header_signature"):  # the newest only, as for the delta's
            self.header_signatures = {contribution.round_num: signature}

    def _receive_delta(
        self,
        responses: CycleCall,
        header: pb.SovereignCycleResult,
        base_state: ModelState,
        decisions: queue.Queue[bool],
        on_progress: ProgressCallback,
    ) -> Mapping[str, torch.Tensor]:
        """Ask the node for its delta and receive it, checked chunk by chunk against the
        base's layout, spilled to disk when the proxy has a ``spill_dir``. A delta this
        member sent in an earlier round (``sent_deltas``) is refused: before it crosses the
        wire when the header announces its digest, else once its trailer names it."""
        announced = header.contribution.weight_delta_sha256
        round_num = header.contribution.round_num
        if announced and self.sent_deltas is not None:
            self.sent_deltas.check(self.node_id, announced, round_num)
        expected = spec_of(base_state)  # anything else is refused on arrival
        encodings = [self.delta_encoding]  # raw, or the one this consortium asked for
        assembler = (
            SpillingAssembler(self.spill_dir / f"{self.node_id}.delta", expected, encodings)
            if self.spill_dir is not None
            else StateAssembler(expected, encodings)
        )
        try:
            _offer(decisions, True)
            raw = self.delta_encoding is DeltaEncoding.FLOAT32  # else its size is not known
            meter = self._meter(
                CyclePhase.SENDING_DELTA, state_nbytes(base_state) if raw else 0, on_progress
            )
            trailers: list[pb.StateTrailer] = []
            delta = receive_state(
                _keeping_trailer(responses, trailers), "delta_chunk", "delta_end", assembler, meter
            )
            # A node may announce the digest in the header; it need not (it then hashes
            # the delta as it streams, one pass fewer), and the trailer's, checked against
            # the bytes received, is the contribution's either way.
            if announced and assembler.digest != announced:
                raise WireError("delta trailer digest differs from the announced one")
            self._check_signed(trailers[-1], header, base_state, assembler.digest)
            if self.sent_deltas is not None:
                self.sent_deltas.check(self.node_id, assembler.digest, round_num)
                self.sent_deltas.add(self.node_id, assembler.digest, round_num)
            on_progress(
                CycleProgress(
                    CyclePhase.DELTA_RECEIVED,
                    state_bytes=state_nbytes(base_state),  # the delta's layout is the base's
                    tensor_count=len(delta),
                )
            )
            return delta
        except grpc.RpcError as error:
            self._discard(assembler)
            raise NodeCallFailed(describe_rpc_error(error, self.address, NODE)) from None
        except BaseException:
            self._discard(assembler)
            raise
        finally:
            responses.cancel()  # a grpc call: ends it
            release_free_memory()  # the stream's buffers, before integration allocates

    def _check_signed(
        self,
        trailer: pb.StateTrailer,
        header: pb.SovereignCycleResult,
        base_state: ModelState,
        digest: str,
    ) -> None:
        """With ``signatures``, refuse a delta its node did not sign over its
        ContributionStatement; keep the signature for the round's record
        (:attr:`contribution_signatures`)."""
        contribution = header.contribution
        if self.signatures is not None:
            if not trailer.HasField("signature"):
                raise WireError("the delta's trailer is not signed (ContributionStatement)")
            payload = contribution_statement(
                self.consortium_id,
                contribution.round_num,
                known_digest(base_state),
                contribution,
                digest,
            )
            problem = self.signatures.signed_by(trailer.signature, payload, self.node_id)
            if problem is not None:
                raise WireError(f"the delta's signature does not hold: {problem}")
        if trailer.HasField("signature"):  # the newest only: a failed round's is never read
            self.contribution_signatures = {contribution.round_num: trailer.signature}

    def _meter(self, phase: CyclePhase, total: int, on_progress: ProgressCallback) -> TransferMeter:
        """What a state's stream tells its bytes: the metric, and the cycle's progress."""
        link = self._link
        resumed = link.resumes
        sending = phase is CyclePhase.SENDING_BASE
        count = self._count_sent if sending else self._count_received
        return TransferMeter(
            phase, total, on_progress, lambda: link.resumes - resumed, count, sender=sending
        )

    @staticmethod
    def _decline_delta(responses: CycleCall, decisions: queue.Queue[bool]) -> None:
        """Tell the node its delta is not wanted, without waiting: a thread lets the node
        end the call (status OK) and cancels it after :data:`DECLINE_GRACE_S`, or at once
        if the node sends delta bytes unasked (never read)."""
        _offer(decisions, False)
        cancel = threading.Timer(DECLINE_GRACE_S, responses.cancel)
        cancel.daemon = True
        cancel.start()

        def drain() -> None:
            try:
                next(iter(responses), None)  # the call's end, or the first unasked message
            except grpc.RpcError:
                pass  # how the call ends is the node's business: nothing of it is used
            finally:
                cancel.cancel()
                responses.cancel()

        threading.Thread(target=drain, name="decline-delta", daemon=True).start()

    @staticmethod
    def _discard(assembler: StateAssembler) -> None:
        if isinstance(assembler, SpillingAssembler):
            assembler.close()
            assembler.path.unlink(missing_ok=True)


def _keeping_trailer(
    responses: Iterator[pb.RunSovereignCycleResponse], trailers: list[pb.StateTrailer]
) -> Iterator[pb.RunSovereignCycleResponse]:
    """``responses``, each delta trailer also kept in ``trailers``."""
    for message in responses:
        if message.WhichOneof("item") == "delta_end":
            trailers.append(message.delta_end)
        yield message


def _settling(meters: list[TransferMeter], on_progress: ProgressCallback) -> ProgressCallback:
    """``on_progress``, with the base's last transfer report (its meter's, if it was sent)
    just before the node's first report: it holds the base once it reports anything."""

    def report(progress: CycleProgress) -> None:
        for meter in meters:
            meter.finish()
        on_progress(progress)

    return report


def _offer(decisions: queue.Queue[bool], send: bool) -> None:
    """Hand the sending thread a decision, unless it already has one."""
    with contextlib.suppress(queue.Full):
        decisions.put_nowait(send)
