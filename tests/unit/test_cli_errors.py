"""Errors a user can act on: each mistake or failure is one line that says what happened and
what to do, with a non-zero exit, never a traceback."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner

from tapestry.cli import main
from tapestry.wire.grpc_plumbing import build_server
from tapestry.wire.status import COORDINATOR, NODE, SERVER, describe_rpc_error

from ..ports import free_ports

CORPUS = Path(__file__).parents[2] / "services" / "tapestry" / "demo" / "corpora" / "vietnam.txt"


def _cli(*args: str, env: dict[str, str] | None = None):
    """The command as run against plaintext servers (these tests are about addresses and
    the errors of reaching them; tests/integration/test_mutual_tls.py covers certificates)."""
    return CliRunner().invoke(main, list(args), env={"TAPESTRY_INSECURE": "1", **(env or {})})


def _error_line(result) -> str:
    """The last line of the output: click's ``Error: ...``."""
    return result.output.strip().splitlines()[-1]


@pytest.fixture
def held_port() -> Iterator[int]:
    """A port on 127.0.0.1 that another socket is listening on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


@pytest.fixture
def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (free, and outside the range that other
    tests' servers and connections take ports from)."""
    return free_ports(1)


@pytest.fixture
def node_config(tmp_path: Path) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(
        f'node_id = "vietnam"\njurisdiction = "Vietnam"\nconsortium_id = "c"\nquality_score = 0.9\n'
        f'corpus = ["{CORPUS}"]\n',
        encoding="utf-8",
    )
    return path


@pytest.fixture
def consortium_config(tmp_path: Path) -> Path:
    path = tmp_path / "consortium.toml"
    path.write_text(
        'consortium_id = "c"\n[[nodes]]\nnode_id = "vietnam"\njurisdiction = "Vietnam"\n'
        'address = "127.0.0.1:50061"\n[[nodes]]\nnode_id = "india"\njurisdiction = "India"\n'
        'address = "127.0.0.1:50062"\n',
        encoding="utf-8",
    )
    return path


# -- addresses --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (
            ["node", "serve", "--config", "n.toml", "--data-dir", "d", "--listen", "127.0.0.1"],
            None,
            "Error: Invalid value for '--listen': expected HOST:PORT with a port in 0..65535 "
            "(0 picks a free port), got '127.0.0.1' (no port)",
        ),
        (
            [
                "coordinator",
                "serve",
                "--config",
                "c.toml",
                "--data-dir",
                "d",
                "--listen",
                "h:70000",
            ],
            None,
            "Error: Invalid value for '--listen': expected HOST:PORT with a port in 0..65535 "
            "(0 picks a free port), got 'h:70000' (port 70000 is out of range)",
        ),
        (
            ["round", "run", "--coordinator", "localhost"],
            None,
            "Error: Invalid value for '--coordinator': expected HOST:PORT with a port in 1..65535, "
            "got 'localhost' (no port)",
        ),
        (
            ["rounds", "--coordinator", "127.0.0.1:0"],
            None,
            "Error: Invalid value for '--coordinator': expected HOST:PORT with a port in 1..65535, "
            "got '127.0.0.1:0' (port 0 is out of range)",
        ),
        (
            ["artifacts"],
            {"TAPESTRY_COORDINATOR": "localhost"},
            "Error: Invalid value for '--coordinator' (from TAPESTRY_COORDINATOR): expected "
            "HOST:PORT with a port in 1..65535, got 'localhost' (no port)",
        ),
        (
            ["node", "serve", "--config", "n.toml", "--data-dir", "d"],
            {"TAPESTRY_LISTEN": "0.0.0.0"},
            "Error: Invalid value for '--listen' (from TAPESTRY_LISTEN): expected HOST:PORT with "
            "a port in 0..65535 (0 picks a free port), got '0.0.0.0' (no port)",
        ),
        (
            ["health", "--address", "127.0.0.1"],
            None,
            "Error: Invalid value for '--address': expected HOST:PORT with a port in 1..65535, "
            "got '127.0.0.1' (no port)",
        ),
    ],
)
def test_an_address_without_a_port_is_refused_before_anything_starts(args, env, expected):
    result = _cli(*args, env=env)
    assert result.exit_code == 2
    assert _error_line(result) == expected


@pytest.mark.parametrize("role", ["node", "coordinator"])
def test_serving_on_a_port_in_use_says_so_in_one_line(
    role, held_port, node_config, consortium_config, tmp_path
):
    config = node_config if role == "node" else consortium_config
    listen = f"127.0.0.1:{held_port}"
    result = _cli(
        role, "serve", "--config", str(config), "--data-dir", str(tmp_path / "d"),
        "--listen", listen,
    )  # fmt: skip
    assert result.exit_code == 1
    assert result.output.strip() == (
        f"Error: cannot listen on {listen}: the address is already in use — another process "
        f"(perhaps another Tapestry server) holds port {held_port}; stop it or choose another "
        "address with --listen HOST:PORT (port 0 picks a free port)"
    )


