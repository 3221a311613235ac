"""A node protects itself from whoever poses as its coordinator (DESIGN §5): the servicer
through a real gRPC server in this process on 127.0.0.1, one case per test. Every refusal
is asserted by its exact status and message, and by the node's files being unchanged."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch

from tapestry.atomic_files import read_json
from tapestry.config import NodeLimits
from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.consortium.v1 import consortium_pb2_grpc as pb_grpc
from tapestry.node.artifacts import ArtifactStore
from tapestry.node.servicer import SovereignNodeServicer
from tapestry.training.consortium import (
    ModelSpec,
    SovereignModelArtifact,
    SovereignTrainingNode,
    state_digest,
)
from tapestry.wire.grpc_plumbing import build_server, open_channel
from tapestry.wire.tensor_stream import send_state

CONSORTIUM = "tapestry-test"
Request = pb.RunSovereignCycleRequest
# Short enough for a test, long enough for a loaded machine to send a tiny base in time.
RECEIVE_TIMEOUT_S = 1.0


def _base() -> dict[str, torch.Tensor]:
    return ModelSpec().build(seed=1).state_dict()


def _start(round_num: int, consortium_id: str = CONSORTIUM) -> Request:
    return Request(start=pb.CycleStart(round_num=round_num, consortium_id=consortium_id))


def _base_stream() -> list[Request]:
    return list(
        send_state(
            _base(),
            lambda c: Request(base_chunk=c),
            lambda t: Request(base_end=t),
            chunk_bytes=4096,
        )
    )


SEND = Request(delta_decision=pb.DeltaDecision(send=True))
"""The coordinator's last message: send the delta."""


def files_of(root: Path) -> dict[str, str]:
    """Every file under ``root``, by relative path, with the sha256 of its bytes."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _result_of(replies: Iterable[pb.RunSovereignCycleResponse]) -> pb.SovereignCycleResult:
    """The cycle result, after the progress messages that open a node's reply."""
    return next(r.result for r in replies if r.WhichOneof("item") == "result")


@dataclass
class Node:
    stub: pb_grpc.SovereignNodeServiceStub
    store: ArtifactStore
    servicer: SovereignNodeServicer

    def cycle(self, round_num: int, consortium_id: str = CONSORTIUM) -> pb.SovereignCycleResult:
        replies = list(
            self.stub.RunSovereignCycle(
                iter([_start(round_num, consortium_id), *_base_stream(), SEND]), timeout=60
            )
        )
        return _result_of(replies)

    def refusal(self, requests: Iterator[Request]) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as caught:
            list(self.stub.RunSovereignCycle(requests, timeout=60))
        return caught.value


def _servicer(
    data_dir: Path, limits: NodeLimits, scratch_dir: Path | None = None
) -> tuple[SovereignNodeServicer, ArtifactStore]:
    spec = ModelSpec()
    node = SovereignTrainingNode(
        "india", "India", spec.build(seed=1), [list(b"namaste duniya")], 0.9, local_epochs=1
    )
    store = ArtifactStore(data_dir, max_superseded=limits.max_superseded)
    servicer = SovereignNodeServicer(node, spec, store, CONSORTIUM, limits, scratch_dir=scratch_dir)
    return servicer, store


@pytest.fixture(params=["base in memory", "base in a scratch file"])
def node(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Node]:
    """A node that already retains rounds 1 and 2, holding the base in memory or on disk."""
    scratch = tmp_path / "scratch" if request.param == "base in a scratch file" else None
    limits = NodeLimits(receive_timeout_s=RECEIVE_TIMEOUT_S)
    servicer, store = _servicer(tmp_path, limits, scratch)
    server, port, _ = build_server(
        "127.0.0.1:0",
        [lambda s: pb_grpc.add_SovereignNodeServiceServicer_to_server(servicer, s)],
        [],
    )
    server.start()
    try:
        with open_channel(f"127.0.0.1:{port}") as channel:
            running = Node(pb_grpc.SovereignNodeServiceStub(channel), store, servicer)
            running.cycle(1)
            running.cycle(2)
            yield running
    finally:
        server.stop(None).wait()


# --- what a CycleStart may claim ----------------------------------------------------------

