"""``tapestry ledger verify``: check a coordinator's signed, hash-chained journal offline
(:mod:`tapestry.coordinator.ledger_check` holds every check; this only reads the options
and prints what it found)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from tapestry.cli.options import EnvOption, friendly_errors


@click.group("ledger")
def ledger_group() -> None:
    """Check the coordinator's signed, hash-chained journal (the ledger)."""


@ledger_group.command("verify")
@click.option(
    "--data-dir",
    cls=EnvOption,
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    required=True,
    envvar="TAPESTRY_DATA_DIR",
    help="The coordinator's data directory (a copy will do: it is only read).",
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
    "--allow-unsigned",
    is_flag=True,
    help="Let records without a signature pass (a coordinator serving plaintext, --insecure, "
    "signs none); everything else is still checked.",
)
@friendly_errors
def verify(data_dir: Path, ca: Path, crl: Path | None, allow_unsigned: bool) -> None:
    """Exit 0 only when every round's chain link, signature, base and momentum files,
    weights and acceptance hold; else print one line per problem, naming the round and
    what differs, and exit 1."""
    from tapestry.coordinator.ledger_check import Trust, check_ledger

    report = check_ledger(data_dir, Trust.from_files(ca, crl, allow_unsigned=allow_unsigned))
    for problem in report.problems:
        click.echo(problem)
    if not report.ok:
        click.echo(
            f"ledger NOT verified: {len(report.problems)} problem(s) in {report.rounds} round(s)",
            err=True,
        )
        sys.exit(1)
    signed = ", ".join(sorted(report.signers)) or "nobody (unsigned, allowed)"
    click.echo(f"ledger verified: {report.rounds} round(s), head {report.head}, signed by {signed}")
