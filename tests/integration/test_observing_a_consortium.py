"""What an operator sees of a running consortium (mutual TLS, real processes): each
server's Prometheus endpoint, JSON logs, the base exported to safetensors, and the report
over ListRounds."""

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
from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.launcher import LocalConsortium
from tapestry.observe.heldout import heldout_losses
from tapestry.training.consortium.tensors import state_digest, tensor_bytes

from .conftest import CORPORA, POLICY, node_specs

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
        # Both ends of each link count the same bytes.
        assert _value(own, "tapestry_bytes_received_total", what="base", peer="coordinator") == sent
        assert _value(own, "tapestry_bytes_sent_total", what="delta", peer="coordinator") == sent
        assert _value(own, "tapestry_cycles_total", outcome="completed") == 1
        assert _value(own, "tapestry_cycle_duration_seconds_count") == 1
        assert _value(own, "tapestry_last_round") == 1
        loss = contributions[node].metrics["loss"]
        assert _value(own, "tapestry_train_loss") == loss
        assert _value(coordinator, "tapestry_member_train_loss", node=node) == loss
        losses = heldout_losses(contributions[node])  # once nodes evaluate on held-out text
        if losses is not None:
            assert _value(own, "tapestry_heldout_loss", model="base") == losses.base
            assert _value(own, "tapestry_heldout_loss", model="sovereign") == losses.sovereign
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
