"""``tapestry init``: a local consortium's files from a few answers, consistent by
construction.

The files are :class:`~tapestry.demo.launcher.LocalConsortium`'s, in its layout: the
consortium file (the one ``[model]`` block), one node file per member (each naming the
coordinator it dials; it takes the model from there), the certificates (`tapestry certs
init`'s layout, one operator) and where each server keeps its data::

    OUT/config/consortium.toml    OUT/config/nodes/NODE_ID.toml
    OUT/certs/...                 OUT/data/coordinator, OUT/data/NODE_ID

The coordinator listens on 127.0.0.1 at a fixed port and the nodes dial it (they listen
nowhere), so the commands :meth:`LocalSetup.next_steps` prints work as written. Imports no
torch: it writes files and certificates.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tapestry.corpus import CorpusError, corpus_files
from tapestry.demo import DEMO_NODES
from tapestry.demo.launcher import OPERATOR, LocalConsortium, LocalNodeSpec
from tapestry.errors import UserError

HOST = "127.0.0.1"
DEMO_CORPORA = {spec.node_id: spec.corpus for spec in DEMO_NODES}
# Every member's own assessment of its data; the same for all, so the weighting decides.
QUALITY_SCORE = 1.0


@dataclass(frozen=True)
class Member:
    """One answer to ``--node``: who a member is, and the text it trains on."""

    node_id: str
    jurisdiction: str
    corpus: tuple[Path, ...]


def parse_member(text: str) -> Member:
    """``NODE_ID:JURISDICTION[:CORPUS]``, CORPUS a file or glob (relative to here); without
    one, the demo's corpus for the demo's nodes (vietnam, switzerland, india)."""
    node_id, colon, rest = text.partition(":")
    jurisdiction, _, corpus = rest.partition(":")
    if not colon or not node_id or not jurisdiction:
        raise UserError(
            f"--node {text!r}: give NODE_ID:JURISDICTION[:CORPUS], e.g. vietnam:Vietnam or "
            "kenya:Kenya:corpora/kenya/*.txt"
        )
    if corpus:
        paths: tuple[Path, ...] = (Path(corpus).absolute(),)
    elif node_id in DEMO_CORPORA:
        paths = tuple(path.absolute() for path in DEMO_CORPORA[node_id])
    else:
        raise UserError(
            f"--node {text!r}: say what node {node_id!r} trains on: "
            f"{node_id}:{jurisdiction}:CORPUS (UTF-8 text files, a glob such as "
            f"'corpora/{node_id}/*.txt'); only the demo's nodes ({', '.join(DEMO_CORPORA)}) "
            "have a corpus by default"
        )
    try:
        corpus_files(paths)
    except CorpusError as error:
        raise UserError(f"--node {text!r}: {error}") from None
    return Member(node_id, jurisdiction, paths)


@dataclass(frozen=True)
class LocalSetup:
    """What :func:`init_local_consortium` wrote, and where the coordinator will listen."""

    consortium: LocalConsortium
    coordinator_address: str
    node_ids: Sequence[str]

    def written(self) -> list[Path]:
        """The configuration files, consortium first."""
        nodes = [self.consortium.node_config_path(node_id) for node_id in self.node_ids]
        return [self.consortium.consortium_config_path, *nodes]

    def next_steps(self) -> list[str]:
        """The commands that start the coordinator, then every node (each dials it), then
        run a round."""
        consortium = self.consortium
        plain = "" if consortium.tls else " --insecure"
        steps = [
            f"tapestry coordinator serve --config {_q(consortium.consortium_config_path)} "
            f"--data-dir {_q(consortium.coordinator_data_dir)} "
            f"--listen {self.coordinator_address}{plain}"
        ]
        steps += [
            f"tapestry node serve --config {_q(consortium.node_config_path(node_id))} "
            f"--data-dir {_q(consortium.node_data_dir(node_id))}{plain}"
            for node_id in self.node_ids
        ]
        caller = plain.strip()
        if consortium.tls:
            pair = consortium.certs.holder("operator", OPERATOR)
            caller = (
                f"--ca {_q(consortium.certs.ca_cert)} --cert {_q(pair / 'cert.pem')} "
                f"--key {_q(pair / 'key.pem')}"
            )
        steps.append(f"tapestry round run --coordinator {self.coordinator_address} {caller}")
        return steps


def init_local_consortium(
    out: Path,
    members: Sequence[Member],
    *,
    consortium_id: str,
    model: str,
    policy: Mapping[str, Any],
    coordinator_port: int,
    seed: int,
    tls: bool = True,
) -> LocalSetup:
    """Write a consortium of ``members`` under ``out`` (which must be new or empty): the
    coordinator at ``HOST:coordinator_port``, every node dialing it. The consortium file
    is checked first (members, model, ``policy``: the fields of
    :class:`~tapestry.config.PolicyConfig`), so a refused answer writes nothing."""
    out = out.absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} is not an empty folder; give --out a new or empty one")
    consortium = LocalConsortium(
        out,
        [LocalNodeSpec(m.node_id, m.jurisdiction, QUALITY_SCORE, list(m.corpus)) for m in members],
        consortium_id=consortium_id,
        seed=seed,
        model={"architecture": model},
        policy=dict(policy),
        tls=tls,
    )
    node_ids = [m.node_id for m in members]
    if len(set(node_ids)) < len(members):
        raise UserError(f"--node: each node id once, got {node_ids}")
    consortium.write_consortium_config()  # checks every answer before anything else
    consortium.coordinator_address = f"{HOST}:{coordinator_port}"  # what the nodes dial
    for spec in consortium.nodes:
        consortium.write_node_config(spec)
    consortium.create_certificates()
    return LocalSetup(consortium, consortium.coordinator_address, node_ids)


def _q(path: Path) -> str:
    return shlex.quote(str(path))
