"""The node's side of its session: it dials the coordinator, holds one session, answers
describes and runs cycles over it, and dials again with backoff and jitter when it drops.

The node opens no listening socket. With mutual TLS it presents its own certificate and
asks for the coordinator's name (:data:`~tapestry.pki.layout.COORDINATOR_SERVER_NAME`), so
the handshake proves the server is the consortium's coordinator. The coordinator's welcome
carries the consortium's model: the node builds its model from it once (``prepare``) and
refuses, for good, one that differs from the one it pinned, or from the one it built, and
one that no consortium file could name (checked as a ``[model]`` table is, before anything is
built from it).

Each cycle is :meth:`SovereignNodeServicer.RunSovereignCycle`, the same code that serves a
cycle to a coordinator that dials, fed from the session's messages of that exchange.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
from collections.abc import Callable, Generator, Iterator
from typing import Any, NoReturn, cast

import grpc

import tapestry
from tapestry.config import (
    ConfigError,
    ModelTable,
    NodeConfig,
    build_config,
    check_window,
    model_table,
)
from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.consortium.v1 import consortium_pb2_grpc as pb_grpc
from tapestry.errors import ModelBuildError, UserError, WireError, quoted
from tapestry.limits import (
    LANE_KEY_BYTES,
    MAX_ERROR_DETAILS_CHARS,
    MAX_LINK_STREAMS,
    MAX_SESSION_CYCLES,
)
from tapestry.node.servicer import DELTA_CHUNK_BYTES, SovereignNodeServicer
from tapestry.pki.layout import COORDINATOR_SERVER_NAME
from tapestry.training.consortium.models.hf_causal_lm import hf_parameter_count
from tapestry.training.consortium.models.spec import ModelSpec, spec_differences
from tapestry.wire import codec
from tapestry.wire.grpc_plumbing import SESSION_CHANNEL_OPTIONS, open_channel
from tapestry.wire.numbering import Numbering, OutOfOrder
from tapestry.wire.outbox import Inbox, Outbox, OutboxClosed, OutboxFull
from tapestry.wire.status import COORDINATOR, describe_rpc_error
from tapestry.wire.windows import window_bytes, window_options

log = logging.getLogger(__name__)
# A cycle that ended waits this long for the coordinator to acknowledge its end (it does at
# once), so a session that drops just then still delivers it on the next.
END_ACK_S = 30.0

PROTOCOL_VERSION = pb.SESSION_PROTOCOL_V1
# Dialing again: the n-th failure in a row waits a random time in [d/2, d], d = first * 2^n,
# at most ``most``; a session that was welcomed starts the count again.
BACKOFF_FIRST_S = 0.5
BACKOFF_MOST_S = 30.0
# Refusals another try would only repeat: the node stops, saying why.
FINAL = frozenset(
    {
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.UNAUTHENTICATED,
    }
)


class SessionClosedForGood(UserError):
    """The coordinator refused this node in a way another try would repeat."""


def backoff_s(failures: int, rng: random.Random, first: float, most: float) -> float:
    """How long to wait after ``failures`` failed dials in a row (full jitter, halved)."""
    ceiling = min(most, first * 2 ** min(failures, 30))
    return rng.uniform(ceiling / 2, ceiling)


class DialOut:
    """A node's session with the coordinator at ``address``, held until ``stop``.

    ``prepare(spec)`` builds the node's servicer from the model the coordinator sends (once;
    later sessions reuse it); ``on_joined`` is called after each welcome (the ready file)."""

    def __init__(
        self,
        config: NodeConfig,
        address: str,
        credentials: grpc.ChannelCredentials | None,
        prepare: Callable[[ModelSpec], SovereignNodeServicer],
        *,
        on_joined: Callable[[], None] | None = None,
        backoff: tuple[float, float] = (BACKOFF_FIRST_S, BACKOFF_MOST_S),
        rng: random.Random | None = None,
    ) -> None:
        self._config = config
        self._address = address
        self._credentials = credentials
        self._prepare = prepare
        self._on_joined = on_joined
        self._backoff = backoff
        self._rng = rng or random.Random()
        self._servicer: SovereignNodeServicer | None = None
        self._spec: ModelSpec | None = None
        self._cycles = _Cycles(
            plaintext=credentials is None,
            node_id=config.node_id,
            retain_bytes=window_bytes(config.link),
        )
        self.sessions = 0  # welcomed sessions so far

    def run(self, stop: threading.Event) -> None:
        """Hold a session until ``stop`` is set, dialing again whenever it drops; a final
        refusal raises :class:`SessionClosedForGood`."""
        failures = 0
        while not stop.is_set():
            opened = self.sessions
            replaced = False
            try:
                self._session(stop)
            except grpc.RpcError as error:
                if stop.is_set():
                    return
                said = describe_rpc_error(error, self._address, COORDINATOR, "coordinator")
                if error.code() in FINAL:
                    raise SessionClosedForGood(
                        f"the coordinator refused this node: {said}"
                    ) from None
                # Replaced by a newer session of this node id: another process with this
                # node's certificate runs. Backing off keeps the two from taking turns.
                replaced = error.code() is grpc.StatusCode.ABORTED
                log.warning("session with the coordinator: %s", said)
            # Counted whether the session ended quietly or raised: a session that drops
            # (a cut link) after its welcome starts the count again.
            failures = 0 if self.sessions > opened and not replaced else failures + 1
            delay = backoff_s(failures, self._rng, *self._backoff)
            if not stop.is_set():
                log.info("dialing the coordinator at %s again in %.1f s", self._address, delay)
            stop.wait(delay)

    def _session(self, stop: threading.Event) -> None:
        """One session, until it ends (:attr:`sessions` counts its welcome)."""
        lanes = _Lanes(self._open_channel, stop)
        outbox: Outbox[pb.OpenSessionRequest] = Outbox()
        outbox.control(pb.OpenSessionRequest(open=self._hello()))
        call = lanes.call(outbox, window_bytes(self._config.link))
        cycles = self._cycles
        welcomed = False
        try:
            for message in call:
                if not welcomed:
                    cycles.servicer = self._welcomed(message)
                    welcome = message.welcome
                    count = _lane_count(welcome)
                    cycles.lanes = count  # before any further lane can bring a message
                    window = window_bytes(self._config.link.model_copy(update={"streams": count}))
                    for lane in range(1, count):
                        lanes.open(lane, self._hello(lane, welcome.lane_key), window, cycles)
                    cycles.attach(lanes.outboxes, welcome)
                    welcomed = True
                    continue
                cycles.receive(message, 0, lanes.ended)
        except grpc.RpcError:
            lanes.raise_lane_error()  # a further lane's refusal ended the session: that
            raise
        except WireError as problem:
            log.warning("the coordinator broke the session protocol: %s", problem)
        except OutboxFull as full:
            log.warning("the coordinator did not read this node's session: %s", full)
        finally:
            lanes.end()
            cycles.detach(outbox)
            if stop.is_set():
                cycles.cancel_all()
            lanes.close()
        lanes.raise_lane_error()

    def _open_channel(self, window: int, lane: int) -> grpc.Channel:
        server_name = COORDINATOR_SERVER_NAME if self._credentials is not None else None
        options = [*SESSION_CHANNEL_OPTIONS, *window_options(window)]
        if lane:  # its own connection, not the session's shared through gRPC's pool
            options.append(("grpc.use_local_subchannel_pool", 1))
        return open_channel(
            self._address, self._credentials, server_name=server_name, options=options
        )

    def _hello(self, lane: int = 0, lane_key: bytes = b"") -> pb.SessionOpen:
        """The SessionOpen of the session (``lane`` 0: with the cycles it still holds) or
        of one of its further lanes."""
        config = self._config
        return pb.SessionOpen(
            protocol_version=PROTOCOL_VERSION,
            consortium_id=config.consortium_id,
            node_id=config.node_id,
            jurisdiction=config.jurisdiction,
            release=tapestry.__version__,
            exchanges=[] if lane else self._cycles.states(),
            lane=lane,
            lane_key=lane_key,
        )

    def _welcomed(self, message: pb.OpenSessionResponse) -> SovereignNodeServicer:
        """Check the coordinator's welcome; the servicer its cycles run on."""
        if message.WhichOneof("item") != "welcome":
            _refuse("the coordinator's first message on a session must be its welcome")
        welcome = message.welcome
        if welcome.protocol_version != PROTOCOL_VERSION:
            _refuse(
                f"the coordinator speaks session protocol version {welcome.protocol_version}; "
                f"this node speaks version {PROTOCOL_VERSION}: upgrade the older of the two"
            )
        if welcome.consortium_id != self._config.consortium_id:
            _refuse(
                f"the coordinator at {self._address} runs consortium "
                f"{quoted(welcome.consortium_id)}, this node serves "
                f"{self._config.consortium_id!r}"
            )
        spec = self._spec_of(welcome)
        if self._servicer is None:
            try:
                self._servicer = self._prepare(spec)
            except Exception as error:  # what a model of a bound that fits may still raise
                why = f"this node cannot build the coordinator's model: {error}"
                _refuse(why[:MAX_ERROR_DETAILS_CHARS])
            self._spec = spec
        self.sessions += 1
        log.info(
            "joined the consortium %s at %s (session %d, model %s, sha256 %s, base round %d)",
            welcome.consortium_id,
            self._address,
            self.sessions,
            spec.summary(),
            spec.digest(),
            welcome.round_num,
        )
        if self._on_joined is not None:
            self._on_joined()
        return self._servicer

    def _spec_of(self, welcome: pb.SessionWelcome) -> ModelSpec:
        """The welcome's model, refused if it does not match its own digest, the node's pin
        (``model_sha256``, ``[model]``), the model already built, the node's windows, or its
        ``max_model_params`` (counted last: an ``hf-causal-lm`` count builds the model's
        modules on the meta device, which a pinned node need not do for another model)."""
        config = self._config
        spec, table = _buildable(codec.model_spec_from_proto(welcome.model))
        if spec.digest() != welcome.model_sha256:
            _refuse("the welcome's model does not match the digest it carries")
        if config.model_sha256 is not None and spec.digest() != config.model_sha256:
            _refuse(
                f"the coordinator's model {spec.summary()} has sha256 {spec.digest()}; this "
                f"node pins model_sha256 = {config.model_sha256}"
            )
        for pinned, what in (
            (config.model, "the node file's [model]"),
            (self._spec, "the model this node runs"),
        ):
            if pinned is not None and pinned != spec:
                differences = ", ".join(spec_differences(spec, pinned))
                _refuse(f"the coordinator's model differs from {what}: {differences}")
        try:
            check_window(spec, config.training.max_seq_len)
        except ValueError as problem:
            _refuse(f"the coordinator's model does not fit this node: {problem}")
        _within(spec, table, config.limits.max_model_params)
        return spec


