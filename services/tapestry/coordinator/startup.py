"""Build a coordinator server from a consortium file, resuming from its data directory."""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import grpc
from grpc_health.v1.health import HealthServicer
from torch.nn import Module

from tapestry.config import ConfigError, ConsortiumConfig, TlsConfig, model_table
from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.consortium.v1 import consortium_pb2_grpc as pb_grpc
from tapestry.coordinator.journal import CoordinatorStore
from tapestry.coordinator.remote_node import (
    MemberMisnamed,
    NodeCallFailed,
    NodeMismatch,
    RemoteSovereignNode,
)
from tapestry.coordinator.roster import Roster
from tapestry.coordinator.sent_deltas import SentDeltas
from tapestry.coordinator.servicer import CoordinatorServicer
from tapestry.coordinator.session_service import SessionDoor
from tapestry.corpus import CorpusError, file_or_folder, trainable_documents, windows
from tapestry.errors import UserError, quoted
from tapestry.limits import MAX_CALLS_PER_MEMBER, MAX_CALLS_PER_NODE
from tapestry.observe.metrics import CoordinatorMetrics, restore_coordinator_metrics
from tapestry.pki.access import PeerRole
from tapestry.pki.call_limits import worker_threads
from tapestry.pki.server_check import served_node_id
from tapestry.pki.serving import server_security
from tapestry.pki.signing import Signer
from tapestry.training.consortium.local.node import SovereignTrainingNode
from tapestry.training.consortium.models.state import model_state
from tapestry.training.consortium.round.coordinator import ConsortiumCoordinator
from tapestry.training.consortium.tensors import state_layout
from tapestry.wire import codec
from tapestry.wire.grpc_plumbing import build_server
from tapestry.wire.windows import window_bytes, window_options

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["CoordinatorService"].full_name
# What only an operator may call: everything else reads.
OPERATOR_METHODS = [f"/{SERVICE_NAME}/{name}" for name in ("RunRound", "RollBackBase")]
SESSION_METHOD = f"/{SERVICE_NAME}/OpenSession"
# The signed journal, for ledger verify over the RPCs: operators and members' nodes.
RECORDS_METHOD = f"/{SERVICE_NAME}/ListRoundRecords"
# Who may call what; a method not named admits any member of the consortium.
ACCESS_RULES: dict[str, list[PeerRole]] = {
    **{method: ["operator"] for method in OPERATOR_METHODS},
    SESSION_METHOD: ["node"],
    RECORDS_METHOD: ["operator", "node"],
}
log = logging.getLogger(__name__)


class CoordinatorServer(NamedTuple):
    """A coordinator's server, bound and not started; ``roster`` holds its members'
    sessions (end them with :meth:`~Roster.close` before stopping the server)."""

    server: grpc.Server
    port: int
    health: HealthServicer
    roster: Roster


