"""A member the consortium file names wrongly stops the coordinator at start, in one line
naming the file, the entry and the value the node there gives, where a round would only
fail that member and commit without it. Other problems with a member (another member's
id at its address, unreachable) stay warnings: its rounds fail it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import grpc
import pytest

from tapestry.config import ConsortiumConfig, TlsConfig, build_config
from tapestry.coordinator.startup import MemberError, build_coordinator_server
from tapestry.pki.authority import init_consortium

from .fake_nodes import FakeNode, serve

SOURCE = "consortium.toml"
FIX = ". Fix the entry (or the node's own config, if the file is right)"


def _config(members: list[dict[str, str]], tls: TlsConfig | None = None) -> ConsortiumConfig:
    settings = {"consortium_id": "c", "nodes": members}
    if tls is not None:
        settings["tls"] = tls.model_dump()
    return build_config(ConsortiumConfig, settings, "test")


@contextmanager
def _started(config: ConsortiumConfig, data_dir: Path) -> Iterator[None]:
    server, _, _, roster = build_coordinator_server(
        config, "127.0.0.1:0", data_dir, insecure=config.tls is None, source=SOURCE
    )
    try:
        yield
    finally:
        roster.close()
        server.stop(None)


def test_a_jurisdiction_typo_stops_the_coordinator_naming_the_right_one(tmp_path):
    with serve([FakeNode("vietnam"), FakeNode("switzerland", jurisdiction="Switzerland")]) as m:
        m[1]["jurisdiction"] = "Switzerlnd"
        with pytest.raises(MemberError) as caught, _started(_config(m), tmp_path / "d"):
            pass
    assert str(caught.value) == (
        f"{SOURCE}: member 'switzerland' (nodes[1], at {m[1]['address']}): the node there "
        "serves jurisdiction 'Switzerland', not 'Switzerlnd' (did you mean jurisdiction = "
        f"'Switzerland'?){FIX}"
    )


def test_an_id_the_file_does_not_list_stops_the_coordinator_naming_the_nodes_own(tmp_path):
    with serve([FakeNode("vietnam"), FakeNode("switzerland")]) as m:
        m[1]["node_id"] = "switzerlnd"
        with pytest.raises(MemberError) as caught, _started(_config(m), tmp_path / "d"):
            pass
    assert str(caught.value) == (
        f"{SOURCE}: member 'switzerlnd' (nodes[1], at {m[1]['address']}): the node there is "
        f"'switzerland', which the file does not list (did you mean node_id = 'switzerland'?)"
        f"{FIX}"
    )


def test_under_tls_an_id_typo_is_read_from_the_nodes_certificate(tmp_path):
    """The handshake itself is refused for the name (the certificate names switzerland),
    so Describe never answers: the node's certificate says who it is."""
    certs = init_consortium(
        tmp_path / "certs",
        "c",
        coordinator_hosts=["127.0.0.1"],
        nodes=[("vietnam", "127.0.0.1"), ("switzerland", "127.0.0.1")],
        operators=[],
    )
    members = []
    with ExitStack() as stack:
        for node_id in ("vietnam", "switzerland"):
            pair = certs.member("node", node_id)
            credentials = grpc.ssl_server_credentials(
                [((pair / "key.pem").read_bytes(), (pair / "cert.pem").read_bytes())]
            )
            members += stack.enter_context(serve([FakeNode(node_id)], credentials))
        members[1]["node_id"] = "switzerlnd"
        own = certs.coordinator
        tls = TlsConfig(ca=certs.ca_cert, cert=own / "cert.pem", key=own / "key.pem")
        with pytest.raises(MemberError) as caught, _started(_config(members, tls), tmp_path / "d"):
            pass
    assert str(caught.value) == (
        f"{SOURCE}: member 'switzerlnd' (nodes[1], at {members[1]['address']}): the node "
        "there presents the certificate of node 'switzerland', which the file does not list "
        f"(did you mean node_id = 'switzerland'?){FIX}"
    )


def test_another_members_id_at_an_address_is_a_warning_and_the_coordinator_starts(tmp_path, caplog):
    """Either an address mistake or an impostor: the round fails that member (tests in
    test_misbehaving_nodes.py); start-up goes on, so an impostor cannot keep the
    coordinator down."""
    with serve([FakeNode("vietnam"), FakeNode("vietnam")]) as m:
        m[1]["node_id"] = "ghost"
        with _started(_config(m), tmp_path / "d"):
            pass
    assert "member ghost: the server at" in caplog.text
    assert "node_id 'vietnam', expected 'ghost'" in caplog.text
