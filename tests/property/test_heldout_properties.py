"""Hostile held-out evaluations: whatever numbers a member sends, the codec carries them back
exactly and admission either finds them within every bound or names the bound, briefly."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.limits import MAX_HELDOUT_LOSS, MAX_TOKEN_COUNT
from tapestry.training.consortium.governance.checks import evaluation_problem
from tapestry.wire import codec

from .conftest import MAX_MESSAGE_CHARS, examples

LOSSES = (
    st.floats(allow_nan=True, allow_infinity=True)
    | st.floats(0, 800)
    | st.sampled_from([0.0, -0.0, MAX_HELDOUT_LOSS, 5.545177444479562])
)


@st.composite
def evaluations(draw: st.DrawFn) -> pb.HeldOutEvaluation:
    """Half honest-looking (perplexity = exp(loss)), half anything at all."""
    losses = [draw(LOSSES), draw(LOSSES)]
    honest = draw(st.booleans())

    def ppl(loss: float) -> float:
        if honest and not math.isnan(loss) and loss < 709:
            return math.exp(loss)
        return draw(st.floats(allow_nan=True, allow_infinity=True))

    return pb.HeldOutEvaluation(
        base_loss=losses[0],
        base_perplexity=ppl(losses[0]),
        sovereign_loss=losses[1],
        sovereign_perplexity=ppl(losses[1]),
        tokens=draw(st.integers(0, 2**64 - 1) | st.integers(0, 10_000)),
    )


@settings(max_examples=examples(300))
@given(msg=evaluations())
def test_an_evaluation_round_trips_and_is_admitted_only_within_bounds(
    msg: pb.HeldOutEvaluation,
) -> None:
    evaluation = codec.evaluation_from_proto(msg)
    assert codec.evaluation_to_proto(evaluation).SerializeToString() == msg.SerializeToString()

    problem = evaluation_problem(evaluation)

    if problem is None:
        assert 1 <= evaluation.tokens <= MAX_TOKEN_COUNT
        for loss, ppl in (
            (evaluation.base_loss, evaluation.base_perplexity),
            (evaluation.sovereign_loss, evaluation.sovereign_perplexity),
        ):
            assert 0 <= loss <= MAX_HELDOUT_LOSS
            assert math.isfinite(ppl) and math.isclose(ppl, math.exp(loss), rel_tol=1e-9)
    else:
        assert problem.startswith("evaluation ") and len(problem) <= MAX_MESSAGE_CHARS
