"""Build and run a node server from its configuration file."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1.health import HealthServicer

from tapestry.config import NodeConfig
from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.consortium.v1 import consortium_pb2_grpc as pb_grpc
from tapestry.corpus import SplitCorpus, load_node_corpus
from tapestry.errors import UserError
from tapestry.node.artifacts import ArtifactStore
from tapestry.node.base_trust import BaseTrust
from tapestry.node.dial_out import DialOut
from tapestry.node.processes import training_device
from tapestry.node.receipts import Receipts
from tapestry.node.servicer import SovereignNodeServicer
from tapestry.observe.metrics import NodeMetrics, restore_node_metrics
from tapestry.pki.serving import dialing_credentials, server_security
from tapestry.pki.signing import Signer
from tapestry.pki.statements import SignatureCheck
from tapestry.training.consortium.local.distributed import TrainingGroup
from tapestry.training.consortium.local.node import SovereignTrainingNode
from tapestry.training.consortium.models.spec import ModelSpec
from tapestry.wire.grpc_plumbing import build_server
from tapestry.wire.windows import window_bytes, window_options

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
    spec = listening_model(config)
    corpus = load_node_corpus(config)
    servicer = _servicer(config, spec, corpus, data_dir, metrics, group)
    return build_server(
        listen,
        [lambda server: pb_grpc.add_SovereignNodeServiceServicer_to_server(servicer, server)],
        [SERVICE_NAME],
        credentials=security.credentials,
        interceptors=security.interceptors,
        options=window_options(window_bytes(config.link)),  # the base's window
    )


def listening_model(config: NodeConfig) -> ModelSpec:
    """The model of a node that listens: its file's ``[model]``, the default model (the
    proof of concept's) without one, as before nodes dialed out."""
    return config.model if config.model is not None else ModelSpec()


def build_dial_out(
    config: NodeConfig,
    data_dir: Path,
    *,
    insecure: bool = False,
    metrics: NodeMetrics | None = None,
    group: TrainingGroup | None = None,
    on_joined: Callable[[], None] | None = None,
) -> DialOut:
    """The node's session with the coordinator its file names (``coordinator``), not yet
    dialed: certificates, corpus and data directory are checked here. The model is built
    when the coordinator's welcome brings it (:class:`~tapestry.node.dial_out.DialOut`).
    With ``[tls]`` it presents its certificate and accepts only the consortium's
    coordinator; plaintext only with ``insecure``."""
    assert config.coordinator is not None
    metrics = metrics or NodeMetrics(config.node_id)
    credentials = dialing_credentials(
        config.tls,
        insecure=insecure,
        consortium=config.consortium_id,
        identity=("node", config.node_id),
        what=f"node {config.node_id}",
    )
    if group is not None and config.model is None:
        raise UserError(
            f"node {config.node_id}: under torchrun a node file needs the consortium's "
            "[model] (its worker ranks build the model before the session opens)"
        )
    corpus = load_node_corpus(config)  # one that cannot be read stops the node before it dials
    return DialOut(
        config,
        config.coordinator,
        credentials,
        lambda spec: _servicer(config, spec, corpus, data_dir, metrics, group),
        on_joined=on_joined,
    )


def _servicer(
    config: NodeConfig,
    spec: ModelSpec,
    corpus: SplitCorpus,
    data_dir: Path,
    metrics: NodeMetrics,
    group: TrainingGroup | None,
) -> SovereignNodeServicer:
    """The node's cycle servicer, its model built from ``spec``; logs what it trains on."""
    node = build_training_node(config, corpus, group, spec)
    store = ArtifactStore(data_dir, max_superseded=config.limits.max_superseded)
    tls = config.tls  # its key signs its evaluations; its CA checks the members' signatures
    restore_node_metrics(metrics, store.newest_manifest())
    receipts = Receipts(data_dir, None if tls is None else SignatureCheck(tls.ca, tls.crl))
    servicer = SovereignNodeServicer(
        node,
        spec,
        store,
        config.consortium_id,
        config.limits,
        metrics=metrics,
        # the base waits on disk while the model trains: a model's worth less memory
        scratch_dir=data_dir / "scratch",
        signer=None if tls is None else Signer.from_files(tls.cert, tls.key, tls.ca),
        trust=BaseTrust(
            config.node_id,
            config.consortium_id,
            data_dir,
            None if tls is None else SignatureCheck(tls.ca, tls.crl),
            config.trust.min_acceptances,
            config.trust.tolerance,
            receipts.committed,
        ),
        receipts=receipts,
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
    return servicer


def build_training_node(
    config: NodeConfig,
    corpus: SplitCorpus,
    group: TrainingGroup | None = None,
    spec: ModelSpec | None = None,
) -> SovereignTrainingNode:
    """The core node ``config`` describes, its model built from ``spec`` (without, the
    file's: :func:`listening_model`), on its training device (the group's under
    ``torchrun``): the same on rank 0 and on every worker rank."""
    spec = spec or listening_model(config)
    device = group.device if group is not None else training_device(config.training.device)
    return SovereignTrainingNode(
        config.node_id,
        config.jurisdiction,
        # replaced by the base each round; fixes keys and shapes
        spec.build(config.seed),
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
