"""The candidate a node holds to evaluate (member-validated commit), and the steps it
evaluated.

After the round's deltas are integrated, the coordinator asks each member that contributed
to evaluate the candidate base on its held-out split (``EvaluationStart``), and, when the
acceptance rule refuses it, shorter steps toward it. The candidate crosses once per round:
the node keeps it here (in memory, or in a file of the scratch directory) and computes each
step from the base it trained from, with the core's own
:func:`~tapestry.training.consortium.round.validation.step`, so the step it evaluates is bit
for bit the one the coordinator would commit. It remembers the digest of every step it
evaluated: the step the round commits is the next round's base, which the node can then
compute again instead of receiving it (``CycleStart.base_held``).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.errors import WireError, quoted
from tapestry.node.guard import CycleRefused
from tapestry.training.consortium.round.validation import step
from tapestry.training.consortium.tensors import state_digest
from tapestry.wire.spill import SpilledState, SpillingAssembler
from tapestry.wire.tensor_stream import ByteCount, StateAssembler, TensorSpec, receive_state

HELD_CANDIDATE = "candidate-{}.spill"  # in the scratch directory, numbered by arrival


def new_assembler(
    expected: Mapping[str, TensorSpec], scratch: Path | None, name: str
) -> StateAssembler:
    """An assembler bounded by the node's own layout: in memory, or (with a scratch
    directory) into the new file ``scratch/name``."""
    if scratch is None:
        return StateAssembler(expected)
    return SpillingAssembler(scratch / name, expected)


def assemble(
    requests: Iterator[pb.RunSovereignCycleRequest],
    fields: tuple[str, str],
    assembler: StateAssembler,
    announced: tuple[str, str],
    what: str,
    on_bytes: ByteCount | None = None,
) -> Mapping[str, torch.Tensor]:
    """The state the stream's ``fields`` (chunk, trailer) carry, refused when its digest is
    not the one ``announced`` as ``(digest, by which message)`` (unless none was); a file of
    one that does not arrive whole is deleted."""
    try:
        state = receive_state(requests, *fields, assembler, on_bytes)
        digest, announcer = announced
        if digest and assembler.digest != digest:
            raise WireError(
                f"the {what}'s digest {assembler.digest} differs from the one its "
                f"{announcer} announced ({quoted(digest)})"
            )
        return state
    except BaseException:
        if isinstance(assembler, SpillingAssembler):
            assembler.close()
            assembler.path.unlink(missing_ok=True)
        raise


@dataclass
class HeldCandidate:
    """A round's candidate, and the steps toward it evaluated (digest: scale)."""

    round_num: int
    sha256: str
    state: Mapping[str, torch.Tensor]
    steps: dict[str, float] = field(default_factory=dict)  # replaced whole, never edited


class Candidates:
    """The one candidate a node holds (the newest round's), see the module."""

    def __init__(
        self, node_id: str, expected: Mapping[str, TensorSpec], scratch: Path | None
    ) -> None:
        self._node_id = node_id
        self._expected = expected
        self._scratch = scratch
        self._arrivals = itertools.count(1)
        self._held: HeldCandidate | None = None
        if scratch is not None:
            for stale in scratch.glob(HELD_CANDIDATE.format("*")):  # held before a restart
                stale.unlink()

    def step_digests(self) -> list[str]:
        """The digests of the steps evaluated toward the held candidate (Describe)."""
        held = self._held
        return list(held.steps) if held is not None else []

    def take(
        self,
        start: pb.EvaluationStart,
        requests: Iterator[pb.RunSovereignCycleRequest],
        on_bytes: ByteCount | None = None,
    ) -> HeldCandidate:
        """The candidate ``start`` names: the one held (``candidate_held``), or the one the
        stream carries, which replaces it."""
        held = self._held
        if start.candidate_held:
            if held is None or (held.round_num, held.sha256) != (
                start.round_num,
                start.candidate_sha256,
            ):
                raise CycleRefused(
                    f"node {self._node_id!r} holds no candidate of round {start.round_num} "
                    f"with digest {quoted(start.candidate_sha256)}; send it"
                )
            return held
        self.drop()  # one candidate at a time
        assembler = new_assembler(
            self._expected, self._scratch, HELD_CANDIDATE.format(next(self._arrivals))
        )
        state = assemble(
            requests,
            ("candidate_chunk", "candidate_end"),
            assembler,
            (start.candidate_sha256, "EvaluationStart"),
            "candidate",
            on_bytes,
        )
        self._held = HeldCandidate(start.round_num, assembler.digest, state)
        return self._held

    def evaluated(self, candidate: HeldCandidate, sha256: str, scale: float) -> None:
        """Remember that the step of ``scale`` toward ``candidate``, ``sha256``, was
        evaluated."""
        candidate.steps = {**candidate.steps, sha256: scale}

    def step_to(
        self, base: Mapping[str, torch.Tensor], sha256: str
    ) -> Mapping[str, torch.Tensor] | None:
        """The evaluated step toward the held candidate whose digest is ``sha256``, computed
        from ``base`` and hashed again; ``None`` when no such step was evaluated."""
        held = self._held
        if held is None or sha256 not in held.steps:
            return None
        state = step(dict(base), dict(held.state), held.steps[sha256])
        return state if state_digest(state) == sha256 else None

    def drop(self) -> None:
        """Let the candidate go (its file too)."""
        held, self._held = self._held, None
        if held is not None and isinstance(held.state, SpilledState):
            held.state.discard()
