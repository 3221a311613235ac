"""docker-compose.yml agrees with the code: commands exist in the CLI, ports and addresses
match, every file it references exists, and the configs it mounts validate."""

from __future__ import annotations

import posixpath
import re
import shlex
from pathlib import Path, PurePosixPath

import click
import pytest
import yaml

from tapestry.cli import main as cli
from tapestry.config import ConsortiumConfig, NodeConfig, load_config
from tapestry.node.corpus import load_corpus

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
NODES = ["vietnam", "switzerland", "india"]


def _argv(command: str | list[str]) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else list(command)


def _resolve(argv: list[str]) -> tuple[click.Command, dict[str, str]]:
    """Walk the click tree like the shell would; returns the leaf and its --options."""
    assert argv[0] == "tapestry", argv
    command: click.Command = cli
    args = argv[1:]
    while isinstance(command, click.Group) and args and not args[0].startswith("-"):
        sub = command.get_command(click.Context(command), args[0])
        assert sub is not None, f"`tapestry ... {args[0]}` is not a CLI command ({argv})"
        command, args = sub, args[1:]
    options: dict[str, str] = {}
    known = {opt for p in command.params for opt in getattr(p, "opts", [])}
    for i, arg in enumerate(args):
        if arg.startswith("--"):
            assert arg in known, f"{argv}: {arg} is not an option of {command.name}"
            options[arg] = args[i + 1] if i + 1 < len(args) else ""
    return command, options


def _with_defaults(text: str) -> str:
    """Compose's ``${VAR:-default}`` as it reads with VAR unset."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*:?-([^}]*)\}", r"\1", text)


def _host_path(service: dict, container_path: str) -> Path:
    """Map a path inside the container to the repository through the bind mounts."""
    target = PurePosixPath(posixpath.normpath(container_path))
    best: tuple[PurePosixPath, Path] | None = None
    for volume in service.get("volumes", []):
        source, mount = _with_defaults(volume).split(":")[:2]
        if not source.startswith("."):
            continue  # a named volume
        mount_path = PurePosixPath(mount)
        if target.is_relative_to(mount_path) and (
            best is None or len(mount_path.parts) > len(best[0].parts)
        ):
            best = (mount_path, ROOT / source)
    assert best is not None, f"{container_path} is not under any bind mount"
    return best[1] / target.relative_to(best[0])


def test_every_command_and_healthcheck_exists_in_the_cli():
    for name, service in SERVICES.items():
        _resolve(_argv(service["command"]))
        if "healthcheck" in service:
            test = service["healthcheck"]["test"]
            assert test[0] == "CMD"
            command, options = _resolve(test[1:])
            assert command.name == "health"
        assert service.get("image") or service.get("build"), name


@pytest.mark.parametrize("node", NODES)
def test_nodes_listen_where_the_consortium_file_says(node):
    service = SERVICES[node]
    _, options = _resolve(_argv(service["command"]))
    port = options["--listen"].rsplit(":", 1)[1]
    _, health = _resolve(service["healthcheck"]["test"][1:])
    assert health["--address"].rsplit(":", 1)[1] == port

    config_path = _host_path(service, options["--config"])
    node_config = load_config(config_path, NodeConfig)
    assert node_config.node_id == node
    # The corpus the node will read exists, through the same mounts, and loads.
    corpus = [
        _host_path(
            service,
            str(PurePosixPath(options["--config"]).parent / p.relative_to(config_path.parent)),
        )
        for p in node_config.corpus
    ]
    assert load_corpus(corpus, node_config.training.max_seq_len)

    coordinator = SERVICES["coordinator"]
    _, coordinator_options = _resolve(_argv(coordinator["command"]))
    consortium = load_config(
        _host_path(coordinator, coordinator_options["--config"]), ConsortiumConfig
    )
    member = {m.node_id: m for m in consortium.nodes}[node]
    assert member.address == f"{node}:{port}"
    assert member.jurisdiction == node_config.jurisdiction
    assert consortium.model == node_config.model
    assert consortium.seed == node_config.seed
    assert consortium.consortium_id == node_config.consortium_id


def test_coordinator_port_matches_its_healthcheck_and_the_cli_service():
    coordinator = SERVICES["coordinator"]
    _, options = _resolve(_argv(coordinator["command"]))
    port = options["--listen"].rsplit(":", 1)[1]
    _, health = _resolve(coordinator["healthcheck"]["test"][1:])
    assert health["--address"].rsplit(":", 1)[1] == port
    assert SERVICES["cli"]["environment"]["TAPESTRY_COORDINATOR"] == f"coordinator:{port}"
    consortium = load_config(_host_path(coordinator, options["--config"]), ConsortiumConfig)
    assert sorted(m.node_id for m in consortium.nodes) == sorted(NODES)


def test_each_service_keeps_state_in_its_own_named_volume():
    seen = set()
    for name in [*NODES, "coordinator"]:
        service = SERVICES[name]
        _, options = _resolve(_argv(service["command"]))
        named = [v.split(":") for v in service["volumes"] if not v.startswith((".", "$"))]
        data = [volume for volume, mount, *_ in named if mount == options["--data-dir"]]
        assert len(data) == 1, f"{name} has no named volume at its --data-dir"
        assert data[0] in COMPOSE["volumes"]
        seen.add(data[0])
    assert len(seen) == 4


def test_startup_order_waits_on_health():
    depends = SERVICES["coordinator"]["depends_on"]
    assert {n: depends[n]["condition"] for n in NODES} == dict.fromkeys(NODES, "service_healthy")
    assert SERVICES["cli"]["depends_on"]["coordinator"]["condition"] == "service_healthy"


def test_the_image_is_built_from_files_that_exist():
    for service in SERVICES.values():
        build = service.get("build")
        if build:
            assert (
                ROOT / build.get("context", ".") / build.get("dockerfile", "Dockerfile")
            ).is_file()
            assert "BASE_IMAGE" in build.get("args", {})
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=python:3.11-slim" in dockerfile
    for script in ("build-base-image", "fill-wheelhouse", "compose-e2e"):
        assert (ROOT / "scripts" / script).is_file()