def test_serving_on_an_address_of_another_machine_says_so(node_config, tmp_path):
    result = _cli(
        "node", "serve", "--config", str(node_config), "--data-dir", str(tmp_path / "d"),
        "--listen", "192.0.2.1:50061",  # TEST-NET-1: never an address of this machine
    )  # fmt: skip
    assert result.exit_code == 1
    assert result.output.strip() == (
        "Error: cannot listen on 192.0.2.1:50061: 192.0.2.1 is not an address of this machine; "
        "pass one of its own with --listen HOST:PORT (127.0.0.1, or 0.0.0.0 for every interface)"
    )


# -- nobody there, or the wrong server ----------------------------------------------------


@pytest.mark.parametrize("command", [["round", "run"], ["rounds"], ["artifacts"]])
def test_no_coordinator_at_the_address_says_how_to_start_one(command, closed_port):
    address = f"127.0.0.1:{closed_port}"
    result = _cli(*command, "--coordinator", address)
    assert result.exit_code == 1
    assert result.output.strip() == (
        f"Error: no coordinator answers at {address} (UNAVAILABLE: connection refused) — is it "
        f"running? Start one with `tapestry coordinator serve --config FILE --data-dir DIR "
        f"--listen {address}`, or pass --coordinator HOST:PORT."
    )


@pytest.fixture
def other_server() -> Iterator[str]:
    """A gRPC server that serves health and reflection but no Tapestry service (as a node,
    or anything else, looks to a coordinator client)."""
    server, port, _ = build_server("127.0.0.1:0", [], [])
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(None).wait()


@pytest.mark.parametrize("command", [["round", "run"], ["rounds"], ["artifacts"]])
def test_a_server_that_is_not_a_coordinator_is_named_as_such(command, other_server):
    result = _cli(*command, "--coordinator", other_server)
    assert result.exit_code == 1
    assert result.output.strip() == (
        f"Error: {other_server} is not a Tapestry coordinator: it does not serve "
        f"{COORDINATOR.service_name} (UNIMPLEMENTED: Method not found!). Is this the right "
        "address? If not, pass the coordinator's address with --coordinator HOST:PORT."
    )


def test_the_expected_services_are_read_from_the_generated_contract():
    from tapestry.consortium.v1 import consortium_pb2 as pb

    services = {s.full_name for s in pb.DESCRIPTOR.services_by_name.values()}
    assert {COORDINATOR.service_name, NODE.service_name} == services
    assert COORDINATOR.service_name.startswith("tapestry.consortium.v1.Coordinator")
    assert NODE.service_name.startswith("tapestry.consortium.v1.SovereignNode")


def test_health_with_nobody_there_says_so(closed_port):
    address = f"127.0.0.1:{closed_port}"
    result = _cli("health", "--address", address)
    assert result.exit_code == 1
    assert result.output.strip() == (
        f"Error: no Tapestry server answers at {address} (UNAVAILABLE: connection refused) — "
        "is it running? Otherwise pass --address HOST:PORT."
    )


