"""Stand-in node servers that speak the protocol but behave as the test needs: one fault
each, or a cycle that stays open until the test lets it go. Each runs in this process on
127.0.0.1, on a port chosen at bind time, and is stopped by :func:`serve`'s caller."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager

import grpc
import torch

from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.consortium.v1 import consortium_pb2_grpc as pb_grpc
from tapestry.limits import MAX_PROGRESS_MESSAGES
from tapestry.training.consortium import ModelSpec, SovereignTrainingNode, state_digest
from tapestry.training.consortium.models.state import model_state
from tapestry.training.consortium.round.validation import step as step_toward
from tapestry.training.consortium.tensors import state_layout
from tapestry.wire.codec import model_spec_to_proto, state_layout_to_proto
from tapestry.wire.delta_encoding import DeltaEncoding
from tapestry.wire.tensor_stream import StateAssembler, receive_state, send_state


class FakeNode(pb_grpc.SovereignNodeServiceServicer):
    """Describes itself as told; its cycle adds 0.01 plus 0.0001 x the round to every
    weight (an honest node's delta differs from round to round), with the fault
    ``behaviour`` names (``"honest"`` for none; ``"replay"`` sends its first delta, 0.01,
    every round, ``"replay-unannounced"`` too without its digest in the header)."""

    def __init__(
        self,
        node_id: str,
        behaviour: str = "honest",
        *,
        jurisdiction: str = "Nowhere",
        model: ModelSpec | None = None,
    ) -> None:
        self.node_id = node_id
        self.behaviour = behaviour
        self.jurisdiction = jurisdiction
        self.model = model or ModelSpec()
        self.cycles = 0  # how many bases this node has been sent
        self.base: dict[str, torch.Tensor] = {}  # the newest base, which it judges steps from
        self.candidate: dict[str, torch.Tensor] = {}

    def Describe(self, request, context):  # noqa: N802
        return pb.DescribeResponse(
            node_id=self.node_id,
            jurisdiction=self.jurisdiction,
            model=model_spec_to_proto(self.model),
            state_layout=state_layout_to_proto(state_layout(model_state(self.model.build(0)))),
        )

    def before_reply(self) -> None:
        """Called once the base is in, before the node answers (a hook for subclasses)."""

    def RunSovereignCycle(self, request_iterator, context):  # noqa: N802
        first = next(request_iterator)
        if first.WhichOneof("item") == "evaluate":
            yield self.evaluation(first.evaluate, request_iterator)
            return
        self.cycles += 1
        start = first.start
        base = receive_state(request_iterator, "base_chunk", "base_end", StateAssembler())
        self.base = dict(base)
        self.before_reply()
        yield from self.progress()
        delta = self.delta(start.round_num, base)
        node_id = "vietnam" if self.behaviour == "impostor" else self.node_id
        digest = state_digest(delta)
        announced = {"tampered": "0" * 64, "replay-unannounced": ""}.get(self.behaviour, digest)
        yield pb.RunSovereignCycleResponse(
            result=pb.SovereignCycleResult(
                artifact=pb.SovereignModelArtifact(
                    node_id=node_id,
                    jurisdiction=self.jurisdiction,
                    stage="continued_pretraining",
                    round_num=start.round_num,
                ),
                contribution=pb.SovereignContribution(
                    node_id=node_id,
                    round_num=start.round_num,
                    weight_delta_sha256=announced,
                    quality_score=1e300 if self.behaviour == "greedy" else 1.0,
                    token_count=1,
                ),
            )
        )
        stream = list(
            send_state(
                delta,
                lambda c: pb.RunSovereignCycleResponse(delta_chunk=c),
                lambda t: pb.RunSovereignCycleResponse(delta_end=t),
                sha256=digest,
                chunk_bytes=4096,
                # int8 blocks when the coordinator asked for raw float32 (CycleStart says so)
                encoding=DeltaEncoding.INT8_BLOCK
                if self.behaviour == "unasked-encoding"
                else DeltaEncoding.FLOAT32,
            )
        )
        if self.behaviour == "truncated":
            stream = stream[: len(stream) // 2]
        yield from stream

    def evaluation(self, start: pb.EvaluationStart, requests) -> pb.RunSovereignCycleResponse:
        """Member-validated commit: every step toward the candidate lowers its held-out
        loss a little; it names the step it judged, computed as a node computes it."""
        if not start.candidate_held:
            assembler = StateAssembler()
            self.candidate = dict(
                receive_state(requests, "candidate_chunk", "candidate_end", assembler)
            )
        judged = step_toward(self.base, self.candidate, start.scale) if self.base else {}
        return pb.RunSovereignCycleResponse(
            evaluation=pb.MemberEvaluation(
                node_id=self.node_id,
                base_loss=3.0,
                candidate_loss=2.99,
                state_sha256=state_digest(judged) if judged else "",
            )
        )

    def delta(self, round_num: int, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The delta this node sends from ``base``, its fault included."""
        replays = self.behaviour in ("replay", "replay-unannounced")
        step = 0.01 if replays else 0.01 + 1e-4 * round_num
        delta = {name: tensor * 0.0 + step for name, tensor in base.items()}
        if self.behaviour == "nan":
            delta["embedding.weight"][0, 0] = float("nan")
        if self.behaviour == "extra-key":
            delta["backdoor.weight"] = delta["lm_head.bias"].clone()
        if self.behaviour == "huge":  # finite, but it would drag the base far away
            delta = {name: tensor * 0.0 + 1e30 for name, tensor in base.items()}
        return delta

    def progress(self) -> Iterator[pb.RunSovereignCycleResponse]:
        """The progress messages sent before the result: two training steps when
        ``"honest"``; a flood, a NaN loss or a phase only the coordinator may mark for the
        ``"progress-*"`` behaviours; none otherwise."""
        padded = pb.CycleProgress(phase=pb.CYCLE_PHASE_TRAINING, step=1, total_steps=2)
        padded.MergeFromString(b"\x7a\xac\x02" + b"x" * 300)  # unknown field 15: 300 bytes
        steps = {
            "honest": [pb.CycleProgress(phase=pb.CYCLE_PHASE_TRAINING, step=s, total_steps=2,
                                        loss=5.0 - s) for s in (1, 2)],
            "progress-flood": [pb.CycleProgress(phase=pb.CYCLE_PHASE_TRAINING, step=1,
                                                total_steps=2, loss=1.0)] * (MAX_PROGRESS_MESSAGES + 1),
            "progress-nan": [pb.CycleProgress(phase=pb.CYCLE_PHASE_TRAINING, step=1,
                                              total_steps=2, loss=float("nan"))],
            "progress-past-total": [pb.CycleProgress(phase=pb.CYCLE_PHASE_TRAINING, step=3,
                                                     total_steps=2, loss=1.0)],
            "progress-coordinator-phase": [pb.CycleProgress(phase=pb.CYCLE_PHASE_DELTA_RECEIVED)],
            "progress-padded": [padded],
        }  # fmt: skip
        for step in steps.get(self.behaviour, []):
            yield pb.RunSovereignCycleResponse(progress=step)


class BlockingNode(FakeNode):
    """An honest fake whose cycle holds the round open until :attr:`release` is set."""

    def __init__(self, node_id: str) -> None:
        super().__init__(node_id)
        self.started = threading.Event()
        self.release = threading.Event()

    def before_reply(self) -> None:
        self.started.set()
        if not self.release.wait(timeout=60):
            raise TimeoutError("the test never released the blocking node")


class ReversedNode(FakeNode):
    """The issue's hostile member: it trains from the base as an honest member would (the
    core's node ``trainer``), then sends that delta times -9.9 and claims quality 1.0.
    Under ten times an honest norm, it passes the services' norm bound."""

    def __init__(self, node_id: str, trainer: SovereignTrainingNode) -> None:
        super().__init__(node_id, "reversed")
        self.trainer = trainer

    def delta(self, round_num: int, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        honest = self.trainer.run_sovereign_cycle(round_num, base).contribution.weight_delta
        return {name: tensor * -9.9 for name, tensor in honest.items()}


@contextmanager
def serve(
    nodes: list[FakeNode], credentials: grpc.ServerCredentials | None = None
) -> Iterator[list[dict[str, str]]]:
    """Serve each node on its own port, plaintext or TLS with ``credentials``; yields their
    consortium-file member entries and stops every server afterwards."""
    servers, members = [], []
    try:
        for node in nodes:
            server = grpc.server(futures.ThreadPoolExecutor(2))
            pb_grpc.add_SovereignNodeServiceServicer_to_server(node, server)
            port = (
                server.add_secure_port("127.0.0.1:0", credentials)
                if credentials is not None
                else server.add_insecure_port("127.0.0.1:0")
            )
            server.start()
            servers.append(server)
            members.append(
                {
                    "node_id": node.node_id,
                    "jurisdiction": node.jurisdiction,
                    "address": f"127.0.0.1:{port}",
                }
            )
        yield members
    finally:
        for server in servers:
            server.stop(0)
