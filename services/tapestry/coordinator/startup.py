"""Build a coordinator server from a consortium file, resuming from its data directory."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from grpc_health.v1.health import HealthServicer

from tapestry.config import ConsortiumConfig
from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.consortium.v1 import consortium_pb2_grpc as pb_grpc
from tapestry.consortium.v1 import journal_pb2 as jpb
from tapestry.coordinator.journal import CoordinatorStore
from tapestry.coordinator.remote_node import NodeCallFailed, NodeMismatch, RemoteSovereignNode
from tapestry.coordinator.servicer import CoordinatorServicer
from tapestry.observe.metrics import CoordinatorMetrics
from tapestry.pki.serving import server_security
from tapestry.training.consortium.coordinator import ConsortiumCoordinator
from tapestry.training.consortium.model import model_state
from tapestry.training.consortium.tensors import state_layout
from tapestry.wire import codec
from tapestry.wire.delta_encoding import DeltaEncoding
from tapestry.wire.grpc_plumbing import build_server

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["CoordinatorService"].full_name
# What only an operator may call: everything else reads.
OPERATOR_METHODS = [f"/{SERVICE_NAME}/{name}" for name in ("RunRound", "RollBackBase")]
log = logging.getLogger(__name__)


def build_coordinator_server(
    config: ConsortiumConfig,
    listen: str,
    data_dir: Path,
    *,
    insecure: bool = False,
    metrics: CoordinatorMetrics | None = None,
) -> tuple[grpc.Server, int, HealthServicer]:
    """``(server, port, health)``, bound and not started, at the last committed round.

    With ``[tls]`` it serves mutual TLS: rounds and rollbacks to operators, reads to any
    member; and calls each node over mutual TLS, checking that the node's certificate names
    that node. Plaintext (both ways) only with ``insecure``. Rounds, weight streams and
    outcomes are counted in ``metrics`` (a registry nobody reads, without)."""
    metrics = metrics or CoordinatorMetrics()
    security = server_security(
        config.tls,
        insecure=insecure,
        consortium=config.consortium_id,
        identity=("coordinator", ""),
        rules={method: ["operator"] for method in OPERATOR_METHODS},
        rounds=OPERATOR_METHODS,
        what="coordinator",
    )
    spec = config.model.spec()
    store = CoordinatorStore(data_dir)
    store.check_identity(
        {
            "consortium_id": config.consortium_id,
            "seed": config.seed,
            # Unset fields left out: a tiny-causal directory keeps the identity it always had.
            "model": config.model.model_dump(mode="json", exclude_none=True),
        }
    )
    base_model = spec.build(config.seed)
    core = ConsortiumCoordinator(
        base_model,
        config.policy.policy(),
        assessed_quality={
            m.node_id: m.quality_score for m in config.nodes if m.quality_score is not None
        },
        min_nodes=config.policy.quorum(),
        # The service only sends the base and persists results: no copies, so a round
        # holds the base and the state integration builds, whatever the number of nodes.
        copy_states=False,
    )
    resumed = store.latest()
    records: list[jpb.RoundRecord] = []
    if resumed is None:
        store.save_initial_base(model_state(base_model))  # read, not copied
        log.info("new consortium %s: initial base saved in %s", config.consortium_id, data_dir)
    else:
        round_num, state, records = resumed
        retained = {
            artifact.node_id: codec.artifact_from_proto(artifact)
            for record in records
            for artifact in record.result.artifacts
        }
        # The store checked the file against this digest before handing the state over.
        digest = records[-1].result.shared_base_sha256 if records else ""
        momentum = store.committed_momentum(round_num, records)
        core.load_base_state(state, round_num, sha256=digest, artifacts=retained, momentum=momentum)
        log.info("consortium %s resumed at round %d", config.consortium_id, round_num)
    layout = state_layout(model_state(base_model))  # what every member's state must hold
    nodes = [
        RemoteSovereignNode(
            member.node_id,
            member.jurisdiction,
            member.address,
            model=spec,
            state_layout=layout,
            consortium_id=config.consortium_id,
            timeout_s=config.node_timeout_s,
            chunk_bytes=config.chunk_bytes,
            spill_dir=store.spill_dir,
            credentials=security.channel_credentials,
            server_check=security.server_check,
            count_sent=metrics.base_sent(member.node_id),
            count_received=metrics.delta_received(member.node_id),
            delta_encoding=DeltaEncoding(config.delta_encoding),
        )
        for member in config.nodes
    ]
    threading.Thread(target=warn_about_members, args=(nodes,), daemon=True).start()
    servicer = CoordinatorServicer(
        core, nodes, store, spec, records, config.chunk_bytes, metrics=metrics
    )
    return build_server(
        listen,
        [lambda server: pb_grpc.add_CoordinatorServiceServicer_to_server(servicer, server)],
        [SERVICE_NAME],
        credentials=security.credentials,
        interceptors=security.interceptors,
    )


def warn_about_members(nodes: Sequence[RemoteSovereignNode]) -> None:
    """Ask every member who it is, in parallel, and log a warning for each one that is not
    reachable or not what the consortium file says. Start-up goes on regardless: the same
    check runs again before a round sends that node any weights, and fails it there."""

    def check(node: RemoteSovereignNode) -> None:
        try:
            node.check_identity()
        except (NodeCallFailed, NodeMismatch) as problem:
            log.warning("member %s: %s", node.node_id, problem)
        else:
            log.info("member %s at %s: identity and model confirmed", node.node_id, node.address)

    with ThreadPoolExecutor(max_workers=max(1, len(nodes))) as pool:
        list(pool.map(check, nodes))
