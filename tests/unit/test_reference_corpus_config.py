"""``[policy] reference_corpus``: the consortium's public corpus for measured quality, read
as a node reads its corpus (a file or a folder, relative to the consortium file's folder),
refused naming the key and the path when it cannot be used."""

from __future__ import annotations

from pathlib import Path

import pytest

from tapestry.config import ConfigError, ConsortiumConfig, load_config
from tapestry.coordinator.startup import REFERENCE_NODE_ID, reference_node

MEMBERS = """
[[nodes]]
node_id = "vietnam"
jurisdiction = "Vietnam"
[[nodes]]
node_id = "india"
jurisdiction = "India"
"""


def _consortium(folder: Path, policy: str, members: str = MEMBERS, model: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "consortium.toml"
    path.write_text(f'consortium_id = "c"\nseed = 3\n{model}\n{policy}\n{members}', "utf-8")
    return path


def test_a_reference_file_resolves_against_the_consortium_file_s_folder(tmp_path):
    (tmp_path / "cfg" / "public").mkdir(parents=True)
    (tmp_path / "cfg" / "public" / "text.txt").write_text("first line\n\nsecond line\n", "utf-8")
    path = _consortium(
        tmp_path / "cfg",
        '[policy]\nreference_corpus = "public/text.txt"\n'
        "[policy.reference]\nlocal_epochs = 1\nlr = 0.01\nbatch_size = 2\nmax_seq_len = 4\n",
    )

    config = load_config(path, ConsortiumConfig)
    node = reference_node(config, str(path))

    assert config.policy.reference_corpus == tmp_path / "cfg" / "public" / "text.txt"
    assert node is not None and node.node_id == REFERENCE_NODE_ID
    assert (node.local_epochs, node.lr, node.batch_size, node.seed) == (1, 0.01, 2, 3)
    # "first line" and "second line" in windows of at most 4 bytes
    assert node.sovereign_corpus[:3] == [list(b"firs"), list(b"t li"), list(b"ne")]
    assert node.token_count == len("first line") + len("second line")


def test_a_reference_folder_is_every_file_under_it_and_defaults_are_a_node_s(tmp_path):
    public = tmp_path / "public"
    (public / "more").mkdir(parents=True)
    (public / "a.txt").write_text("alpha\n", "utf-8")
    (public / "more" / "b.md").write_text("beta\n", "utf-8")
    (public / ".hidden").write_text("\xff never read\n", "latin-1")
    path = _consortium(tmp_path, f'[policy]\nreference_corpus = "{public}"\n')

    node = reference_node(load_config(path, ConsortiumConfig))

    assert node is not None
    assert node.sovereign_corpus == [list(b"alpha"), list(b"beta")]
    assert (node.local_epochs, node.lr, node.batch_size) == (3, 1e-3, 8)


def test_without_a_reference_corpus_there_is_no_reference_node(tmp_path):
    config = load_config(_consortium(tmp_path, "[policy]\n"), ConsortiumConfig)
    assert config.policy.reference_corpus is None
    assert reference_node(config) is None


@pytest.mark.parametrize(
    ("policy", "members", "model", "fragment"),
    [
        (
            '[policy]\nreference_corpus = "nowhere.txt"\n',
            MEMBERS,
            "",
            "policy.reference_corpus: '{tmp}/nowhere.txt' is no file or folder; give the "
            "reference corpus's path (relative to the consortium file's folder)",
        ),
        (
            "[policy.reference]\nlocal_epochs = 1\n",
            MEMBERS,
            "",
            "policy: [policy.reference] trains the reference update on reference_corpus, "
            "which is unset; set policy.reference_corpus or remove [policy.reference]",
        ),
        (
            '[policy]\nreference_corpus = "public.txt"\n[policy.reference]\nepochs = 1\n',
            MEMBERS,
            "",
            "policy.reference.epochs: Extra inputs are not permitted; did you mean 'local_epochs'?",
        ),
        (
            '[policy]\nreference_corpus = "public.txt"\n',
            MEMBERS.replace('jurisdiction = "India"', 'jurisdiction = "India"\nquality_score = 1'),
            "",
            "nodes[1].quality_score is never weighed when policy.reference_corpus is set "
            "(measured quality replaces it); remove one",
        ),
        (
            '[policy]\nreference_corpus = "public.txt"\n',
            MEMBERS,
            '[model]\narchitecture = "gpt"\nvocab_size = 256\nhidden_size = 8\ncontext_length = 32\n',
            "policy.reference.max_seq_len = 128 gives inputs of 127 positions, past the "
            "model's context length 32; set max_seq_len to at most 33",
        ),
    ],
    ids=["missing", "table-without-corpus", "typo", "assessed-too", "window"],
)
def test_a_reference_setting_that_cannot_work_is_refused_naming_the_key(
    tmp_path, policy, members, model, fragment
):
    (tmp_path / "public.txt").write_text("some public text\n", "utf-8")
    path = _consortium(tmp_path, policy, members, model)
    with pytest.raises(ConfigError) as refused:
        load_config(path, ConsortiumConfig)
    assert str(refused.value).startswith(f"{path}: ")
    assert fragment.format(tmp=tmp_path) in str(refused.value)


@pytest.mark.parametrize(
    ("write", "fragment"),
    [
        (
            lambda p: p.write_text("\n  \nx\n", "utf-8"),
            "has no line of 2 or more bytes to train on",
        ),
        (lambda p: p.write_bytes(b"caf\xe9\n"), "not valid UTF-8 at byte 3"),
        (lambda p: p.mkdir(), "matches no file"),
    ],
    ids=["no-line-to-train-on", "not-utf8", "empty-folder"],
)
def test_a_reference_corpus_that_cannot_be_read_names_the_key_and_the_path(
    tmp_path, write, fragment
):
    public = tmp_path / "public"
    write(public)
    path = _consortium(tmp_path, '[policy]\nreference_corpus = "public"\n')
    config = load_config(path, ConsortiumConfig)
    with pytest.raises(ConfigError) as refused:
        reference_node(config, str(path))
    assert str(refused.value).startswith(f"{path}: policy.reference_corpus = '{public}': ")
    assert fragment in str(refused.value)
