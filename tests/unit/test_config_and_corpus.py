"""Configuration files and corpora: validated once, with errors that say where and why."""

from __future__ import annotations

from pathlib import Path

import pytest

from tapestry.address import check_address
from tapestry.config import ConfigError, ConsortiumConfig, NodeConfig, load_config
from tapestry.corpus import CorpusError, load_corpus
from tapestry.limits import MAX_NODE_TIMEOUT_S

NODE = """
node_id = "vietnam"
jurisdiction = "Vietnam"
consortium_id = "c"
quality_score = 0.9
corpus = ["corpora/*.txt"]
seed = 7
[training]
local_epochs = 2
max_seq_len = 16
"""

CONSORTIUM = """
consortium_id = "c"
[policy]
quality_floor = 0.75
max_node_weight = 0.5
[[nodes]]
node_id = "vietnam"
jurisdiction = "Vietnam"
address = "vietnam:50061"
[[nodes]]
node_id = "india"
jurisdiction = "India"
address = "india:50061"
"""


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_node_config_resolves_corpus_paths_against_its_folder(tmp_path):
    config = load_config(_write(tmp_path / "cfg" / "node.toml", NODE), NodeConfig)
    assert config.corpus == [tmp_path / "cfg" / "corpora" / "*.txt"]
    assert (
        config.training.local_epochs,
        config.training.lr,
        config.training.batch_size,
        config.training.max_seq_len,
    ) == (2, 1e-3, 8, 16)
    assert config.model is None  # a node that dials out takes the model from the coordinator
    assert config.consortium_id == "c"
    assert (
        config.limits.max_round_gap,
        config.limits.receive_timeout_s,
        config.limits.send_timeout_s,
        config.limits.max_superseded,
    ) == (1000, 300.0, 300.0, 3)


def test_consortium_config_builds_the_policy(tmp_path):
    config = load_config(_write(tmp_path / "c.toml", CONSORTIUM), ConsortiumConfig)
    policy = config.policy.policy()
    assert (policy.quality_floor, policy.max_node_weight, policy.weighting.value) == (
        0.75,
        0.5,
        "quality",
    )
    assert config.nodes[0].address == "vietnam:50061"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (
            NODE.replace("quality_score = 0.9", "quality_score = nan"),
            "quality_score: Input should be a finite number",
        ),
        (
            NODE.replace("seed = 7", "seed = 7\nlearning_rate = 3"),
            "learning_rate: Extra inputs are not permitted",
        ),
        (
            NODE.replace('node_id = "vietnam"', 'node_id = "Viet Nam!"'),
            "node_id: String should match pattern",
        ),
        (
            NODE.replace("local_epochs = 2", "local_epochs = 0"),
            "training.local_epochs: Input should be greater than or equal to 1",
        ),
        (
            NODE.replace('corpus = ["corpora/*.txt"]', "corpus = []"),
            "corpus: List should have at least 1 item",
        ),
        ("node_id = ", "not valid TOML"),
        (
            NODE.replace("quality_score = 0.9", "quality_score = 1e300"),
            "quality_score: Input should be less than or equal to 1",
        ),
        (
            NODE.replace("quality_score = 0.9", "quality_score = -0.1"),
            "quality_score: Input should be greater than or equal to 0",
        ),
        (NODE.replace('consortium_id = "c"\n', ""), "consortium_id: Field required"),
        (
            NODE.replace('consortium_id = "c"', 'consortium_id = ""'),
            "consortium_id: String should have at least 1 character",
        ),
        (
            NODE + "[limits]\nmax_round_gap = 0\n",
            "limits.max_round_gap: Input should be greater than or equal to 1",
        ),
        (
            NODE + "[limits]\nreceive_timeout_s = inf\n",
            "limits.receive_timeout_s: Input should be a finite number",
        ),
        (
            NODE + "[limits]\nsend_timeout_s = 86401\n",
            "limits.send_timeout_s: Input should be less than or equal to 86400",
        ),
        (
            NODE + "[limits]\nmax_superseded = -1\n",
            "limits.max_superseded: Input should be greater than or equal to 0",
        ),
    ],
)
def test_bad_node_config_names_the_field(tmp_path, text, fragment):
    path = _write(tmp_path / "node.toml", text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, NodeConfig)
    assert str(caught.value).startswith(str(path))
    assert fragment in str(caught.value)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (
            CONSORTIUM.replace("max_node_weight = 0.5", "max_node_weight = 1.5"),
            "policy.max_node_weight: max_node_weight must be in (0, 1], got 1.5",
        ),
        (
            CONSORTIUM.replace('address = "vietnam:50061"', 'address = "vietnam"'),
            "nodes.0.address: expected HOST:PORT with a port in 1..65535, got 'vietnam' (no port)",
        ),
        (
            CONSORTIUM.replace('address = "india:50061"', 'address = "india:99999"'),
            "nodes.1.address: expected HOST:PORT with a port in 1..65535, "
            "got 'india:99999' (port 99999 is out of range)",
        ),
        (
            CONSORTIUM + CONSORTIUM[CONSORTIUM.index("[[nodes]]") :],
            "node_id must be unique, repeated: ['india', 'vietnam']",
        ),
        (
            CONSORTIUM.replace("quality_floor = 0.75", "quality_floor = inf"),
            "policy.quality_floor: Input should be a finite number",
        ),
        (
            CONSORTIUM.replace('consortium_id = "c"', 'consortium_id = "c"\nnode_timeout_s = inf'),
            "node_timeout_s: Input should be a finite number",
        ),
        (
            CONSORTIUM.replace(
                'consortium_id = "c"',
                f'consortium_id = "c"\nnode_timeout_s = {MAX_NODE_TIMEOUT_S + 1}',
            ),
            "node_timeout_s: Input should be less than or equal to 604800",
        ),
        (
            CONSORTIUM.replace("max_node_weight = 0.5", "max_node_weight = 0.3"),
            "(file): policy.max_node_weight = 0.3 can never hold with the 2 "
            "configured node(s): weights that sum to 1 under that cap need a quorum of at least "
            "4 nodes (ceil(1/max_node_weight)); add members or raise max_node_weight to at least 0.5",
        ),
        (CONSORTIUM.replace('consortium_id = "c"', ""), "consortium_id: Field required"),
        (
            CONSORTIUM.replace("[policy]", '[policy]\nweighting = "loudest"'),
            "policy.weighting: Input should be 'quality' or 'equal'",
        ),
    ],
)
def test_bad_consortium_config_names_the_field(tmp_path, text, fragment):
    with pytest.raises(ConfigError) as caught:
        load_config(_write(tmp_path / "c.toml", text), ConsortiumConfig)
    assert fragment in str(caught.value)


