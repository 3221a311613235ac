"""`tapestry init`: a consistent local consortium from a few answers, every file one the
servers load, and the commands it prints (tests/integration/test_init_consortium.py runs
them)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from tapestry.cli import main
from tapestry.config import ConsortiumConfig, NodeConfig, load_config
from tapestry.pki.credentials import check_credentials
from tapestry.pki.layout import spiffe_id

DEMO_CORPORA = Path(__file__).parents[2] / "services" / "tapestry" / "demo" / "corpora"


def _init(*args: str):
    return CliRunner().invoke(main, ["init", *args])


def test_init_writes_files_every_server_loads_with_one_model_block(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    corpus = tmp_path / "kenya.txt"
    corpus.write_text("Mvua za masika zimeanza mapema mwaka huu.\nThe co-op sells tea.\n")
    ran = _init(
        "--out", str(out), "--node", "vietnam:Vietnam,switzerland:Switzerland",
        "--node", f"kenya:Kenya:{corpus}", "--model", "gpt", "--strategy", "median",
        "--max-node-weight", "0.6", "--consortium-id", "mine",
    )  # fmt: skip
    assert ran.exit_code == 0, ran.output

    consortium = load_config(out / "config" / "consortium.toml", ConsortiumConfig)
    nodes = {
        member.node_id: load_config(out / "config" / "nodes" / f"{member.node_id}.toml", NodeConfig)
        for member in consortium.nodes
    }
    # Every member dials out: the consortium file gives none an address.
    assert [(m.node_id, m.jurisdiction, m.address) for m in consortium.nodes] == [
        ("vietnam", "Vietnam", None),
        ("switzerland", "Switzerland", None),
        ("kenya", "Kenya", None),
    ]
    assert consortium.model.architecture == "gpt"
    assert (consortium.policy.strategy, consortium.policy.max_node_weight) == ("median", 0.6)
    for node_id, node in nodes.items():
        assert (node.node_id, node.consortium_id, node.seed) == (node_id, "mine", consortium.seed)
        assert (
            node.jurisdiction
            == next(m for m in consortium.nodes if m.node_id == node_id).jurisdiction
        )
        # The model is the coordinator's, sent at each session's opening: written once.
        assert (node.model, node.coordinator) == (None, "127.0.0.1:50051")
        assert node.tls is not None
        check_credentials(
            node.tls.cert, node.tls.key, node.tls.ca, expect_san=spiffe_id("mine", "node", node_id)
        )
    assert nodes["vietnam"].corpus == [DEMO_CORPORA / "vietnam.txt"]
    assert nodes["kenya"].corpus == [corpus]
    assert consortium.tls is not None
    check_credentials(consortium.tls.cert, consortium.tls.key, consortium.tls.ca,
                      expect_san=spiffe_id("mine", "coordinator"))  # fmt: skip

    operator = out / "certs" / "operators" / "operator"
    assert ran.output.splitlines()[-6:] == [
        "Next, each server in a terminal of its own (the coordinator first), then a round:",
        f"  tapestry coordinator serve --config {out}/config/consortium.toml --data-dir "
        f"{out}/data/coordinator --listen 127.0.0.1:50051",
        *(
            f"  tapestry node serve --config {out}/config/nodes/{node_id}.toml --data-dir "
            f"{out}/data/{node_id}"
            for node_id in ("vietnam", "switzerland", "kenya")
        ),
        f"  tapestry round run --coordinator 127.0.0.1:50051 --ca {out}/certs/ca.pem --cert "
        f"{operator}/cert.pem --key {operator}/key.pem",
    ]


def test_insecure_writes_no_certificates_and_says_insecure_in_every_command(tmp_path) -> None:
    out = tmp_path / "plain"
    ran = _init("--out", str(out), "--node", "vietnam:Vietnam,india:India", "--insecure",
                "--coordinator-port", "7000")  # fmt: skip
    assert ran.exit_code == 0, ran.output
    assert not (out / "certs").exists()
    assert load_config(out / "config" / "consortium.toml", ConsortiumConfig).tls is None
    assert load_config(out / "config" / "nodes" / "india.toml", NodeConfig).tls is None
    commands = [line for line in ran.output.splitlines() if line.startswith("  tapestry ")]
    assert len(commands) == 4
    assert all(command.endswith(" --insecure") for command in commands)
    assert commands[-1] == "  tapestry round run --coordinator 127.0.0.1:7000 --insecure"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["--node", "vietnam:Vietnam", "--node", "kenya:Kenya"],
            "Error: --node 'kenya:Kenya': say what node 'kenya' trains on: kenya:Kenya:CORPUS "
            "(UTF-8 text files, a glob such as 'corpora/kenya/*.txt'); only the demo's nodes "
            "(vietnam, switzerland, india) have a corpus by default",
        ),
        (
            ["--node", "vietnam"],
            "Error: --node 'vietnam': give NODE_ID:JURISDICTION[:CORPUS], e.g. vietnam:Vietnam "
            "or kenya:Kenya:corpora/kenya/*.txt",
        ),
        (
            ["--node", "vietnam:Vietnam,india:India", "--max-node-weight", "0.3"],
            "Error: local consortium: (file): policy.max_node_weight = 0.3 can never "
            "hold with the 2 configured node(s): weights that sum to 1 under that cap need a "
            "quorum of at least 4 nodes (ceil(1/max_node_weight)); add members or raise "
            "max_node_weight to at least 0.5",
        ),
        (
            ["--node", "vietnam:Vietnam,vietnam:Vietnam"],
            "Error: --node: each node id once, got ['vietnam', 'vietnam']",
        ),
        # A node id that no file may hold (a path, a capital, a thousand characters) and a
        # port past 65535 are the consortium file's refusals, said in one line (the id is
        # not echoed), never a traceback.
        *(
            (
                ["--node", f"{node_id}:Kenya:{DEMO_CORPORA / 'vietnam.txt'}"],
                "Error: local consortium: nodes.0.node_id: String should match pattern "
                "'^[a-z0-9][a-z0-9_-]{0,62}$'",
            )
            for node_id in ("../evil", "a/b", "..", "Kenya", "k" * 1000)
        ),
    ],
)
def test_an_answer_that_cannot_work_is_refused_and_nothing_is_written(
    tmp_path, args, expected
) -> None:
    out = tmp_path / "refused"
    ran = _init("--out", str(out), *args)
    assert ran.exit_code == 1
    assert ran.output.strip() == expected
    assert not out.exists()


def test_init_refuses_a_folder_that_holds_anything(tmp_path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    ran = _init("--out", str(tmp_path), "--node", "vietnam:Vietnam,india:India")
    assert ran.exit_code == 1
    assert ran.output.strip() == (
        f"Error: {tmp_path} is not an empty folder; give --out a new or empty one"
    )
