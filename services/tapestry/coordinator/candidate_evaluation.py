"""A member's evaluation of a round's candidate, asked over its link (member-validated
commit, :mod:`~tapestry.training.consortium.round.validation`).

An evaluation is an exchange of its own on the link a cycle uses (the node's
``RunSovereignCycle`` call, or a numbered exchange on its session): an ``EvaluationStart``,
the candidate's chunks and trailer the first time the round's candidate is asked of this
member, and one ``MemberEvaluation`` back. Shorter steps name the candidate held: the
member computes each from the base it trained from.
"""

from __future__ import annotations

from collections.abc import Iterator

from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.coordinator.node_links import NodeLink
from tapestry.errors import WireError
from tapestry.training.consortium.messages import MemberEvaluation, ModelState
from tapestry.wire import codec
from tapestry.wire.tensor_stream import ByteCount, send_state


def ask_evaluation(
    link: NodeLink,
    start: pb.EvaluationStart,
    candidate: ModelState | None,
    timeout_s: float,
    chunk_bytes: int,
    on_bytes: ByteCount | None = None,
) -> MemberEvaluation:
    """The member's evaluation of the step ``start`` names, sending ``candidate`` along
    unless it is ``None`` (``start.candidate_held``). A reply that is not one
    ``MemberEvaluation`` of a step a digest can name is a :class:`WireError`; a refusal is
    the call's ``grpc.RpcError``."""

    def requests() -> Iterator[pb.RunSovereignCycleRequest]:
        yield pb.RunSovereignCycleRequest(evaluate=start)
        if candidate is not None:
            yield from send_state(
                candidate,
                lambda c: pb.RunSovereignCycleRequest(candidate_chunk=c),
                lambda t: pb.RunSovereignCycleRequest(candidate_end=t),
                sha256=start.candidate_sha256,
                chunk_bytes=chunk_bytes,
                on_bytes=on_bytes,
            )

    responses = link.cycle(requests(), timeout_s)
    try:
        first = next(responses, None)
        if first is None or first.WhichOneof("item") != "evaluation":
            raise WireError("the node must answer an evaluation with one MemberEvaluation")
        if next(responses, None) is not None:
            raise WireError("the node sent more than one message in answer to an evaluation")
    except BaseException:
        responses.cancel()
        raise
    try:
        return codec.member_evaluation_from_proto(first.evaluation)
    except ValueError as error:
        raise WireError(f"the node's evaluation is invalid: {error}") from None
