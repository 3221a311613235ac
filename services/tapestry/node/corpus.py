"""A node's corpus: UTF-8 text files turned into byte-level token sequences.

Every non-blank line is one document; its UTF-8 bytes are its tokens (vocabulary 256), cut
into windows of at most ``max_seq_len`` tokens. Files are matched by glob patterns, read in
sorted order, and must be valid UTF-8: a bad file is an error naming the file and byte.
"""

from __future__ import annotations

import glob
from collections.abc import Sequence
from pathlib import Path

from tapestry.errors import UserError


class CorpusError(UserError, ValueError):
    """The corpus cannot be used; the message names the file and what is wrong."""


def corpus_files(patterns: Sequence[Path]) -> list[Path]:
    files: list[Path] = []
    for pattern in patterns:
        matches = sorted(Path(p) for p in glob.glob(str(pattern), recursive=True))
        matches = [m for m in matches if m.is_file()]
        if not matches:
            raise CorpusError(f"corpus entry {str(pattern)!r} matches no file")
        files.extend(m for m in matches if m not in files)
    return files


def load_corpus(patterns: Sequence[Path], max_seq_len: int) -> list[list[int]]:
    """Token sequences (byte values 0-255) from every line of every matched file."""
    if max_seq_len < 2:
        raise CorpusError(f"max_seq_len must be >= 2, got {max_seq_len}")
    sequences: list[list[int]] = []
    for path in corpus_files(patterns):
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as error:
            raise CorpusError(
                f"{path}: not valid UTF-8 at byte {error.start} ({error.reason}); "
                "re-encode the file as UTF-8"
            ) from None
        for line in text.splitlines():
            tokens = list(line.strip().encode("utf-8"))
            for start in range(0, len(tokens), max_seq_len):
                sequences.append(tokens[start : start + max_seq_len])
    if not any(len(seq) >= 2 for seq in sequences):
        raise CorpusError(
            f"corpus {[str(p) for p in patterns]} has no line of 2 or more bytes to train on"
        )
    return sequences
