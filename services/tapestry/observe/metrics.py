"""Prometheus metrics of the coordinator and of a node, and the endpoint that serves them.

Each server keeps its metrics in a registry of its own (never prometheus-client's global
one), so two servers in one process — the tests, an embedding application — never share a
count. The endpoint is prometheus-client's own HTTP server: plaintext, unauthenticated,
read-only. Bind it to a private interface (it is off unless ``--metrics-listen`` is given).

What a metric may carry is fixed here, by design: numbers, and as labels only node ids from
the consortium file, outcomes, stream names and the base's digest. Never corpus text, file
paths or a peer's free text (rejection reasons stay in the journal). Every series a node
serves carries its ``node`` id, so series from several nodes never merge.

A restarted server says what its disk says, never a false zero:

- the coordinator's counters of recorded rounds start at the journal's counts
  (:func:`restore_coordinator_metrics`), and its gauges at the newest round's values; what
  the journal does not record (failed rounds, durations, bytes) counts from the start;
- a node's gauges come from its newest retained artifact's manifest
  (:func:`restore_node_metrics`), or are absent until its next cycle: a gauge no round
  has set is never exported.

Bytes are the tensor bytes of the weight streams (the base out, deltas in), counted as each
chunk crosses (:data:`~tapestry.wire.tensor_stream.ByteCount`); gRPC and protobuf framing
add well under 1 % to them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import start_http_server
from prometheus_client.metrics_core import Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.errors import UserError
from tapestry.observe.heldout import HeldOutLosses, heldout_losses
from tapestry.wire.tensor_stream import ByteCount

# Rounds and cycles last from under a second (tests) to hours (a real model's training).
DURATION_BUCKETS_S = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400)
# What ``peer`` a coordinator names for a caller of GetBase (an operator, an exporter).
CLIENT_PEER = "client"
COORDINATOR_PEER = "coordinator"
ROUND_OUTCOMES = ("committed", "aborted", "failed", "rolled_back")
CONTRIBUTION_OUTCOMES = ("accepted", "rejected")
CYCLE_OUTCOMES = ("completed", "failed", "busy")


def _bytes_counters(registry: CollectorRegistry, *labels: str) -> tuple[Counter, Counter]:
    """The same two counters on the coordinator and the nodes, so one query sums a link."""
    names = [*labels, "what", "peer"]
    sent = Counter(
        "tapestry_bytes_sent", "Tensor bytes sent, by stream (base, delta) and peer.",
        names, registry=registry,
    )  # fmt: skip
    received = Counter(
        "tapestry_bytes_received", "Tensor bytes received, by stream (base, delta) and peer.",
        names, registry=registry,
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
            "not met; recorded, base unchanged), failed (nothing recorded), rolled_back. "
            "Recorded outcomes count from the journal; failed ones since start-up.",
            ["outcome"], registry=r,
        )  # fmt: skip
        for outcome in ROUND_OUTCOMES:  # exported from start-up, before any round
            self.rounds.labels(outcome=outcome)
        self.round_duration = Histogram(
            "tapestry_round_duration_seconds",
            "Wall time of a round, from trigger to commit (or failure), since start-up.",
            buckets=DURATION_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.base_round = Gauge(
            "tapestry_base_round", "Round number of the committed shared base.", registry=r
        )
        self.base_digest = Gauge(
            "tapestry_base_info",
            "1, labelled with the committed shared base's state digest (sha256) as the journal "
            "records it; absent before the first recorded round.",
            ["sha256"], registry=r,
        )  # fmt: skip
        self._base_sha256 = ""
        self.node_failures = Counter(
            "tapestry_node_failures",
            "Rounds in which a node failed (unreachable, refused, or a contribution that "
            "failed the checks).",
            ["node"], registry=r,
        )  # fmt: skip
        self.resumes = Counter(
            "tapestry_transfer_resumes",
            "Cycles that went on, where they stopped, after the node's session dropped and it "
            "dialed again (tapestry.wire.numbering).",
            ["node"], registry=r,
        )  # fmt: skip
        self.sessions = Counter(
            "tapestry_sessions_opened",
            "Sessions members opened (a node that dials again opens another).",
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

    def candidate_sent(self, peer: str) -> ByteCount:
        """The round's candidate, sent to a member to evaluate (member-validated commit)."""
        return self.bytes_sent.labels(what="candidate", peer=peer).inc

    def _set_base_digest(self, sha256: str) -> None:
        """One series, the base in force: the new one set before the old one goes, so a
        scrape in between never finds none."""
        self.base_digest.labels(sha256=sha256).set(1)
        if self._base_sha256 not in ("", sha256):
            self.base_digest.remove(self._base_sha256)
        self._base_sha256 = sha256

    def delta_received(self, peer: str) -> ByteCount:
        return self.bytes_received.labels(what="delta", peer=peer).inc

    def round_failed(self, seconds: float) -> None:
        self.rounds.labels(outcome="failed").inc()
        self.round_duration.observe(seconds)

    def round_recorded(self, result: pb.ConsortiumRoundResult) -> None:
        """Count a committed journal entry (a round, an aborted round or a rollback)."""
        self.base_round.set(result.round_num)
        self._set_base_digest(result.shared_base_sha256)
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
                self.train_loss,
                self.heldout_loss,
                contribution.node_id,
                contribution.metrics.get("loss"),
                heldout_losses(contribution),
            )


