"""The whole evidence run: the services, the cross evaluation, the strategies and the
poisoned member; writes ``evidence.json``, ``report.png`` and ``report.html``."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from evidence import claims
from evidence.governance import reversed_member_section, validation_section
from evidence.heldout import HeldOutScorer
from evidence.inprocess import (
    HOSTILE,
    CoreRun,
    NormRecorder,
    honest_node,
    hostile_node,
    run_core,
)
from evidence.page import evidence_sections
from evidence.services import ServiceRun, run_services
from evidence.settings import EvidenceSettings
from tapestry.atomic_files import write_bytes, write_text
from tapestry.demo import DEMO_POLICY
from tapestry.observe.report_data import report_data
from tapestry.observe.report_figure import render_png
from tapestry.observe.report_page import HTML_NAME, PNG_NAME, render_html
from tapestry.training.consortium.governance.acceptance import AcceptancePolicy

JSON_NAME = "evidence.json"


def run_evidence(
    settings: EvidenceSettings, out_dir: Path, say: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run everything, write the three files under ``out_dir`` (the consortium's work
    folder is ``out_dir/consortium``) and return what ``evidence.json`` holds."""
    started = time.monotonic()
    out_dir.mkdir(parents=True, exist_ok=True)
    service = run_services(settings, out_dir / "consortium", say)
    nodes = {m.node_id: m.jurisdiction for m in service.members}
    evidence: dict[str, Any] = {
        "nodes": nodes,
        "rounds": service.rounds_json(),
        "round0_base_heldout_loss": service.base_loss[0],
        "cross_eval": service.cross_eval,
    }
    unvalidated = None
    if settings.experiments:
        experiments, unvalidated = _experiments(settings, service, say)
        evidence.update(experiments)
    evidence["validation"] = validation_section(
        service.base_loss, [r["validation"] for r in evidence["rounds"]], nodes, unvalidated
    )
    evidence["checks"] = _checks(evidence)
    evidence["run"] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": round(time.monotonic() - started, 1),
        "machine": f"{platform.machine()}, {_cpus()} CPUs, {platform.platform()}",
        "model": settings.model,
        "training": settings.training,
        "policy": DEMO_POLICY,
        "rounds": settings.rounds,
    }
    write_text(out_dir / JSON_NAME, json.dumps(evidence, indent=2) + "\n")
    data = report_data(service.rounds)
    # The journal knows the base of round r only from round r + 1's nodes; the last base is
    # scored here, by the same function on the same splits (rounds 0..N-1 agree exactly).
    data.base_loss = {
        place: {r: losses[place] for r, losses in enumerate(service.base_loss)}
        for place in nodes.values()
    }
    png = render_png(data)
    write_bytes(out_dir / PNG_NAME, png)
    page = render_html(data, png).replace(
        "</body></html>", evidence_sections(evidence) + "</body></html>"
    )
    write_text(out_dir / HTML_NAME, page)
    say(f"wrote {out_dir / JSON_NAME}, {out_dir / PNG_NAME}, {out_dir / HTML_NAME}")
    return evidence


