"""``tapestry certs init|issue|revoke``: the consortium's PKI (a CA; a certificate for the
coordinator, each node and each operator; a CRL). cryptography is imported inside the
commands, so the other commands do not pay for it."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import click

from tapestry.cli.options import friendly_errors


@click.group("certs")
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
@friendly_errors
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
@friendly_errors
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
@friendly_errors
def certs_revoke(root: Path, node_id: str | None, operator: str | None) -> None:
    """Revoke a node's or operator's certificate: add it to DIR/crl.pem, re-signed by the CA."""
    from tapestry.pki.authority import revoke_member

    role, name = _one_member(node_id, operator)
    serial = revoke_member(root, role, name)
    click.echo(f"{role} {name}: certificate {serial:x} revoked in {root / 'crl.pem'}")
