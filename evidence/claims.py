"""The issue's claims, checked against an evidence run's numbers (pure functions).

Every check takes the plain dictionaries ``evidence.json`` holds, so a reader can re-check a
stored file. A claim holds strictly: a tie does not count as "better".
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

Losses = Mapping[str, float]  # jurisdiction -> held-out loss

# Poisoning: the hostile member "visibly harms" an integration when the base's mean held-out
# loss ends at least this many nats above the same integration without it; a defence
# "contains" it when what is left of the harm is at most CONTAINED_SHARE of fedavg's.
VISIBLE_HARM_NATS = 0.05
CONTAINED_SHARE = 0.25


def falls_for_every_jurisdiction(base_by_round: Sequence[Losses]) -> bool:
    """The last base's loss is below the first's (round 0) on every jurisdiction."""
    first, last = base_by_round[0], base_by_round[-1]
    return all(last[place] < first[place] for place in first)


def falls_every_round(base_by_round: Sequence[Losses]) -> bool:
    """Every round's base is below the previous one's on every jurisdiction."""
    return all(
        after[place] < before[place]
        for before, after in zip(base_by_round, base_by_round[1:], strict=False)
        for place in before
    )


def own_jurisdiction_winners(
    cross_eval: Mapping[str, Losses], nodes: Mapping[str, str]
) -> dict[str, bool]:
    """Per node: whether its sovereign model has the lowest loss of every model (base,
    round-0 base, the other sovereign models) on its own jurisdiction's split."""
    return {
        node: all(
            cross_eval[node][place] < losses[place]
            for row, losses in cross_eval.items()
            if row != node
        )
        for node, place in nodes.items()
    }


def mean_loss(losses: Losses) -> float:
    return statistics.fmean(losses.values())


def base_lowest_mean(cross_eval: Mapping[str, Losses]) -> bool:
    """The final base has the lowest mean loss across the jurisdictions of every model."""
    base = mean_loss(cross_eval["base"])
    return all(base < mean_loss(losses) for row, losses in cross_eval.items() if row != "base")


def better_everywhere(better: Losses, than: Losses) -> bool:
    return all(better[place] < than[place] for place in than)


def harm(poisoned: float, clean: float) -> float:
    """Nats of mean held-out loss the hostile member added."""
    return poisoned - clean


def visibly_harmed(excess: float) -> bool:
    return excess >= VISIBLE_HARM_NATS


def contained(excess: float, undefended_excess: float) -> bool:
    """The defence leaves at most :data:`CONTAINED_SHARE` of the undefended harm."""
    return excess <= CONTAINED_SHARE * undefended_excess


# Member-validated commit: what the fallback did in a round, and the evidence's own check of
# the rule's promise (no jurisdiction's held-out loss rises past the tolerance).


def fallback(validation: Mapping[str, Any] | None) -> str:
    """What validation did in one round, in words, from a round's ``validation`` as
    ``evidence.json`` holds it (``None``: the round ran none)."""
    if validation is None:
        return "not validated"
    probed = sum(1 for p in validation.get("probes", []) if p["dropped"])
    said = _tried(validation)
    return f"scored by probes without each of {probed} members; {said}" if probed else said


def _tried(validation: Mapping[str, Any]) -> str:
    tries = len(validation["attempts"])
    scale = validation["committed_scale"]
    if scale is None:
        return f"not committed after {tries} tries (base unchanged)"
    if validation.get("dropped"):
        at = f" at step {scale:g}" if scale != 1.0 else ""
        return f"committed without {validation['dropped']}{at} after {tries} tries"
    if validation["committed_over"]:
        over = ", ".join(validation["committed_over"])
        return f"committed the full step over the lone objection of {over} after {tries} tries"
    if tries == 1:
        return "committed the full step"
    return f"committed at step {scale:g} after {tries} tries"


def rises_past(base_by_round: Sequence[Losses], tolerance: float) -> list[dict[str, Any]]:
    """Every (round, jurisdiction) whose base's held-out loss rose by more than
    ``tolerance`` nats over the previous round's base (round r: index r)."""
    return [
        {
            "round": r,
            "jurisdiction": place,
            "before": before[place],
            "after": after[place],
            "rise": after[place] - before[place],
        }
        for r, (before, after) in enumerate(zip(base_by_round, base_by_round[1:], strict=False), 1)
        for place in before
        if after[place] - before[place] > tolerance
    ]
