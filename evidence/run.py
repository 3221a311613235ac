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
    if settings.experiments:
        evidence.update(_experiments(settings, service, say))
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
) -> dict[str, Any]:
    spec = service.spec
    scorer = HeldOutScorer(spec, service.members, settings.seed)
    honest = [NormRecorder(honest_node(m)) for m in service.members]

    def core(label: str, policy: dict[str, Any], nodes: list[Any], rounds: int) -> CoreRun:
        return run_core(spec, policy, nodes, scorer, rounds, settings.seed, say, label)

    fedavg = CoreRun(service.base_loss, [list(r.accepted_nodes) for r in service.rounds])
    strategies = {
        "fedavg": fedavg,
        "diloco": core("diloco", {**DEMO_POLICY, "strategy": "diloco"}, honest, settings.rounds),
        "median": core("median", {**DEMO_POLICY, "strategy": "median"}, honest, settings.rounds),
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
        clean = [claims.mean_loss(b) for b in strategies[clean_name].base_loss[: r + 1]]
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
    return {
        "strategies": {
            name: {**run.summary(), "rounds": len(run.base_loss) - 1}
            for name, run in strategies.items()
        },
        "strategies_note": "fedavg is the service run; diloco and median the in-process core "
        "(same corpora, splits, model, seeds, policy)",
        "poisoning": poisoning,
    }


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


def _cpus() -> int:
    return len(os.sched_getaffinity(0))
