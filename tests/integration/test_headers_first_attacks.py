"""Attacks on "headers first": a node's reply opens with its result header and the node
streams its delta only after the coordinator's ``DeltaDecision{send}``. Each hostile node
here breaks that contract one way; the round must end promptly, the base must be what the
honest nodes alone give (or unchanged), and the hostile node's reason must be bounded text.

Nodes are real gRPC servers on 127.0.0.1 in this process, behind the coordinator's remote
proxies, with the core as ``tapestry coordinator serve`` builds it (``copy_states=False``).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import grpc
import pytest

from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.limits import MAX_REASON_CHARS
from tapestry.node.artifacts import ArtifactStore
from tapestry.node.servicer import SovereignNodeServicer
from tapestry.training.consortium import (
    ConsortiumCoordinator,
    ContributionPolicy,
    SovereignTrainingNode,
    state_digest,
)
from tapestry.training.consortium.models.spec import ModelSpec
from tapestry.training.consortium.models.state import model_state
from tapestry.training.consortium.round.result import ConsortiumRoundResult

from .node_servers import Served, served_nodes

CONSORTIUM = "tapestry-attacks"
SEED = 2026
SPEC = ModelSpec(hidden_size=32)
CHUNK_BYTES = 4096
SCORES = {"n0": 0.9, "n1": 0.8, "n2": 0.7, "bad": 0.6}
# Far below the proxy's DECLINE_GRACE_S (10 s): a round that waits on a grace, or on a
# hostile node's call, shows up here.
PROMPT_S = 6.0

Responses = Iterator[pb.RunSovereignCycleResponse]


def _node(node_id: str) -> SovereignTrainingNode:
    corpus = [list(f"{node_id} keeps its data at home, line {i}".encode()) for i in range(4)]
    return SovereignTrainingNode(
        node_id, node_id.upper(), SPEC.build(SEED), corpus, SCORES[node_id], seed=SEED
    )


def _ended(context: grpc.ServicerContext) -> threading.Event:
    """Set when the call ends (however: the caller's cancel, a deadline, the server's stop)."""
    ended = threading.Event()
    context.add_callback(ended.set)
    return ended


class HostileServicer(SovereignNodeServicer):
    """An honest node's cycle, bent by ``mode`` after its result header."""

    def __init__(self, *args: object, mode: str, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.mode = mode
        self.sent_after_decline = 0  # messages the "flood" node got out after send=false
        self.call_ended = threading.Event()
        self.declined = False  # the "flood" node was told send=false
        if mode == "slow unwind":
            self._busy = _SlowRelease()  # type: ignore[assignment]

    def RunSovereignCycle(self, request_iterator, context):  # noqa: N802
        ended = _ended(context)
        context.add_callback(self.call_ended.set)
        requests = request_iterator
        if self.mode == "eager":
            requests = _decided_for_the_coordinator(request_iterator)
        if self.mode == "flood":
            requests = _watch_decision(request_iterator, self)
        messages = super().RunSovereignCycle(requests, context)
        if self.mode in ("eager", "slow unwind"):
            # eager: streams its delta without waiting for the decision
            yield from messages
            return
        for message in messages:
            kind = message.WhichOneof("item")
            if kind == "result":
                yield message
                if self.mode == "second result":
                    yield message
                elif self.mode == "ends after result":  # OK, and no delta ever
                    return
                elif self.mode == "progress after result":
                    progress = pb.CycleProgress(phase=pb.CYCLE_PHASE_TRAINING)
                    yield pb.RunSovereignCycleResponse(progress=progress)
                continue
            if kind == "delta_chunk":
                if self.mode == "silent":  # send=true, then nothing, ever
                    ended.wait(30)
                    return
                if self.mode == "end first":
                    yield pb.RunSovereignCycleResponse(delta_end=pb.StateTrailer())
                    ended.wait(30)
                    return
                if self.mode == "corrupt":  # one byte flipped: the trailer's digest differs
                    data = bytearray(message.delta_chunk.data)
                    data[0] ^= 0xFF
                    message.delta_chunk.data = bytes(data)
                    self.mode = "honest"
            yield message
        if self.mode == "flood" and self.declined:
            junk = pb.TensorChunk(name="junk", data=b"\0" * (1 << 20))
            while not ended.is_set() and self.sent_after_decline < 10_000:
                self.sent_after_decline += 1
                yield pb.RunSovereignCycleResponse(delta_chunk=junk)


class _SlowRelease:
    """A node's busy lock whose release lags (a loaded node still unwinding its last call
    after the coordinator has moved on): honest, just not instant."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return self._lock.acquire(blocking, timeout)

    def release(self) -> None:
        time.sleep(0.3)
        self._lock.release()


def _decided_for_the_coordinator(
    requests: Iterator[pb.RunSovereignCycleRequest],
) -> Iterator[pb.RunSovereignCycleRequest]:
    """The coordinator's requests up to the base's end, then a send=true of the node's own:
    the node never waits for the real decision."""
    for request in requests:
        yield request
        if request.WhichOneof("item") == "base_end" or request.start.base_held:
            break
    yield pb.RunSovereignCycleRequest(delta_decision=pb.DeltaDecision(send=True))


def _watch_decision(
    requests: Iterator[pb.RunSovereignCycleRequest], servicer: HostileServicer
) -> Iterator[pb.RunSovereignCycleRequest]:
    for request in requests:
        if request.WhichOneof("item") == "delta_decision" and not request.delta_decision.send:
            servicer.declined = True
        yield request


class NaNNode:
    """A node whose delta holds a NaN (its digest is honest: it hashes what it sends)."""

    def __init__(self, node: SovereignTrainingNode) -> None:
        self._node = node

    def __getattr__(self, name: str) -> object:
        return getattr(self._node, name)

    def run_sovereign_cycle(self, *args: object, **kwargs: object) -> object:
        result = self._node.run_sovereign_cycle(*args, **kwargs)  # type: ignore[arg-type]
        first = sorted(result.contribution.weight_delta)[0]
        result.contribution.weight_delta[first].view(-1)[0] = math.nan
        return result


def _served(
    root: Path, node_ids: list[str], hostile: dict[str, str], bad_timeout_s: float = 120
) -> AbstractContextManager[Served]:
    """A server and a proxy per node; ``hostile`` maps a node to its :class:`HostileServicer`
    mode (or ``"nan"``: an honest servicer over a :class:`NaNNode`), whose proxy waits
    ``bad_timeout_s`` for its call."""
    servicers: dict[str, SovereignNodeServicer] = {}
    for node_id in node_ids:
        mode = hostile.get(node_id)
        node = NaNNode(_node(node_id)) if mode == "nan" else _node(node_id)
        args = (node, SPEC, ArtifactStore(root / node_id), CONSORTIUM)
        servicers[node_id] = (
            HostileServicer(*args, mode=mode, chunk_bytes=CHUNK_BYTES)
            if mode not in (None, "nan")
            else SovereignNodeServicer(*args, chunk_bytes=CHUNK_BYTES)  # type: ignore[arg-type]
        )
    return served_nodes(
        root,
        servicers,
        spec=SPEC,
        consortium_id=CONSORTIUM,
        chunk_bytes=CHUNK_BYTES,
        timeout_s=dict.fromkeys(hostile, bad_timeout_s),
    )


def _streamed(policy: ContributionPolicy, **kwargs: int) -> ConsortiumCoordinator:
    return ConsortiumCoordinator(SPEC.build(SEED), policy, copy_states=False, **kwargs)


def _honest_only(policy: ContributionPolicy, node_ids: list[str]) -> str:
    """The base the in-process core makes of the honest nodes alone."""
    core = ConsortiumCoordinator(SPEC.build(SEED), policy)
    return core.run_round([_node(n) for n in node_ids]).shared_base_sha256


def _timed(run: Callable[[], ConsortiumRoundResult]) -> tuple[ConsortiumRoundResult, float]:
    began = time.monotonic()
    outcome = run()
    return outcome, time.monotonic() - began


def _bounded(reason: str) -> None:
    assert 0 < len(reason) <= MAX_REASON_CHARS
    assert reason.isprintable()


def _wait_for(condition: Callable[[], bool], within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# 1. A delta streamed unasked, from a node the policy rejects: never read, never waited for.
def test_an_unasked_delta_from_a_rejected_node_is_not_read_and_the_round_is_prompt(
    tmp_path: Path,
) -> None:
    policy = ContributionPolicy(quality_floor=0.65, weighting="equal")  # "bad" scores 0.6
    expected = _honest_only(policy, ["n0", "n1"])
    streamed = _streamed(policy)
    with _served(tmp_path, ["n0", "n1", "bad"], {"bad": "eager"}) as served:
        result, took = _timed(lambda: streamed.run_round(served.proxies))
        assert took < PROMPT_S
        assert result.accepted_nodes == ["n0", "n1"]
        assert result.rejected_nodes == ["bad"]
        assert result.shared_base_sha256 == expected
        assert served.received["bad"] == 0
        # The decline reads at most one message and cancels: the node's call ends long
        # before DECLINE_GRACE_S.
        assert served.servicers["bad"].call_ended.wait(PROMPT_S)


# 2a. The same node accepted: its unasked but valid stream is simply read.
def test_an_unasked_valid_delta_from_an_accepted_node_is_integrated(tmp_path: Path) -> None:
    policy = ContributionPolicy(weighting="equal")
    expected = _honest_only(policy, ["n0", "n1", "bad"])
    streamed = _streamed(policy)
    with _served(tmp_path, ["n0", "n1", "bad"], {"bad": "eager"}) as served:
        result = streamed.run_round(served.proxies)
    assert result.accepted_nodes == ["n0", "n1", "bad"]
    assert result.shared_base_sha256 == expected


# 2b. send=true and then silence: the node fails at the proxy's timeout, the rest integrate.
def test_a_node_silent_after_send_true_fails_at_the_proxy_timeout(tmp_path: Path) -> None:
    policy = ContributionPolicy(weighting="equal")
    expected = _honest_only(policy, ["n0", "n1"])
    streamed = _streamed(policy)
    with _served(tmp_path, ["n0", "n1", "bad"], {"bad": "silent"}, bad_timeout_s=3) as served:
        result, took = _timed(lambda: streamed.run_round(served.proxies))
    assert took < 3 + PROMPT_S
    assert result.accepted_nodes == ["n0", "n1"]
    assert list(result.failed_nodes) == ["bad"]
    assert "DEADLINE_EXCEEDED" in result.failed_nodes["bad"]
    _bounded(result.failed_nodes["bad"])
    assert result.contribution_weights == {"n0": 0.5, "n1": 0.5}
    assert result.shared_base_sha256 == expected


# 3. Told send=false, the node floods: the coordinator neither hangs nor buffers it.
def test_a_node_that_floods_after_send_false_is_cut_off(tmp_path: Path) -> None:
    policy = ContributionPolicy(quality_floor=0.65)
    streamed = _streamed(policy)
    before = streamed.base_sha256
    with _served(tmp_path, ["bad"], {"bad": "flood"}) as served:
        result, took = _timed(lambda: streamed.run_round(served.proxies))
        assert took < PROMPT_S
        assert result.rejected_nodes == ["bad"]
        assert served.received["bad"] == 0
        flooder = served.servicers["bad"]
        assert flooder.call_ended.wait(PROMPT_S)
        # Flow control holds the node to a few messages before the cancel reaches it.
        assert flooder.sent_after_decline < 100
    assert streamed.base_sha256 == before


# 4. A delta failing its checks on arrival fails its node; the rest are weighed again.
@pytest.mark.parametrize("mode", ["nan", "corrupt"])
def test_a_bad_delta_fails_its_node_and_the_rest_are_weighed_again(
    tmp_path: Path, mode: str
) -> None:
    policy = ContributionPolicy(weighting="equal")
    expected = _honest_only(policy, ["n0", "n1", "n2"])
    streamed = _streamed(policy)
    with _served(tmp_path, ["n0", "bad", "n1", "n2"], {"bad": mode}) as served:
        result, took = _timed(lambda: streamed.run_round(served.proxies))
    assert took < PROMPT_S
    assert result.accepted_nodes == ["n0", "n1", "n2"]
    assert list(result.failed_nodes) == ["bad"]
    reason = result.failed_nodes["bad"]
    _bounded(reason)
    assert ("NaN or Inf" in reason) if mode == "nan" else ("digest" in reason), reason
    third = 1 / 3
    assert result.contribution_weights == {"n0": third, "n1": third, "n2": third}
    assert result.shared_base_sha256 == expected
    # A NaN delta arrived whole (its digest is honest) and stays in the spill like the
    # accepted ones until the service clears the spill at the next round's start.


# 5. Quorum: one of two nodes fails on fetch, so the round is aborted, not integrated.
def test_a_failed_fetch_below_quorum_aborts_the_round(tmp_path: Path) -> None:
    streamed = _streamed(ContributionPolicy(), min_nodes=2)
    before = state_digest(model_state(streamed.base_model))
    with _served(tmp_path, ["n0", "bad"], {"bad": "nan"}) as served:
        result = streamed.run_round(served.proxies)
    assert result.aborted_reason.startswith("quorum not met: 1 of 2")
    assert result.accepted_nodes == []
    assert list(result.failed_nodes) == ["bad"]
    assert result.shared_base_sha256 == before
    assert state_digest(model_state(streamed.base_model)) == before


# 6. Out-of-order replies after the header.
@pytest.mark.parametrize(
    ("mode", "why"),
    [
        ("second result", "unexpected 'result' message"),
        ("progress after result", "unexpected 'progress' message"),
        ("end first", "stream ended without tensors"),
        ("ends after result", "ended before its trailer"),
    ],
)
def test_a_reply_out_of_order_after_the_header_is_refused(
    tmp_path: Path, mode: str, why: str
) -> None:
    policy = ContributionPolicy(weighting="equal")
    expected = _honest_only(policy, ["n0"])
    streamed = _streamed(policy)
    with _served(tmp_path, ["n0", "bad"], {"bad": mode}) as served:
        result, took = _timed(lambda: streamed.run_round(served.proxies))
    assert took < PROMPT_S
    assert list(result.failed_nodes) == ["bad"]
    reason = result.failed_nodes["bad"]
    _bounded(reason)
    assert why in reason, reason
    assert result.shared_base_sha256 == expected


# 7a. The coordinator does not wait for a declined call to end (nor for a fetched one,
# cancelled once its trailer is in): the next round may reach a node still unwinding it.
def test_back_to_back_rounds_reach_a_node_still_unwinding_its_last_call(tmp_path: Path) -> None:
    for floor in (0.99, 0.0):  # every delta declined, then every delta fetched
        streamed = _streamed(ContributionPolicy(quality_floor=floor))
        with _served(tmp_path / str(floor), ["n0"], {"n0": "slow unwind"}) as served:
            for _ in range(3):
                result = streamed.run_round(served.proxies)
                assert result.failed_nodes == {}, result.failed_nodes


# 7b. Twenty rounds of declines leave no threads behind.
def test_declined_deltas_leave_no_threads_behind(tmp_path: Path) -> None:
    streamed = _streamed(ContributionPolicy(quality_floor=0.99))
    with _served(tmp_path, ["n0", "n1", "n2"], {}) as served:
        streamed.run_round(served.proxies)  # the channels and servers' own threads start
        baseline = threading.active_count()
        for _ in range(20):
            result = streamed.run_round(served.proxies)
            assert result.rejected_nodes == ["n0", "n1", "n2"], result.failed_nodes
            assert all(received == 0 for received in served.received.values())
        assert _wait_for(lambda: threading.active_count() <= baseline + 2, 5), (
            threading.active_count(),
            baseline,
            sorted(t.name for t in threading.enumerate()),
        )
