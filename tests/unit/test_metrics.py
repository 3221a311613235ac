"""The metrics each server keeps: counted from round results and cycles, the weight-stream
bytes counted where tensor streams cross, and served over HTTP from a registry of its own."""

from __future__ import annotations

import socket
import urllib.request
from dataclasses import dataclass, field

import pytest
import torch

from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.errors import UserError
from tapestry.observe.heldout import HeldOutLosses, heldout_losses
from tapestry.observe.metrics import CoordinatorMetrics, MetricsServer, NodeMetrics
from tapestry.wire.tensor_stream import StateAssembler, receive_state, send_state

from .test_round_report import recorded_journal


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


@dataclass(frozen=True)
class _Evaluation:
    base_loss: float
    sovereign_loss: float


@dataclass(frozen=True)
class _Contribution:
    metrics: dict[str, float] = field(default_factory=dict)
    evaluation: _Evaluation | None = None


def test_a_node_records_its_latest_cycle_and_its_losses() -> None:
    metrics = NodeMetrics()
    metrics.trained(3, _Contribution({"loss": 2.5}, _Evaluation(3.25, 2.75)))
    metrics.cycle_ended("completed", 1.5)
    metrics.cycle_ended("busy")

    def value(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, labels)

    assert value("tapestry_last_round") == 3
    assert value("tapestry_train_loss") == 2.5
    assert value("tapestry_heldout_loss", model="base") == 3.25
    assert value("tapestry_heldout_loss", model="sovereign") == 2.75
    assert value("tapestry_cycles_total", outcome="completed") == 1
    assert value("tapestry_cycles_total", outcome="busy") == 1
    assert value("tapestry_cycle_duration_seconds_sum") == 1.5


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
    coordinator, node = CoordinatorMetrics(), NodeMetrics()
    coordinator.rounds.labels(outcome="committed").inc()
    server = MetricsServer("127.0.0.1:0", node.registry)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as got:
            text = got.read().decode()
    finally:
        server.close()
    assert "# TYPE tapestry_cycles_total counter" in text
    assert "tapestry_rounds_total" not in text  # the coordinator's registry is another one
    assert "process_resident_memory_bytes" in text


def test_a_metrics_address_in_use_is_refused_naming_the_option() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UserError) as refused:
            MetricsServer(f"127.0.0.1:{port}", NodeMetrics().registry)
    assert str(refused.value) == (
        f"cannot serve metrics on 127.0.0.1:{port}: Address already in use; choose another "
        "address with --metrics-listen HOST:PORT (port 0 picks a free port)"
    )