def build_coordinator_server(
    config: ConsortiumConfig,
    listen: str,
    data_dir: Path,
    *,
    insecure: bool = False,
    metrics: CoordinatorMetrics | None = None,
    source: str = "the consortium file",
) -> CoordinatorServer:
    """The server, bound and not started, at the last committed round.

    With ``[tls]`` it serves mutual TLS: rounds and rollbacks to operators, reads to any
    member, a session to each member's node; it calls a member that listens (its entry has
    an ``address``) over mutual TLS, checking that the node's certificate names that node.
    Plaintext (both ways) only with ``insecure``. Rounds, weight streams and outcomes are
    counted in ``metrics`` (a registry nobody reads, without). Every member that listens is
    asked who it is first (:func:`check_members`): one that ``source`` (the file's name, for
    the message) names wrongly stops start-up."""
    metrics = metrics or CoordinatorMetrics()
    security = server_security(
        config.tls,
        insecure=insecure,
        consortium=config.consortium_id,
        identity=("coordinator", ""),
        rules=ACCESS_RULES,
        rounds=OPERATOR_METHODS,
        what="coordinator",
        calls_per_node=MAX_CALLS_PER_NODE * config.link.streams,
    )
    spec = config.model
    reference = reference_node(config, source)  # a corpus that cannot be read stops here
    store = _store(config, data_dir, insecure=insecure)
    base_model = spec.build(config.seed)
    core = _core(config, base_model, reference)
    records = _resume(core, store, base_model, config.consortium_id)
    restore_coordinator_metrics(metrics, records, [member.node_id for member in config.nodes])
    layout = state_layout(model_state(base_model))  # what every member's state must hold
    # every delta a member delivered, from the journal: one sent again is refused
    roster = Roster(
        config, layout, store, security, metrics, SentDeltas(records), lambda: core.ledger.records()
    )
    door = SessionDoor(
        roster.members,
        config.consortium_id,
        spec,
        lambda: core.round_num,
        roster.check,
        secure=security.credentials is not None,
    )
    servicer = CoordinatorServicer(
        core,
        roster.for_round,
        store,
        spec,
        records,
        config.chunk_bytes,
        metrics=metrics,
        sessions=door,
        members=roster.members,
    )
    server, port, health = build_server(
        listen,
        [lambda server: pb_grpc.add_CoordinatorServiceServicer_to_server(servicer, server)],
        [SERVICE_NAME],
        credentials=security.credentials,
        interceptors=security.interceptors,
        # every member at its bound of calls (its session included) leaves room for others
        max_workers=worker_threads(
            len(config.nodes), max(MAX_CALLS_PER_MEMBER, MAX_CALLS_PER_NODE * config.link.streams)
        ),
        # the deltas' window: the link's, within the budget shared by every member
        options=window_options(window_bytes(config.link, len(config.nodes))),
    )
    try:
        check_members(roster.dialed, source, config.tls, [m.node_id for m in config.nodes])
    except MemberError:
        server.stop(None)
        roster.close()
        raise
    return CoordinatorServer(server, port, health, roster)


def _store(config: ConsortiumConfig, data_dir: Path, *, insecure: bool) -> CoordinatorStore:
    """The journal in ``data_dir``, refused if it holds another consortium's rounds; its
    entries signed with the coordinator's ``[tls]`` certificate and key (unsigned when it
    serves plaintext: it has none)."""
    tls = None if insecure else config.tls
    signer = Signer.from_files(tls.cert, tls.key, tls.ca) if tls is not None else None
    store = CoordinatorStore(data_dir, signer)
    store.check_identity(
        {
            "consortium_id": config.consortium_id,
            "seed": config.seed,
            # Unset fields left out: a tiny-causal directory keeps the identity it always had.
            "model": model_table(config.model),
        }
    )
    return store


def _core(
    config: ConsortiumConfig, base_model: Module, reference: SovereignTrainingNode | None = None
) -> ConsortiumCoordinator:
    """The core coordinator the consortium file describes, from ``base_model``; with
    ``reference`` (:func:`reference_node`), it weighs members by measured quality."""
    return ConsortiumCoordinator(
        base_model,
        config.policy.policy(),
        assessed_quality={
            m.node_id: m.quality_score for m in config.nodes if m.quality_score is not None
        },
        min_nodes=config.policy.quorum(),
        acceptance=config.policy.acceptance.policy(),
        # The service only sends the base and persists results: no copies, so a round
        # holds the base and the state integration builds, whatever the number of nodes.
        copy_states=False,
        reference=reference,
    )


REFERENCE_NODE_ID = "reference"  # the coordinator's own node: never a member, never on the wire


def reference_node(
    config: ConsortiumConfig, source: str = "the consortium file"
) -> SovereignTrainingNode | None:
    """The coordinator's own node for measured quality
    (:mod:`~tapestry.training.consortium.governance.measured`): the consortium's model,
    trained each round from the round's base on ``[policy] reference_corpus`` as
    ``[policy.reference]`` says, its update the one every member's delta is scored
    against. ``None`` without a reference corpus. A corpus that cannot be read, or holds
    no line to train on, is a :class:`ConfigError` naming ``source``, the key and the path."""
    path = config.policy.reference_corpus
    if path is None:
        return None
    training = config.policy.reference_training()
    try:
        sequences = windows(trainable_documents(file_or_folder(path)), training.max_seq_len)
    except CorpusError as error:
        raise ConfigError(f"{source}: policy.reference_corpus = {str(path)!r}: {error}") from None
    node = SovereignTrainingNode(
        REFERENCE_NODE_ID,
        "reference",
        config.model.build(config.seed),  # replaced by the base each round; fixes the shapes
        sequences,
        1.0,  # never weighed: its update is the measure, not a contribution
        local_epochs=training.local_epochs,
        lr=training.lr,
        batch_size=training.batch_size,
        seed=config.seed,
    )
    log.info(
        "measured quality: the coordinator trains each round's base on %s (%d sequences, "
        "%d tokens) and weighs each member by its delta against that update",
        path,
        len(sequences),
        node.token_count,
    )
    return node


