"""``tapestry nodes`` (the members and their sessions), ``tapestry artifacts`` (what the
nodes retain) and ``tapestry report`` (the rounds as a PNG and an HTML page): what the
coordinator knows and has recorded. The client, the views and torch
are imported inside the commands."""

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
    page_size_option,
)


@click.command()
@coordinator_option
@json_option
@client_tls_options
@friendly_errors
def nodes(address: str, as_json: bool, credentials: grpc.ChannelCredentials | None) -> None:
    """List the consortium's members: connected or not, since when, last seen, protocol
    version, release, and the address their session comes from."""
    from tapestry.cli import report
    from tapestry.coordinator.client import CoordinatorClient

    with CoordinatorClient(address, credentials) as client:
        members = client.list_members()
    if as_json:
        echo_json(members)
    else:
        report.console().print(report.members_table(members))


@click.command()
@coordinator_option
@json_option
@page_size_option
@client_tls_options
@friendly_errors
def artifacts(
    address: str, as_json: bool, page_size: int, credentials: grpc.ChannelCredentials | None
) -> None:
    """List the sovereign artifacts the nodes retain (metadata only)."""
    from tapestry.cli import report
    from tapestry.coordinator.client import CoordinatorClient

    with CoordinatorClient(address, credentials) as client:
        retained = client.list_artifacts(page_size)
    if as_json:
        echo_json(retained)
    else:
        report.console().print(report.artifacts_table(retained))


@click.command("report")
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
@coordinator_option
@page_size_option
@client_tls_options
@friendly_errors
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
    from tapestry.coordinator.client import CoordinatorClient
    from tapestry.coordinator.journal import read_identity, read_records
    from tapestry.observe.report_data import served_model
    from tapestry.observe.report_page import write_report
    from tapestry.pki.authority import consortium_named_by

    if journal is not None:
        if not (journal / "rounds").is_dir():
            raise click.ClickException(
                f"{journal} has no rounds/ folder: --journal takes a coordinator's --data-dir"
            )
        rounds = [record.result for record in read_records(journal / "rounds")]
        identity = read_identity(journal)
    else:
        with CoordinatorClient(address, credentials) as client:
            rounds = client.list_rounds(page_size)
            identity = {"model": served_model(client.base_header().model)}
        ca = click.get_current_context().params.get("ca")  # taken by client_tls_options
        if ca is not None:  # the consortium the CA certifies is the one the server is of
            identity["consortium_id"] = consortium_named_by(ca)
    for path in write_report(rounds, out_dir, identity):
        click.echo(f"wrote {path}")
