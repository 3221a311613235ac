"""``tapestry demo``: a local consortium of real processes (tapestry.demo's three
jurisdictions), rounds over gRPC, each shown as the other commands show it; and ``tapestry
init``: such a consortium's files for one's own experiment, and the commands that run it.

The consortium, its processes and its files are :mod:`tapestry.demo`'s (its launcher and
its scaffold); this module only runs them and prints (the arrow goes one way: the command
imports the demo, never the reverse). They are imported inside the command.
"""

from __future__ import annotations

import json
import signal
import tempfile
import threading
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, get_args

import click

from tapestry.atomic_files import write_text
from tapestry.cli.options import friendly_errors
from tapestry.config import DeltaEncodingName, PolicyConfig

# The architectures `init` offers: those that build from the configuration alone.
MODELS = ("tiny-causal", "gpt")


def _choices(policy_field: str) -> click.Choice[str]:
    """The values the consortium file takes for a ``[policy]`` field."""
    kind = PolicyConfig.model_fields[policy_field].annotation
    assert isinstance(kind, type) and issubclass(kind, StrEnum)  # the core's own names
    return click.Choice([member.value for member in kind])


if TYPE_CHECKING:
    from rich.console import Console

    from tapestry.demo.launcher import LocalConsortium


@click.command()
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
@friendly_errors
def demo(round_count: int, workdir: Path | None, keep_running: bool, delta_encoding: str) -> None:
    """Start a coordinator and three nodes on 127.0.0.1 (mutual TLS, certificates made for
    the run) and run rounds over gRPC."""
    workdir = workdir or Path(tempfile.mkdtemp(prefix="tapestry-demo-"))
    run_demo(round_count, workdir, keep_running=keep_running, delta_encoding=delta_encoding)


@click.command("init")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="The folder to write into (new or empty): config/, certs/; data/ once serving.",
)
@click.option(
    "--node",
    "nodes",
    multiple=True,
    required=True,
    help="A member as NODE_ID:JURISDICTION[:CORPUS] (comma-separated or repeated); CORPUS "
    "is a text file or glob, by default the demo's for vietnam, switzerland and india.",
)
@click.option(
    "--model",
    type=click.Choice(MODELS),
    default="tiny-causal",
    show_default=True,
    help="The architecture every member trains (its defaults: docs/concepts/models.md).",
)
@click.option("--consortium-id", default="tapestry-local", show_default=True)
@click.option("--seed", type=int, default=2026, show_default=True)
@click.option(
    "--strategy",
    type=_choices("strategy"),
    default=None,
    help="How accepted deltas are combined [default: fedavg].",
)
@click.option("--weighting", type=_choices("weighting"), default=None, help="[default: quality]")
@click.option("--quality-floor", type=float, default=None, help="[default: 0]")
@click.option(
    "--max-node-weight", type=float, default=None, help="The cap on any one node's weight."
)
@click.option("--min-nodes", type=int, default=None, help="The quorum.")
@click.option("--coordinator-port", type=click.IntRange(1, 65535), default=50051, show_default=True)
@click.option("--insecure", is_flag=True, help="Write no certificates: every server plaintext.")
@friendly_errors
def init(
    out: Path,
    nodes: tuple[str, ...],
    model: str,
    consortium_id: str,
    seed: int,
    coordinator_port: int,
    insecure: bool,
    **policy: object,
) -> None:
    """Write a local consortium: the consortium file (with the [model]), one node file per
    member (each dials the coordinator and takes the model from it), and the certificates;
    then print the commands that serve it and run a round. The coordinator listens on
    127.0.0.1 at a fixed port; the nodes listen nowhere. Policy options left out take the
    consortium file's defaults (docs/concepts/policy.md)."""
    from tapestry.demo.scaffold import init_local_consortium, parse_member
    from tapestry.pki.layout import split_list

    setup = init_local_consortium(
        out,
        [parse_member(text) for text in split_list(nodes)],
        consortium_id=consortium_id,
        model=model,
        policy={name: value for name, value in policy.items() if value is not None},
        coordinator_port=coordinator_port,
        seed=seed,
        tls=not insecure,
    )
    root = setup.consortium.workdir
    click.echo(f"consortium {consortium_id}: {len(setup.node_ids)} nodes, written to {root}")
    for path in setup.written():
        click.echo(f"  {path.relative_to(root)}")
    if not insecure:
        click.echo("  certs/ (mutual TLS: the CA, the coordinator, each node, one operator)")
    click.echo("Next, each server in a terminal of its own (the coordinator first), then a round:")
    for command in setup.next_steps():
        click.echo(f"  {command}")


def run_demo(
    round_count: int, workdir: Path, *, keep_running: bool = False, delta_encoding: str = "float32"
) -> None:
    """Start the local consortium, run ``round_count`` rounds and stop it; with
    ``keep_running``, write ``<workdir>/endpoints.json`` and leave it up until SIGINT or
    SIGTERM. ``delta_encoding`` is the consortium file's (how nodes send their deltas)."""
    from tapestry.cli import report
    from tapestry.cli.live import PlainProgress
    from tapestry.demo import DEMO_NODES, DEMO_POLICY
    from tapestry.demo.launcher import LocalConsortium

    out = report.console()
    out.print(
        f"Tapestry demo: coordinator + {len(DEMO_NODES)} nodes on 127.0.0.1 (work folder {workdir})"
    )
    with LocalConsortium(
        workdir,
        DEMO_NODES,
        consortium_id="tapestry-demo",
        policy=DEMO_POLICY,
        settings={"delta_encoding": delta_encoding},
    ) as consortium:
        for name, process in consortium.processes.items():
            out.print(f"  {name:<12} pid {process.popen.pid:<7} {process.address}")
        with consortium.client() as client:
            for _ in range(round_count):
                result = client.run_round(PlainProgress(out))
                out.print(report.round_table(result))
                out.print(report.artifacts_table(client.list_artifacts()))
        if keep_running:
            _serve_until_stopped(consortium, workdir, out)
    out.print(
        f"All processes stopped. The base and the sovereign models are kept under {workdir}/data."
    )


def _serve_until_stopped(consortium: LocalConsortium, workdir: Path, out: Console) -> None:
    endpoints = workdir.absolute() / "endpoints.json"
    # Written atomically: whoever waits for the file reads it whole.
    write_text(endpoints, json.dumps(consortium.endpoints(), indent=2) + "\n")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    client = " ".join(f"{k}={v}" for k, v in consortium.cli_env().items())
    out.print(
        f"The consortium keeps running; addresses and credentials are in {endpoints}.\n"
        f"Try: {client} tapestry rounds --coordinator {consortium.coordinator_address}\n"
        "Press Ctrl-C (or send SIGTERM) to stop every process.",
        soft_wrap=True,  # a command to copy stays on one line
    )
    while not stop.wait(1.0):
        for name, process in consortium.processes.items():
            if process.popen.poll() is not None:
                out.print(f"{name} exited ({process.popen.returncode}); stopping the rest.")
                return
