"""A corpus: UTF-8 text files turned into byte-level token sequences. A node's is split into
a training part and a held-out part that the node never trains on; the coordinator's
reference corpus (``[policy] reference_corpus``, measured quality) is read by the same
functions and trained on whole. Both services read it, so it lives outside either.

Every non-blank line (stripped) is one document; its UTF-8 bytes are its tokens (vocabulary
256), cut into windows of at most ``max_seq_len`` tokens. Files are matched by glob
patterns, read in sorted order, and must be valid UTF-8: a bad file is an error naming the
file and byte.

**The held-out split** (:func:`split_documents`) is decided per document, before windowing,
by a seeded hash, so it is the same on every run, in every process, and whatever order the
files list their lines in::

    bucket(document) = int.from_bytes(sha256(f"{seed}\\0{node_id}\\0{document}")[:8], "big") % 100
    held out  <=>  bucket(document) < heldout_percent

``seed`` is the consortium seed and ``node_id`` the node's. A document and all of its windows
fall on one side, and so do repeated copies of one document (same text, same hash): nothing
is in both parts. Then two guarantees, so small corpora still train and evaluate: if no
held-out document has a next-token target (2 or more bytes), the training document of
lowest ``(bucket, hash)`` is held out instead; if no training document has one, the held-out
document of highest ``(bucket, hash)`` goes back to training. A corpus with fewer than two
distinct such documents cannot be split: :class:`CorpusError`. ``heldout_percent = 0``
holds nothing out (and the node evaluates nothing).
"""

from __future__ import annotations

import glob
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tapestry.errors import UserError

if TYPE_CHECKING:
    from tapestry.config import NodeConfig


class CorpusError(UserError, ValueError):
    """The corpus cannot be used; the message names the file and what is wrong."""


@dataclass(frozen=True)
class SplitCorpus:
    """A node's token sequences: ``training`` to train on, ``heldout`` to evaluate on
    (empty when nothing is held out)."""

    training: list[list[int]]
    heldout: list[list[int]]


def corpus_files(patterns: Sequence[Path]) -> list[Path]:
    files: list[Path] = []
    for pattern in patterns:
        matches = sorted(Path(p) for p in glob.glob(str(pattern), recursive=True))
        matches = [m for m in matches if m.is_file()]
        if not matches:
            raise CorpusError(f"corpus entry {str(pattern)!r} matches no file")
        files.extend(m for m in matches if m not in files)
    return files


def file_or_folder(path: Path) -> list[Path]:
    """The patterns that read ``path``: the file itself, or every file under the folder
    (recursively, in sorted order; hidden ones skipped, as globs skip them)."""
    return [path / "**" / "*"] if path.is_dir() else [path]


def read_documents(patterns: Sequence[Path]) -> list[str]:
    """Every non-blank line of every matched file, stripped, in file and line order."""
    documents: list[str] = []
    for path in corpus_files(patterns):
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as error:
            raise CorpusError(
                f"{path}: not valid UTF-8 at byte {error.start} ({error.reason}); "
                "re-encode the file as UTF-8"
            ) from None
        documents.extend(line.strip() for line in text.splitlines() if line.strip())
    return documents


def windows(documents: Sequence[str], max_seq_len: int) -> list[list[int]]:
    """Each document's UTF-8 bytes, cut into windows of at most ``max_seq_len`` tokens."""
    if max_seq_len < 2:
        raise CorpusError(f"max_seq_len must be >= 2, got {max_seq_len}")
    sequences: list[list[int]] = []
    for document in documents:
        tokens = list(document.encode("utf-8"))
        for start in range(0, len(tokens), max_seq_len):
            sequences.append(tokens[start : start + max_seq_len])
    return sequences


def trainable_documents(patterns: Sequence[Path]) -> list[str]:
    """:func:`read_documents`, refused when no line has a next-token target (2+ bytes)."""
    documents = read_documents(patterns)
    if not any(len(doc.encode()) >= 2 for doc in documents):
        raise CorpusError(
            f"corpus {[str(p) for p in patterns]} has no line of 2 or more bytes to train on"
        )
    return documents


def load_corpus(patterns: Sequence[Path], max_seq_len: int) -> list[list[int]]:
    """Token sequences (byte values 0-255) from every line of every matched file, unsplit."""
    return windows(trainable_documents(patterns), max_seq_len)


def heldout_bucket(document: str, *, seed: int, node_id: str) -> tuple[int, int]:
    """``(bucket in 0..99, hash)`` of a document: the seeded rule's draw (module docstring)."""
    material = f"{seed}\0{node_id}\0{document}".encode()
    value = int.from_bytes(hashlib.sha256(material).digest()[:8], "big")
    return value % 100, value


def split_documents(
    documents: Sequence[str], *, seed: int, node_id: str, heldout_percent: int
) -> tuple[list[str], list[str]]:
    """``(training, heldout)`` documents, each in its original order, by the seeded rule
    and its two guarantees (module docstring)."""
    if not 0 <= heldout_percent < 100:
        raise CorpusError(f"heldout_percent must be in 0..99, got {heldout_percent}")
    if heldout_percent == 0:
        return list(documents), []
    draws = {doc: heldout_bucket(doc, seed=seed, node_id=node_id) for doc in documents}
    heldout = {doc for doc, (bucket, _) in draws.items() if bucket < heldout_percent}
    usable = sorted((draw, doc) for doc, draw in draws.items() if len(doc.encode()) >= 2)
    if len(usable) < 2:
        raise CorpusError(
            f"node {node_id!r}: the corpus has {len(usable)} distinct line(s) of 2 or more "
            f"bytes; holding {heldout_percent}% out needs at least 2 (one to train on, one to "
            "evaluate on): add lines, or set [training] heldout_percent = 0"
        )
    if not any(doc in heldout for _, doc in usable):
        heldout.add(usable[0][1])  # the training document closest to the held-out side
    if all(doc in heldout for _, doc in usable):
        heldout.discard(usable[-1][1])  # the held-out document farthest from it
    return (
        [doc for doc in documents if doc not in heldout],
        [doc for doc in documents if doc in heldout],
    )


def load_split_corpus(
    patterns: Sequence[Path],
    max_seq_len: int,
    *,
    seed: int,
    node_id: str,
    heldout_percent: int,
) -> SplitCorpus:
    """The corpus's documents split by :func:`split_documents`, each part cut into windows."""
    training, heldout = split_documents(
        trainable_documents(patterns),
        seed=seed,
        node_id=node_id,
        heldout_percent=heldout_percent,
    )
    return SplitCorpus(windows(training, max_seq_len), windows(heldout, max_seq_len))


def load_node_corpus(config: NodeConfig) -> SplitCorpus:
    """The corpus as a node's configuration says: its files, windows and held-out split."""
    return load_split_corpus(
        config.corpus,
        config.training.max_seq_len,
        seed=config.seed,
        node_id=config.node_id,
        heldout_percent=config.training.heldout_percent,
    )
