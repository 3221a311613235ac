"""Live progress from the nodes through the coordinator to the operator: a node's reply
streams its progress before its result, RunRound relays every node's training steps with
their losses, a member that floods or lies through progress is failed with the reason while
the round commits with the others, and ``tapestry round run --rounds 3`` follows three
rounds in plain lines that fit 80 columns."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.consortium.v1 import consortium_pb2_grpc as pb_grpc
from tapestry.demo.launcher import LocalConsortium
from tapestry.limits import MAX_PROGRESS_MESSAGES
from tapestry.wire.tensor_stream import send_state

from .fake_nodes import FakeNode, serve

pytestmark = pytest.mark.slow  # whole consortia of training processes

NODES = ["vietnam", "switzerland", "india"]


def _cycle_requests(
    consortium: LocalConsortium, round_num: int
) -> Iterator[pb.RunSovereignCycleRequest]:
    with consortium.client() as client:
        _, base = client.get_base()
    yield pb.RunSovereignCycleRequest(
        start=pb.CycleStart(round_num=round_num, consortium_id=consortium.consortium_id)
    )
    yield from send_state(
        base,
        lambda c: pb.RunSovereignCycleRequest(base_chunk=c),
        lambda t: pb.RunSovereignCycleRequest(base_end=t),
    )
    yield pb.RunSovereignCycleRequest(delta_decision=pb.DeltaDecision(send=True))


def test_a_nodes_reply_streams_its_progress_before_its_result(listening_consortium) -> None:
    shared_consortium = listening_consortium  # its node's own port, called as its coordinator
    """Called as the coordinator would: base received (how much), then training steps up to
    the last, each with a finite loss, then the result and the delta."""
    with shared_consortium.channel("india", "coordinator", "") as channel:
        stub = pb_grpc.SovereignNodeServiceStub(channel)
        replies = list(stub.RunSovereignCycle(_cycle_requests(shared_consortium, 1), timeout=60))

    kinds = [reply.WhichOneof("item") for reply in replies]
    first_result = kinds.index("result")
    assert set(kinds[:first_result]) == {"progress"}
    assert "progress" not in kinds[first_result:]
    progress = [reply.progress for reply in replies[:first_result]]
    assert progress[0].phase == pb.CYCLE_PHASE_BASE_RECEIVED
    assert progress[0].tensor_count == 3 and progress[0].state_bytes > 0
    training = progress[1:]
    assert training and all(p.phase == pb.CYCLE_PHASE_TRAINING for p in training)
    assert training[-1].step == training[-1].total_steps  # the last step is always sent
    assert all(p.HasField("loss") and 0 < p.loss < 10 for p in training)
    assert [p.step for p in training] == sorted({p.step for p in training})


def test_run_round_relays_training_steps_with_losses_for_every_node(shared_consortium) -> None:
    events: list[pb.RoundProgress] = []
    with shared_consortium.client() as client:
        result = client.run_round(events.append)

    assert list(result.accepted_nodes) == NODES
    for node_id in NODES:
        mine = [e for e in events if e.node_id == node_id]
        stages = [e.stage for e in mine]
        assert stages[0] == pb.ROUND_STAGE_NODE_STARTED
        # The header first; the delta is fetched once the policy has accepted the node.
        contributed = stages.index(pb.ROUND_STAGE_NODE_CONTRIBUTED)
        after = mine[contributed + 1 :]
        assert all(e.stage == pb.ROUND_STAGE_NODE_PROGRESS for e in after)
        # The delta's transfer: its first report at 0 bytes, its last with every byte, then
        # the coordinator's "received".
        sending = [e.progress for e in after[:-1]]
        assert all(p.phase == pb.CYCLE_PHASE_SENDING_DELTA for p in sending) and len(sending) >= 2
        assert sending[0].state_bytes == 0 < sending[-1].state_bytes == sending[-1].total_bytes
        assert all(p.resumes == 0 for p in sending)
        assert after[-1].progress.phase == pb.CYCLE_PHASE_DELTA_RECEIVED
        phases = [e.progress.phase for e in mine if e.stage == pb.ROUND_STAGE_NODE_PROGRESS]
        # The base's transfer, the same way, before the node says it holds it.
        base = [e.progress for e in mine if e.progress.phase == pb.CYCLE_PHASE_SENDING_BASE]
        assert len(base) >= 2 and phases[: len(base) + 1] == [
            *[pb.CYCLE_PHASE_SENDING_BASE] * len(base),
            pb.CYCLE_PHASE_BASE_RECEIVED,
        ]
        assert base[0].state_bytes == 0 < base[-1].state_bytes == base[-1].total_bytes
        steps = [e for e in mine if e.progress.phase == pb.CYCLE_PHASE_TRAINING]
        assert steps[-1].progress.step == steps[-1].progress.total_steps > 0
        assert all(e.progress.HasField("loss") and e.progress.loss > 0 for e in steps)
        assert steps[-1].detail.startswith(f"training step {steps[-1].progress.step}/")
    assert all(
        not e.HasField("progress") for e in events if e.stage != pb.ROUND_STAGE_NODE_PROGRESS
    )


LYING = {
    "progress-flood": f"more than MAX_PROGRESS_MESSAGES = {MAX_PROGRESS_MESSAGES} progress "
    "messages in one cycle (flooding)",
    "progress-nan": "progress loss nan at step 1 is not a finite number in "
    "[0, MAX_PROGRESS_LOSS = 700] nats",
    "progress-past-total": "progress step 3 of 2: a step must be in [0, total_steps]",
    "progress-coordinator-phase": "invalid progress message 1: progress phase must be one of "
    "CYCLE_PHASE_BASE_RECEIVED, CYCLE_PHASE_TRAINING; got enum number 4",
    "progress-padded": "more than MAX_PROGRESS_MESSAGE_BYTES = 256",
}


def test_a_member_that_floods_or_lies_through_progress_fails_and_the_round_commits(
    consortium_factory,
) -> None:
    fakes = [FakeNode(behaviour, behaviour) for behaviour in LYING] + [FakeNode("fair")]
    events: list[pb.RoundProgress] = []
    with serve(fakes) as members:
        consortium = consortium_factory(extra_members=members, tls=False)
        with consortium.client() as client:
            result = client.run_round(events.append)

    assert list(result.accepted_nodes) == [*NODES, "fair"]
    assert sorted(result.failed_nodes) == sorted(LYING)
    for behaviour, reason in LYING.items():
        assert reason in result.failed_nodes[behaviour], result.failed_nodes[behaviour]
    # What a flood reaches the clients is throttled: the flooder's 1001 reports are not.
    flooded = [e for e in events if e.node_id == "progress-flood"]
    assert len(flooded) < 10
    fair = [e.progress.step for e in events if e.node_id == "fair" and e.progress.step]
    assert fair[-1] == 2


def test_round_run_rounds_3_follows_three_rounds_in_lines_that_fit_80_columns(
    shared_consortium,
) -> None:
    with shared_consortium.client() as client:
        before = len(client.list_rounds())
    ran = subprocess.run(
        [sys.executable, "-m", "tapestry", "round", "run", "--rounds", "3",
         "--coordinator", shared_consortium.coordinator_address],
        capture_output=True,
        text=True,
        env={**os.environ, **shared_consortium.cli_env()},
        timeout=180,
    )  # fmt: skip

    assert ran.returncode == 0, ran.stderr
    lines = ran.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert [line.split()[:2] for line in lines if line.startswith("Round ")] == [
        ["Round", str(before + n)] for n in (1, 2, 3)
    ]
    for node_id in NODES:
        assert any(line.startswith(f"  · {node_id}: training step ") for line in lines)
        assert any(line.startswith(f"  · {node_id}: base received (3 tensors, ") for line in lines)
    with shared_consortium.client() as client:
        assert len(client.list_rounds()) == before + 3