def _buildable(spec: ModelSpec) -> tuple[ModelSpec, ModelTable]:
    """``spec`` if a consortium file could name it (:class:`ModelTable`: each bound, no code
    from elsewhere, its canonical form), with that table; refused otherwise, before anything
    is built (the reason cut: it may quote what the coordinator sent)."""
    problems = spec.problems()
    if problems:
        why = f"the coordinator's model cannot be built: {'; '.join(problems)}"
        _refuse(why[:MAX_ERROR_DETAILS_CHARS])
    try:
        table = build_config(ModelTable, model_table(spec), "the coordinator's model")
    except ConfigError as error:
        _refuse(str(error)[:MAX_ERROR_DETAILS_CHARS])
    if table.spec() != spec:
        _refuse("the coordinator's model is not in the form a consortium file gives it")
    return spec, table


def _within(spec: ModelSpec, table: ModelTable, max_params: int) -> None:
    """Refuse ``spec`` if it holds more than ``max_params`` parameters (the node's
    ``[limits]``), counted without building it."""
    try:
        params = (
            hf_parameter_count(spec.hf_config)
            if spec.architecture == "hf-causal-lm"
            else table.estimated_params()
        )
    except ModelBuildError as error:
        _refuse(f"the coordinator's model cannot be built: {error}"[:MAX_ERROR_DETAILS_CHARS])
    if params > max_params:
        _refuse(
            f"the coordinator's model {spec.summary()[:200]} holds about {params:,} "
            f"parameters; this node builds at most {max_params:,} ([limits] max_model_params)"
        )