def test_a_cap_the_members_can_just_meet_is_accepted(tmp_path):
    # 2 nodes under a cap of 0.5: each gets exactly half, which the cap allows.
    config = load_config(_write(tmp_path / "c.toml", CONSORTIUM), ConsortiumConfig)
    assert (len(config.nodes), config.policy.max_node_weight) == (2, 0.5)


@pytest.mark.parametrize(
    "address", ["127.0.0.1:50051", "vietnam:1", "node-1.example.org:65535", "[::1]:50061"]
)
def test_an_address_is_host_and_port(address):
    assert check_address(address) == address


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("127.0.0.1", "(no port)"),
        ("localhost", "(no port)"),
        ("[::1]", "(no port)"),
        ("vietnam:", "(no port)"),
        (":50051", "(no host)"),
        ("vietnam:99999", "(port 99999 is out of range)"),
        ("vietnam:0", "(port 0 is out of range)"),
        ("vietnam:http", "(port 'http' is not a number)"),
        ("viet nam:50061", "(bad host name; IPv6 goes in [brackets])"),
        ("::1:50061", "(bad host name; IPv6 goes in [brackets])"),
        ("[::g]:50061", "(bad IPv6 address)"),
    ],
)
def test_an_address_without_a_usable_port_or_host_is_refused(address, why):
    with pytest.raises(ValueError) as caught:
        check_address(address)
    assert str(caught.value) == (
        f"expected HOST:PORT with a port in 1..65535, got {address!r} {why}"
    )


def test_port_zero_is_allowed_only_where_a_free_port_is_meant():
    assert check_address("127.0.0.1:0", free_port=True) == "127.0.0.1:0"
    with pytest.raises(ValueError) as caught:
        check_address("127.0.0.1", free_port=True)
    assert str(caught.value) == (
        "expected HOST:PORT with a port in 0..65535 (0 picks a free port), "
        "got '127.0.0.1' (no port)"
    )


