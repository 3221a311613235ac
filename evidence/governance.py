"""Governance in the evidence run: what member-validated commit did in each service round,
whether the base's held-out loss rose past the tolerance anyway (scored by the evidence, not
taken from the members), the same rounds without validation, and the issue's reversed
member under self-reported quality, measured quality and validation.

Validation is read from each round's result (``validation``: every step tried with its
scale, verdict, objections and the members' evaluations; the step committed; a lone
objector committed over). The rule's promise is then checked on the evidence's own scores
of each round's base on each jurisdiction's held-out split (the splits the members
evaluate on), so the check does not rest on the members' word.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from evidence import claims
from evidence.inprocess import HOSTILE, CoreRun, hostile_node, reference_node
from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.demo import DEMO_POLICY
from tapestry.training.consortium.governance.acceptance import AcceptancePolicy, Validation

Losses = dict[str, float]
# The public reference corpus of the measured-quality run: sentences written for this
# evidence in Vietnamese, German and Hindi on everyday topics, none taken from any member's
# corpus (the demo's corpora are the members' own, held-out lines included).
REFERENCE_CORPUS = Path(__file__).with_name("reference_corpus.txt")
REVERSED_SCALE = -9.9  # the reversed member: its honest delta times -9.9 ...
REVERSED_QUALITY = 1.0  # ... claiming quality 1.0


def validation_from_pb(result: pb.ConsortiumRoundResult) -> dict[str, Any] | None:
    """A service round's validation as ``evidence.json`` holds it (``None``: none ran)."""
    if not result.HasField("validation"):
        return None
    v = result.validation
    return {
        "rule": v.rule,
        "tolerance": v.tolerance,
        "max_halvings": v.max_halvings,
        "attempts": [_attempt(a.scale, a.dropped, a.accepted, a.objections, a.reason,
                              a.evaluations) for a in v.attempts],
        "probes": [_attempt(a.scale, a.dropped, a.accepted, a.objections, a.reason,
                            a.evaluations) for a in v.probes],
        "committed_scale": v.committed_scale if v.HasField("committed_scale") else None,
        "committed_over": list(v.committed_over),
        "dropped": v.dropped,
        "reason": v.reason,
    }  # fmt: skip


def validation_from_core(v: Validation | None) -> dict[str, Any] | None:
    """An in-process round's validation, in the same shape as :func:`validation_from_pb`."""
    if v is None:
        return None
    return {
        "rule": str(v.policy.rule),
        "tolerance": v.policy.tolerance,
        "max_halvings": v.policy.max_halvings,
        "attempts": [_attempt(a.scale, a.dropped, a.verdict.accepted, a.verdict.objections,
                              a.verdict.reason, a.evaluations) for a in v.attempts],
        "probes": [_attempt(a.scale, a.dropped, a.verdict.accepted, a.verdict.objections,
                            a.verdict.reason, a.evaluations) for a in v.probes],
        "committed_scale": v.scale,
        "committed_over": list(v.committed_over),
        "dropped": v.dropped,
        "reason": v.reason,
    }  # fmt: skip


def _attempt(
    scale: float,
    dropped: str,
    accepted: bool,
    objections: Sequence[str],
    reason: str,
    evaluations: Sequence[Any],
) -> dict[str, Any]:
    """One step tried (or probed), with each member's two losses."""
    return {
        "scale": scale,
        "dropped": dropped,
        "accepted": accepted,
        "objections": list(objections),
        "reason": reason,
        "evaluations": {
            e.node_id: {"base_loss": e.base_loss, "candidate_loss": e.candidate_loss}
            for e in evaluations
        },
    }


def validation_section(
    base_loss: Sequence[Losses],
    validations: Sequence[Mapping[str, Any] | None],
    nodes: Mapping[str, str],
    unvalidated: CoreRun | None,
) -> dict[str, Any]:
    """What validation did per round of the service run, the rises past the tolerance the
    evidence measured on each round's base, and (where run) the same rounds unvalidated."""
    tolerance = next(
        (v["tolerance"] for v in validations if v is not None), AcceptancePolicy().tolerance
    )
    rounds = []
    for r, v in enumerate(validations, 1):
        committed = _committed_attempt(v)
        rounds.append(
            {
                "round": r,
                "fallback": claims.fallback(v),
                "tries": 0 if v is None else len(v["attempts"]),
                "committed_scale": None if v is None else v["committed_scale"],
                "committed_over": [] if v is None else v["committed_over"],
                "reason": "" if v is None else v["reason"],
                "measured_change": {
                    place: base_loss[r][place] - base_loss[r - 1][place] for place in base_loss[r]
                },
                "members_change": {
                    nodes.get(node, node): e["candidate_loss"] - e["base_loss"]
                    for node, e in (committed or {}).get("evaluations", {}).items()
                },
            }
        )
    section: dict[str, Any] = {
        "rule": next((v["rule"] for v in validations if v is not None), ""),
        "tolerance": tolerance,
        "rounds": rounds,
        "rises_past_tolerance": claims.rises_past(base_loss, tolerance),
        "mean_per_round": [claims.mean_loss(b) for b in base_loss],
    }
    if unvalidated is not None:
        section["unvalidated"] = {
            **unvalidated.summary(),
            "rises_past_tolerance": claims.rises_past(unvalidated.base_loss, tolerance),
            "note": "the same policy, corpora, splits, model and seeds on the in-process "
            "core, acceptance off",
        }
    return section


