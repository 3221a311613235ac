"""Prometheus metrics of the coordinator and of a node, and the endpoint that serves them.

Each server keeps its metrics in a registry of its own (never prometheus-client's global
one), so two servers in one process — the tests, an embedding application — never share a
count. The endpoint is prometheus-client's own HTTP server: plaintext, unauthenticated,
read-only. Bind it to a private interface (it is off unless ``--metrics-listen`` is given).

What a metric may carry is fixed here, by design: numbers, and as labels only node ids from
the consortium file, outcomes and stream names. Never corpus text, file paths or a peer's
free text (rejection reasons stay in the journal).

Bytes are the tensor bytes of the weight streams (the base out, deltas in), counted as each
chunk crosses (:data:`~tapestry.wire.tensor_stream.ByteCount`); gRPC and protobuf framing
add well under 1 % to them.
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import start_http_server
from prometheus_client.process_collector import ProcessCollector

from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.errors import UserError
from tapestry.observe.heldout import heldout_losses
from tapestry.wire.tensor_stream import ByteCount

# Rounds and cycles last from under a second (tests) to hours (a real model's training).
DURATION_BUCKETS_S = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400)
# What ``peer`` a coordinator names for a caller of GetBase (an operator, an exporter).
CLIENT_PEER = "client"
COORDINATOR_PEER = "coordinator"


def _bytes_counters(registry: CollectorRegistry) -> tuple[Counter, Counter]:
    """The same two counters on the coordinator and the nodes, so one query sums a link."""
    labels = ["what", "peer"]
    sent = Counter(
        "tapestry_bytes_sent", "Tensor bytes sent, by stream (base, delta) and peer.",
        labels, registry=registry,
    )  # fmt: skip
    received = Counter(
        "tapestry_bytes_received", "Tensor bytes received, by stream (base, delta) and peer.",
        labels, registry=registry,
    )  # fmt: skip
    return sent, received


class CoordinatorMetrics:
    """The coordinator's rounds, the weight streams to and from each node, each node's
    outcomes, and the losses members reported in the latest round."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.rounds = Counter(
            "tapestry_rounds",
            "Rounds by outcome: committed (with or without accepted nodes), aborted (quorum "
            "not met; recorded, base unchanged), failed (nothing recorded), rolled_back.",
            ["outcome"], registry=r,
        )  # fmt: skip
        self.round_duration = Histogram(
            "tapestry_round_duration_seconds",
            "Wall time of a round, from trigger to commit (or failure).",
            buckets=DURATION_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.base_round = Gauge(
            "tapestry_base_round", "Round number of the committed shared base.", registry=r
        )
        self.node_failures = Counter(
            "tapestry_node_failures",
            "Rounds in which a node failed (unreachable, refused, or a contribution that "
            "failed the checks).",
            ["node"], registry=r,
        )  # fmt: skip
        self.contributions = Counter(
            "tapestry_contributions",
            "Contributions the policy accepted (given weight) or rejected, by node.",
            ["node", "outcome"], registry=r,
        )  # fmt: skip
        self.node_weight = Gauge(
            "tapestry_node_weight", "The node's weight in the latest round.", ["node"], registry=r
        )
        self.train_loss = Gauge(
            "tapestry_member_train_loss",
            "Mean training loss the node reported in the latest round it contributed to.",
            ["node"], registry=r,
        )  # fmt: skip
        self.heldout_loss = Gauge(
            "tapestry_member_heldout_loss",
            "Held-out loss the node reported in the latest round it contributed to: of the "
            "base it received (model=base) and of its new sovereign model (model=sovereign).",
            ["node", "model"], registry=r,
        )  # fmt: skip
        self.bytes_sent, self.bytes_received = _bytes_counters(r)
        ProcessCollector(registry=r)  # memory, CPU, open files: no paths, no arguments

    def base_sent(self, peer: str) -> ByteCount:
        return self.bytes_sent.labels(what="base", peer=peer).inc

    def delta_received(self, peer: str) -> ByteCount:
        return self.bytes_received.labels(what="delta", peer=peer).inc

    def round_failed(self, seconds: float) -> None:
        self.rounds.labels(outcome="failed").inc()
        self.round_duration.observe(seconds)

    def round_recorded(self, result: pb.ConsortiumRoundResult) -> None:
        """Count a committed journal entry (a round, an aborted round or a rollback)."""
        self.base_round.set(result.round_num)
        if result.HasField("rolled_back_to"):
            self.rounds.labels(outcome="rolled_back").inc()
            return
        self.rounds.labels(outcome="aborted" if result.aborted_reason else "committed").inc()
        for node in result.failed_nodes:
            self.node_failures.labels(node=node).inc()
        for node in result.accepted_nodes:
            self.contributions.labels(node=node, outcome="accepted").inc()
        for node in result.rejected_nodes:
            self.contributions.labels(node=node, outcome="rejected").inc()
        for node in {*result.accepted_nodes, *result.rejected_nodes, *result.failed_nodes}:
            self.node_weight.labels(node=node).set(result.contribution_weights.get(node, 0.0))
        for contribution in result.contributions:
            _set_losses(
                contribution,
                self.train_loss.labels(node=contribution.node_id),
                self.heldout_loss.labels(node=contribution.node_id, model="base"),
                self.heldout_loss.labels(node=contribution.node_id, model="sovereign"),
            )


class NodeMetrics:
    """A node's cycles, its weight streams, and the losses of its latest cycle."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.cycles = Counter(
            "tapestry_cycles",
            "Sovereign cycles by outcome: completed (result sent, and the delta when the "
            "coordinator asked for it), failed (refused, failed or cut off), busy (refused: "
            "another cycle was running).",
            ["outcome"], registry=r,
        )  # fmt: skip
        self.cycle_duration = Histogram(
            "tapestry_cycle_duration_seconds",
            "Wall time of a cycle, from the first byte of the base to the delta's trailer (or "
            "to the coordinator's decision, when it did not want the delta).",
            buckets=DURATION_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.last_round = Gauge(
            "tapestry_last_round", "Round number of the latest cycle trained.", registry=r
        )
        self.train_loss = Gauge(
            "tapestry_train_loss", "Mean training loss of the latest cycle.", registry=r
        )
        self.heldout_loss = Gauge(
            "tapestry_heldout_loss",
            "Held-out loss of the latest cycle: of the base received (model=base) and of the "
            "new sovereign model (model=sovereign). Absent when the node holds nothing out.",
            ["model"], registry=r,
        )  # fmt: skip
        self.bytes_sent, self.bytes_received = _bytes_counters(r)
        ProcessCollector(registry=r)

    def base_received(self) -> ByteCount:
        return self.bytes_received.labels(what="base", peer=COORDINATOR_PEER).inc

    def delta_sent(self) -> ByteCount:
        return self.bytes_sent.labels(what="delta", peer=COORDINATOR_PEER).inc

    def cycle_ended(self, outcome: str, seconds: float | None = None) -> None:
        self.cycles.labels(outcome=outcome).inc()
        if seconds is not None:
            self.cycle_duration.observe(seconds)

    def trained(self, round_num: int, contribution: object) -> None:
        """Record a cycle's result (the core's ``SovereignContribution``)."""
        self.last_round.set(round_num)
        _set_losses(
            contribution,
            self.train_loss,
            self.heldout_loss.labels(model="base"),
            self.heldout_loss.labels(model="sovereign"),
        )


def _set_losses(contribution: object, train: Gauge, base: Gauge, sovereign: Gauge) -> None:
    metrics: Mapping[str, float] = getattr(contribution, "metrics", {})
    if "loss" in metrics:
        train.set(metrics["loss"])
    losses = heldout_losses(contribution)
    if losses is not None:
        base.set(losses.base)
        sovereign.set(losses.sovereign)


class MetricsServer:
    """prometheus-client's HTTP server for one registry, on a daemon thread."""

    def __init__(self, listen: str, registry: CollectorRegistry) -> None:
        """Serve ``registry`` at ``http://listen/metrics``; ``listen`` may end in ``:0``
        (a free port: see :attr:`port`). Refused with a clear message when it cannot bind."""
        host, _, port = listen.rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        try:
            self._server, self._thread = start_http_server(int(port), addr=host, registry=registry)
        except OSError as error:
            raise UserError(
                f"cannot serve metrics on {listen}: {error.strerror or error}; choose another "
                "address with --metrics-listen HOST:PORT (port 0 picks a free port)"
            ) from None
        self.port = int(self._server.server_port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
