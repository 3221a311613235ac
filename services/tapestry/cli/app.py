"""``tapestry``: serve a coordinator or a node, trigger and inspect rounds, run the demo.

The root group and its logging options; each command group lives in a module of its own
(serve, rounds, base, listings, health, certs, ledger, demo). Every module is imported to build
the command, so none imports torch or the services at its top: they are imported inside
the commands that need them, and `tapestry --help`, `tapestry health` and a configuration
error stay fast.

Options can also come from the environment (for containers); ``--help`` names the variable
next to each option that reads one (TAPESTRY_CONFIG, TAPESTRY_LISTEN, TAPESTRY_DATA_DIR,
TAPESTRY_COORDINATOR, TAPESTRY_LOG_LEVEL, TAPESTRY_LOG_FORMAT, TAPESTRY_METRICS_LISTEN,
TAPESTRY_ARENA_MAX, TAPESTRY_TRIM_THRESHOLD), and a bad value is refused naming the variable
it came from.
"""

from __future__ import annotations

from typing import Literal

import click

from tapestry.cli import base, certs, demo, health, ledger, listings, rounds, serve
from tapestry.cli.options import EnvOption
from tapestry.lifetime import stop_with_parent
from tapestry.observe import json_logs


@click.group()
@click.option(
    "--log-level",
    cls=EnvOption,
    default="INFO",
    envvar="TAPESTRY_LOG_LEVEL",
    show_default=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
)
@click.option(
    "--log-format",
    cls=EnvOption,
    default="text",
    envvar="TAPESTRY_LOG_FORMAT",
    show_default=True,
    type=click.Choice(["text", "json"]),
    help="json: one JSON object per line (time, level, logger, message, exception).",
)
def main(log_level: str, log_format: Literal["text", "json"]) -> None:
    """Tapestry Consortium: one shared base model, one sovereign model per jurisdiction."""
    stop_with_parent()  # a server a launcher started ends with it (tapestry.lifetime)
    json_logs.configure_logging(log_level, log_format)


for command in (
    serve.coordinator,
    serve.node,
    rounds.round_group,
    base.base_group,
    rounds.rounds,
    listings.nodes,
    listings.artifacts,
    listings.report_command,
    health.health,
    certs.certs_group,
    ledger.ledger_group,
    demo.demo,
    demo.init,
):
    main.add_command(command)
