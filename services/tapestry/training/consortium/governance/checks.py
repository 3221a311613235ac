"""The checks every number, name and mapping a member sends must pass before it is weighed,
journaled or shown (DESIGN §5): each returns why a value is out of bounds, naming the bound
from :mod:`~tapestry.training.consortium.governance.limits` without echoing the input, or
``None``."""

from __future__ import annotations

import math
from collections.abc import Mapping

from tapestry.errors import quoted
from tapestry.limits import (
    MAX_HELDOUT_LOSS,
    MAX_METRICS,
    MAX_NAME_CHARS,
    MAX_PROGRESS_LOSS,
    MAX_REASON_CHARS,
    MAX_STATE_BYTES,
    MAX_TENSOR_COUNT,
    MAX_TOKEN_COUNT,
    MAX_TRAINING_STEPS,
    PERPLEXITY_RELATIVE_TOLERANCE,
)
from tapestry.training.consortium.messages import HeldOutEvaluation
from tapestry.training.consortium.progress import TRANSFERS, CycleProgress

__all__ = [
    "bounded_text",
    "evaluation_problem",
    "metrics_problem",
    "name_problem",
    "progress_problem",
    "quoted",
]


def bounded_text(text: str, limit: int = MAX_REASON_CHARS) -> str:
    """``text`` cut to ``limit`` characters, saying how long it was."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… (cut from {len(text)} characters)"


def metrics_problem(metrics: object) -> str | None:
    """Why ``metrics`` is not a small mapping of short names to finite numbers, or None."""
    if not isinstance(metrics, Mapping):
        return f"metrics must be a mapping, got {type(metrics).__name__}"
    if len(metrics) > MAX_METRICS:
        return f"{len(metrics)} metrics, more than MAX_METRICS = {MAX_METRICS}"
    for name, value in metrics.items():
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS:
            return f"a metric name is not a string of 1 to MAX_NAME_CHARS = {MAX_NAME_CHARS}"
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"metric {name!r} is a {type(value).__name__}, not a number"
        if not math.isfinite(value):
            return f"metric {name!r} is {value}, not a finite number"
    return None


def name_problem(field: str, value: object) -> str | None:
    """Why ``value`` is not a string of 1 to :data:`MAX_NAME_CHARS` characters, or None."""
    if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME_CHARS:
        return f"{field} must be a string of 1 to MAX_NAME_CHARS = {MAX_NAME_CHARS} characters"
    return None


def evaluation_problem(evaluation: object) -> str | None:
    """Why a held-out evaluation is not ``None`` or a :class:`HeldOutEvaluation` of losses in
    ``[0, MAX_HELDOUT_LOSS]`` whose perplexities are ``exp`` of them, over 1 to
    :data:`MAX_TOKEN_COUNT` tokens; None when it is."""
    if evaluation is None:
        return None
    if not isinstance(evaluation, HeldOutEvaluation):
        return f"evaluation must be a HeldOutEvaluation, got {type(evaluation).__name__}"
    tokens = evaluation.tokens
    if isinstance(tokens, bool) or not isinstance(tokens, int) or not 0 < tokens <= MAX_TOKEN_COUNT:
        return f"evaluation tokens must be an integer in [1, MAX_TOKEN_COUNT = {MAX_TOKEN_COUNT}]"
    for which in ("base", "sovereign"):
        loss = getattr(evaluation, f"{which}_loss")
        ppl = getattr(evaluation, f"{which}_perplexity")
        for name, value in ((f"{which}_loss", loss), (f"{which}_perplexity", ppl)):
            if isinstance(value, bool) or not isinstance(value, int | float):
                return f"evaluation {name} is a {type(value).__name__}, not a number"
            if not math.isfinite(value):
                return f"evaluation {name} is {value}, not a finite number"
        if not 0 <= loss <= MAX_HELDOUT_LOSS:
            return (
                f"evaluation {which}_loss is {loss:.6g}, outside [0, MAX_HELDOUT_LOSS = "
                f"{MAX_HELDOUT_LOSS:g}] nats"
            )
        if not math.isclose(ppl, math.exp(loss), rel_tol=PERPLEXITY_RELATIVE_TOLERANCE):
            return (
                f"evaluation {which}_perplexity is {ppl:.6g}, not exp({which}_loss) = "
                f"{math.exp(loss):.6g}"
            )
    return None


def _transfer_problem(progress: CycleProgress) -> str | None:
    """Why the transfer numbers of ``progress`` are wrong: set outside a transfer, a total
    beyond MAX_STATE_BYTES or below the bytes so far, a rate that is not a finite number in
    [0, MAX_STATE_BYTES] bytes/s, resumes outside [0, MAX_TRAINING_STEPS]."""
    total, rate, resumes = progress.total_bytes, progress.bytes_per_s, progress.resumes
    if progress.phase not in TRANSFERS:
        if total or rate or resumes:
            return f"progress of phase {progress.phase.value!r} carries transfer numbers"
        return None
    if isinstance(total, bool) or not isinstance(total, int) or not 0 <= total <= MAX_STATE_BYTES:
        return f"progress total_bytes must be an integer in [0, {MAX_STATE_BYTES}]"
    if total and progress.state_bytes > total:
        return f"progress of {progress.state_bytes} bytes of {total}"
    if isinstance(rate, bool) or not isinstance(rate, int | float):
        return f"progress bytes_per_s is a {type(rate).__name__}, not a number"
    if not math.isfinite(rate) or not 0 <= rate <= MAX_STATE_BYTES:
        return f"progress bytes_per_s must be a finite number in [0, {MAX_STATE_BYTES}]"
    if isinstance(resumes, bool) or not isinstance(resumes, int) or not resumes >= 0:
        return "progress resumes must be a non-negative integer"
    if resumes > MAX_TRAINING_STEPS:
        return f"progress resumes must be at most {MAX_TRAINING_STEPS}"
    return None


def progress_problem(progress: object) -> str | None:
    """Why ``progress`` is not a :class:`CycleProgress` whose numbers are in range: a step
    in ``[0, total_steps]``, ``total_steps`` in ``[1, MAX_TRAINING_STEPS]`` and a finite loss
    in ``[0, MAX_PROGRESS_LOSS]`` when training (no step, total or loss otherwise), sizes and
    counts within :data:`MAX_STATE_BYTES` and :data:`MAX_TENSOR_COUNT`; None when it is."""
    if not isinstance(progress, CycleProgress):
        return f"progress must be a CycleProgress, got {type(progress).__name__}"
    numbers = {
        "step": (progress.step, MAX_TRAINING_STEPS),
        "total_steps": (progress.total_steps, MAX_TRAINING_STEPS),
        "state_bytes": (progress.state_bytes, MAX_STATE_BYTES),
        "tensor_count": (progress.tensor_count, MAX_TENSOR_COUNT),
    }
    for name, (value, bound) in numbers.items():
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= bound:
            return f"progress {name} must be an integer in [0, {bound}]"
    problem = _transfer_problem(progress)
    if problem is not None:
        return problem
    loss = progress.loss
    if progress.phase != "training":
        if progress.step or progress.total_steps or loss is not None:
            return f"progress of phase {progress.phase.value!r} carries a step, total or loss"
        return None
    if progress.total_steps < 1 or progress.step > progress.total_steps:
        return (
            f"progress step {progress.step} of {progress.total_steps}: a step must be in "
            f"[0, total_steps] and total_steps in [1, MAX_TRAINING_STEPS = {MAX_TRAINING_STEPS}]"
        )
    if loss is None:
        return None
    if isinstance(loss, bool) or not isinstance(loss, int | float):
        return f"progress loss is a {type(loss).__name__}, not a number"
    if not math.isfinite(loss) or not 0 <= loss <= MAX_PROGRESS_LOSS:
        return (
            f"progress loss {loss:.6g} at step {progress.step} is not a finite number in "
            f"[0, MAX_PROGRESS_LOSS = {MAX_PROGRESS_LOSS:g}] nats"
        )
    return None
