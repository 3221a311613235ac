"""Member-validated commit over the wire: each member evaluates the round's candidate on its
held-out split through its own node service, the candidate crosses once per member and
round, a committed shorter step is never sent again, and the rule holds against a reversed
member, a member that does not answer in time, one that objects to everything, and a
coordinator killed between the validation and the commit.

Most nodes here are real gRPC servers on 127.0.0.1 in this process (served_nodes); the
crash test runs whole processes.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import grpc
import pytest
import torch

from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.consortium.v1 import consortium_pb2_grpc as pb_grpc
from tapestry.coordinator.journal import CoordinatorStore
from tapestry.node.artifacts import ArtifactStore
from tapestry.node.servicer import SovereignNodeServicer
from tapestry.state_files import save_state
from tapestry.training.consortium import (
    ConsortiumCoordinator,
    ContributionPolicy,
    SovereignTrainingNode,
    state_digest,
)
from tapestry.training.consortium.governance.acceptance import AcceptancePolicy
from tapestry.training.consortium.messages import SovereignCycleResult
from tapestry.training.consortium.models.spec import ModelSpec
from tapestry.training.consortium.round.result import ConsortiumRoundResult
from tapestry.training.consortium.round.validation import step
from tapestry.wire.tensor_stream import send_state

from ..unit.conftest import CORPORA
from ..unit.test_member_validation import HELDOUT
from .node_servers import Served, served_nodes

CONSORTIUM = "tapestry-validated"
SEED = 7
SPEC = ModelSpec(hidden_size=32)
CHUNK_BYTES = 4096
MEMBERS = {"n0": "vn", "n1": "ch", "n2": "in"}  # node id -> corpus


def _node(node_id: str, corpus: str, quality: float = 0.8) -> SovereignTrainingNode:
    return SovereignTrainingNode(
        node_id,
        node_id.upper(),
        SPEC.build(SEED),
        CORPORA[corpus],
        quality,
        local_epochs=2,
        batch_size=2,
        seed=SEED,
        heldout_corpus=HELDOUT[corpus],
    )


class Reversed:
    """The issue's hostile member behind a real node service: trains honestly, sends its
    delta times -9.9 claiming quality 1.0, and flatters every candidate it evaluates."""

    def __init__(self, node: SovereignTrainingNode) -> None:
        self._node = node

    def __getattr__(self, name: str) -> object:
        return getattr(self._node, name)

    def run_sovereign_cycle(self, *args: object, **kwargs: object) -> SovereignCycleResult:
        result: SovereignCycleResult = self._node.run_sovereign_cycle(*args, **kwargs)  # type: ignore[arg-type]
        delta = {k: v * -9.9 for k, v in result.contribution.weight_delta.items()}
        contribution = dataclasses.replace(
            result.contribution, weight_delta=delta, quality_score=1.0
        )
        return dataclasses.replace(result, contribution=contribution)

    def evaluate_candidate(self, round_num: int, state: Mapping[str, torch.Tensor]) -> object:
        honest = self._node.evaluate_candidate(round_num, state)
        assert honest is not None
        return dataclasses.replace(honest, candidate_loss=honest.base_loss * 0.5)


class Member(SovereignNodeServicer):
    """A node service that counts the base and candidate chunks it is sent and, when told,
    says every step longer than ``object_above`` raised its loss by 5 nats, or answers
    evaluations only after ``delay_s``."""

    def __init__(
        self, node: object, root: Path, *, object_above: float = 2.0, delay_s: float = 0.0
    ) -> None:
        super().__init__(
            node,  # type: ignore[arg-type]
            SPEC,
            ArtifactStore(root / node.node_id),  # type: ignore[attr-defined]
            CONSORTIUM,
            chunk_bytes=CHUNK_BYTES,
        )
        self.object_above = object_above
        self.delay_s = delay_s
        self.chunks = {"base_chunk": 0, "candidate_chunk": 0}
        self.asked = 0  # evaluations asked of it

    def RunSovereignCycle(self, request_iterator, context):  # noqa: N802
        def counted() -> Iterator[pb.RunSovereignCycleRequest]:
            for message in request_iterator:
                kind = message.WhichOneof("item")
                if kind in self.chunks:
                    self.chunks[kind] += 1
                yield message

        return super().RunSovereignCycle(counted(), context)

    def _evaluate(self, start, requests):
        self.asked += 1
        time.sleep(self.delay_s)
        answer = super()._evaluate(start, requests)
        if start.scale > self.object_above:
            answer.candidate_loss = answer.base_loss + 5.0
        return answer


def _served(root: Path, servicers: dict[str, SovereignNodeServicer]) -> Iterator[Served]:
    return served_nodes(  # type: ignore[return-value]
        root, servicers, spec=SPEC, consortium_id=CONSORTIUM, chunk_bytes=CHUNK_BYTES
    )


def _coordinator(policy: ContributionPolicy | None = None) -> ConsortiumCoordinator:
    """The core as the services build it, validating by the default rule."""
    return ConsortiumCoordinator(
        SPEC.build(SEED),
        policy or ContributionPolicy(),
        min_nodes=2,
        copy_states=False,
        acceptance=AcceptancePolicy(),
    )


def _honest(root: Path, **options: dict[str, object]) -> dict[str, Member]:
    return {
        node_id: Member(_node(node_id, corpus), root, **options.get(node_id, {}))  # type: ignore[arg-type]
        for node_id, corpus in MEMBERS.items()
    }


def test_a_committed_shorter_step_is_the_next_base_and_is_never_sent(tmp_path: Path) -> None:
    members = _honest(tmp_path, n2={"object_above": 0.5})  # objects to the full step only
    with _served(tmp_path, members) as served:
        coordinator = _coordinator()
        first = coordinator.run_round(served.proxies)
        after_first = {n: dict(m.chunks) for n, m in members.items()}
        second = coordinator.run_round(served.proxies)

    validation = first.validation
    assert validation is not None
    assert [a.scale for a in validation.attempts] == [1.0, 0.5]
    assert validation.attempts[0].verdict.objections == ("n2",)
    assert validation.scale == 0.5 and validation.committed_over == ()
    # What was committed is the half step each member computed and hashed itself, bit for
    # bit; the full step they judged was another state.
    full, half = validation.attempts
    assert {e.state_sha256 for e in half.evaluations} == {first.shared_base_sha256}
    assert len({e.state_sha256 for e in full.evaluations}) == 1
    assert full.evaluations[0].state_sha256 not in (first.shared_base_sha256, "")
    # The candidate crossed once per member (the half step named it held); round 2's
    # base, the committed half step, crossed to nobody: each member computed it.
    candidate_chunks = after_first["n0"]["candidate_chunk"]
    assert candidate_chunks > 0
    for node_id, member in members.items():
        assert after_first[node_id]["candidate_chunk"] == candidate_chunks, node_id
        assert member.chunks["base_chunk"] == after_first[node_id]["base_chunk"], node_id
    assert second.accepted_nodes == ["n0", "n1", "n2"]
    assert second.previous_base_sha256 == first.shared_base_sha256


def test_the_reversed_member_cannot_raise_an_honest_members_held_out_loss(
    tmp_path: Path,
) -> None:
    members: dict[str, SovereignNodeServicer] = dict(_honest(tmp_path))
    members["rogue"] = Member(Reversed(_node("rogue", "vn", quality=1.0)), tmp_path)
    # No norm bound: the rogue's delta gets into the candidate, and only validation stands
    # between it and the base.
    policy = ContributionPolicy(max_delta_norm_ratio=None)
    with _served(tmp_path, members) as served:
        coordinator = _coordinator(policy)
        results = [coordinator.run_round(served.proxies) for _ in range(2)]

    for result in results:
        assert "rogue" in result.contributions
        validation = result.validation
        assert validation is not None
        # The full candidate, the rogue's delta in it, raised honest losses: refused.
        assert set(validation.attempts[0].verdict.objections) & set(MEMBERS)
        committed = [a for a in validation.attempts if a.scale == validation.scale]
        if validation.scale is None:  # nothing committed: the base is unchanged
            assert result.shared_base_sha256 == result.previous_base_sha256
            continue
        for evaluation in committed[0].evaluations:
            if evaluation.node_id in MEMBERS:  # the rogue's own word counts for nothing
                assert evaluation.change <= 0.01, evaluation


def _with_the_rogue(
    root: Path, acceptance: AcceptancePolicy, rounds: int, floor: float = 0.0
) -> tuple[list[ConsortiumRoundResult], dict[str, Member]]:
    """``rounds`` rounds of the honest members and the reversed one under ``acceptance``,
    cap 0.5, quality ``floor`` and no norm bound (only validation stands between its delta
    and the base)."""
    members = _honest(root)
    members["rogue"] = Member(Reversed(_node("rogue", "vn", quality=1.0)), root)
    policy = ContributionPolicy(floor, max_delta_norm_ratio=None, max_node_weight=0.5)
    with _served(root, dict(members)) as served:
        coordinator = _coordinator(policy)
        coordinator.acceptance = acceptance
        return [coordinator.run_round(served.proxies) for _ in range(rounds)], members


def test_with_drop_one_the_reversed_member_is_left_out_over_the_wire_and_the_base_moves(
    tmp_path: Path,
) -> None:
    results, members = _with_the_rogue(tmp_path, AcceptancePolicy(max_halvings=1, drop_one=True), 2)

    for result in results:
        validation = result.validation
        assert validation is not None and validation.dropped == "rogue"
        assert [a.dropped for a in validation.attempts] == ["", "", "n0", "n1", "n2", "rogue"]
        assert result.accepted_nodes == ["n0", "n1", "n2"] and "rogue" in result.rejected_nodes
        assert result.shared_base_sha256 != result.previous_base_sha256
        (chosen,) = [a for a in validation.attempts if a.dropped == "rogue"]
        # every member judged the very state committed, and no honest loss rose
        assert {e.state_sha256 for e in chosen.evaluations} == {result.shared_base_sha256}
        assert all(e.change <= 0.01 for e in chosen.evaluations if e.node_id in MEMBERS)
    assert results[1].previous_base_sha256 == results[0].shared_base_sha256
    # the candidate without the rogue crossed to each member once, like every candidate
    assert all(m.asked == 2 * 6 for m in members.values())


def test_evaluated_quality_over_the_wire_cuts_the_reversed_members_weight(
    tmp_path: Path,
) -> None:
    from tapestry.training.consortium.governance.measured import QualitySource

    (result,), _ = _with_the_rogue(tmp_path, AcceptancePolicy(measure=True), 1)

    validation = result.validation
    assert validation is not None
    assert [p.dropped for p in validation.probes] == ["", "n0", "n1", "n2", "rogue"]
    # The others are no better off without an honest member (score 1); without the rogue
    # each honest member's held-out loss falls (0.30, 0.17, 0.02 nats here: harm 0.17,
    # score exp(-1.7) = 0.19), so it weighs under a quarter of an honest member, where its
    # claim of 1.0 gave it the largest weight (0.275).
    assert all(result.quality_scores[n] == 1.0 for n in MEMBERS)
    assert result.quality_scores["rogue"] < 0.25
    weights = result.contribution_weights
    assert all(weights["rogue"] < weights[n] / 4 for n in MEMBERS)
    assert set(result.quality_sources.values()) == {QualitySource.EVALUATED}
    assert validation.scale is not None  # committed, and no honest loss rose
    committed = [a for a in validation.attempts if a.scale == validation.scale][0]
    assert {e.state_sha256 for e in committed.evaluations} == {result.shared_base_sha256}
    assert all(e.change <= 0.01 for e in committed.evaluations if e.node_id in MEMBERS)


def test_a_member_that_does_not_answer_in_time_does_not_count(tmp_path: Path) -> None:
    members = _honest(tmp_path, n2={"delay_s": 3.0})
    with _served(tmp_path, members) as served:
        for proxy in served.proxies:
            proxy.evaluation_timeout_s = 1.0
        result = _coordinator().run_round(served.proxies)

    validation = result.validation
    assert validation is not None and validation.scale is not None
    for attempt in validation.attempts:
        assert sorted(e.node_id for e in attempt.evaluations) == ["n0", "n1"]
    assert result.shared_base_sha256 != result.previous_base_sha256


def test_a_silent_member_holds_a_round_up_for_one_timeout_not_one_per_step(
    tmp_path: Path,
) -> None:
    # n1 objects to every step, so the round tries all four; n2 is silent.
    members = _honest(tmp_path, n1={"object_above": 0.1}, n2={"delay_s": 3.0})
    with _served(tmp_path, members) as served:
        for proxy in served.proxies:
            proxy.evaluation_timeout_s = 1.0
        result = _coordinator().run_round(served.proxies)

    validation = result.validation
    assert validation is not None
    assert len(validation.attempts) == 4
    assert all("n2" not in [e.node_id for e in a.evaluations] for a in validation.attempts)
    # Asked once (its first step timed out after 1 s), never again that round.
    assert members["n2"].asked == 1


def test_a_member_that_objects_to_every_step_is_committed_over(tmp_path: Path) -> None:
    members = _honest(tmp_path, n1={"object_above": 0.0})
    with _served(tmp_path, members) as served:
        result = _coordinator().run_round(served.proxies)

    validation = result.validation
    assert validation is not None
    assert [a.scale for a in validation.attempts] == [1.0, 0.5, 0.25, 0.125]
    assert all(a.verdict.objections == ("n1",) for a in validation.attempts)
    assert validation.scale == 1.0 and validation.committed_over == ("n1",)
    assert result.accepted_nodes == ["n0", "n1", "n2"]


@pytest.fixture
def trained(tmp_path: Path) -> Iterator[tuple[Served, ConsortiumCoordinator]]:
    """Three members that trained round 1 (validated and committed)."""
    with _served(tmp_path, _honest(tmp_path)) as served:
        coordinator = _coordinator()
        coordinator.run_round(served.proxies)
        yield served, coordinator


def _evaluate(served: Served, start: pb.EvaluationStart, candidate=None) -> pb.MemberEvaluation:
    """Ask n0 for an evaluation the way a coordinator (or a stranger) would."""
    with grpc.insecure_channel(served.proxies[0].address) as channel:
        stub = pb_grpc.SovereignNodeServiceStub(channel)
        requests = [pb.RunSovereignCycleRequest(evaluate=start)]
        if candidate is not None:
            requests += send_state(
                candidate,
                lambda c: pb.RunSovereignCycleRequest(candidate_chunk=c),
                lambda t: pb.RunSovereignCycleRequest(candidate_end=t),
            )
        replies = list(stub.RunSovereignCycle(iter(requests), timeout=30))
    assert len(replies) == 1
    return replies[0].evaluation


@pytest.mark.parametrize(
    ("change", "code", "words"),
    [
        ({"base_sha256": "0" * 64}, grpc.StatusCode.FAILED_PRECONDITION, "did not train round 2"),
        ({"round_num": 1}, grpc.StatusCode.FAILED_PRECONDITION, "below the node's newest"),
        ({"consortium_id": "other"}, grpc.StatusCode.FAILED_PRECONDITION, "does not serve"),
        ({"scale": 1.5}, grpc.StatusCode.INVALID_ARGUMENT, "scale 1.5 is not in (0, 1]"),
        ({"scale": float("nan")}, grpc.StatusCode.INVALID_ARGUMENT, "is not in (0, 1]"),
        ({"candidate_held": True}, grpc.StatusCode.FAILED_PRECONDITION, "holds no candidate"),
        (
            {"candidate_sha256": "f" * 64},
            grpc.StatusCode.INVALID_ARGUMENT,
            "its EvaluationStart announced",
        ),
    ],
)
def test_a_node_refuses_an_evaluation_it_cannot_stand_behind(
    trained: tuple[Served, ConsortiumCoordinator], change: dict, code: grpc.StatusCode, words: str
) -> None:
    served, coordinator = trained
    coordinator.run_round(served.proxies)  # round 2: its base is the one n0 holds
    base = coordinator.shared_base_state
    candidate = {k: v + 0.01 for k, v in base.items()}
    fields = {
        "round_num": 2,
        "consortium_id": CONSORTIUM,
        "base_sha256": _held_base(served),
        "candidate_sha256": state_digest(candidate),
        "scale": 1.0,
    } | change
    with pytest.raises(grpc.RpcError) as refused:
        _evaluate(served, pb.EvaluationStart(**fields), candidate)
    assert refused.value.code() == code
    assert words in refused.value.details()


def test_a_node_evaluates_a_step_it_computes_from_the_base_it_holds(
    trained: tuple[Served, ConsortiumCoordinator],
) -> None:
    served, coordinator = trained
    base = coordinator.shared_base_state  # the base n0 trained round 1 from is before it
    held = _held_base(served)
    candidate = {k: v + 0.01 for k, v in base.items()}
    start = pb.EvaluationStart(
        round_num=1,
        consortium_id=CONSORTIUM,
        base_sha256=held,
        candidate_sha256=state_digest(candidate),
        scale=1.0,
    )
    full = _evaluate(served, start, candidate)
    start.candidate_held, start.scale = True, 0.25
    quarter = _evaluate(served, start)

    assert full.node_id == quarter.node_id == "n0"
    assert full.state_sha256 == state_digest(candidate)
    assert full.base_loss == quarter.base_loss
    held_state = served.servicers["n0"]._held.state  # the base it trained from
    assert quarter.state_sha256 == state_digest(step(dict(held_state), candidate, 0.25))


def _held_base(served: Served) -> str:
    held = served.servicers["n0"]._held
    assert held is not None
    return held.sha256


class Crash(BaseException):
    """The coordinator's process dying: nothing after it runs, no handler catches it."""


