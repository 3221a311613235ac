"""The metrics each server keeps: counted from round results and cycles, the weight-stream
bytes counted where tensor streams cross, and served over HTTP from a registry of its own."""

from __future__ import annotations

import socket
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry

from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.errors import UserError
from tapestry.node.artifacts import ArtifactStore
from tapestry.observe.heldout import HeldOutLosses, heldout_losses
from tapestry.observe.metrics import (
    CoordinatorMetrics,
    MetricsServer,
    NodeMetrics,
    restore_coordinator_metrics,
    restore_node_metrics,
)
from tapestry.training.consortium.messages import HeldOutEvaluation, SovereignModelArtifact
from tapestry.wire.tensor_stream import StateAssembler, receive_state, send_state

from .test_round_report import recorded_journal

MEMBERS = ["vietnam", "switzerland", "india", "brazil", "kenya"]  # kenya: in no round


def _samples(registry: CollectorRegistry) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample the registry would serve, by name and labels."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in registry.collect()
        for s in family.samples
    }


def _names(registry: CollectorRegistry, prefix: str = "tapestry_") -> set[str]:
    return {name for name, _ in _samples(registry) if name.startswith(prefix)}


def test_the_coordinator_counts_every_journal_entry_by_outcome() -> None:
    metrics = CoordinatorMetrics()
    for result in recorded_journal(evaluated=False):
        metrics.round_recorded(result)
    metrics.round_failed(3.0)

    def value(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, labels)

    assert value("tapestry_rounds_total", outcome="committed") == 3
    assert value("tapestry_rounds_total", outcome="aborted") == 1
    assert value("tapestry_rounds_total", outcome="rolled_back") == 1
    assert value("tapestry_rounds_total", outcome="failed") == 1
    assert value("tapestry_round_duration_seconds_count") == 1
    assert value("tapestry_base_round") == 5
    assert value("tapestry_node_failures_total", node="brazil") == 1
    assert value("tapestry_node_failures_total", node="india") == 1
    assert value("tapestry_contributions_total", node="vietnam", outcome="accepted") == 3
    assert value("tapestry_contributions_total", node="india", outcome="rejected") == 1
    assert value("tapestry_node_weight", node="switzerland") == 0.3
    assert value("tapestry_member_train_loss", node="vietnam") == pytest.approx(5.5)
    # No member reported a held-out evaluation: the gauge is absent, not 0.
    assert value("tapestry_member_heldout_loss", node="vietnam", model="base") is None


@dataclass(frozen=True)
class _Evaluation:
    base_loss: float
    sovereign_loss: float


@dataclass(frozen=True)
class _Contribution:
    metrics: dict[str, float] = field(default_factory=dict)
    evaluation: _Evaluation | None = None


def test_a_restarted_coordinator_starts_every_counter_at_its_journals_count() -> None:
    journal = recorded_journal()
    restarted = CoordinatorMetrics()
    restore_coordinator_metrics(restarted, [pb.RoundRecord(result=r) for r in journal], MEMBERS)
    uninterrupted = CoordinatorMetrics()
    for result in journal:
        uninterrupted.round_recorded(result)

    def value(name: str, **labels: str) -> float | None:
        return restarted.registry.get_sample_value(name, labels)

    assert value("tapestry_rounds_total", outcome="committed") == 3
    assert value("tapestry_rounds_total", outcome="aborted") == 1
    assert value("tapestry_rounds_total", outcome="rolled_back") == 1
    assert value("tapestry_rounds_total", outcome="failed") == 0  # the journal records none
    assert value("tapestry_base_round") == 5
    assert value("tapestry_base_info", sha256=journal[-1].shared_base_sha256) == 1
    assert value("tapestry_contributions_total", node="vietnam", outcome="accepted") == 3
    assert value("tapestry_node_failures_total", node="switzerland") == 1
    # A member the journal never names is counted from start-up, at 0.
    assert value("tapestry_node_failures_total", node="kenya") == 0
    assert value("tapestry_contributions_total", node="kenya", outcome="accepted") == 0
    assert value("tapestry_node_weight", node="kenya") is None  # never weighed: absent
    # Every series the journal can tell equals the one of the process that recorded it
    # (the duration histogram only counts what this process timed).
    replayed = CoordinatorMetrics()
    restore_coordinator_metrics(replayed, [pb.RoundRecord(result=r) for r in journal], [])
    assert _journalled(replayed.registry) == _journalled(uninterrupted.registry)


def _journalled(registry: CollectorRegistry) -> dict[tuple[str, frozenset], float]:
    return {
        key: value
        for key, value in _samples(registry).items()
        if key[0].startswith("tapestry_")
        and not key[0].startswith("tapestry_round_duration_seconds")
        and not key[0].endswith("_created")  # the time the series was made
    }


def test_a_coordinator_exports_its_round_counters_before_any_round() -> None:
    metrics = CoordinatorMetrics()
    restore_coordinator_metrics(metrics, [], MEMBERS)
    samples = _samples(metrics.registry)

    for outcome in ("committed", "aborted", "failed", "rolled_back"):
        assert samples[("tapestry_rounds_total", frozenset({("outcome", outcome)}))] == 0
    assert samples[("tapestry_node_failures_total", frozenset({("node", "india")}))] == 0
    # Gauges no round has set are absent, not 0.
    assert not _names(metrics.registry) & {
        "tapestry_base_info",
        "tapestry_node_weight",
        "tapestry_member_train_loss",
        "tapestry_member_heldout_loss",
    }


