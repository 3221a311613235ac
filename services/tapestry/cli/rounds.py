"""``tapestry round run`` (trigger rounds and follow each one) and ``tapestry rounds`` (list
the committed ones). The client, the views and torch are imported inside the commands."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import wraps
from typing import TYPE_CHECKING, ParamSpec, TypeVar

import click
import grpc

from tapestry.cli.options import (
    DEFAULT_COORDINATOR,
    client_tls_options,
    coordinator_option,
    echo_json,
    friendly_errors,
    json_option,
    page_size_option,
)
from tapestry.wire.status import COORDINATOR, describe_rpc_error

if TYPE_CHECKING:
    from rich.console import Console

    from tapestry.consortium.v1 import consortium_pb2 as pb
    from tapestry.coordinator.client import CoordinatorClient

P = ParamSpec("P")
R = TypeVar("R")
# `round run`: the round was recorded as aborted (quorum not met), apart from 1 (it failed,
# or no coordinator answered) and 2 (click: a usage error).
ABORTED_EXIT_CODE = 3


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


@click.group("round")
def round_group() -> None:
    """Trigger rounds."""


@round_group.command("run")
@coordinator_option
@json_option
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
@client_tls_options
@_keep_round_on_interrupt
@friendly_errors
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
    from tapestry.cli import report
    from tapestry.coordinator.client import CoordinatorClient

    plan = _Plan.of(request_id or str(uuid.uuid4()), round_count, as_json, timeout)
    out = report.console()
    nodes: list[str] = []
    with CoordinatorClient(address, credentials) as client:
        for number, round_id in enumerate(plan.ids, start=1):
            label = f"{number} of {round_count}" if round_count > 1 else ""
            result = _follow_round(client, out, plan, round_id, label, nodes)
            nodes = [*result.accepted_nodes, *result.rejected_nodes, *result.failed_nodes]
            if as_json:
                echo_json(result, indent=round_count == 1)
            else:
                out.print(report.round_table(result))
            if result.aborted_reason:
                click.echo(
                    f"Error: round {result.round_num} was aborted: {result.aborted_reason}",
                    err=True,
                )
                raise click.exceptions.Exit(ABORTED_EXIT_CODE)


@dataclass(frozen=True)
class _Plan:
    """The rounds one `round run` triggers: their request ids, the options that repeat
    them (``retry``), and how each is followed."""

    ids: list[str]
    retry: str
    as_json: bool
    timeout: float | None

    @classmethod
    def of(cls, key: str, round_count: int, as_json: bool, timeout: float | None) -> _Plan:
        from tapestry.limits import MAX_REQUEST_ID_CHARS

        ids = [key] if round_count == 1 else [f"{key}-{i}" for i in range(1, round_count + 1)]
        if len(ids[-1]) > MAX_REQUEST_ID_CHARS:
            raise click.UsageError(
                f"--request-id with --rounds {round_count} makes keys like {ids[-1][:20]}…, "
                f"longer than {MAX_REQUEST_ID_CHARS} characters; use a shorter --request-id"
            )
        retry = f"--request-id {key}"
        if round_count > 1:
            retry = f"--rounds {round_count} {retry}"
        return cls(ids, retry, as_json, timeout)


def _follow_round(
    client: CoordinatorClient,
    out: Console,
    plan: _Plan,
    request_id: str,
    label: str,
    nodes: list[str],
) -> pb.ConsortiumRoundResult:
    """Run one round and follow it: a live table on a terminal, plain lines elsewhere,
    nothing with ``--json``. A round lost after it may have started says how to get its
    result (``plan.retry``: the options that repeat the command's keys)."""
    from rich.live import Live

    from tapestry.cli.live import PlainProgress, RoundView

    heard = False
    view = RoundView(label, nodes)
    live = not plan.as_json and out.is_terminal
    follow: Callable[[pb.RoundProgress], None] | None = None
    if not plan.as_json:
        follow = view.update if live else PlainProgress(out)

    def progress(event: pb.RoundProgress) -> None:
        nonlocal heard
        heard = True
        if follow is not None:
            follow(event)

    showing: AbstractContextManager[object] = (
        Live(view, console=out, refresh_per_second=4, transient=True) if live else nullcontext()
    )
    try:
        with showing:
            return client.run_round(progress, plan.timeout, request_id=request_id)
    except grpc.RpcError as error:
        if not heard and error.code() is not grpc.StatusCode.DEADLINE_EXCEEDED:
            raise
        # The round may have started (and may still commit): say how to learn its fate
        # without running another.
        raise click.ClickException(
            f"{describe_rpc_error(error, client.address, COORDINATOR, '--coordinator')} "
            f"The round may still commit: `tapestry round run {plan.retry}` returns its result "
            "without running another."
        ) from None


@click.command()
@coordinator_option
@json_option
@page_size_option
@client_tls_options
@friendly_errors
def rounds(
    address: str, as_json: bool, page_size: int, credentials: grpc.ChannelCredentials | None
) -> None:
    """List the committed rounds; then, per round and node, the quality score the policy
    weighed, where it came from (measured, assessed or self-reported) and what the member
    claimed; then the held-out evaluations."""
    from tapestry.cli import report
    from tapestry.coordinator.client import CoordinatorClient

    with CoordinatorClient(address, credentials) as client:
        committed = client.list_rounds(page_size)
    if as_json:
        echo_json(committed)
        return
    out = report.console()
    out.print(report.rounds_table(committed))
    for table in (report.quality_table(committed), report.heldout_table(committed)):
        if table is not None:
            out.print(table)
