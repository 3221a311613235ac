"""``tapestry health``: a server's ``grpc.health.v1`` status, for container healthchecks.

Run every few seconds: it imports neither torch nor the services."""

from __future__ import annotations

import sys

import click
import grpc

from tapestry.cli.options import Address, client_tls_options
from tapestry.wire.grpc_plumbing import check_health
from tapestry.wire.status import SERVER, describe_rpc_error


@click.command()
@click.option("--address", type=Address(), required=True, help="HOST:PORT of any Tapestry server.")
@click.option("--service", default="", help="Service name; empty = the whole server.")
@click.option("--timeout", type=float, default=5.0, show_default=True)
@click.option(
    "--server-name",
    default=None,
    help="Check the server's certificate for this name instead of the address's host (a "
    "node's is NODE_ID.node.tapestry.invalid).",
)
@client_tls_options
def health(
    address: str,
    service: str,
    timeout: float,
    server_name: str | None,
    credentials: grpc.ChannelCredentials | None,
) -> None:
    """Exit 0 when the server reports SERVING through grpc.health.v1 (container healthchecks)."""
    try:
        status = check_health(address, service, timeout, credentials, server_name)
    except grpc.RpcError as error:
        raise click.ClickException(
            describe_rpc_error(error, address, SERVER, "--address")
        ) from None
    click.echo(status)
    if status != "SERVING":
        sys.exit(1)
