"""``tapestry base rollback`` and ``tapestry base export``: the shared base, restored or
written out. The client and torch are imported inside the commands."""

from __future__ import annotations

from pathlib import Path

import click
import grpc

from tapestry.cli.options import (
    client_tls_options,
    coordinator_option,
    echo_json,
    friendly_errors,
    json_option,
)
from tapestry.limits import MAX_ROUND_NUM

_ROUND = click.IntRange(0, MAX_ROUND_NUM)


@click.group("base")
def base_group() -> None:
    """The shared base."""


@base_group.command("rollback")
@click.option(
    "--to",
    "to_round",
    type=_ROUND,
    required=True,
    help="The round whose committed base to restore (0: the initial base).",
)
@coordinator_option
@json_option
@client_tls_options
@friendly_errors
def base_rollback(
    to_round: int, address: str, as_json: bool, credentials: grpc.ChannelCredentials | None
) -> None:
    """Roll the shared base back to the base committed by round N.

    Recorded as a new round (history is never deleted): the next round trains from the
    restored base. Rolling back to the newest round records a no-op. To only read an older
    base, export it instead (`tapestry base export --round N`).
    """
    from tapestry.cli import report
    from tapestry.coordinator.client import CoordinatorClient

    with CoordinatorClient(address, credentials) as client:
        result = client.roll_back_base(to_round)
    if as_json:
        echo_json(result)
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
    "round_num",
    type=_ROUND,
    default=None,
    help="Export the base committed by round N (0: the initial base); default: the newest.",
)
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@coordinator_option
@client_tls_options
@friendly_errors
def base_export(
    out: Path,
    round_num: int | None,
    force: bool,
    address: str,
    credentials: grpc.ChannelCredentials | None,
) -> None:
    """Write a committed shared base to a safetensors file, with its round, digest and
    model spec in the file's metadata. Reads only: nothing is recorded."""
    from tapestry.cli import report
    from tapestry.coordinator.base_export import check_destination, write_base
    from tapestry.coordinator.client import CoordinatorClient
    from tapestry.errors import NotFound

    check_destination(out, force=force)
    with CoordinatorClient(address, credentials) as client:
        try:
            base = client.fetch_base(round_num)
        except NotFound as error:
            raise click.ClickException(str(error)) from None
    write_base(base, out)
    click.echo(f"round {base.round_num} base ({report.short(base.sha256)}) written to {out}")
