"""docker-compose.yml agrees with the code: commands exist in the CLI, ports and addresses
match, every file it references exists, the configs it mounts validate, and the certificates
reach each member and no one else: a node's container mounts only its own key, never
another node's nor the CA's."""

from __future__ import annotations

import posixpath
import re
import shlex
from pathlib import Path, PurePosixPath

import click
import pytest
import yaml

from tapestry.cli import main as cli
from tapestry.config import ConsortiumConfig, NodeConfig, TlsConfig, load_config
from tapestry.corpus import load_corpus

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
NODES = ["vietnam", "switzerland", "india"]
SERVERS = [*NODES, "coordinator"]
# The one-shot service that creates the certificates and hands out each member's share.
CERTS = SERVICES["certs"]


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


def _mounts(service: dict) -> list[tuple[str, str, bool]]:
    """``(source, mount point, read-only)`` of every volume of ``service``, as compose reads
    them with no variable set; a named volume's source has no leading ``.``."""
    mounts = []
    for volume in service.get("volumes", []):
        source, mount, *mode = _with_defaults(volume).split(":")
        mounts.append((source, mount, mode == ["ro"]))
    return mounts


def _volume_at(service: dict, container_path: str) -> tuple[str, bool]:
    """The named volume (and whether it is read-only) that holds ``container_path``."""
    target = PurePosixPath(container_path)
    under = [
        (source, PurePosixPath(mount), ro)
        for source, mount, ro in _mounts(service)
        if target.is_relative_to(mount)
    ]
    assert under, f"{container_path} is under no mount"
    source, _, ro = max(under, key=lambda m: len(m[1].parts))
    assert not source.startswith("."), f"{container_path} is in the bind mount {source}"
    return source, ro


def _certs_script() -> str:
    argv = _argv(CERTS["command"])
    assert argv[0] == "sh" and len(argv) == 2, argv
    return _host_path(CERTS, argv[1]).read_text()


def _certs_init() -> dict[str, list[str]]:
    """The ``tapestry certs init`` of the certs service's script: every option's values."""
    script = _certs_script().replace("\\\n", " ")
    lines = [line.strip() for line in script.splitlines()]
    (line,) = [line for line in lines if line.startswith("tapestry certs init")]
    argv = shlex.split(line)
    _resolve(argv)  # the command and its options exist
    options: dict[str, list[str]] = {}
    for flag, value in zip(argv[3::2], argv[4::2], strict=True):
        options.setdefault(flag, []).extend(value.split(","))
    return options


def _shares() -> list[str]:
    """The certificate folders the certs service copies out (``coordinator``,
    ``nodes/ID``, ``operators/NAME``), each to ``/out/<last part>``."""
    (loop,) = re.findall(r"^for share in (.*); do$", _certs_script(), re.MULTILINE)
    assert "out=/out/${share#*/}" in _certs_script()
    return loop.split()


def test_every_command_and_healthcheck_exists_in_the_cli():
    for name, service in SERVICES.items():
        if service is CERTS:
            _certs_init()
        else:
            _resolve(_argv(service["command"]))
        if "healthcheck" in service:
            test = service["healthcheck"]["test"]
            assert test[0] == "CMD"
            if name in NODES:  # a node listens nowhere: healthy once welcomed (its ready file)
                _, options = _resolve(_argv(service["command"]))
                assert test[1:] == ["test", "-f", options["--ready-file"]]
                continue
            command, options = _resolve(test[1:])
            assert command.name == "health"
        assert service.get("image") or service.get("build"), name


@pytest.mark.parametrize("node", NODES)
def test_nodes_dial_the_coordinator_and_listen_nowhere(node):
    service = SERVICES[node]
    _, options = _resolve(_argv(service["command"]))
    assert "--listen" not in _argv(service["command"])

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
    assert member.address is None  # the coordinator never dials a node
    port = coordinator_options["--listen"].rsplit(":", 1)[1]
    assert node_config.coordinator == f"coordinator:{port}"
    assert member.jurisdiction == node_config.jurisdiction
    assert node_config.model is None  # the node takes the coordinator's
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
    """The coordinator first; each node once it is healthy (they dial it); a round once
    every node holds its session."""
    assert set(SERVICES["coordinator"]["depends_on"]) == {"certs"}
    for node in NODES:
        assert SERVICES[node]["depends_on"]["coordinator"]["condition"] == "service_healthy"
    depends = SERVICES["cli"]["depends_on"]
    assert {n: depends[n]["condition"] for n in NODES} == dict.fromkeys(NODES, "service_healthy")


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


def _tls(name: str) -> TlsConfig:
    service = SERVICES[name]
    _, options = _resolve(_argv(service["command"]))
    kind = ConsortiumConfig if name == "coordinator" else NodeConfig
    config = load_config(_host_path(service, options["--config"]), kind)
    assert config.tls is not None, f"{options['--config']} has no [tls] section"
    return config.tls


