"""Build and run a node server from its configuration file."""

from __future__ import annotations

import logging
from pathlib import Path

import grpc
from grpc_health.v1.health import HealthServicer

from tapestry.config import NodeConfig
from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.consortium.v1 import consortium_pb2_grpc as pb_grpc
from tapestry.node.artifacts import ArtifactStore
from tapestry.node.corpus import SplitCorpus, load_node_corpus
from tapestry.node.processes import training_device
from tapestry.node.servicer import SovereignNodeServicer
from tapestry.observe.metrics import NodeMetrics, restore_node_metrics
from tapestry.pki.serving import server_security
from tapestry.training.consortium.local.distributed import TrainingGroup
from tapestry.training.consortium.local.node import SovereignTrainingNode
from tapestry.wire.grpc_plumbing import build_server

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SovereignNodeService"].full_name
CYCLE_METHOD = f"/{SERVICE_NAME}/RunSovereignCycle"
ARTIFACT_METHOD = f"/{SERVICE_NAME}/GetArtifact"
log = logging.getLogger(__name__)


def build_node_server(
    config: NodeConfig,
    listen: str,
    data_dir: Path,
    *,
    insecure: bool = False,
    metrics: NodeMetrics | None = None,
    group: TrainingGroup | None = None,
) -> tuple[grpc.Server, int, HealthServicer]:
    """``(server, port, health)``, bound and not started. Certificates, corpus and data
    directory are checked here, so a bad configuration fails before the port answers.

    With ``[tls]`` it serves mutual TLS: cycles only to its consortium's coordinator, its
    artifacts' metadata to the coordinator and operators, ``Describe`` to any member;
    plaintext only with ``insecure``. Cycles are counted in ``metrics``. With ``group``
    (rank 0 under ``torchrun``) its cycles train across the group's processes."""
    metrics = metrics or NodeMetrics(config.node_id)
    security = server_security(
        config.tls,
        insecure=insecure,
        consortium=config.consortium_id,
        identity=("node", config.node_id),
        rules={CYCLE_METHOD: ["coordinator"], ARTIFACT_METHOD: ["coordinator", "operator"]},
        rounds=[CYCLE_METHOD],
        what=f"node {config.node_id}",
    )
    corpus = load_node_corpus(config)
    spec = config.model
    node = build_training_node(config, corpus, group)
    store = ArtifactStore(data_dir, max_superseded=config.limits.max_superseded)
    restore_node_metrics(metrics, store.newest_manifest())
    servicer = SovereignNodeServicer(
        node,
        spec,
        store,
        config.consortium_id,
        config.limits,
        metrics=metrics,
        # the base waits on disk while the model trains: a model's worth less memory
        scratch_dir=data_dir / "scratch",
    )
    log.info(
        "node %s (%s) of consortium %s: %d sequences, %d tokens to train on, %d sequences "
        "held out (%d%%), quality %.3f, data in %s, training on %s",
        config.node_id,
        config.jurisdiction,
        config.consortium_id,
        len(corpus.training),
        node.token_count,
        len(corpus.heldout),
        config.training.heldout_percent,
        config.quality_score,
        data_dir,
        node.device if group is None else f"{group.world_size} processes ({group.device})",
    )
    return build_server(
        listen,
        [lambda server: pb_grpc.add_SovereignNodeServiceServicer_to_server(servicer, server)],
        [SERVICE_NAME],
        credentials=security.credentials,
        interceptors=security.interceptors,
    )


def build_training_node(
    config: NodeConfig, corpus: SplitCorpus, group: TrainingGroup | None = None
) -> SovereignTrainingNode:
    """The core node ``config`` describes, on its training device (the group's under
    ``torchrun``): the same on rank 0 and on every worker rank."""
    device = group.device if group is not None else training_device(config.training.device)
    return SovereignTrainingNode(
        config.node_id,
        config.jurisdiction,
        # replaced by the base each round; fixes keys and shapes
        config.model.build(config.seed),
        corpus.training,
        config.quality_score,
        local_epochs=config.training.local_epochs,
        lr=config.training.lr,
        batch_size=config.training.batch_size,
        seed=config.seed,
        heldout_corpus=corpus.heldout or None,
        trainer=config.training.trainer,
        device=device,
        group=group,
    )