def _resume(
    core: ConsortiumCoordinator, store: CoordinatorStore, base_model: Module, consortium_id: str
) -> list[pb.RoundRecord]:
    """Load the last intact commit into ``core`` (or save ``base_model`` as the initial
    base of a new consortium); the committed rounds, oldest first."""
    resumed = store.latest()
    if resumed is None:
        store.save_initial_base(model_state(base_model))  # read, not copied
        log.info("new consortium %s: initial base saved in %s", consortium_id, store.root)
        return []
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
    log.info("consortium %s resumed at round %d", consortium_id, round_num)
    return records


class MemberError(UserError):
    """The consortium file names a member wrongly: the node at its address serves another
    jurisdiction, or is a node the file does not list; the message names the file, the
    entry and the value the node gives."""


# How long start-up waits to read the certificate of a member whose handshake failed (it
# only explains the failure; the address is already known to answer or not).
_CERTIFICATE_PROBE_S = 3.0


def check_members(
    nodes: Sequence[RemoteSovereignNode],
    source: str,
    tls: TlsConfig | None = None,
    members: Collection[str] | None = None,
) -> None:
    """Ask every member in ``nodes`` (those the coordinator dials) who it is, in parallel;
    ``members`` are all the file lists (``nodes``' ids without). One that the file (``source``)
    names wrongly stops start-up (:class:`MemberError`), where a round would only fail it
    and commit without it: the node at its address serves another jurisdiction, or is a
    node the file does not list (with ``tls``: whose certificate names such a node, so the
    handshake was refused for the name). Anything else (unreachable; another member's id,
    an address mistake or an impostor; another model; a revoked certificate) is logged as
    a warning: the same check runs again before a round sends that node any weights, and
    fails it there."""
    listed = set(members) if members is not None else {node.node_id for node in nodes}
    with ThreadPoolExecutor(max_workers=max(1, len(nodes))) as pool:
        found = list(pool.map(lambda node: _misnamed(node, listed, tls), nodes))
    problems = [
        f"member {node.node_id!r} (nodes[{place}], at {node.address}): {problem}"
        for place, (node, problem) in enumerate(zip(nodes, found, strict=True))
        if problem
    ]
    if problems:
        raise MemberError(
            f"{source}: {'; '.join(problems)}. Fix the entry (or the node's own config, if "
            "the file is right)"
        )


def _misnamed(
    node: RemoteSovereignNode, listed: Collection[str], tls: TlsConfig | None
) -> str | None:
    """How the file names ``node`` wrongly, or None (any other problem is logged)."""
    try:
        node.check_identity()
    except MemberMisnamed as wrong:
        if wrong.node_id not in listed:
            return (
                f"the node there is {quoted(wrong.node_id)}, which the file does not list "
                f"(did you mean node_id = {wrong.node_id!r}?)"
            )
        if wrong.node_id == node.node_id:
            return (
                f"the node there serves jurisdiction {quoted(wrong.jurisdiction)}, not "
                f"{node.jurisdiction!r} (did you mean jurisdiction = {wrong.jurisdiction!r}?)"
            )
        log.warning("member %s: %s", node.node_id, wrong)
    except NodeCallFailed as problem:
        served = served_node_id(tls, node.address, _CERTIFICATE_PROBE_S) if tls else None
        if served is not None and served not in listed:
            return (
                f"the node there presents the certificate of node {served!r}, which the file "
                f"does not list (did you mean node_id = {served!r}?)"
            )
        log.warning("member %s: %s", node.node_id, problem)
    except NodeMismatch as problem:
        log.warning("member %s: %s", node.node_id, problem)
    else:
        log.info("member %s at %s: identity and model confirmed", node.node_id, node.address)
    return None