def _refuse(why: str) -> NoReturn:
    raise SessionClosedForGood(why)


def _lane_count(welcome: pb.SessionWelcome) -> int:
    """The lanes the welcome asks for (0 means 1), refused past the bound."""
    count = welcome.lanes or 1
    if count > MAX_LINK_STREAMS:
        _refuse(f"the coordinator asks for {count} lanes; at most {MAX_LINK_STREAMS}")
    if count > 1 and len(welcome.lane_key) != LANE_KEY_BYTES:
        _refuse(f"the welcome's lane_key must be {LANE_KEY_BYTES} bytes")
    return count


class _Lanes:
    """The calls of one session (its own, then its further lanes), each on its own
    connection: the first that ends ends them all (cancelled), and so the session."""

    def __init__(
        self, open_channel: Callable[[int, int], grpc.Channel], stop: threading.Event
    ) -> None:
        self._open_channel = open_channel
        self.ended = threading.Event()
        self.outboxes: list[Outbox[pb.OpenSessionRequest]] = []
        self._calls: list[Any] = []
        self._channels: list[grpc.Channel] = []
        self._lane_error: grpc.RpcError | None = None
        threading.Thread(target=self._cancel_on_stop, args=(stop,), daemon=True).start()

    def call(self, outbox: Outbox[pb.OpenSessionRequest], window: int) -> Any:
        """Open the next lane's call, sending what ``outbox`` holds."""
        channel = self._open_channel(window, len(self._calls))
        call = pb_grpc.CoordinatorServiceStub(channel).OpenSession(outbox.messages())
        self._channels.append(channel)
        self._calls.append(call)
        self.outboxes.append(outbox)
        if self.ended.is_set():  # another lane ended the session meanwhile
            call.cancel()
        return call

    def open(self, lane: int, hello: pb.SessionOpen, window: int, cycles: _Cycles) -> None:
        """Open lane ``lane`` (from 1), its messages handed to ``cycles`` on its thread."""
        outbox: Outbox[pb.OpenSessionRequest] = Outbox()
        outbox.control(pb.OpenSessionRequest(open=hello))
        call = self.call(outbox, window)
        threading.Thread(
            target=self._read, args=(lane, call, cycles), name=f"lane-{lane}", daemon=True
        ).start()

    def _read(self, lane: int, call: Any, cycles: _Cycles) -> None:
        try:
            for message in call:
                cycles.receive(message, lane, self.ended)
        except grpc.RpcError as error:
            if not self.ended.is_set():
                self._lane_error = error
        except (WireError, OutboxFull) as problem:
            log.warning("lane %d of the session: %s", lane, problem)
        self.end()

    def end(self) -> None:
        """End every call of the session (once)."""
        if self.ended.is_set():
            return
        self.ended.set()
        for call in self._calls:
            call.cancel()
        for outbox in self.outboxes:
            outbox.close()

    def close(self) -> None:
        self.end()
        for channel in self._channels:
            channel.close()

    def raise_lane_error(self) -> None:
        """A further lane's refusal, for the caller to handle as the session's own."""
        if self._lane_error is not None:
            raise self._lane_error

    def _cancel_on_stop(self, stop: threading.Event) -> None:
        while not self.ended.wait(0.2):
            if stop.is_set():
                self.end()
                return