def _committed_attempt(v: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    if v is None or v["committed_scale"] is None:
        return None
    attempts: list[Mapping[str, Any]] = v["attempts"]
    dropped = v.get("dropped", "")
    return next(
        a for a in attempts if (a["scale"], a.get("dropped", "")) == (v["committed_scale"], dropped)
    )


CoreRunner = Callable[..., CoreRun]

EVALUATED_FLOOR = 0.05
"""The quality floor of the evaluated-quality run: a contribution whose removal makes the
other members 0.3 nats better (with the default harm scale, 0.1) is refused."""


def reversed_member_section(
    core: CoreRunner,
    honest: Sequence[Any],
    like: Any,
    settings: Any,
    clean: Sequence[Losses],
    clean_validated: Sequence[Losses],
) -> dict[str, Any]:
    """The issue's reversed member (its honest delta x -9.9, claiming quality 1.0) with
    three honest members under the demo's policy (relative norm bound 10 on) for
    ``settings.poison_rounds`` rounds: (a) self-reported quality, (b) measured quality
    against a reference update on :data:`REFERENCE_CORPUS`, (c) member-validated commit,
    (d) the same with the drop-one fallback, (e) quality evaluated by the members (probes,
    validated). ``clean``/``clean_validated``: the honest members' bases without it, per
    round."""
    r = settings.poison_rounds
    hostile = hostile_node(like, REVERSED_SCALE, REVERSED_QUALITY)
    nodes = [*honest, hostile]
    spec = like.config.model
    measured_policy = {**DEMO_POLICY, "quality_floor": 0.0}
    runs = {
        "self_reported": (core("reversed self-reported", DEMO_POLICY, nodes, r), clean),
        "measured": (
            core(
                "reversed measured",
                measured_policy,
                nodes,
                r,
                reference=reference_node(spec, REFERENCE_CORPUS, settings.training, settings.seed),
            ),
            clean,
        ),
        "validated": (
            core("reversed validated", DEMO_POLICY, nodes, r, acceptance=AcceptancePolicy()),
            clean_validated,
        ),
        "validated_drop_one": (
            core(
                "reversed validated, drop one",
                DEMO_POLICY,
                nodes,
                r,
                acceptance=AcceptancePolicy(drop_one=True),
            ),
            clean_validated,
        ),
        "evaluated": (
            core(
                "reversed evaluated",
                {**DEMO_POLICY, "quality_floor": EVALUATED_FLOOR},
                nodes,
                r,
                acceptance=AcceptancePolicy(measure=True),
            ),
            clean_validated,
        ),
    }
    return {
        "rounds": r,
        "hostile_node": HOSTILE,
        "hostile_delta": f"{REVERSED_SCALE:g} x its own trained delta",
        "claimed_quality": REVERSED_QUALITY,
        "reference_corpus": REFERENCE_CORPUS.name,
        "measured_policy_note": "measured quality runs with quality_floor 0 and evaluated "
        f"quality with {EVALUATED_FLOOR:g}: the demo's floor (0.75) is a bar for claimed "
        "scores; measured scores are cosines, and an evaluated score of 0.05 is a harm of "
        "0.3 nats to the other members",
        "runs": {
            name: _reversed_run(run, base[: r + 1], AcceptancePolicy().tolerance)
            for name, (run, base) in runs.items()
        },
    }


def _reversed_run(run: CoreRun, clean: Sequence[Losses], tolerance: float) -> dict[str, Any]:
    poisoned = [claims.mean_loss(b) for b in run.base_loss]
    reference = [claims.mean_loss(b) for b in clean]
    harms = [claims.harm(p, c) for p, c in zip(poisoned[1:], reference[1:], strict=True)]
    return {
        **run.summary(),
        "clean_mean_heldout_loss": reference[-1],
        "clean_mean_per_round": reference,
        "harm": harms[-1],
        "harm_per_round": harms,
        "worst_harm": max(harms),
        "rises_past_tolerance": claims.rises_past(run.base_loss, tolerance),
        "per_round": [
            {
                "round": result.round_num,
                "hostile_weight": result.contribution_weights.get(HOSTILE, 0.0),
                "hostile_quality_weighed": result.quality_scores.get(HOSTILE),
                "hostile_rejected": result.rejection_reasons.get(HOSTILE, "")
                or result.failed_nodes.get(HOSTILE, ""),
                "quality_weighed": dict(result.quality_scores),
                "quality_sources": {k: str(v) for k, v in result.quality_sources.items()},
                "weights": dict(result.contribution_weights),
                "fallback": claims.fallback(validation_from_core(result.validation)),
                "mean_heldout_loss": statistics.fmean(run.base_loss[i + 1].values()),
            }
            for i, result in enumerate(run.results)
        ],
    }