def test_a_coordinator_that_dies_between_validation_and_commit_resumes_whole(
    tmp_path: Path,
) -> None:
    """The round's members validated its candidate, the coordinator wrote the base file
    and died before the journal entry landed: the store resumes at the round before, bit
    for bit, and the round runs again and commits, its members training from the base they
    hold."""
    store = CoordinatorStore(tmp_path / "coordinator")
    with _served(tmp_path, _honest(tmp_path)) as served:
        coordinator = _coordinator()
        store.save_initial_base(coordinator.shared_base_state)
        coordinator.run_round(served.proxies, commit=store.commit_round)
        before = coordinator.base_sha256

        def dies_mid_commit(result: ConsortiumRoundResult) -> None:
            assert result.validation is not None  # the members have spoken
            save_state(store.base_path(result.round_num), result.shared_base_state, {})
            raise Crash

        with pytest.raises(Crash):
            coordinator.run_round(served.proxies, commit=dies_mid_commit)

        # A restart: a fresh store and core from the same directory.
        reopened = CoordinatorStore(tmp_path / "coordinator")
        resumed = reopened.latest()
        assert resumed is not None
        round_num, state, records = resumed
        assert round_num == 1 and [r.result.round_num for r in records] == [1]
        assert state_digest(state) == before
        restarted = _coordinator()
        restarted.load_base_state(state, round_num, sha256=before)
        again = restarted.run_round(served.proxies, commit=reopened.commit_round)

    assert again.round_num == 2 and again.previous_base_sha256 == before
    assert again.accepted_nodes == ["n0", "n1", "n2"]
    assert again.validation is not None and again.validation.scale is not None
    assert [r.result.round_num for r in reopened.records()] == [1, 2]