def _experiments(
    settings: EvidenceSettings, service: ServiceRun, say: Callable[[str], None]
) -> tuple[dict[str, Any], CoreRun]:
    """The in-process runs, and the unvalidated fedavg run (the service run's policy with
    acceptance off) that the validation section compares with."""
    spec = service.spec
    scorer = HeldOutScorer(spec, service.members, settings.seed)
    honest = [NormRecorder(honest_node(m)) for m in service.members]

    def core(
        label: str, policy: dict[str, Any], nodes: list[Any], rounds: int, **kw: Any
    ) -> CoreRun:
        return run_core(spec, policy, nodes, scorer, rounds, settings.seed, say, label, **kw)

    # The service run validates (the consortium file's default); so do the strategies run
    # against it. The poisoning runs below do not: what contains the attack there is the
    # strategy or the clipping under test, each held against its own unvalidated clean run.
    validated = AcceptancePolicy()
    fedavg = CoreRun(service.base_loss, [list(r.accepted_nodes) for r in service.rounds])
    diloco, median = ({**DEMO_POLICY, "strategy": name} for name in ("diloco", "median"))
    strategies = {
        "fedavg": fedavg,
        "diloco": core("diloco", diloco, honest, settings.rounds, acceptance=validated),
        "median": core("median", median, honest, settings.rounds, acceptance=validated),
    }
    unvalidated = {
        "fedavg": core("fedavg unvalidated", DEMO_POLICY, honest, settings.rounds),
        "median": core("median unvalidated", median, honest, settings.poison_rounds),
    }
    norm = sorted(recorder.norms[1] for recorder in honest)[len(honest) // 2]
    hostile = hostile_node(service.members[0], settings.poison_scale)
    unbounded = {**DEMO_POLICY, "max_delta_norm_ratio": None}
    # name -> (policy settings over the unbounded policy, the clean run it is held against)
    variants: dict[str, tuple[dict[str, Any], str]] = {
        "fedavg": ({}, "fedavg"),
        "fedavg_clipped": ({"clip_delta_norm": norm}, "fedavg"),
        "median": ({"strategy": "median"}, "median"),
    }
    r = settings.poison_rounds
    poisoning: dict[str, Any] = {
        "rounds": r,
        "hostile_node": HOSTILE,
        "hostile_delta": f"{settings.poison_scale:g} x its own trained delta",
        "honest_round1_median_delta_norm": norm,
        "scale": settings.poison_scale,
        "clip_delta_norm": norm,
        "max_delta_norm_ratio": None,
        "runs": {},
    }
    for name, (extra, clean_name) in variants.items():
        run = core(f"poisoned {name}", {**unbounded, **extra}, [*honest, hostile], r)
        clean = [claims.mean_loss(b) for b in unvalidated[clean_name].base_loss[: r + 1]]
        poisoned = [claims.mean_loss(b) for b in run.base_loss]
        harms = [claims.harm(p, c) for p, c in zip(poisoned[1:], clean[1:], strict=True)]
        poisoning["runs"][name] = {
            **run.summary(),
            "clean_mean_heldout_loss": clean[-1],
            "clean_mean_per_round": clean,
            "harm": harms[-1],
            "harm_per_round": harms,
            "worst_harm": max(harms),
        }
    reversed_member = reversed_member_section(
        core,
        honest,
        service.members[0],
        settings,
        unvalidated["fedavg"].base_loss,
        service.base_loss,
    )
    return {
        "strategies": {
            name: {**run.summary(), "rounds": len(run.base_loss) - 1}
            for name, run in strategies.items()
        },
        "strategies_note": "fedavg is the service run; diloco and median the in-process core "
        "(same corpora, splits, model, seeds, policy, member-validated commit included)",
        "poisoning": poisoning,
        "reversed_member": reversed_member,
    }, unvalidated["fedavg"]


def _checks(evidence: dict[str, Any]) -> dict[str, Any]:
    by_round = [evidence["round0_base_heldout_loss"]] + [
        r["base_heldout_loss"] for r in evidence["rounds"]
    ]
    cross = evidence["cross_eval"]
    winners = claims.own_jurisdiction_winners(cross, evidence["nodes"])
    checks: dict[str, Any] = {
        "base_heldout_loss_falls_for_every_jurisdiction": claims.falls_for_every_jurisdiction(
            by_round
        ),
        "base_heldout_loss_falls_every_round": claims.falls_every_round(by_round),
        "sovereign_best_on_own_jurisdiction": winners,
        "each_sovereign_best_on_own_jurisdiction": all(winners.values()),
        "base_lowest_mean_across_jurisdictions": claims.base_lowest_mean(cross),
        "base_better_than_round0_everywhere": claims.better_everywhere(
            cross["base"], cross["round0"]
        ),
    }
    checks["validated_base_never_rises_past_tolerance"] = not evidence["validation"][
        "rises_past_tolerance"
    ]
    if "unvalidated" in evidence["validation"]:
        checks["unvalidated_base_never_rises_past_tolerance"] = not evidence["validation"][
            "unvalidated"
        ]["rises_past_tolerance"]
    checks.update(_reversed_member_checks(evidence.get("reversed_member")))
    poisoning = evidence.get("poisoning")
    if poisoning is not None:
        runs = poisoning["runs"]
        # The worst round counts: a defence that lets one round's base be wrecked and then
        # recovers has not contained the attack.
        undefended = runs["fedavg"]["worst_harm"]
        checks["poison_visibly_harms_fedavg"] = claims.visibly_harmed(undefended)
        checks["clipping_contains_poison"] = claims.contained(
            runs["fedavg_clipped"]["worst_harm"], undefended
        )
        checks["median_contains_poison"] = claims.contained(
            runs["median"]["worst_harm"], undefended
        )
    return checks


def _reversed_member_checks(section: dict[str, Any] | None) -> dict[str, bool]:
    """The issue's reversed member under self-reported quality, measured quality and
    validation: whether it visibly harms the honest members (worst round), whether it ever
    got weight, whether any honest member's loss rose past the tolerance."""
    if section is None:
        return {}
    runs = section["runs"]
    measured = runs["measured"]["per_round"]
    return {
        "reversed_member_harms_under_self_reported_quality": claims.visibly_harmed(
            runs["self_reported"]["worst_harm"]
        ),
        "reversed_member_harmless_under_measured_quality": not claims.visibly_harmed(
            runs["measured"]["worst_harm"]
        ),
        "measured_quality_gives_reversed_member_no_weight": all(
            row["hostile_weight"] == 0.0 for row in measured
        ),
        "reversed_member_harmless_under_validation": not claims.visibly_harmed(
            runs["validated"]["worst_harm"]
        ),
        "validation_keeps_honest_losses_within_tolerance_against_reversed_member": not runs[
            "validated"
        ]["rises_past_tolerance"],
        "reversed_member_harmless_under_validation_with_drop_one": not claims.visibly_harmed(
            runs["validated_drop_one"]["worst_harm"]
        ),
        "drop_one_leaves_the_reversed_member_out_every_round": all(
            row["hostile_weight"] == 0.0 for row in runs["validated_drop_one"]["per_round"]
        ),
        "reversed_member_harmless_under_evaluated_quality": not claims.visibly_harmed(
            runs["evaluated"]["worst_harm"]
        ),
        "evaluated_quality_gives_reversed_member_no_weight": all(
            row["hostile_weight"] == 0.0 for row in runs["evaluated"]["per_round"]
        ),
    }


def _cpus() -> int:
    return len(os.sched_getaffinity(0))
