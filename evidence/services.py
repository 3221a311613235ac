"""The local consortium for N rounds, then every model on every held-out split.

Naming, precisely: ``base_heldout_loss`` of round *r* is the base **committed by round r**
(fetched with ``GetBase`` right after it), scored here on each split. The nodes' own
numbers (``evaluation.base_loss`` in round *r*) measure the base they *received*, the one
committed by round *r − 1*; they are kept as ``received_base_heldout_loss`` and must agree
with the previous round's ``base_heldout_loss``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evidence import claims
from evidence.governance import validation_from_pb
from evidence.heldout import HeldOutScorer, Member, member
from evidence.settings import EvidenceSettings
from tapestry.config import ConsortiumConfig, NodeConfig, load_config
from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.demo import DEMO_NODES, DEMO_POLICY
from tapestry.demo.launcher import LocalConsortium, LocalNodeSpec
from tapestry.errors import UserError
from tapestry.state_files import load_state
from tapestry.training.consortium.models.spec import ModelSpec

Losses = dict[str, float]  # jurisdiction -> held-out loss


class EvidenceError(UserError):
    """The run cannot start as asked; the message says why and what to do."""


@dataclass
class ServiceRun:
    members: list[Member]
    spec: ModelSpec
    rounds: list[pb.ConsortiumRoundResult] = field(default_factory=list)
    base_loss: list[Losses] = field(default_factory=list)  # index r: the base after round r
    received_loss: list[dict[str, float]] = field(default_factory=list)  # as nodes reported
    cross_eval: dict[str, Losses] = field(default_factory=dict)
    seconds_per_round: list[float] = field(default_factory=list)

    def rounds_json(self) -> list[dict[str, Any]]:
        rows = []
        for r in range(1, len(self.base_loss)):
            validation = validation_from_pb(self.rounds[r - 1])
            rows.append(
                {
                    "round": r,
                    "base_heldout_loss": self.base_loss[r],
                    "received_base_heldout_loss": self.received_loss[r - 1],
                    "seconds": self.seconds_per_round[r - 1],
                    "fallback": claims.fallback(validation),
                    "validation": validation,
                }
            )
        return rows


def demo_nodes(settings: EvidenceSettings) -> list[LocalNodeSpec]:
    """The demo's three nodes with the run's training settings."""
    return [
        LocalNodeSpec(n.node_id, n.jurisdiction, n.quality_score, n.corpus, dict(settings.training))
        for n in DEMO_NODES
    ]


def run_services(
    settings: EvidenceSettings, workdir: Path, say: Callable[[str], None]
) -> ServiceRun:
    """Start the coordinator and the three demo nodes (processes, mutual TLS), run
    ``settings.rounds`` rounds over gRPC, then score every model on every split."""
    if workdir.exists():
        raise EvidenceError(
            f"{workdir} exists (an earlier run's consortium): give a new OUT_DIR or remove it"
        )
    consortium = LocalConsortium(
        workdir,
        demo_nodes(settings),
        consortium_id="tapestry-evidence",
        seed=settings.seed,
        model=settings.model,
        policy=DEMO_POLICY,
    )
    with consortium:
        # The consortium's model: the nodes take it from the coordinator at their session's
        # opening, so their files do not repeat it; each member's twin is given it here.
        spec = load_config(consortium.consortium_config_path, ConsortiumConfig).model
        # The files the nodes read: their split is rebuilt from them, by their function.
        members = [
            member(
                load_config(consortium.node_config_path(n.node_id), NodeConfig).model_copy(
                    update={"model": spec}
                )
            )
            for n in consortium.nodes
        ]
        scorer = HeldOutScorer(spec, members, settings.seed)
        run = ServiceRun(members, spec)
        with consortium.client() as client:
            _, state = client.get_base()  # a new consortium's: round 0
            round0_state = state
            run.base_loss.append(scorer.losses(state))
            say(f"round 0 base: {_show(run.base_loss[0])}")
            for _ in range(settings.rounds):
                started = time.monotonic()
                result = client.run_round()
                run.seconds_per_round.append(time.monotonic() - started)
                run.rounds.append(result)
                run.received_loss.append(_received(result, members))
                number, state = client.get_base()
                run.base_loss.append(scorer.losses(state))
                say(
                    f"round {number}: accepted {', '.join(result.accepted_nodes) or '-'}, "
                    f"{claims.fallback(validation_from_pb(result))}, "
                    f"{run.seconds_per_round[-1]:.1f} s; base after it: {_show(run.base_loss[-1])}"
                )
        run.cross_eval["base"] = run.base_loss[-1]
        run.cross_eval["round0"] = scorer.losses(round0_state)
        for m in members:
            run.cross_eval[m.node_id] = scorer.losses(
                sovereign_state(consortium.node_data_dir(m.node_id))
            )
    return run


def sovereign_state(data_dir: Path) -> dict[str, Any]:
    """The node's newest stored sovereign model (its own disk: visible in the local demo)."""
    rounds = sorted((data_dir / "artifacts").glob("round-[0-9][0-9][0-9][0-9][0-9][0-9]"))
    if not rounds:
        raise FileNotFoundError(f"{data_dir}: no stored sovereign model")
    state, _ = load_state(rounds[-1] / "model.safetensors")
    return state


def _received(result: pb.ConsortiumRoundResult, members: list[Member]) -> dict[str, float]:
    place = {m.node_id: m.jurisdiction for m in members}
    return {
        place.get(c.node_id, c.node_id): c.evaluation.base_loss
        for c in result.contributions
        if c.HasField("evaluation")
    }


def _show(losses: Losses) -> str:
    return ", ".join(f"{place} {loss:.3f}" for place, loss in losses.items())