def test_the_base_digest_is_one_series_the_base_in_force() -> None:
    metrics = CoordinatorMetrics()
    first, second = recorded_journal()[:2]
    metrics.round_recorded(first)
    metrics.round_recorded(second)
    digests = [k for k in _samples(metrics.registry) if k[0] == "tapestry_base_info"]
    assert digests == [("tapestry_base_info", frozenset({("sha256", second.shared_base_sha256)}))]
    assert first.shared_base_sha256 != second.shared_base_sha256


def test_a_node_records_its_latest_cycle_and_its_losses() -> None:
    metrics = NodeMetrics("vietnam")
    metrics.trained(3, _Contribution({"loss": 2.5}, _Evaluation(3.25, 2.75)))
    metrics.cycle_ended("completed", 1.5)
    metrics.cycle_ended("busy")

    def value(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, {"node": "vietnam", **labels})

    assert value("tapestry_last_round") == 3
    assert value("tapestry_train_loss") == 2.5
    assert value("tapestry_heldout_loss", model="base") == 3.25
    assert value("tapestry_heldout_loss", model="sovereign") == 2.75
    assert value("tapestry_cycles_total", outcome="completed") == 1
    assert value("tapestry_cycles_total", outcome="busy") == 1
    assert value("tapestry_cycles_total", outcome="failed") == 0
    assert value("tapestry_cycle_duration_seconds_sum") == 1.5


def test_every_series_a_node_serves_names_the_node() -> None:
    metrics = NodeMetrics("vietnam")
    metrics.trained(3, _Contribution({"loss": 2.5}, _Evaluation(3.25, 2.75)))
    samples = _samples(metrics.registry)

    assert {name for name, _ in samples} >= {
        "tapestry_last_round", "tapestry_train_loss", "tapestry_heldout_loss",
        "tapestry_cycles_total", "tapestry_bytes_sent_total", "process_resident_memory_bytes",
    }  # fmt: skip
    assert [k for k in samples if dict(k[1]).get("node") != "vietnam"] == []


def test_a_node_that_never_trained_exports_no_gauge() -> None:
    metrics = NodeMetrics("india")
    restore_node_metrics(metrics, None)
    assert not _names(metrics.registry) & {
        "tapestry_last_round",
        "tapestry_train_loss",
        "tapestry_heldout_loss",
    }
    assert (
        metrics.registry.get_sample_value(
            "tapestry_cycles_total", {"node": "india", "outcome": "completed"}
        )
        == 0
    )


def test_a_restarted_node_restores_its_gauges_from_its_newest_manifest(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    for round_num, loss in ((7, 3.5), (8, 3.25)):
        store.save(
            SovereignModelArtifact(
                "vietnam", "Vietnam", "continued_pretraining", {"w": torch.ones(2)},
                {"loss": loss}, round_num,
            )
        )  # fmt: skip
    store.record_evaluation(8, HeldOutEvaluation(4.5, 90.0, 4.0, 54.6, 123))

    metrics = NodeMetrics("vietnam")
    restore_node_metrics(metrics, ArtifactStore(tmp_path).newest_manifest())

    def value(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, {"node": "vietnam", **labels})

    assert value("tapestry_last_round") == 8
    assert value("tapestry_train_loss") == 3.25
    assert value("tapestry_heldout_loss", model="base") == 4.5
    assert value("tapestry_heldout_loss", model="sovereign") == 4.0
    assert store.get(8) is not None  # the manifest still reads as the artifact it was


def test_a_manifest_without_held_out_numbers_leaves_those_gauges_absent() -> None:
    metrics = NodeMetrics("vietnam")
    restore_node_metrics(metrics, {"round_num": 8, "metrics": {"loss": 3.25}})
    assert metrics.registry.get_sample_value("tapestry_last_round", {"node": "vietnam"}) == 8
    assert "tapestry_heldout_loss" not in _names(metrics.registry)


def test_held_out_losses_are_read_only_where_a_contribution_has_them() -> None:
    assert heldout_losses(_Contribution(evaluation=_Evaluation(1.0, 0.5))) == HeldOutLosses(1, 0.5)
    assert heldout_losses(_Contribution()) is None
    assert heldout_losses(pb.SovereignContribution(node_id="n")) is None  # unset (or no field)


def test_both_ends_of_a_tensor_stream_count_its_tensor_bytes() -> None:
    state = {"a": torch.arange(1000, dtype=torch.float32), "b": torch.ones(3, 7)}
    sent: list[int] = []
    received: list[int] = []
    stream = send_state(
        state,
        lambda c: pb.GetBaseResponse(chunk=c),
        lambda t: pb.GetBaseResponse(end=t),
        chunk_bytes=1024,
        on_bytes=sent.append,
    )
    receive_state(stream, "chunk", "end", StateAssembler(), on_bytes=received.append)
    assert sum(sent) == sum(received) == 1000 * 4 + 21 * 4
    assert max(sent) == 1024


def test_metrics_are_served_over_http_from_their_own_registry() -> None:
    coordinator, node = CoordinatorMetrics(), NodeMetrics("vietnam")
    coordinator.rounds.labels(outcome="committed").inc()
    server = MetricsServer("127.0.0.1:0", node.registry)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as got:
            text = got.read().decode()
    finally:
        server.close()
    assert "# TYPE tapestry_cycles_total counter" in text
    assert 'tapestry_cycles_total{node="vietnam",outcome="completed"} 0.0' in text
    assert "tapestry_rounds_total" not in text  # the coordinator's registry is another one
    assert 'process_resident_memory_bytes{node="vietnam"}' in text


def test_a_metrics_address_in_use_is_refused_naming_the_option() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UserError) as refused:
            MetricsServer(f"127.0.0.1:{port}", NodeMetrics("india").registry)
    assert str(refused.value) == (
        f"cannot serve metrics on 127.0.0.1:{port}: Address already in use; choose another "
        "address with --metrics-listen HOST:PORT (port 0 picks a free port)"
    )