@pytest.mark.parametrize("name", SERVERS)
def test_every_server_serves_mutual_tls_from_its_own_certificate_volume(name):
    service = SERVICES[name]
    tls = _tls(name)
    assert tls.crl is not None  # revocations reach the servers
    for path in (tls.ca, tls.cert, tls.key, tls.crl):
        assert _volume_at(service, str(path)) == (f"{name}-tls", True), path
    assert "--insecure" not in _argv(service["command"])
    assert "TAPESTRY_INSECURE" not in service.get("environment", {})
    # ... which the certs service fills with this member's share, and which exists.
    assert (f"{name}-tls", f"/out/{name}", False) in _mounts(CERTS)
    assert f"{name}-tls" in COMPOSE["volumes"]
    share = "coordinator" if name == "coordinator" else f"nodes/{name}"
    assert share in _shares()


def test_the_health_check_calls_with_the_coordinators_own_certificate():
    name = "coordinator"
    service = SERVICES[name]
    tls = _tls(name)
    _, health = _resolve(service["healthcheck"]["test"][1:])
    assert health["--address"].startswith("127.0.0.1:")
    assert (health["--ca"], health["--cert"], health["--key"]) == tuple(
        str(p) for p in (tls.ca, tls.cert, tls.key)
    )
    assert health["--server-name"] in _certs_init()["--coordinator-host"]


def test_the_certificates_name_this_consortium_and_its_members():
    init = _certs_init()
    coordinator = SERVICES["coordinator"]
    _, options = _resolve(_argv(coordinator["command"]))
    consortium = load_config(_host_path(coordinator, options["--config"]), ConsortiumConfig)
    assert init["--consortium"] == [consortium.consortium_id]
    # Every member is named; none is dialed (each dials the coordinator by the host its
    # certificate names).
    assert sorted(init["--node"]) == sorted(NODES)
    assert {m.address for m in consortium.nodes} == {None}
    assert "coordinator" in init["--coordinator-host"]
    assert SERVICES["cli"]["environment"]["TAPESTRY_COORDINATOR"].startswith("coordinator:")
    assert sorted(_shares()) == sorted(
        ["coordinator", *(f"nodes/{n}" for n in NODES)]
        + [f"operators/{o}" for o in init["--operator"]]
    )


def test_the_cli_calls_as_an_operator():
    cli_service = SERVICES["cli"]
    environment = cli_service["environment"]
    (operator,) = _certs_init()["--operator"]
    for variable in ("TAPESTRY_CA", "TAPESTRY_CERT", "TAPESTRY_KEY"):
        assert _volume_at(cli_service, environment[variable]) == (f"{operator}-tls", True)
    assert (f"{operator}-tls", f"/out/{operator}", False) in _mounts(CERTS)


def test_no_container_but_the_certs_service_sees_another_members_key_or_the_ca_key():
    shares = {volume for volume, _, _ in _mounts(CERTS) if volume.endswith("-tls")}
    assert "certs" in {volume for volume, _, _ in _mounts(CERTS)}
    for name, service in SERVICES.items():
        if service is CERTS:
            continue
        volumes = {volume for volume, _, _ in _mounts(service)}
        assert "certs" not in volumes, f"{name} mounts the CA's volume"
        assert len(volumes & shares) == 1, f"{name} mounts {sorted(volumes & shares)}"
        if name in NODES:
            assert volumes & shares == {f"{name}-tls"}
        # The configuration bind mount holds no certificate or key (they are never committed).
        for source, _, _ in _mounts(service):
            if source.startswith("."):
                found = [
                    p for p in (ROOT / source).rglob("*") if p.suffix in {".pem", ".key", ".crt"}
                ]
                assert not found, found


def test_servers_start_only_once_the_certificates_exist():
    for name in SERVERS:
        assert SERVICES[name]["depends_on"]["certs"] == {
            "condition": "service_completed_successfully"
        }
    assert "restart" not in CERTS  # one-shot


@pytest.mark.parametrize("name", SERVERS)
def test_every_server_serves_metrics_inside_the_network_only(name):
    """Metrics are plaintext HTTP: exposed to the compose network, and published only for
    the coordinator, on the host's loopback."""
    service = SERVICES[name]
    _, options = _resolve(_argv(service["command"]))
    host, port = options["--metrics-listen"].rsplit(":", 1)
    assert host == "0.0.0.0"  # the container's interfaces: its network, not the host's
    assert port != options.get("--listen", ":").rsplit(":", 1)[1]
    assert service["expose"] == [port]
    published = [_with_defaults(p) for p in service.get("ports", [])]
    if name == "coordinator":
        assert f"127.0.0.1:{port}:{port}" in published
    else:
        assert not published
    assert all(p.startswith("127.0.0.1:") for p in published)