class _Failed(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize(
    ("code", "details", "expected"),
    [
        (
            grpc.StatusCode.UNAVAILABLE,
            "DNS resolution failed for vietnam:50061: C-ares status is not ARES_SUCCESS "
            "qtype=A name=vietnam is_balancer=0: Domain name not found",
            "no sovereign node answers at vietnam:50061 (UNAVAILABLE: domain name not found) — "
            "is it running? Otherwise fix its address in the consortium file.",
        ),
        (
            grpc.StatusCode.UNIMPLEMENTED,
            "Method not found!",
            f"vietnam:50061 is not a Tapestry sovereign node: it does not serve "
            f"{NODE.service_name} (UNIMPLEMENTED: Method not found!). Is this the right "
            "address? If not, fix its address in the consortium file.",
        ),
        # The TLS handshake failures gRPC reports, as measured against real servers.
        (
            grpc.StatusCode.UNAVAILABLE,
            "failed to connect to all addresses; last error: UNAVAILABLE: "
            "ipv4:127.0.0.1:33429: Socket closed",
            "no TLS connection to the sovereign node at vietnam:50061: the server closed the "
            "connection during the handshake: it serves mutual TLS and wants a certificate "
            "from its consortium (--ca, --cert, --key), or refused yours (UNAVAILABLE: failed "
            "to connect to all addresses; last error: UNAVAILABLE: ipv4:127.0.0.1:33429: "
            "Socket closed)",
        ),
        (
            grpc.StatusCode.UNAVAILABLE,
            "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:44787: "
            "Tls handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:100000f7:SSL "
            "routines:OPENSSL_internal:WRONG_VERSION_NUMBER",
            "no TLS connection to the sovereign node at vietnam:50061: the server speaks "
            "plaintext (it was started with --insecure); call it with --insecure (UNAVAILABLE: "
            "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:44787: "
            "Tls handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:100000f7:SSL "
            "routines:OPENSSL_internal:WRONG_VERSION_NUMBER)",
        ),
        (
            grpc.StatusCode.UNAVAILABLE,
            "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: "
            "Tls handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:1000007d:SSL "
            "routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED",
            "no TLS connection to the sovereign node at vietnam:50061: a certificate is not "
            "from the expected CA: the server's is not signed by the CA you trust (--ca), or "
            "yours is not signed by the server's (UNAVAILABLE: failed to connect to all "
            "addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: Tls handshake failed "
            "(TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:1000007d:SSL "
            "routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED)",
        ),
        (
            grpc.StatusCode.UNAVAILABLE,
            "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:2: Custom "
            "verification check failed with error: UNAUTHENTICATED: Hostname Verification "
            "Check failed.",
            "no TLS connection to the sovereign node at vietnam:50061: the server's "
            "certificate does not name the server expected there (for a node: its node id), "
            "so it is not that server (UNAVAILABLE: failed to connect to all addresses; last "
            "error: UNKNOWN: ipv4:127.0.0.1:2: Custom verification check failed with error: "
            "UNAUTHENTICATED: Hostname Verification Check failed.)",
        ),
        (
            grpc.StatusCode.UNAVAILABLE,
            "Socket closed",
            "the sovereign node at vietnam:50061 went away during the call "
            "(UNAVAILABLE: Socket closed)",
        ),
        (
            grpc.StatusCode.DEADLINE_EXCEEDED,
            "Deadline Exceeded",
            "the sovereign node at vietnam:50061 did not answer in time "
            "(DEADLINE_EXCEEDED: Deadline Exceeded)",
        ),
        (
            grpc.StatusCode.INVALID_ARGUMENT,
            "WireError: " + "x" * 400,
            "the sovereign node at vietnam:50061 refused the call (INVALID_ARGUMENT: WireError: "
            + "x" * 289
            + "… (411 characters))",
        ),
    ],
)
def test_rpc_errors_are_described_by_what_happened(code, details, expected):
    assert describe_rpc_error(_Failed(code, details), "vietnam:50061", NODE) == expected


def test_without_context_an_rpc_error_is_its_code_and_details():
    error = _Failed(grpc.StatusCode.NOT_FOUND, "no round 7")
    assert describe_rpc_error(error) == "NOT_FOUND: no round 7"
    assert describe_rpc_error(error, "h:1") == "h:1: NOT_FOUND: no round 7"
    assert SERVER.service_name == "grpc.health.v1.Health"


# -- settings from the environment and the configuration ----------------------------------


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {"TAPESTRY_ARENA_MAX": "0"},
            "Error: Invalid value for '--arena-max' (from TAPESTRY_ARENA_MAX): 0 is not in the "
            "range 1<=x<=1024.",
        ),
        (
            {"TAPESTRY_TRIM_THRESHOLD": "1MiB"},
            "Error: Invalid value for '--trim-threshold' (from TAPESTRY_TRIM_THRESHOLD): '1MiB' "
            "is not a valid integer range.",
        ),
        (
            {"TAPESTRY_TRIM_THRESHOLD": "-1"},
            "Error: Invalid value for '--trim-threshold' (from TAPESTRY_TRIM_THRESHOLD): -1 is "
            "not in the range 0<=x<=2147483647.",
        ),
        (
            {"TAPESTRY_LOG_LEVEL": "LOUD"},
            "Error: Invalid value for '--log-level' (from TAPESTRY_LOG_LEVEL): 'LOUD' is not one "
            "of 'debug', 'info', 'warning', 'error'.",
        ),
    ],
)
@pytest.mark.parametrize("server", ["coordinator", "node"])
def test_a_bad_environment_setting_is_refused_naming_the_variable(server, env, expected):
    result = _cli(server, "serve", "--config", "c.toml", "--data-dir", "d", env=env)
    assert result.exit_code == 2
    assert _error_line(result) == expected