class _Aborted(Exception):
    """A cycle's servicer ended it with a status (``context.abort``)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class _Cancelled(Exception):
    """The coordinator cancelled the cycle, or the session ended under it."""


class _HalfClosed(Exception):
    """The coordinator sent the last message of the cycle's request stream."""


class _Cycles:
    """The node's exchanges with the coordinator, across its sessions: describes answered
    at once, each cycle on its own thread, its messages numbered
    (:mod:`tapestry.wire.numbering`) so that a cycle whose session drops resumes on the
    next one where it stopped."""

    def __init__(self, *, plaintext: bool, node_id: str, retain_bytes: int) -> None:
        self._plaintext = plaintext
        self._node_id = node_id
        self.servicer: SovereignNodeServicer | None = None
        self.numbering: Numbering[pb.OpenSessionRequest] = Numbering(
            lambda exchange, count: pb.OpenSessionRequest(exchange_id=exchange, ack=count),
            retain_bytes,
            # each kept reply counted at the delta's chunk size (plus a header), not encoded
            message_bytes=DELTA_CHUNK_BYTES + 1024,
            peer_opens=True,
        )
        self._outbox: Outbox[pb.OpenSessionRequest] | None = None
        self.lanes = 1  # the session's, from its welcome
        self._runs: dict[int, _CycleRun] = {}
        self._lock = threading.Lock()

    def states(self) -> list[pb.ExchangeState]:
        """The cycles this node holds, for its next SessionOpen."""
        return [
            pb.ExchangeState(exchange_id=key, received=count)
            for key, count in self.numbering.states()
        ]

    def attach(
        self, outboxes: list[Outbox[pb.OpenSessionRequest]], welcome: pb.SessionWelcome
    ) -> None:
        """A new session over the lanes of ``outboxes``: the cycles the coordinator resumes
        (its welcome lists them) go on, their unacknowledged replies sent again; the others
        end."""
        resumed = {e.exchange_id: e.received for e in welcome.exchanges}
        with self._lock:
            self._outbox = outboxes[0]
            self.lanes = len(outboxes)
            lost = [run for key, run in self._runs.items() if key not in resumed]
        for run in lost:
            run.cancel(tell=False)
        if resumed:
            log.info("resuming %d cycle(s) where they stopped", len(resumed))
        self.numbering.attach(outboxes, resumed.items())

    def detach(self, outbox: Outbox[pb.OpenSessionRequest]) -> None:
        """The session ended: cycles wait for the next (their deadlines still run)."""
        with self._lock:
            if self._outbox is outbox:
                self._outbox = None
        self.numbering.detach(outbox)

    def control(self, message: pb.OpenSessionRequest) -> None:
        """Queue an unnumbered message on the session now open (dropped without one); a
        coordinator that does not take them raises :class:`OutboxFull` (the session ends)."""
        outbox = self._outbox
        if outbox is not None:
            with contextlib.suppress(OutboxClosed):
                outbox.control(message)

    def receive(
        self, message: pb.OpenSessionResponse, lane: int = 0, gone: threading.Event | None = None
    ) -> None:
        """Hand a message of the coordinator, arrived on ``lane`` of the session that
        ``gone`` ends, on: a gap in an exchange's numbers, or an unnumbered message on a
        further lane, is a :class:`WireError` that ends the session; what has no place
        mid-session (a second welcome, an empty message) is dropped."""
        assert self.servicer is not None
        if message.ack:
            self.numbering.acknowledged(message.exchange_id, message.ack)
        kind = message.WhichOneof("item")
        key = message.exchange_id
        if kind is not None and not message.seq and lane:
            raise WireError(f"the coordinator sent an unnumbered message on lane {lane}")
        if kind == "describe":
            described = self.servicer.Describe(message.describe, cast(Any, None))
            self.control(pb.OpenSessionRequest(exchange_id=key, described=described))
            return
        if kind not in ("cycle", "end"):
            return  # an acknowledgement alone, or what has no place mid-session: dropped
        if not message.seq:  # an unnumbered end: the coordinator cancels the cycle
            with self._lock:
                run = self._runs.get(key)
            if run is not None:
                run.cancel(tell=False)
            return
        if message.seq == 1:
            if lane:  # checked before a cycle starts from it
                raise WireError(f"the coordinator sent an exchange's first message on lane {lane}")
            self._run_for(message)
        try:
            self.numbering.take(
                message,
                lambda: self._hand_on(message),
                lane=lane,
                lanes=self.lanes,
                ack_now=kind == "end",
                gone=gone,
            )
        except OutOfOrder as error:
            raise WireError(str(error)) from None

    def _hand_on(self, message: pb.OpenSessionResponse) -> None:
        with self._lock:
            run = self._runs.get(message.exchange_id)
        if run is None:
            return  # a cycle already over
        if message.WhichOneof("item") == "cycle":
            run.inbox.put(message.cycle)
        else:
            run.ended(message.end.code)

    def _run_for(self, message: pb.OpenSessionResponse) -> None:
        """Start the cycle that ``message``, its first, opens (unless one runs under its id,
        or too many run: the coordinator is then told, and its messages are dropped)."""
        assert self.servicer is not None
        key = message.exchange_id
        refused = False
        with self._lock:
            run = self._runs.get(key)
            # A cycle, or an evaluation of the round's candidate, which runs as one.
            starts = message.seq == 1 and message.cycle.WhichOneof("item") in ("start", "evaluate")
            if run is None and starts and len(self._runs) >= MAX_SESSION_CYCLES:
                refused = True
            elif run is None and starts:
                if self._plaintext and message.cycle.WhichOneof("item") == "start":
                    log.warning(
                        "INSECURE: node %s cycle over plaintext, from an unauthenticated "
                        "coordinator",
                        self._node_id,
                    )
                self.numbering.open(key)
                run = _CycleRun(key, self.servicer, self, self._forget)
                self._runs[key] = run
        if refused:  # no thread for it: the coordinator is told at once
            self.numbering.close(key)  # what else it sends, on any lane, is dropped
            end = pb.ExchangeEnd(
                code=grpc.StatusCode.RESOURCE_EXHAUSTED.value[0],
                message=f"this node already runs {MAX_SESSION_CYCLES} cycles on this session, "
                "the most it runs at once (MAX_SESSION_CYCLES)",
            )
            self.control(pb.OpenSessionRequest(exchange_id=key, end=end))

    def _forget(self, key: int) -> None:
        with self._lock:
            self._runs.pop(key, None)
        self.numbering.close(key)

    def cancel_all(self) -> None:
        with self._lock:
            runs = list(self._runs.values())
        for run in runs:
            run.cancel(tell=False)