REFUSED: dict[str, tuple[Request, str]] = {
    "another consortium": (
        _start(3, "tapestry-elsewhere"),
        "node 'india' does not serve consortium 'tapestry-elsewhere': CycleStart.consortium_id "
        "must equal the consortium_id of the node's config (the coordinator's consortium file "
        "and the node's config must name the same one)",
    ),
    "no consortium at all": (
        _start(3, ""),
        "node 'india' does not serve consortium '': CycleStart.consortium_id must equal the "
        "consortium_id of the node's config (the coordinator's consortium file and the node's "
        "config must name the same one)",
    ),
    "a huge consortium id is not echoed back": (
        _start(3, "x" * 100_000),
        f"node 'india' does not serve consortium {'x' * 64!r}… (100000 characters): "
        "CycleStart.consortium_id must equal the consortium_id of the node's config (the "
        "coordinator's consortium file and the node's config must name the same one)",
    ),
    "a replay of round 1": (
        _start(1),
        "node 'india' refuses round 1: it is below the node's newest retained round 2, and a "
        "node never rewrites its history (only round 2 may run again)",
    ),
    "a forged round past max_round_gap": (
        _start(1003),
        "node 'india' refuses round 1003: it is more than max_round_gap = 1000 rounds past the "
        "node's newest retained round 2 (at most round 1002); raise [limits] max_round_gap in "
        "the node's config if the consortium really is that far ahead",
    ),
    "the highest round number there is": (
        _start(2**32 - 1),
        "node 'india' refuses round 4294967295: it is more than max_round_gap = 1000 rounds "
        "past the node's newest retained round 2 (at most round 1002); raise [limits] "
        "max_round_gap in the node's config if the consortium really is that far ahead",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_cycle_the_node_cannot_stand_behind_is_refused_and_changes_nothing(
    node: Node, case: str
) -> None:
    start, message = REFUSED[case]
    before = files_of(node.store.root)

    error = node.refusal(iter([start, *_base_stream()]))

    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error.details() == f"CycleRefused: {message}"
    assert files_of(node.store.root) == before
    assert node.store.rounds() == [1, 2]


ACCEPTED: dict[str, tuple[int, list[int]]] = {
    # A coordinator that crashed before committing runs its round again.
    "the newest round again": (2, [1, 2]),
    "the next round": (3, [1, 2, 3]),
    # A node that was down or failed for rounds 3..1001 sees the consortium jump ahead.
    "a lagging node's jump, up to max_round_gap": (1002, [1, 2, 1002]),
}


@pytest.mark.parametrize("case", list(ACCEPTED))
def test_a_round_the_coordinator_could_be_at_is_run(node: Node, case: str) -> None:
    round_num, rounds = ACCEPTED[case]

    result = node.cycle(round_num)

    assert result.artifact.round_num == round_num
    assert node.store.rounds() == rounds


def test_the_newest_round_run_again_keeps_the_earlier_model_aside(node: Node) -> None:
    earlier = node.store.get(2)
    assert earlier is not None
    kept = files_of(node.store.root / "round-000002")

    node.cycle(2)

    aside = node.store.root / f"round-000002.superseded-{earlier.model_state_sha256[:16]}"
    assert files_of(aside) == {**kept, "superseded.json": files_of(aside)["superseded.json"]}
    assert read_json(aside / "superseded.json") == {"sequence": 1}


# --- a caller that stalls cannot hold the node --------------------------------------------


def _stalling(requests: list[Request], release: threading.Event) -> Iterator[Request]:
    """Sends ``requests``, then keeps the stream open and silent until ``release``."""
    yield from requests
    release.wait(timeout=60)


STALLS: dict[str, list[Request]] = {
    "after the CycleStart": [_start(3)],
    "halfway through the base": [_start(3), *_base_stream()[:2]],
}


@pytest.mark.parametrize("case", list(STALLS))
def test_a_caller_that_stalls_is_dropped_and_the_node_serves_the_next_cycle(
    node: Node, case: str
) -> None:
    before = files_of(node.store.root)
    release = threading.Event()
    try:
        error = node.refusal(_stalling(STALLS[case], release))
    finally:
        release.set()

    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert error.details() == (
        f"TimeoutError: the base did not arrive within receive_timeout_s = {RECEIVE_TIMEOUT_S:g}"
        " s; the node dropped the call"
    )
    assert files_of(node.store.root) == before
    assert node.cycle(3).artifact.round_num == 3  # the node is free again


class _Context:
    """Enough of a ``grpc.ServicerContext`` to drive the servicer's generator by hand."""

    def __init__(self) -> None:
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise AssertionError(f"aborted: {code.name}: {details}")


def test_a_caller_that_stops_reading_the_delta_is_cancelled_and_frees_the_node(
    tmp_path: Path,
) -> None:
    servicer, store = _servicer(tmp_path, NodeLimits(send_timeout_s=0.2))
    context = _Context()
    replies = servicer.RunSovereignCycle(iter([_start(1), *_base_stream(), SEND]), context)  # type: ignore[arg-type]

    assert _result_of(replies).artifact.round_num == 1
    assert next(replies).WhichOneof("item") == "delta_chunk"  # asked for, then read no more
    assert context.cancelled.wait(timeout=30)
    replies.close()  # what gRPC's cancelled call does with the handler's generator

    again = list(servicer.RunSovereignCycle(iter([_start(2), *_base_stream(), SEND]), _Context()))  # type: ignore[arg-type]
    assert _result_of(again).artifact.round_num == 2
    assert store.rounds() == [1, 2]


# --- superseded copies are bounded --------------------------------------------------------


def _artifact(round_num: int, value: float) -> SovereignModelArtifact:
    state = {"w": torch.full((2,), value)}
    return SovereignModelArtifact(
        "india",
        "India",
        "continued_pretraining",
        state,
        {"loss": value},
        round_num=round_num,
        model_state_sha256=state_digest(state),
        model_state_bytes=8,
    )


def _aside(artifact: SovereignModelArtifact) -> str:
    return f"round-{artifact.round_num:06d}.superseded-{artifact.model_state_sha256[:16]}"


@pytest.mark.parametrize("max_superseded", [0, 1, 3])
def test_only_the_newest_superseded_copies_are_kept(tmp_path: Path, max_superseded: int) -> None:
    store = ArtifactStore(tmp_path, max_superseded=max_superseded)
    runs = [_artifact(2, float(value)) for value in range(6)]  # round 2, run six times
    for artifact in runs:
        store.save(artifact)

    earlier = runs[:-1]
    expected = [_aside(a) for a in earlier[len(earlier) - max_superseded :]]
    assert [p.name for p in store.superseded()] == expected
    current = store.get(2)
    assert current is not None and current.model_state_sha256 == runs[-1].model_state_sha256
    assert (tmp_path / "artifacts" / "round-000002" / "model.safetensors").is_file()


def test_the_copies_set_aside_first_are_deleted_first(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path, max_superseded=2)
    round_1 = [_artifact(1, 1.0), _artifact(1, 2.0)]
    round_2 = [_artifact(2, 3.0), _artifact(2, 4.0), _artifact(2, 5.0)]
    for artifact in (*round_1, *round_2):
        store.save(artifact)

    # Set aside: round 1's first run, then round 2's first two; the first is gone.
    assert [p.name for p in store.superseded()] == [_aside(a) for a in round_2[:2]]
    assert store.rounds() == [1, 2]  # every round's current artifact stays
    assert store.get(1).model_state_sha256 == round_1[1].model_state_sha256  # type: ignore[union-attr]


# --- a base the node already holds ----------------------------------------------------------


def _held_start(round_num: int, sha256: str) -> Request:
    start = pb.CycleStart(
        round_num=round_num, consortium_id=CONSORTIUM, base_sha256=sha256, base_held=True
    )
    return Request(start=start)


def test_a_held_base_is_hashed_again_and_trained_from_as_if_it_had_been_sent(node: Node) -> None:
    digest = state_digest(_base())
    assert node.stub.Describe(pb.DescribeRequest()).held_base_sha256 == digest
    held = list(node.stub.RunSovereignCycle(iter([_held_start(3, digest), SEND]), timeout=60))
    sent = node.cycle(3)  # the newest round may run again: now with the base sent
    (result,) = [r.result for r in held if r.WhichOneof("item") == "result"]  # after progress
    assert result.artifact.model_state_sha256 == sent.artifact.model_state_sha256
    assert held[-1].delta_end.sha256 and held[-1].delta_end.sha256 != digest


def test_a_base_the_node_does_not_hold_is_refused_and_changes_nothing(
    node: Node, tmp_path: Path
) -> None:
    before = files_of(tmp_path)
    error = node.refusal(iter([_held_start(3, "0" * 64)]))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error.details() == (
        f"CycleRefused: node 'india' holds no base with digest {'0' * 64!r}; send the base"
    )
    assert files_of(tmp_path) == before


def test_a_base_that_is_not_the_one_announced_is_refused(node: Node) -> None:
    start = Request(start=pb.CycleStart(round_num=3, consortium_id=CONSORTIUM, base_sha256="ab"))
    error = node.refusal(iter([start, *_base_stream()]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == (
        f"WireError: the base's digest {state_digest(_base())} differs from the one its CycleStart "
        "announced ('ab')"
    )


def test_a_delta_not_wanted_never_leaves_the_node_which_keeps_its_model(node: Node) -> None:
    declined = Request(delta_decision=pb.DeltaDecision(send=False))
    replies = list(node.stub.RunSovereignCycle(iter([_start(3), *_base_stream(), declined])))

    kinds = [r.WhichOneof("item") for r in replies]
    assert kinds[-1] == "result"  # the call ends (OK) right after the header
    assert "delta_chunk" not in kinds and "delta_end" not in kinds
    assert node.store.rounds() == [1, 2, 3]  # the sovereign model of round 3 is kept
    assert node.cycle(4).artifact.round_num == 4  # and the node is free again


def test_a_coordinator_that_never_decides_is_dropped_after_decision_timeout_s(
    tmp_path: Path,
) -> None:
    servicer, store = _servicer(tmp_path, NodeLimits(decision_timeout_s=0.3))
    release = threading.Event()
    context = _Context()
    replies = servicer.RunSovereignCycle(
        _stalling([_start(1), *_base_stream()], release),  # type: ignore[arg-type]
        context,
    )
    try:
        assert _result_of(replies).artifact.round_num == 1
        with pytest.raises(AssertionError) as aborted:
            next(replies)
    finally:
        release.set()
    assert str(aborted.value) == (
        "aborted: DEADLINE_EXCEEDED: TimeoutError: the coordinator's decision on the delta "
        "did not arrive within decision_timeout_s = 0.3 s; the node dropped the call"
    )
    assert store.rounds() == [1]  # its artifact stays: the node trained and kept it
    again = list(servicer.RunSovereignCycle(iter([_start(2), *_base_stream(), SEND]), _Context()))  # type: ignore[arg-type]
    assert _result_of(again).artifact.round_num == 2


def test_anything_but_a_decision_after_the_base_is_refused(node: Node) -> None:
    error = node.refusal(iter([_start(3), *_base_stream(), _start(3)]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == (
        "WireError: after the base, the request stream must carry the coordinator's "
        "DeltaDecision and nothing else"
    )


def _encoded_start(round_num: int, encoding: int) -> Request:
    start = pb.CycleStart(round_num=round_num, consortium_id=CONSORTIUM)
    start.delta_encoding = encoding  # type: ignore[assignment]
    return Request(start=start)


def test_a_delta_encoding_the_node_does_not_know_is_refused_and_changes_nothing(
    node: Node, tmp_path: Path
) -> None:
    before = files_of(tmp_path)
    error = node.refusal(iter([_encoded_start(3, 42), *_base_stream()]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == (
        "WireError: CycleStart.delta_encoding must be one of TENSOR_ENCODING_UNSPECIFIED, "
        "TENSOR_ENCODING_BFLOAT16, TENSOR_ENCODING_FLOAT16, TENSOR_ENCODING_INT8_BLOCK; got "
        "enum number 42 (an encoding this node's release does not know)"
    )
    assert files_of(tmp_path) == before


def test_a_node_asked_for_int8_blocks_sends_its_delta_in_them(node: Node) -> None:
    replies = list(
        node.stub.RunSovereignCycle(
            iter([_encoded_start(3, pb.TENSOR_ENCODING_INT8_BLOCK), *_base_stream(), SEND]),
            timeout=60,
        )
    )
    chunks = [r.delta_chunk for r in replies if r.WhichOneof("item") == "delta_chunk"]
    assert {c.name: c.encoding for c in chunks} == {
        name: pb.TENSOR_ENCODING_INT8_BLOCK for name in _base()
    }
    numel = sum(t.numel() for t in _base().values())  # tiny-causal: 256 x 32 twice, 256
    assert sum(len(c.data) for c in chunks) == numel + 4 * (numel // 256)


def test_a_base_that_does_not_arrive_whole_leaves_the_held_one(node: Node, tmp_path: Path) -> None:
    digest = state_digest(_base())
    before = files_of(tmp_path)
    cut = [_start(3), *_base_stream()[:-2]]  # no trailer: truncated
    error = node.refusal(iter(cut))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert files_of(tmp_path) == before
    held = node.stub.Describe(pb.DescribeRequest()).held_base_sha256
    # On disk the held base stays; in memory it was dropped before the new one was read.
    assert held == (digest if (tmp_path / "scratch").exists() else "")
