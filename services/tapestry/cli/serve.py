"""``tapestry coordinator serve`` and ``tapestry node serve``: a server in the foreground
until SIGTERM or SIGINT.

Each reads and checks its configuration file (and a node its corpus) before importing
torch and the services, so a typo is reported at once, naming the file and the closest
valid key; only then are the heavy modules imported, inside the command.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, TypeVar

import click

from tapestry.allocator import tune_allocator
from tapestry.cli.options import Address, EnvOption, friendly_errors
from tapestry.config import ConsortiumConfig, NodeConfig, load_config
from tapestry.corpus import CorpusError, corpus_files
from tapestry.errors import UserError

if TYPE_CHECKING:
    import grpc
    from grpc_health.v1.health import HealthServicer
    from prometheus_client import CollectorRegistry

    from tapestry.observe.metrics import NodeMetrics
    from tapestry.training.consortium.local.distributed import TrainingGroup

F = TypeVar("F", bound=Callable[..., object])
log = logging.getLogger(__name__)


def _serve_options(command: F) -> F:
    """The options both servers take: config, listen address, data directory, ready file,
    metrics listener, plaintext, and the allocator's settings."""
    options = [
        click.option(
            "--config",
            "config_path",
            cls=EnvOption,
            type=click.Path(path_type=Path),
            required=True,
            envvar="TAPESTRY_CONFIG",
            help="The configuration file (TOML).",
        ),
        click.option(
            "--listen",
            cls=EnvOption,
            type=Address(free_port=True),
            default="127.0.0.1:0",
            envvar="TAPESTRY_LISTEN",
            show_default=True,
            help="HOST:PORT to serve on; port 0 picks a free one (see --ready-file).",
        ),
        click.option(
            "--data-dir",
            cls=EnvOption,
            type=click.Path(path_type=Path),
            required=True,
            envvar="TAPESTRY_DATA_DIR",
            help="Where state is persisted.",
        ),
        click.option(
            "--ready-file",
            type=click.Path(path_type=Path),
            help='Write {"port": N} here once serving (and "metrics_port" with --metrics-listen).',
        ),
        click.option(
            "--metrics-listen",
            cls=EnvOption,
            type=Address(free_port=True),
            default=None,
            envvar="TAPESTRY_METRICS_LISTEN",
            help="Serve Prometheus metrics at http://HOST:PORT/metrics (off without it; port 0 "
            "picks a free one, reported in --ready-file as metrics_port). Plaintext HTTP, no "
            "authentication: bind a private interface.",
        ),
        click.option(
            "--insecure",
            cls=EnvOption,
            is_flag=True,
            envvar="TAPESTRY_INSECURE",
            help="Serve plaintext, without TLS or any authentication (for a closed test "
            "network only; logged as a warning at start and on every round). Without it the "
            "configuration's [tls] section is required.",
        ),
        # Both servers move every tensor through 1 MiB chunk buffers on many gRPC threads,
        # which glibc's defaults keep long after (benchmarks/RESULTS.md, coordinator memory).
        click.option(
            "--arena-max",
            cls=EnvOption,
            type=click.IntRange(1, 1024),
            default=1,
            envvar="TAPESTRY_ARENA_MAX",
            show_default=True,
            help="glibc malloc arenas (M_ARENA_MAX): fewer keeps memory near what is live.",
        ),
        click.option(
            "--trim-threshold",
            cls=EnvOption,
            type=click.IntRange(0, 2**31 - 1),  # mallopt takes a C int
            default=1 << 20,
            envvar="TAPESTRY_TRIM_THRESHOLD",
            show_default=True,
            help="Bytes of free heap above which glibc returns memory to the system.",
        ),
    ]
    for option in reversed(options):  # as listed, in --help
        command = option(command)
    return command


@click.group()
def coordinator() -> None:
    """The coordinator service."""


@coordinator.command("serve")
@_serve_options
@friendly_errors
def coordinator_serve(
    config_path: Path,
    listen: str,
    data_dir: Path,
    ready_file: Path | None,
    metrics_listen: str | None,
    insecure: bool,
    arena_max: int,
    trim_threshold: int,
) -> None:
    """Serve the coordinator gRPC service."""
    tune_allocator(arena_max, trim_threshold)  # before any thread allocates
    config = load_config(config_path, ConsortiumConfig)
    from tapestry.coordinator.startup import SERVICE_NAME, build_coordinator_server
    from tapestry.observe.metrics import CoordinatorMetrics

    metrics = CoordinatorMetrics()
    built = build_coordinator_server(
        config, listen, data_dir, insecure=insecure, metrics=metrics, source=str(config_path)
    )
    extra = _serve_metrics(metrics_listen, metrics.registry)
    _serve_then_exit(
        built.server,
        built.port,
        built.health,
        SERVICE_NAME,
        ready_file,
        extra,
        before_stop=built.roster.close,
    )


@click.group()
def node() -> None:
    """A sovereign node service."""