@pytest.mark.parametrize(
    ("command", "variables"),
    [
        (
            ["coordinator", "serve"],
            [
                "TAPESTRY_CONFIG",
                "TAPESTRY_LISTEN",
                "TAPESTRY_DATA_DIR",
                "TAPESTRY_ARENA_MAX",
                "TAPESTRY_TRIM_THRESHOLD",
            ],
        ),
        (
            ["node", "serve"],
            [
                "TAPESTRY_CONFIG",
                "TAPESTRY_LISTEN",
                "TAPESTRY_DATA_DIR",
                "TAPESTRY_ARENA_MAX",
                "TAPESTRY_TRIM_THRESHOLD",
            ],
        ),
        (["round", "run"], ["TAPESTRY_COORDINATOR"]),
        (["rounds"], ["TAPESTRY_COORDINATOR"]),
        (["artifacts"], ["TAPESTRY_COORDINATOR"]),
        ([], ["TAPESTRY_LOG_LEVEL"]),
    ],
)
def test_help_names_every_environment_variable_a_command_reads(command, variables):
    result = _cli(*command, "--help")
    assert result.exit_code == 0
    text = " ".join(result.output.split())  # click's wrapping undone
    for variable in variables:
        assert f"env var: {variable}" in text


def test_a_cap_the_configured_members_cannot_meet_stops_the_coordinator_at_start_up(
    consortium_config, tmp_path
):
    config = consortium_config
    config.write_text(config.read_text() + "[policy]\nmax_node_weight = 0.3\n")
    result = _cli(
        "coordinator", "serve", "--config", str(config), "--data-dir", str(tmp_path / "d")
    )
    assert result.exit_code == 1
    assert result.output.strip() == (
        f"Error: {config}: (file): policy.max_node_weight = 0.3 can never hold "
        "with the 2 configured node(s): weights that sum to 1 under that cap need a quorum of "
        "at least 4 nodes (ceil(1/max_node_weight)); add members or raise max_node_weight to "
        "at least 0.5"
    )
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("where", ["closed", "other"])
def test_a_member_that_cannot_serve_its_cycle_is_reported_in_those_words(
    where, closed_port, other_server
):
    from tapestry.coordinator.remote_node import NodeCallFailed, RemoteSovereignNode

    address = f"127.0.0.1:{closed_port}" if where == "closed" else other_server
    node = RemoteSovereignNode("atlantis", "Atlantis", address)
    try:
        with pytest.raises(NodeCallFailed) as caught:
            node.run_sovereign_cycle(1, {})
    finally:
        node.close()
    assert (
        str(caught.value)
        == {
            "closed": f"no sovereign node answers at {address} (UNAVAILABLE: connection refused) — "
            "is it running? Otherwise fix its address in the consortium file.",
            "other": f"{address} is not a Tapestry sovereign node: it does not serve "
            f"{NODE.service_name} (UNIMPLEMENTED: Method not found!). Is this the right address? "
            "If not, fix its address in the consortium file.",
        }[where]
    )


def test_the_demo_refuses_a_delta_encoding_it_does_not_know() -> None:
    result = _cli("demo", "--delta-encoding", "int4", "--rounds", "0")
    assert result.exit_code == 2
    assert _error_line(result) == (
        "Error: Invalid value for '--delta-encoding': 'int4' is not one of 'float32', "
        "'bfloat16', 'float16', 'int8_block'."
    )


# The command as `tapestry` runs it, in an interpreter of its own; then whether it imported
# torch (this test process may have imported it already).
_FRESH = """
import sys
from tapestry.cli import main
try:
    main(sys.argv[1:], prog_name="tapestry")
except SystemExit as exit:
    print("torch imported:", "torch" in sys.modules)
    raise
"""


@pytest.mark.parametrize(
    ("role", "mistake", "expected"),
    [
        (
            "node",
            ("[training]\nlocal_epochs = 2\n", "[training]\nlocal_epoch = 2\n"),
            "training.local_epoch: Extra inputs are not permitted; did you mean 'local_epochs'?",
        ),
        (
            "node",
            (str(CORPUS), "/nonexistent/corpus.txt"),
            "corpus: corpus entry '/nonexistent/corpus.txt' matches no file; fix the file's "
            "`corpus` list",
        ),
        (
            "coordinator",
            ('consortium_id = "c"\n', 'consortium_id = "c"\nnode_timeout = 60\n'),
            "node_timeout: Extra inputs are not permitted; did you mean 'node_timeout_s'?",
        ),
    ],
)
def test_a_configuration_mistake_is_reported_before_torch_is_imported(
    role, mistake, expected, node_config, consortium_config, tmp_path
):
    config = node_config if role == "node" else consortium_config
    if role == "node":
        config.write_text(config.read_text() + "[training]\nlocal_epochs = 2\n")
    text = config.read_text()
    assert mistake[0] in text
    config.write_text(text.replace(mistake[0], mistake[1]))
    ran = subprocess.run(
        [sys.executable, "-c", _FRESH, role, "serve", "--config", str(config),
         "--data-dir", str(tmp_path / "d"), "--insecure"],
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert ran.returncode == 1, ran.stderr
    assert ran.stderr.strip() == f"Error: {config}: {expected}"
    assert ran.stdout.strip() == "torch imported: False"
    assert not (tmp_path / "d").exists()
