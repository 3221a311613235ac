"""``tapestry ledger verify``: check a coordinator's signed, hash-chained journal offline
(:mod:`tapestry.coordinator.ledger_check` holds every check; this only reads the options
and prints what it found)."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import click

from tapestry.cli.options import Address, EnvOption, checked_credentials, friendly_errors

if TYPE_CHECKING:
    from tapestry.coordinator.ledger_check import Trust


@click.group("ledger")
def ledger_group() -> None:
    """Check the coordinator's signed, hash-chained journal (the ledger)."""


@ledger_group.command("verify")
@click.option(
    "--data-dir",
    cls=EnvOption,
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    envvar="TAPESTRY_DATA_DIR",
    help="The coordinator's data directory (a copy will do: it is only read).",
)
@click.option(
    "--coordinator",
    "address",
    type=Address(),
    help="Instead of --data-dir: a live coordinator's HOST:PORT, read over its RPCs with "
    "--cert and --key (an operator's or a member node's certificate). Momentum files are "
    "not served, so they are not checked.",
)
@click.option(
    "--ca",
    cls=EnvOption,
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    envvar="TAPESTRY_CA",
    help="The consortium CA's certificate the coordinator's signatures must chain to.",
)
@click.option(
    "--crl",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The consortium's CRL: a record signed by a revoked certificate fails.",
)
@click.option(
    "--cert",
    cls=EnvOption,
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="TAPESTRY_CERT",
    help="With --coordinator: your certificate (an operator's or a member node's).",
)
@click.option(
    "--key",
    cls=EnvOption,
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="TAPESTRY_KEY",
    help="With --coordinator: its private key.",
)
@click.option(
    "--allow-unsigned",
    is_flag=True,
    help="Let records without the coordinator's signature pass (a coordinator serving "
    "plaintext, --insecure, signs none), and accepted contributions and recorded evaluations "
    "without their member's (members serving plaintext, or a journal written before members "
    "signed them); every signature present, and everything else, is still checked.",
)
@friendly_errors
def verify(
    data_dir: Path | None,
    address: str | None,
    ca: Path,
    crl: Path | None,
    cert: Path | None,
    key: Path | None,
    allow_unsigned: bool,
) -> None:
    """Exit 0 only when every round's chain link, signatures (the coordinator's, and its
    members' on every contribution it accepted and every evaluation it recorded), base and
    momentum files, weights and
    acceptance hold; else print one line per problem, naming the round and what differs,
    and exit 1. With --coordinator the records and bases are fetched into a temporary
    directory and checked the same way, momentum files apart."""
    from tapestry.coordinator.ledger_check import Trust

    if (data_dir is None) == (address is None):
        raise click.UsageError("give either --data-dir or --coordinator (not both)")
    trust = Trust.from_files(ca, crl, allow_unsigned=allow_unsigned)
    if address is None:
        assert data_dir is not None
        _report(data_dir, trust, remote=False, fetched=[])
        return
    _verify_remote(address, trust, ca, cert, key)


def _verify_remote(
    address: str, trust: Trust, ca: Path, cert: Path | None, key: Path | None
) -> None:
    """Fetch the coordinator's ledger into a temporary directory and check it there."""
    from tapestry.coordinator.client import CoordinatorClient
    from tapestry.coordinator.ledger_copy import copy_ledger

    if cert is None or key is None:
        raise click.UsageError(
            "--coordinator needs --cert and --key (or TAPESTRY_CERT, TAPESTRY_KEY): an "
            "operator's or a member node's certificate"
        )
    credentials = checked_credentials(ca, cert, key)
    with tempfile.TemporaryDirectory(prefix="tapestry-ledger-") as folder:
        with CoordinatorClient(address, credentials) as client:
            fetched = copy_ledger(client, Path(folder))
        _report(Path(folder), trust, remote=True, fetched=fetched)


def _report(data_dir: Path, trust: Trust, *, remote: bool, fetched: list[str]) -> None:
    """Check ``data_dir`` (with ``remote``, a copy fetched over the RPCs: its momentum files
    are not checked; ``fetched``, what the fetch could not get) and print the verdict; exit
    1 on any problem."""
    from tapestry.coordinator.ledger_check import check_ledger

    report = check_ledger(data_dir, trust, momentum=not remote)
    problems = [*fetched, *report.problems]
    for problem in problems:
        click.echo(problem)
    if problems:
        click.echo(
            f"ledger NOT verified: {len(problems)} problem(s) in {report.rounds} round(s)",
            err=True,
        )
        sys.exit(1)
    signed = ", ".join(sorted(report.signers)) or "nobody (unsigned, allowed)"
    skipped = " (over the RPCs: momentum files not served, not checked)" if remote else ""
    click.echo(
        f"ledger verified: {report.rounds} round(s), head {report.head}, signed by {signed}"
        + skipped
    )
