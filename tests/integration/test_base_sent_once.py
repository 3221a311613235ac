"""A node that already holds the round's base (by digest) is not sent it again, and trains
from exactly that base."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import CORPORA, POLICY

pytestmark = pytest.mark.slow  # whole consortia of training processes


def base_bytes_sent(url: str) -> float:
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "tapestry_bytes_sent_total" and sample.labels.get("what") == "base"
    )


def test_an_unchanged_base_is_not_sent_again_to_nodes_that_hold_it(consortium_factory) -> None:
    # Every score is under the floor: nothing is integrated, so round 2's base is round 1's.
    consortium = consortium_factory(policy={**POLICY, "quality_floor": 0.95}, metrics=True)
    url = consortium.metrics_url("coordinator")
    model_bytes = 4 * (256 * 32 + 32 * 256 + 256)
    with consortium.client() as client:
        first = client.run_round()
        after_first = base_bytes_sent(url)
        second = client.run_round()
    assert after_first == len(CORPORA) * model_bytes
    assert base_bytes_sent(url) == after_first  # round 2 sent no base
    for result in (first, second):
        assert sorted(result.rejected_nodes) == sorted(CORPORA)  # trained, then weighed
        assert not result.failed_nodes
        assert result.shared_base_sha256 == result.previous_base_sha256
    assert second.previous_base_sha256 == first.shared_base_sha256
