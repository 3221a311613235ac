"""``tapestry``: serve a coordinator or a node, trigger and inspect rounds, run the demo.

Options can also come from the environment (for containers); ``--help`` names the variable
next to each option that reads one (TAPESTRY_CONFIG, TAPESTRY_LISTEN, TAPESTRY_DATA_DIR,
TAPESTRY_COORDINATOR, TAPESTRY_LOG_LEVEL, TAPESTRY_LOG_FORMAT, TAPESTRY_METRICS_LISTEN,
TAPESTRY_ARENA_MAX, TAPESTRY_TRIM_THRESHOLD), and a bad value is refused naming the variable
it came from.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, Literal, NoReturn, ParamSpec, TypeVar, get_args

import click
import grpc
from click.core import ParameterSource

from tapestry.address import check_address
from tapestry.config import DeltaEncodingName
from tapestry.errors import UserError
from tapestry.wire.status import COORDINATOR, SERVER, describe_rpc_error

# Heavy modules (torch, the services) are imported inside the commands that need them, so
# `tapestry health` (run every few seconds by container healthchecks) starts fast.

F = TypeVar("F", bound=Callable[..., Any])
P = ParamSpec("P")
R = TypeVar("R")
DEFAULT_COORDINATOR = "127.0.0.1:50051"
# `round run`: the round was recorded as aborted (quorum not met), apart from 1 (it failed,
# or no coordinator answered) and 2 (click: a usage error).
ABORTED_EXIT_CODE = 3


def _friendly_errors(command: Callable[P, R]) -> Callable[P, R]:
    """Turn the errors a user can fix into one clear line and a non-zero exit. A command
    with an ``address`` parameter (``--coordinator``) talks to the coordinator there."""

    @wraps(command)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except UserError as error:
            raise click.ClickException(str(error)) from None
        except OSError as error:  # e.g. a data directory that cannot be created or written
            raise click.ClickException(f"{type(error).__name__}: {error}") from None
        except grpc.RpcError as error:
            address = str(kwargs.get("address") or "")
            raise click.ClickException(
                describe_rpc_error(error, address, COORDINATOR, "--coordinator")
                if address
                else describe_rpc_error(error)
            ) from None

    return run


class _Option(click.Option):
    """An option whose environment variable is shown in ``--help`` and named in the error
    when a value read from it is refused (``Invalid value for '--listen' (from
    TAPESTRY_LISTEN): ...``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("show_envvar", True)
        super().__init__(*args, **kwargs)

    def get_error_hint(self, ctx: click.Context | None) -> str:
        hint = click.Parameter.get_error_hint(self, ctx)  # the names, without click's env note
        if ctx is not None and ctx.get_parameter_source(self.name or "") is (
            ParameterSource.ENVIRONMENT
        ):
            hint += f" (from {self.envvar})"
        return hint


class _Address(click.ParamType[str, Any]):
    """``HOST:PORT`` through :func:`tapestry.config.check_address`, the one address check."""

    name = "HOST:PORT"

    def __init__(self, *, free_port: bool = False) -> None:
        self.free_port = free_port

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        try:
            return check_address(str(value), free_port=self.free_port)
        except ValueError as error:
            self.fail(str(error), param, ctx)


def _keep_round_on_interrupt(command: Callable[P, R]) -> Callable[P, R]:
    """Ctrl-C stops following a round, not the round: the coordinator runs it to its commit
    whoever listens. Leaving the command closes the channel (cancelling the stream); then
    say so, and how to see the result, and exit 130 as an interrupted command does."""

    @wraps(command)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except KeyboardInterrupt:
            address = kwargs.get("address", DEFAULT_COORDINATOR)
            click.echo(
                f"\nInterrupted: stopped following the round. A round that has started keeps "
                f"running on the coordinator at {address} and commits on its own; see its "
                f"result with `tapestry rounds --coordinator {address}`.",
                err=True,
            )
            raise click.exceptions.Exit(130) from None

    return run


@click.group()
@click.option(
    "--log-level",
    cls=_Option,
    default="INFO",
    envvar="TAPESTRY_LOG_LEVEL",
    show_default=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
)
@click.option(
    "--log-format",
    cls=_Option,
    default="text",
    envvar="TAPESTRY_LOG_FORMAT",
    show_default=True,
    type=click.Choice(["text", "json"]),
    help="json: one JSON object per line (time, level, logger, message, exception).",
)
def main(log_level: str, log_format: Literal["text", "json"]) -> None:
    """Tapestry Consortium: one shared base model, one sovereign model per jurisdiction."""
    from tapestry.observe.json_logs import configure_logging

    configure_logging(log_level, log_format)


def _serve_options(command: F) -> F:
    command = click.option(
        "--insecure",
        cls=_Option,
        is_flag=True,
        envvar="TAPESTRY_INSECURE",
        help="Serve plaintext, without TLS or any authentication (for a closed test network "
        "only; logged as a warning at start and on every round). Without it the "
        "configuration's [tls] section is required.",
    )(command)
    command = click.option(
        "--metrics-listen",
        cls=_Option,
        type=_Address(free_port=True),
        default=None,
        envvar="TAPESTRY_METRICS_LISTEN",
        help="Serve Prometheus metrics at http://HOST:PORT/metrics (off without it; port 0 "
        "picks a free one, reported in --ready-file as metrics_port). Plaintext HTTP, no "
        "authentication: bind a private interface.",
    )(command)
    command = click.option(
        "--ready-file",
        type=click.Path(path_type=Path),
        help='Write {"port": N} here once serving (and "metrics_port" with --metrics-listen).',
    )(command)
    command = click.option(
        "--data-dir",
        cls=_Option,
        type=click.Path(path_type=Path),
        required=True,
        envvar="TAPESTRY_DATA_DIR",
        help="Where state is persisted.",
    )(command)
    command = click.option(
        "--listen",
        cls=_Option,
        type=_Address(free_port=True),
        default="127.0.0.1:0",
        envvar="TAPESTRY_LISTEN",
        show_default=True,
        help="HOST:PORT to serve on; port 0 picks a free one (see --ready-file).",
    )(command)
    command = click.option(
        "--config",
        "config_path",
        cls=_Option,
        type=click.Path(path_type=Path),
        required=True,
        envvar="TAPESTRY_CONFIG",
        help="The configuration file (TOML).",
    )(command)
    return command


def _serve_metrics(listen: str | None, registry: Any) -> dict[str, int]:
    """Serve ``registry`` on ``listen`` when given; what the ready file adds about it."""
    if listen is None:
        return {}
    from tapestry.observe.metrics import MetricsServer

    served = MetricsServer(listen, registry)
    logging.getLogger(__name__).info(
        "metrics (plaintext HTTP) at http://%s:%d/metrics",
        listen.rpartition(":")[0],
        served.port,
    )
    return {"metrics_port": served.port}


def _serve_then_exit(
    server: grpc.Server,
    port: int,
    health: Any,
    names: list[str],
    ready_file: Path | None,
    ready_extra: dict[str, int],
    before_exit: Callable[[], None] | None = None,
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

    serve_forever(server, port, health, names, ready_file, ready_extra)
    if before_exit is not None:
        before_exit()
    _exit_now()


def _exit_now() -> NoReturn:
    """Exit 0 without the interpreter's teardown (see :func:`_serve_then_exit`)."""
    import os

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@main.group()
def coordinator() -> None:
    """The coordinator service."""


def _allocator_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--arena-max`` and ``--trim-threshold``, for both servers: each moves every tensor
    through 1 MiB chunk buffers on many gRPC threads, which glibc's defaults keep long
    after (benchmarks/RESULTS.md, issue 8)."""
    command = click.option(
        "--trim-threshold",
        cls=_Option,
        type=click.IntRange(0, 2**31 - 1),  # mallopt takes a C int
        default=1 << 20,
        envvar="TAPESTRY_TRIM_THRESHOLD",
        show_default=True,
        help="Bytes of free heap above which glibc returns memory to the system.",
    )(command)
    return click.option(
        "--arena-max",
        cls=_Option,
        type=click.IntRange(1, 1024),
        default=1,
        envvar="TAPESTRY_ARENA_MAX",
        show_default=True,
        help="glibc malloc arenas (M_ARENA_MAX): fewer keeps memory near what is live.",
    )(command)


@coordinator.command("serve")
@_serve_options
@_allocator_options
@_friendly_errors
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
    from tapestry.allocator import tune_allocator
    from tapestry.config import ConsortiumConfig, load_config

    tune_allocator(arena_max, trim_threshold)
    from tapestry.coordinator.startup import SERVICE_NAME, build_coordinator_server
    from tapestry.observe.metrics import CoordinatorMetrics

    config = load_config(config_path, ConsortiumConfig)
    metrics = CoordinatorMetrics()
    server, port, health = build_coordinator_server(
        config, listen, data_dir, insecure=insecure, metrics=metrics
    )
    extra = _serve_metrics(metrics_listen, metrics.registry)
    _serve_then_exit(server, port, health, [SERVICE_NAME], ready_file, extra)


@main.group()
def node() -> None:
    """A sovereign node service."""


@node.command("serve")
@_serve_options
@_allocator_options
@_friendly_errors
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
    """Serve the sovereign node gRPC service for one jurisdiction.

    Under ``torchrun`` rank 0 serves and the other ranks train beside it (README, "A node
    on several processes")."""
    from tapestry.allocator import tune_allocator

    tune_allocator(arena_max, trim_threshold)
    from tapestry.config import NodeConfig, load_config
    from tapestry.node.corpus import load_node_corpus
    from tapestry.node.processes import join_training_group, serve_as_worker
    from tapestry.node.startup import SERVICE_NAME, build_node_server, build_training_node
    from tapestry.observe.metrics import NodeMetrics
    from tapestry.training.consortium.local.distributed import STOP

    config = load_config(config_path, NodeConfig)
    group = join_training_group(config.training.device, config.training.collective_timeout_s)
    if group is not None and group.is_worker:
        serve_as_worker(build_training_node(config, load_node_corpus(config), group), group)
        _exit_now()
    metrics = NodeMetrics(config.node_id)
    server, port, health = build_node_server(
        config, listen, data_dir, insecure=insecure, metrics=metrics, group=group
    )
    extra = _serve_metrics(metrics_listen, metrics.registry)
    stop_workers = None if group is None else lambda: group.post(STOP)
    _serve_then_exit(server, port, health, [SERVICE_NAME], ready_file, extra, stop_workers)


_coordinator_option = click.option(
    "--coordinator",
    "address",
    cls=_Option,
    type=_Address(),
    default=DEFAULT_COORDINATOR,
    envvar="TAPESTRY_COORDINATOR",
    show_default=True,
    help="The coordinator's HOST:PORT.",
)
_json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


def _client_tls_options(command: Callable[..., R]) -> Callable[..., R]:
    """``--ca``, ``--cert``, ``--key`` (a member's certificate from `tapestry certs`; an
    operator's to run rounds or roll back) or ``--insecure``, turned into the command's
    ``credentials`` argument. A command given a ``journal`` directory reads no server:
    it may go without them."""

    @wraps(command)
    def run(
        *args: Any, ca: Path | None, cert: Path | None, key: Path | None, insecure: bool, **kw: Any
    ) -> R:
        from tapestry.pki.serving import client_credentials

        if insecure and (ca or cert or key):
            raise click.UsageError("--insecure goes without --ca, --cert and --key")
        if not insecure and not (ca or cert or key):
            if kw.get("journal") is not None:
                return command(*args, credentials=None, **kw)
            raise click.UsageError(
                "give the certificate to call with: --ca, --cert and --key (or "
                "TAPESTRY_CA, TAPESTRY_CERT, TAPESTRY_KEY), e.g. an operator's from `tapestry "
                "certs init`; or --insecure for a server that serves plaintext"
            )
        try:
            credentials = client_credentials(ca, cert, key)
        except UserError as error:
            raise click.ClickException(str(error)) from None
        return command(*args, credentials=credentials, **kw)

    path = click.Path(dir_okay=False, path_type=Path)
    for flag, what in (("key", "Its private key"), ("cert", "Your certificate"),
                       ("ca", "The consortium CA's certificate")):  # fmt: skip
        run = click.option(
            f"--{flag}", cls=_Option, type=path, envvar=f"TAPESTRY_{flag.upper()}", help=f"{what}."
        )(run)
    return click.option(
        "--insecure",
        cls=_Option,
        is_flag=True,
        envvar="TAPESTRY_INSECURE",
        help="Call a plaintext server (no TLS, no certificate).",
    )(run)


@main.group("round")
def round_group() -> None:
    """Trigger rounds."""


@round_group.command("run")
@_coordinator_option
@_json_option
@click.option(
    "--timeout", type=float, default=None, help="Give up on a round after this many seconds."
)
@click.option(
    "--rounds",
    "round_count",
    type=click.IntRange(1, 1000),
    default=1,
    show_default=True,
    help="Rounds to run back to back; stops at the first that does not commit.",
)
@click.option(
    "--request-id",
    default=None,
    help="Idempotency key (default: a fresh UUID); with --rounds N > 1, round i's key is "
    "ID-i. Run again with the same key (and --rounds) after a lost reply to get the results "
    "of the rounds already recorded instead of new rounds.",
)
@_client_tls_options
@_keep_round_on_interrupt
@_friendly_errors
def round_run(
    address: str,
    as_json: bool,
    timeout: float | None,
    round_count: int,
    request_id: str | None,
    credentials: grpc.ChannelCredentials | None,
) -> None:
    """Trigger rounds over gRPC, follow each one's progress and print its result.

    On a terminal a live table shows every node (receiving base, training step and loss,
    sending delta, contributed or failed); elsewhere one line per event, training steps
    every few seconds. --json prints each result instead: one indented object for one
    round; with --rounds N > 1, one compact object per line (JSON Lines) as each round ends.

    Exit status: 0 when every round committed; 1 when one failed (nothing committed) or the
    coordinator could not be asked; 3 when one was aborted for want of a quorum (recorded,
    base unchanged). The rounds after it are not triggered.
    """
    import uuid

    from tapestry.cli import report
    from tapestry.coordinator.client import CoordinatorClient
    from tapestry.wire.codec import MAX_REQUEST_ID_CHARS, message_to_dict

    key = request_id or str(uuid.uuid4())
    ids = [key] if round_count == 1 else [f"{key}-{i}" for i in range(1, round_count + 1)]
    if len(ids[-1]) > MAX_REQUEST_ID_CHARS:
        raise click.UsageError(
            f"--request-id with --rounds {round_count} makes keys like {ids[-1][:20]}…, "
            f"longer than {MAX_REQUEST_ID_CHARS} characters; use a shorter --request-id"
        )
    retry = f"--request-id {key}"
    if round_count > 1:
        retry = f"--rounds {round_count} {retry}"
    out = report.console()
    nodes: list[str] = []
    with CoordinatorClient(address, credentials) as client:
        for number, round_id in enumerate(ids, start=1):
            label = f"{number} of {round_count}" if round_count > 1 else ""
            result = _follow_round(client, out, round_id, timeout, as_json, label, nodes, retry)
            nodes = [*result.accepted_nodes, *result.rejected_nodes, *result.failed_nodes]
            if as_json:
                document = message_to_dict(result)
                click.echo(
                    json.dumps(document, indent=2, sort_keys=True)
                    if round_count == 1
                    else json.dumps(document, sort_keys=True)
                )
            else:
                out.print(report.round_table(result))
            if result.aborted_reason:
                click.echo(
                    f"Error: round {result.round_num} was aborted: {result.aborted_reason}",
                    err=True,
                )
                raise click.exceptions.Exit(ABORTED_EXIT_CODE)


def _follow_round(
    client: Any,
    out: Any,
    request_id: str,
    timeout: float | None,
    as_json: bool,
    label: str,
    nodes: list[str],
    retry: str,
) -> Any:
    """Run one round and follow it: a live table on a terminal, plain lines elsewhere,
    nothing with ``--json``. A round lost after it may have started says how to get its
    result (``retry``: the options that repeat the command's keys)."""
    from contextlib import nullcontext

    from rich.live import Live

    from tapestry.cli.live import PlainProgress, RoundView

    heard = False
    view = RoundView(label, nodes)
    live = not as_json and out.is_terminal
    follow: Callable[[Any], None] | None = None
    if not as_json:
        follow = view.update if live else PlainProgress(out)

    def progress(event: Any) -> None:
        nonlocal heard
        heard = True
        if follow is not None:
            follow(event)

    showing = (
        Live(view, console=out, refresh_per_second=4, transient=True) if live else nullcontext()
    )
    try:
        with showing:
            return client.run_round(progress, timeout, request_id=request_id)
    except grpc.RpcError as error:
        if not heard and error.code() is not grpc.StatusCode.DEADLINE_EXCEEDED:
            raise
        # The round may have started (and may still commit): say how to learn its fate
        # without running another.
        raise click.ClickException(
            f"{describe_rpc_error(error, client.address, COORDINATOR, '--coordinator')} "
            f"The round may still commit: `tapestry round run {retry}` returns its result "
            "without running another."
        ) from None


@main.group("base")
def base_group() -> None:
    """The shared base."""


@base_group.command("rollback")
@click.option(
    "--to",
    "to_round",
    type=click.IntRange(0, 2**32 - 1),  # the wire's uint32
    required=True,
    help="The round whose committed base to restore (0: the initial base).",
)
@_coordinator_option
@_json_option
@_client_tls_options
@_friendly_errors
def base_rollback(
    to_round: int, address: str, as_json: bool, credentials: grpc.ChannelCredentials | None
) -> None:
    """Roll the shared base back to the base committed by round N.

    Recorded as a new round (history is never deleted): the next round trains from the
    restored base. Rolling back to the newest round records a no-op.
    """
    from tapestry.cli import report
    from tapestry.coordinator.client import CoordinatorClient
    from tapestry.wire.codec import message_to_dict

    with CoordinatorClient(address, credentials) as client:
        result = client.roll_back_base(to_round)
    if as_json:
        click.echo(json.dumps(message_to_dict(result), indent=2, sort_keys=True))
    else:
        click.echo(report.rollback_line(result))


@base_group.command("export")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="The safetensors file to write (atomically).",
)
@click.option(
    "--round",
    "expect_round",
    type=click.IntRange(0, 2**32 - 1),
    default=None,
    help="Export only if the served base is round N's (GetBase serves the newest base).",
)
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@_coordinator_option
@_client_tls_options
@_friendly_errors
def base_export(
    out: Path,
    expect_round: int | None,
    force: bool,
    address: str,
    credentials: grpc.ChannelCredentials | None,
) -> None:
    """Write the shared base to a safetensors file, with its round, digest and model spec
    in the file's metadata."""
    from tapestry.cli import report
    from tapestry.coordinator.base_export import check_destination, write_base
    from tapestry.coordinator.client import CoordinatorClient
    from tapestry.errors import NotFound

    check_destination(out, force=force)
    with CoordinatorClient(address, credentials) as client:
        try:
            base = client.fetch_base(expect_round)
        except NotFound as error:
            raise click.ClickException(str(error)) from None
    write_base(base, out)
    click.echo(f"round {base.round_num} base ({report.short(base.sha256)}) written to {out}")


def _print_listing(
    address: str,
    credentials: grpc.ChannelCredentials | None,
    as_json: bool,
    what: str,
    page_size: int,
) -> None:
    """Fetch every page of a listing from the coordinator; print it as a table or as JSON
    (a list of objects, counts and sizes as numbers)."""
    from tapestry.cli import report
    from tapestry.coordinator.client import CoordinatorClient
    from tapestry.wire.codec import message_to_dict

    with CoordinatorClient(address, credentials) as client:
        if what == "rounds":
            items: list[Any] = client.list_rounds(page_size)
        else:
            items = client.list_artifacts(page_size)
    if as_json:
        click.echo(json.dumps([message_to_dict(i) for i in items], indent=2, sort_keys=True))
    elif what == "rounds":
        out = report.console()
        out.print(report.rounds_table(items))
        heldout = report.heldout_table(items)
        if heldout is not None:
            out.print(heldout)
    else:
        report.console().print(report.artifacts_table(items))


_page_size_option = click.option(
    "--page-size",
    type=click.IntRange(0, 2**31 - 1),  # the wire's int32; the server caps what it returns
    default=0,
    show_default=True,
    help="Items per request (0: the server's default); every page is fetched.",
)


@main.command()
@_coordinator_option
@_json_option
@_page_size_option
@_client_tls_options
@_friendly_errors
def rounds(
    address: str, as_json: bool, page_size: int, credentials: grpc.ChannelCredentials | None
) -> None:
    """List the committed rounds."""
    _print_listing(address, credentials, as_json, "rounds", page_size)


@main.command()
@_coordinator_option
@_json_option
@_page_size_option
@_client_tls_options
@_friendly_errors
def artifacts(
    address: str, as_json: bool, page_size: int, credentials: grpc.ChannelCredentials | None
) -> None:
    """List the sovereign artifacts the nodes retain (metadata only)."""
    _print_listing(address, credentials, as_json, "artifacts", page_size)


@main.command("report")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="The folder to write report.png and report.html into (created if need be).",
)
@click.option(
    "--journal",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    default=None,
    help="Read a coordinator's --data-dir directly (its rounds/ journal) instead of asking "
    "the coordinator; needs no certificate.",
)
@_coordinator_option
@_page_size_option
@_client_tls_options
@_friendly_errors
def report_command(
    out_dir: Path,
    journal: Path | None,
    address: str,
    page_size: int,
    credentials: grpc.ChannelCredentials | None,
) -> None:
    """Write a PNG and a self-contained HTML page of the rounds, headed by the consortium,
    its model and policy: per jurisdiction, the held-out loss of the shared base against
    that of its own model; weights per node; accepted, rejected and failed nodes per round."""
    from tapestry.observe.report_page import write_report

    if journal is not None:
        from tapestry.coordinator.journal import read_identity, read_records

        if not (journal / "rounds").is_dir():
            raise click.ClickException(
                f"{journal} has no rounds/ folder: --journal takes a coordinator's --data-dir"
            )
        rounds = [record.result for record in read_records(journal / "rounds")]
        identity = read_identity(journal)
    else:
        from tapestry.coordinator.client import CoordinatorClient
        from tapestry.observe.report_data import served_model
        from tapestry.pki.authority import consortium_named_by

        with CoordinatorClient(address, credentials) as client:
            rounds = client.list_rounds(page_size)
            identity = {"model": served_model(client.base_header().model)}
        ca = click.get_current_context().params.get("ca")  # taken by _client_tls_options
        if ca is not None:  # the consortium the CA certifies is the one the server is of
            identity["consortium_id"] = consortium_named_by(ca)
    for path in write_report(rounds, out_dir, identity):
        click.echo(f"wrote {path}")


@main.command()
@click.option("--address", type=_Address(), required=True, help="HOST:PORT of any Tapestry server.")
@click.option("--service", default="", help="Service name; empty = the whole server.")
@click.option("--timeout", type=float, default=5.0, show_default=True)
@click.option(
    "--server-name",
    default=None,
    help="Check the server's certificate for this name instead of the address's host (a "
    "node's is NODE_ID.node.tapestry.invalid).",
)
@_client_tls_options
def health(
    address: str,
    service: str,
    timeout: float,
    server_name: str | None,
    credentials: grpc.ChannelCredentials | None,
) -> None:
    """Exit 0 when the server reports SERVING through grpc.health.v1 (container healthchecks)."""
    from tapestry.wire.grpc_plumbing import check_health

    try:
        status = check_health(address, service, timeout, credentials, server_name)
    except grpc.RpcError as error:
        raise click.ClickException(
            describe_rpc_error(error, address, SERVER, "--address")
        ) from None
    click.echo(status)
    if status != "SERVING":
        sys.exit(1)


@main.group("certs")
def certs_group() -> None:
    """The consortium PKI: a CA, a certificate per node, coordinator and operator (mTLS)."""


_dir_option = click.option(
    "--dir",
    "root",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="The certificate directory: ca.pem, ca.key, crl.pem, coordinator/, nodes/, operators/.",
)
_days_option = click.option(
    "--days", type=int, default=365, show_default=True, help="Validity of each leaf certificate."
)


@certs_group.command("init")
@_dir_option
@click.option("--consortium", required=True, help="Consortium id, the host part of every SAN URI.")
@click.option(
    "--coordinator-host",
    "coordinator_hosts",
    multiple=True,
    required=True,
    help="DNS name or IP the coordinator is reached at (comma-separated or repeated).",
)
@click.option(
    "--node",
    "nodes",
    multiple=True,
    help="NODE_ID or NODE_ID=HOST (comma-separated or repeated); HOST defaults to NODE_ID.",
)
@click.option(
    "--operator", "operators", multiple=True, help="Operator name (comma-separated or repeated)."
)
@_days_option
@_friendly_errors
def certs_init(
    root: Path,
    consortium: str,
    coordinator_hosts: tuple[str, ...],
    nodes: tuple[str, ...],
    operators: tuple[str, ...],
    days: int,
) -> None:
    """Create a consortium CA and the coordinator's, nodes' and operators' certificates."""
    from tapestry.pki.authority import init_consortium
    from tapestry.pki.layout import parse_nodes, split_list

    init_consortium(
        root,
        consortium,
        coordinator_hosts=split_list(coordinator_hosts),
        nodes=parse_nodes(nodes),
        operators=split_list(operators),
        days=days,
    )
    click.echo(f"consortium {consortium}: CA and certificates written to {root}")


def _one_member(
    node_id: str | None, operator: str | None
) -> tuple[Literal["node", "operator"], str]:
    if (node_id is None) == (operator is None):
        raise click.UsageError("give exactly one of --node or --operator")
    return ("node", node_id) if node_id is not None else ("operator", operator or "")


@certs_group.command("issue")
@_dir_option
@click.option("--node", "node_id", default=None, help="Node id (needs --host).")
@click.option("--host", default=None, help="DNS name or IP the node is reached at.")
@click.option("--operator", default=None, help="Operator name.")
@_days_option
@_friendly_errors
def certs_issue(
    root: Path, node_id: str | None, host: str | None, operator: str | None, days: int
) -> None:
    """Issue one more node or operator certificate, signed by the existing CA."""
    from tapestry.pki.authority import issue_member

    role, name = _one_member(node_id, operator)
    if role == "operator" and host is not None:
        raise click.UsageError("--host goes with --node, not --operator")
    directory = issue_member(root, role, name, host=host, days=days)
    click.echo(f"{role} {name}: certificate written to {directory}")


@certs_group.command("revoke")
@_dir_option
@click.option("--node", "node_id", default=None, help="Node id.")
@click.option("--operator", default=None, help="Operator name.")
@_friendly_errors
def certs_revoke(root: Path, node_id: str | None, operator: str | None) -> None:
    """Revoke a node's or operator's certificate: add it to DIR/crl.pem, re-signed by the CA."""
    from tapestry.pki.authority import revoke_member

    role, name = _one_member(node_id, operator)
    serial = revoke_member(root, role, name)
    click.echo(f"{role} {name}: certificate {serial:x} revoked in {root / 'crl.pem'}")


@main.command()
@click.option(
    "--rounds",
    "round_count",
    type=click.IntRange(0, 1000),
    default=3,
    show_default=True,
    help="Rounds to run (0: none, e.g. with --keep-running).",
)
@click.option(
    "--workdir",
    type=click.Path(path_type=Path),
    default=None,
    help="Where configs, certificates, logs and data go (default: a new temporary folder).",
)
@click.option(
    "--keep-running",
    is_flag=True,
    help="After the rounds, leave the consortium up until Ctrl-C or SIGTERM and write "
    "WORKDIR/endpoints.json (addresses, CA, operator and node credentials).",
)
@click.option(
    "--delta-encoding",
    type=click.Choice(get_args(DeltaEncodingName)),
    default="float32",
    show_default=True,
    help="How nodes send their deltas (the consortium file's delta_encoding): float32 is "
    "exact; bfloat16, float16 and int8_block take fewer bytes within a stated error bound.",
)
@_friendly_errors
def demo(round_count: int, workdir: Path | None, keep_running: bool, delta_encoding: str) -> None:
    """Start a coordinator and three nodes on 127.0.0.1 (mutual TLS, certificates made for
    the run) and run rounds over gRPC."""
    from tapestry.demo.run import run_demo

    workdir = workdir or Path(tempfile.mkdtemp(prefix="tapestry-demo-"))
    run_demo(round_count, workdir, keep_running=keep_running, delta_encoding=delta_encoding)
