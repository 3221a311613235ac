"""What an operator sees of a running consortium (mutual TLS, real processes): each
server's Prometheus endpoint (also after a restart), JSON logs, the base exported to
safetensors, and the report over ListRounds."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families
from safetensors import safe_open

from tapestry.cli import main as cli
from tapestry.config import NodeConfig, load_config
from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.coordinator.journal import read_records
from tapestry.demo.launcher import LocalConsortium
from tapestry.node.startup import build_node_server
from tapestry.observe.heldout import heldout_losses
from tapestry.observe.metrics import MetricsServer, NodeMetrics
from tapestry.training.consortium.tensors import state_digest, tensor_bytes

from .conftest import CORPORA, POLICY, node_specs

pytestmark = pytest.mark.slow  # whole consortia of training processes

NODES = list(CORPORA)
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def observed(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[LocalConsortium, pb.ConsortiumRoundResult]]:
    """A consortium serving metrics and logging JSON, after one round."""
    root = tmp_path_factory.mktemp("observed")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TAPESTRY_LOG_FORMAT", "json")  # the servers inherit the environment
        with LocalConsortium(root, node_specs(root), policy=POLICY, metrics=True) as consortium:
            with consortium.client() as client:
                result = client.run_round()
            yield consortium, result


def _scrape(url: str) -> tuple[str, Samples]:
    with urllib.request.urlopen(url, timeout=10) as reply:
        assert reply.headers["Content-Type"].startswith("text/plain")
        text = reply.read().decode()
    samples = {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    return text, samples


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def test_every_server_serves_its_named_metrics(observed) -> None:
    consortium, result = observed
    assert sorted(result.accepted_nodes) == sorted(NODES)
    _, coordinator = _scrape(consortium.metrics_url("coordinator"))
    model_bytes = 4 * (256 * 32 + 32 * 256 + 256)  # tiny-causal, float32

    assert _value(coordinator, "tapestry_rounds_total", outcome="committed") == 1
    assert _value(coordinator, "tapestry_round_duration_seconds_count") == 1
    assert _value(coordinator, "tapestry_base_round") == 1
    contributions = {c.node_id: c for c in result.contributions}
    for node in NODES:
        sent = _value(coordinator, "tapestry_bytes_sent_total", what="base", peer=node)
        received = _value(coordinator, "tapestry_bytes_received_total", what="delta", peer=node)
        assert sent == received == model_bytes
        assert (
            _value(coordinator, "tapestry_contributions_total", node=node, outcome="accepted") == 1
        )
        assert (
            _value(coordinator, "tapestry_node_weight", node=node)
            == (result.contribution_weights[node])
        )

        _, own = _scrape(consortium.metrics_url(node))
        mine = {"node": node}  # every series a node serves names it
        # Both ends of each link count the same bytes.
        assert (
            _value(own, "tapestry_bytes_received_total", what="base", peer="coordinator", **mine)
            == sent
        )
        assert (
            _value(own, "tapestry_bytes_sent_total", what="delta", peer="coordinator", **mine)
            == sent
        )
        assert _value(own, "tapestry_cycles_total", outcome="completed", **mine) == 1
        assert _value(own, "tapestry_cycle_duration_seconds_count", **mine) == 1
        assert _value(own, "tapestry_last_round", **mine) == 1
        loss = contributions[node].metrics["loss"]
        assert _value(own, "tapestry_train_loss", **mine) == loss
        assert _value(coordinator, "tapestry_member_train_loss", node=node) == loss
        losses = heldout_losses(contributions[node])  # once nodes evaluate on held-out text
        if losses is not None:
            assert _value(own, "tapestry_heldout_loss", model="base", **mine) == losses.base
            assert (
                _value(own, "tapestry_heldout_loss", model="sovereign", **mine) == losses.sovereign
            )
            assert (
                _value(coordinator, "tapestry_member_heldout_loss", node=node, model="sovereign")
                == losses.sovereign
            )


def test_metrics_carry_no_corpus_text_and_no_local_path(observed) -> None:
    consortium, _ = observed
    for name in ["coordinator", *NODES]:
        text, _ = _scrape(consortium.metrics_url(name))
        assert str(consortium.workdir) not in text
        assert "/tmp" not in text and "corpora" not in text
        for line in (line for lines in CORPORA.values() for line in lines):
            assert line[:12] not in text


def test_servers_log_json_lines_when_asked(observed) -> None:
    consortium, _ = observed
    records = [
        json.loads(line)
        for line in (consortium.workdir / "logs" / "coordinator.log").read_text().splitlines()
        if line.startswith("{")
    ]
    assert {"time", "level", "logger", "message"} <= set(records[0])
    assert any(r["message"].startswith("round 1 committed: accepted") for r in records)


def test_base_export_writes_the_served_base_bit_for_bit(observed, tmp_path: Path) -> None:
    consortium, result = observed
    out = tmp_path / "base.safetensors"
    args = ["base", "export", "--coordinator", consortium.coordinator_address, "--out", str(out)]
    env = consortium.cli_env()

    ran = CliRunner().invoke(cli, args, env=env)

    assert ran.exit_code == 0, ran.output
    assert ran.output == f"round 1 base ({result.shared_base_sha256[:12]}) written to {out}\n"
    with consortium.client() as client:
        round_num, served = client.get_base()
    with safe_open(str(out), framework="pt") as handle:
        metadata = handle.metadata()
        exported = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    assert round_num == 1 and sorted(exported) == sorted(served)
    for name, tensor in served.items():
        assert exported[name].dtype == tensor.dtype and exported[name].shape == tensor.shape
        assert bytes(tensor_bytes(exported[name])) == bytes(tensor_bytes(tensor))
    assert metadata["sha256"] == state_digest(exported) == result.shared_base_sha256
    assert metadata["round_num"] == "1"
    assert json.loads(metadata["model"])["architecture"] == "tiny-causal"

    again = CliRunner().invoke(cli, args, env=env)
    assert again.exit_code == 1
    assert f"{out} already exists; pass --force to replace it" in again.output
    assert CliRunner().invoke(cli, [*args, "--force", "--round", "1"], env=env).exit_code == 0
    initial = CliRunner().invoke(cli, [*args, "--force", "--round", "0"], env=env)
    assert initial.exit_code == 0, initial.output
    assert initial.output == f"round 0 base ({result.previous_base_sha256[:12]}) written to {out}\n"
    assert torch.equal(exported[sorted(exported)[0]], served[sorted(served)[0]])


def test_report_over_list_rounds(observed, tmp_path: Path) -> None:
    consortium, result = observed
    ran = CliRunner().invoke(
        cli,
        ["report", "--coordinator", consortium.coordinator_address, "--out", str(tmp_path)],
        env=consortium.cli_env(),
    )
    assert ran.exit_code == 0, ran.output
    assert (tmp_path / "report.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "<td>1</td><td>committed</td><td>3</td><td>0</td><td>0</td>" in html.replace(
        ' class="text"', ""
    )
    # Headed by the consortium its CA names, the model GetBase's header names, the policy.
    assert f"<h1>Tapestry consortium {consortium.consortium_id}: round 1</h1>" in html
    assert (
        f'<dl id="about"><dt>consortium</dt><dd>{consortium.consortium_id}</dd>'
        "<dt>model</dt><dd>tiny-causal: vocab 256, hidden 32</dd>"
        "<dt>policy</dt><dd>quality weighting, floor 0.75, cap 0.5, fedavg</dd></dl>"
    ) in html


def _gauges_at_zero(text: str) -> list[str]:
    """Every tapestry_ gauge sample reading 0: none should, in a consortium whose rounds all
    counted every node (a weight or a loss of 0 would be one never observed)."""
    return [
        f"{s.name}{s.labels}"
        for family in text_string_to_metric_families(text)
        if family.type == "gauge" and family.name.startswith("tapestry_")
        for s in family.samples
        if s.value == 0
    ]


def test_restarted_servers_export_what_their_data_directories_hold(tmp_path: Path) -> None:
    """Restart the coordinator (its process) and a node (in this process, over the stopped
    node's data directory): counters start at the journal's, gauges at the newest round's
    and the newest artifact's values, before any new round."""
    with LocalConsortium(tmp_path, node_specs(tmp_path), policy=POLICY, metrics=True) as consortium:
        with consortium.client() as client:
            client.run_round()
            client.run_round()
            client.roll_back_base(1)
        consortium.restart_coordinator()
        text, coordinator = _scrape(consortium.metrics_url("coordinator"))
        journal = [r.result for r in read_records(consortium.coordinator_data_dir / "rounds")]
        node = NODES[0]
        consortium.stop_node(node)
        restarted = _restart_node(consortium, node)

    assert [r.round_num for r in journal] == [1, 2, 3]
    assert _value(coordinator, "tapestry_rounds_total", outcome="committed") == 2
    assert _value(coordinator, "tapestry_rounds_total", outcome="rolled_back") == 1
    assert _value(coordinator, "tapestry_rounds_total", outcome="aborted") == 0
    assert _value(coordinator, "tapestry_rounds_total", outcome="failed") == 0
    assert _value(coordinator, "tapestry_base_round") == 3
    assert _value(coordinator, "tapestry_base_info", sha256=journal[-1].shared_base_sha256) == 1
    latest = {c.node_id: c for c in journal[1].contributions}  # round 2: the last trained
    for member in NODES:
        accepted = sum(member in r.accepted_nodes for r in journal)
        assert (
            _value(coordinator, "tapestry_contributions_total", node=member, outcome="accepted")
            == accepted
            == 2
        )
        assert _value(coordinator, "tapestry_node_failures_total", node=member) == 0
        assert (
            _value(coordinator, "tapestry_node_weight", node=member)
            == journal[1].contribution_weights[member]
        )
        assert (
            _value(coordinator, "tapestry_member_train_loss", node=member)
            == latest[member].metrics["loss"]
        )
    assert _value(coordinator, "tapestry_round_duration_seconds_count") == 0  # none timed yet
    assert _gauges_at_zero(text) == []

    text, own = restarted
    manifest = json.loads(
        (consortium.node_data_dir(node) / "artifacts" / "round-000002" / "manifest.json")
        .read_text(encoding="utf-8")
    )  # fmt: skip
    losses = heldout_losses(latest[node])
    assert losses is not None  # every node holds a line out
    assert manifest["evaluation"]["sovereign_loss"] == losses.sovereign
    assert _value(own, "tapestry_last_round", node=node) == manifest["round_num"] == 2
    assert _value(own, "tapestry_train_loss", node=node) == manifest["metrics"]["loss"]
    assert _value(own, "tapestry_train_loss", node=node) == latest[node].metrics["loss"]
    assert _value(own, "tapestry_heldout_loss", node=node, model="base") == losses.base
    assert _value(own, "tapestry_heldout_loss", node=node, model="sovereign") == losses.sovereign
    assert _value(own, "tapestry_cycles_total", node=node, outcome="completed") == 0
    assert [labels for _, labels in own if ("node", node) not in labels] == []
    assert _gauges_at_zero(text) == []


def _restart_node(consortium: LocalConsortium, node: str) -> tuple[str, Samples]:
    """Build node ``node``'s server over its data directory as `tapestry node serve` does,
    and scrape its metrics before any cycle."""
    config = load_config(consortium.node_config_path(node), NodeConfig)
    metrics = NodeMetrics(config.node_id)
    server, _, _ = build_node_server(
        config, "127.0.0.1:0", consortium.node_data_dir(node), metrics=metrics
    )
    served = MetricsServer("127.0.0.1:0", metrics.registry)
    try:
        return _scrape(f"http://127.0.0.1:{served.port}/metrics")
    finally:
        served.close()
        server.stop(None)