@pytest.mark.parametrize(
    ("typo", "expected"),
    [
        (
            NODE.replace("local_epochs = 2", "local_epoch = 2"),
            "training.local_epoch: Extra inputs are not permitted; did you mean 'local_epochs'?",
        ),
        (
            NODE.replace("seed = 7", "seed = 7\nqualty = 1"),
            "qualty: Extra inputs are not permitted; did you mean 'quality_score'?",
        ),
        # the right key in the wrong section: the section is named
        (
            NODE.replace("seed = 7", "seed = 7\nlocal_epochs = 1"),
            "local_epochs: Extra inputs are not permitted; did you mean 'training.local_epochs'?",
        ),
        (NODE + "[model]\nhiden_size = 8\n", "did you mean 'hidden_size'?"),
        (NODE.replace("seed = 7", "seed = 7\nzzz = 1"), "zzz: Extra inputs are not permitted"),
    ],
)
def test_an_unknown_key_is_refused_naming_the_closest_valid_one(tmp_path, typo, expected):
    path = _write(tmp_path / "node.toml", typo)
    with pytest.raises(ConfigError) as caught:
        load_config(path, NodeConfig)
    assert str(caught.value).startswith(f"{path}: ")
    assert str(caught.value).endswith(expected)


def test_an_unknown_member_key_names_the_closest_valid_one(tmp_path):
    path = _write(tmp_path / "c.toml", CONSORTIUM.replace('address = "india', 'adress = "india'))
    with pytest.raises(ConfigError) as caught:
        load_config(path, ConsortiumConfig)
    assert str(caught.value) == (
        f"{path}: nodes.1.adress: Extra inputs are not permitted; did you mean 'address'?"
    )


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="no such configuration file"):
        load_config(tmp_path / "absent.toml", NodeConfig)


def test_corpus_lines_become_byte_windows(tmp_path):
    _write(tmp_path / "a.txt", "héllo\n\n  world  \n" + "x" * 10 + "\n")
    sequences = load_corpus([tmp_path / "a.txt"], max_seq_len=4)
    assert sequences == [
        list("héllo".encode())[:4],
        list("héllo".encode())[4:],
        list(b"worl"),
        list(b"d"),
        list(b"xxxx"),
        list(b"xxxx"),
        list(b"xx"),
    ]


def test_corpus_errors_name_the_file(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café".encode("latin-1"))
    with pytest.raises(CorpusError, match=r"latin1.txt: not valid UTF-8 at byte 3"):
        load_corpus([bad], 16)
    with pytest.raises(CorpusError, match="matches no file"):
        load_corpus([tmp_path / "nothing-*.txt"], 16)
    _write(tmp_path / "tiny.txt", "a\nb\n")
    with pytest.raises(CorpusError, match="no line of 2 or more bytes"):
        load_corpus([tmp_path / "tiny.txt"], 16)


def test_a_member_may_carry_the_consortiums_own_quality_assessment(tmp_path):
    text = CONSORTIUM.replace(
        'address = "vietnam:50061"', 'address = "vietnam:50061"\nquality_score = 0.8'
    )
    config = load_config(_write(tmp_path / "c.toml", text), ConsortiumConfig)
    assert config.nodes[0].quality_score == 0.8
    assert (
        load_config(_write(tmp_path / "d.toml", CONSORTIUM), ConsortiumConfig)
        .nodes[0]
        .quality_score
        is None
    )


def test_the_services_policy_defaults_keep_any_one_member_from_capturing_the_base(tmp_path):
    text = CONSORTIUM.replace("quality_floor = 0.75\nmax_node_weight = 0.5\n", "")
    policy = load_config(_write(tmp_path / "c.toml", text), ConsortiumConfig).policy.policy()
    assert (policy.max_node_weight, policy.max_quality) == (0.5, 1.0)
    assert (policy.max_delta_norm, policy.max_delta_norm_ratio) == (None, 10.0)


@pytest.mark.parametrize(
    ("setting", "fragment"),
    [
        (
            "max_delta_norm = 0",
            "policy.max_delta_norm: max_delta_norm must be None or a finite number > 0.0",
        ),
        (
            "max_delta_norm_ratio = 1",
            "policy.max_delta_norm_ratio: max_delta_norm_ratio must be None or a finite number > 1.0",
        ),
        (
            "quality_floor = 2",
            "policy: quality_floor 2.0 is above max_quality = 1.0: every contribution would be refused",
        ),
    ],
)
def test_policy_bounds_that_make_no_sense_are_refused(tmp_path, setting, fragment):
    text = CONSORTIUM.replace("quality_floor = 0.75\n", f"{setting}\n")
    with pytest.raises(ConfigError, match=fragment):
        load_config(_write(tmp_path / "c.toml", text), ConsortiumConfig)