def restore_coordinator_metrics(
    metrics: CoordinatorMetrics, records: Iterable[pb.RoundRecord], members: Iterable[str]
) -> None:
    """Start ``metrics`` where the journal stands: its ``records`` (oldest first, the ones
    the coordinator resumed from) counted as if this process had recorded each, so every
    counter equals the journal's count and every gauge the newest round's value. Each of the
    ``members`` (node ids) has its per-node counters exported from start-up, at the
    journal's count or 0."""
    for node in members:
        metrics.node_failures.labels(node=node)
        for outcome in CONTRIBUTION_OUTCOMES:
            metrics.contributions.labels(node=node, outcome=outcome)
    for record in records:
        metrics.round_recorded(record.result)


class NodeMetrics:
    """A node's cycles, its weight streams, and the losses of its latest cycle; every
    series labelled with the node's id."""

    def __init__(self, node_id: str, registry: CollectorRegistry | None = None) -> None:
        self.node_id = node_id
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.cycles = Counter(
            "tapestry_cycles",
            "Sovereign cycles since start-up, by outcome: completed (result sent, and the "
            "delta when the coordinator asked for it), failed (refused, failed or cut off), "
            "busy (refused: another cycle was running).",
            ["node", "outcome"], registry=r,
        )  # fmt: skip
        for outcome in CYCLE_OUTCOMES:
            self.cycles.labels(node=node_id, outcome=outcome)
        self.cycle_duration = Histogram(
            "tapestry_cycle_duration_seconds",
            "Wall time of a cycle, from the first byte of the base to the delta's trailer (or "
            "to the coordinator's decision, when it did not want the delta).",
            ["node"], buckets=DURATION_BUCKETS_S, registry=r,
        )  # fmt: skip
        self.cycle_duration.labels(node=node_id)
        # Labelled, so absent until a cycle (or the newest artifact) gives them a value.
        self.last_round = Gauge(
            "tapestry_last_round",
            "Round number of the latest cycle trained (of the newest artifact, after a "
            "restart).",
            ["node"], registry=r,
        )  # fmt: skip
        self.train_loss = Gauge(
            "tapestry_train_loss", "Mean training loss of the latest cycle.", ["node"], registry=r
        )
        self.heldout_loss = Gauge(
            "tapestry_heldout_loss",
            "Held-out loss of the latest cycle: of the base received (model=base) and of the "
            "new sovereign model (model=sovereign). Absent when the node holds nothing out.",
            ["node", "model"], registry=r,
        )  # fmt: skip
        self.bytes_sent, self.bytes_received = _bytes_counters(r, "node")
        self.base_received()
        self.delta_sent()
        r.register(_Labelled(ProcessCollector(registry=None), {"node": node_id}))

    def base_received(self) -> ByteCount:
        return self.bytes_received.labels(node=self.node_id, what="base", peer=COORDINATOR_PEER).inc

    def candidate_received(self) -> ByteCount:
        """A round's candidate, received to evaluate (member-validated commit)."""
        return self.bytes_received.labels(
            node=self.node_id, what="candidate", peer=COORDINATOR_PEER
        ).inc

    def delta_sent(self) -> ByteCount:
        return self.bytes_sent.labels(node=self.node_id, what="delta", peer=COORDINATOR_PEER).inc

    def cycle_ended(self, outcome: str, seconds: float | None = None) -> None:
        self.cycles.labels(node=self.node_id, outcome=outcome).inc()
        if seconds is not None:
            self.cycle_duration.labels(node=self.node_id).observe(seconds)

    def trained(self, round_num: int, contribution: object) -> None:
        """Record a cycle's result (the core's ``SovereignContribution``)."""
        metrics: Mapping[str, float] = getattr(contribution, "metrics", {})
        self.set_latest(round_num, metrics.get("loss"), heldout_losses(contribution))

    def set_latest(self, round_num: int, loss: float | None, losses: HeldOutLosses | None) -> None:
        """The gauges of the latest cycle: its round, mean training loss and held-out
        losses (a loss left ``None`` keeps its gauge as it was)."""
        self.last_round.labels(node=self.node_id).set(round_num)
        _set_losses(self.train_loss, self.heldout_loss, self.node_id, loss, losses)


def restore_node_metrics(metrics: NodeMetrics, manifest: Mapping[str, Any] | None) -> None:
    """Set ``metrics``' gauges from the manifest of the node's newest retained artifact
    (:meth:`~tapestry.node.artifacts.ArtifactStore.newest_manifest`): its round, its
    training loss and, where the manifest records them, its held-out losses. Without a
    manifest (a node that never trained) they stay absent."""
    if manifest is None:
        return
    evaluation = manifest.get("evaluation")
    losses = (
        HeldOutLosses(float(evaluation["base_loss"]), float(evaluation["sovereign_loss"]))
        if isinstance(evaluation, Mapping)
        else None
    )
    metrics.set_latest(int(manifest["round_num"]), manifest.get("metrics", {}).get("loss"), losses)


def _set_losses(
    train: Gauge, heldout: Gauge, node: str, loss: float | None, losses: HeldOutLosses | None
) -> None:
    """Set ``node``'s loss gauges to what it reported; a series is made only with a value
    (``labels`` makes it at 0), so a loss never reported is absent, never a false 0."""
    if loss is not None:
        train.labels(node=node).set(loss)
    if losses is not None:
        heldout.labels(node=node, model="base").set(losses.base)
        heldout.labels(node=node, model="sovereign").set(losses.sovereign)


class _Labelled(Collector):
    """Another collector's series with ``labels`` added to each (a node's process
    metrics, so that they too say which node they describe)."""

    def __init__(self, inner: Collector, labels: Mapping[str, str]) -> None:
        self._inner = inner
        self._labels = dict(labels)

    def collect(self) -> Iterator[Metric]:
        for family in self._inner.collect():
            labelled = Metric(family.name, family.documentation, family.type, family.unit)
            labelled.samples = [
                s._replace(labels={**s.labels, **self._labels}) for s in family.samples
            ]
            yield labelled


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