class _CycleRun:
    """One cycle on the node: the servicer's generator on its own thread, its requests from
    the exchange's inbox, its replies numbered onto whichever session is open."""

    def __init__(
        self,
        exchange_id: int,
        servicer: SovereignNodeServicer,
        cycles: _Cycles,
        forget: Callable[[int], None],
    ) -> None:
        self.exchange_id = exchange_id
        self.inbox: Inbox[pb.RunSovereignCycleRequest] = Inbox()
        self.gone = threading.Event()
        self._cycles = cycles
        self._forget = forget
        self._servicer = servicer
        threading.Thread(target=self._run, name=f"cycle-{exchange_id}", daemon=True).start()

    def _requests(self) -> Iterator[pb.RunSovereignCycleRequest]:
        while True:
            try:
                yield self.inbox.take()
            except _HalfClosed:
                return

    def _send(self, message: pb.OpenSessionRequest) -> None:
        self._cycles.numbering.send(message, gone=self.gone)

    def _run(self) -> None:
        code, details = grpc.StatusCode.OK, ""
        context: Any = _ExchangeContext(self)  # what a cycle asks of its call, and no more
        # The servicer's cycle is a generator (typed as an iterator by its base class).
        replies = cast(
            Generator[pb.RunSovereignCycleResponse, None, None],
            self._servicer.RunSovereignCycle(self._requests(), context),
        )
        try:
            for reply in replies:
                message = pb.OpenSessionRequest(exchange_id=self.exchange_id)
                message.cycle.CopyFrom(reply)  # not cycle=reply: see SessionCall._send_requests
                self._send(message)
        except _Aborted as aborted:
            code, details = aborted.code, aborted.details
        except OutboxClosed:
            replies.close()
            self.inbox.fail(_Cancelled("the cycle is over"), discard=True)
            self._forget(self.exchange_id)
            return
        except Exception as error:  # a bug: the coordinator still hears the cycle ended
            log.exception("cycle %d failed", self.exchange_id)
            code, details = grpc.StatusCode.INTERNAL, f"{type(error).__name__}: {error}"
        replies.close()
        # What the coordinator still sends for it is dropped: neither the session's reader
        # nor the servicer's receiving thread waits on this inbox any more.
        self.inbox.fail(_Cancelled("the cycle is over"), discard=True)
        # After the replies, numbered like them; kept until the coordinator has it.
        with contextlib.suppress(OutboxClosed):
            self._send(self._end(code, details))
            self._cycles.numbering.drained(self.exchange_id, END_ACK_S, self.gone)
        self._forget(self.exchange_id)

    def _end(self, code: grpc.StatusCode, details: str) -> pb.OpenSessionRequest:
        end = pb.ExchangeEnd(code=code.value[0], message=details[:MAX_ERROR_DETAILS_CHARS])
        return pb.OpenSessionRequest(exchange_id=self.exchange_id, end=end)

    def ended(self, code: int) -> None:
        """The coordinator's end of the request stream: its half-close (OK), or a cancel."""
        if code == grpc.StatusCode.OK.value[0]:
            self.inbox.fail(_HalfClosed(), discard=False)
        else:
            self.cancel(tell=False)

    def cancel(self, *, tell: bool) -> None:
        """End the cycle; ``tell`` the coordinator so (the node's own deadline)."""
        if self.gone.is_set():
            return
        self.gone.set()
        self.inbox.fail(_Cancelled("the cycle was cancelled"), discard=True)
        if tell:  # unnumbered: it may overtake what is queued, nothing queued is wanted
            why = "the node cancelled the cycle (send_timeout_s)"
            with contextlib.suppress(OutboxFull):
                self._cycles.control(self._end(grpc.StatusCode.CANCELLED, why))


class _ExchangeContext:
    """What the cycle's servicer asks of its call, for a cycle over a session."""

    def __init__(self, run: _CycleRun) -> None:
        self._run = run

    def abort(self, code: grpc.StatusCode, details: str) -> NoReturn:
        raise _Aborted(code, details)

    def cancel(self) -> None:
        self._run.cancel(tell=True)

    def is_active(self) -> bool:
        return not self._run.gone.is_set()
