"""A round whose deltas travel as int8 blocks, through real coordinator and node processes
on 127.0.0.1: the bytes on the wire, counted by both ends, and the committed base, within
the encoding's bound of the exact round's."""

from __future__ import annotations

import math
import urllib.request

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from tapestry.training.consortium import ModelSpec
from tapestry.wire.delta_encoding import INT8_BLOCK, DeltaEncoding, error_bound

from .conftest import CORPORA, core_node

pytestmark = pytest.mark.slow  # whole consortia of training processes

NODES = list(CORPORA)
# tiny-causal, vocab 256, hidden 32: embedding and lm_head weights (256 x 32) and bias (256)
TENSOR_NUMELS = [256 * 32, 256 * 32, 256]
FLOAT32_BYTES = 4 * sum(TENSOR_NUMELS)
INT8_BYTES = sum(n + 4 * math.ceil(n / INT8_BLOCK) for n in TENSOR_NUMELS)


def _bytes_counted(url: str, name: str, what: str, peer: str) -> float:
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            # a node's series also name the node
            if (
                sample.name == name
                and {"what": what, "peer": peer}.items() <= sample.labels.items()
            ):
                return float(sample.value)
    raise AssertionError(f"{url} has no {name}{{what={what!r}, peer={peer!r}}}")


def test_an_int8_round_moves_the_deltas_in_3_5x_fewer_bytes_within_the_bound(
    consortium_factory,
) -> None:
    consortium = consortium_factory(
        settings={"delta_encoding": "int8_block"}, metrics=True, tls=False
    )
    with consortium.client() as client:
        _, before = client.get_base()
        result = client.run_round()
        _, served = client.get_base()
    assert sorted(result.accepted_nodes) == sorted(NODES)

    coordinator = consortium.metrics_url("coordinator")
    for node_id in NODES:
        received = _bytes_counted(coordinator, "tapestry_bytes_received_total", "delta", node_id)
        sent = _bytes_counted(
            consortium.metrics_url(node_id), "tapestry_bytes_sent_total", "delta", "coordinator"
        )
        assert received == sent == INT8_BYTES
        assert FLOAT32_BYTES / received >= 3.5
        # The base still travels raw and exact.
        assert _bytes_counted(coordinator, "tapestry_bytes_sent_total", "base", node_id) == (
            FLOAT32_BYTES
        )

    # Each node's exact delta, as the in-process core computes it from the same seeds and
    # corpora: the served base is base + sum w_i * decoded delta_i, so it lies within
    # sum w_i * bound_i (plus float32 rounding of the sum) of base + sum w_i * delta_i.
    expected = {name: tensor.clone() for name, tensor in before.items()}
    allowed = {
        name: torch.zeros(tensor.numel(), dtype=torch.float64) for name, tensor in before.items()
    }
    for node_id in NODES:
        node = core_node(consortium, node_id, ModelSpec())
        delta = node.run_sovereign_cycle(1, before).contribution.weight_delta
        weight = result.contribution_weights[node_id]
        for name, values in delta.items():
            expected[name] += weight * values
            allowed[name] += weight * error_bound(values, DeltaEncoding.INT8_BLOCK)
    moved = 0.0
    for name, tensor in expected.items():
        off = (served[name].double() - tensor.double()).abs().reshape(-1)
        slack = 2.0**-20 * (tensor.double().abs().reshape(-1) + 1)
        assert bool((off <= allowed[name] + slack).all()), name
        moved = max(moved, float((served[name] - before[name]).abs().max()))
    assert moved > 0  # the round did change the base