@node.command("serve")
@_serve_options
@friendly_errors
def node_serve(
    config_path: Path,
    listen: str,
    data_dir: Path,
    ready_file: Path | None,
    metrics_listen: str | None,
    insecure: bool,
    arena_max: int,
    trim_threshold: int,
) -> None:
    """Run the sovereign node of one jurisdiction.

    With ``coordinator = "HOST:PORT"`` in its file (the default way) the node dials the
    coordinator, holds a session and opens no listening socket (``--listen`` unused);
    without, it serves on ``--listen`` and the coordinator dials it. Under ``torchrun``
    rank 0 runs the node and the other ranks train beside it (docs/operating/torchrun.md)."""
    tune_allocator(arena_max, trim_threshold)  # before any thread allocates
    config = load_node_config(config_path)
    from tapestry.corpus import load_node_corpus
    from tapestry.node.processes import join_training_group, serve_as_worker
    from tapestry.node.startup import SERVICE_NAME, build_node_server, build_training_node
    from tapestry.observe.metrics import NodeMetrics
    from tapestry.training.consortium.local.distributed import STOP

    group = join_training_group(config.training.device, config.training.collective_timeout_s)
    if group is not None and group.is_worker:
        serve_as_worker(build_training_node(config, load_node_corpus(config), group), group)
        _exit_now()
    metrics = NodeMetrics(config.node_id)
    stop_workers = None if group is None else lambda: group.post(STOP)
    if config.coordinator is not None:
        _dial_out_then_exit(config, data_dir, ready_file, metrics_listen, insecure, metrics, group)
    server, port, health = build_node_server(
        config, listen, data_dir, insecure=insecure, metrics=metrics, group=group
    )
    extra = _serve_metrics(metrics_listen, metrics.registry)
    _serve_then_exit(server, port, health, SERVICE_NAME, ready_file, extra, stop_workers)


def _dial_out_then_exit(
    config: NodeConfig,
    data_dir: Path,
    ready_file: Path | None,
    metrics_listen: str | None,
    insecure: bool,
    metrics: NodeMetrics,
    group: TrainingGroup | None,
) -> NoReturn:
    """Hold the node's session with its coordinator until SIGTERM/SIGINT (the ready file is
    written at each welcome, ``port`` 0: the node listens nowhere), then exit at once."""
    from tapestry.node.startup import build_dial_out
    from tapestry.training.consortium.local.distributed import STOP
    from tapestry.wire.grpc_plumbing import write_ready_file

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    extra = _serve_metrics(metrics_listen, metrics.registry)

    def joined() -> None:
        if ready_file is not None:
            write_ready_file(ready_file, 0, extra)

    dial = build_dial_out(
        config, data_dir, insecure=insecure, metrics=metrics, group=group, on_joined=joined
    )
    try:
        dial.run(stop)
    finally:
        if group is not None:
            group.post(STOP)
    log.info("node %s stopped", config.node_id)
    _exit_now()


def load_node_config(path: Path) -> NodeConfig:
    """The node file, checked, with its corpus entries matched to files: what a node can be
    told is wrong before torch is imported (the corpus is read later, by the node)."""
    config = load_config(path, NodeConfig)
    try:
        corpus_files(config.corpus)
    except CorpusError as error:
        raise UserError(f"{path}: corpus: {error}; fix the file's `corpus` list") from None
    return config


def _serve_metrics(listen: str | None, registry: CollectorRegistry) -> dict[str, int]:
    """Serve ``registry`` on ``listen`` when given; what the ready file adds about it."""
    if listen is None:
        return {}
    from tapestry.observe.metrics import MetricsServer

    served = MetricsServer(listen, registry)
    log.info(
        "metrics (plaintext HTTP) at http://%s:%d/metrics",
        listen.rpartition(":")[0],
        served.port,
    )
    return {"metrics_port": served.port}


def _serve_then_exit(
    server: grpc.Server,
    port: int,
    health: HealthServicer,
    service_name: str,
    ready_file: Path | None,
    ready_extra: dict[str, int],
    before_exit: Callable[[], None] | None = None,
    before_stop: Callable[[], None] | None = None,
) -> NoReturn:
    """Serve until SIGTERM/SIGINT, drain the calls in flight, call ``before_exit``, then
    exit at once.

    Everything a server keeps is on disk (written, fsynced, renamed) by the time its calls
    have drained, so the interpreter's teardown is skipped: unloading torch and its thread
    pools cost about a second of CPU per process for nothing (measured after a round: 0.94 s
    from SIGTERM to exit, 0.03 s without it), which every stopping container, demo and test
    consortium waited on.
    """
    from tapestry.wire.grpc_plumbing import serve_forever

    serve_forever(server, port, health, [service_name], ready_file, ready_extra, before_stop)
    if before_exit is not None:
        before_exit()
    _exit_now()


def _exit_now() -> NoReturn:
    """Exit 0 without the interpreter's teardown (see :func:`_serve_then_exit`)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
