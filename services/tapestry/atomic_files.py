"""Crash-safe files, the one atomic write: every write goes to a temporary file, is fsynced,
then renamed over the target (and the directory fsynced), so a reader sees the old file or the
new one, never half. Standard library only, so the PKI, the demo and the gRPC plumbing use it
without importing torch; model states go through :mod:`tapestry.state_files`, which commits
its safetensors files with :func:`commit`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(tmp: Path, target: Path) -> None:
    """Make the written ``tmp`` the file ``target``: fsync it, rename it over, fsync the
    folder."""
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, target)
    _fsync_dir(target.parent)


# This module's temporary names (``.<name>.tmp``) and safetensors' own (``.tmpXXXXXX``,
# random, written before it renames to ours).
TEMPORARY = re.compile(r"\.(.+\.tmp|tmp[A-Za-z0-9_]{6,})")


def remove_temporaries(directory: Path) -> list[Path]:
    """Delete the temporary files that writes cut short (a crash, SIGKILL) left in
    ``directory``; nothing else, even in a data directory shared with other files. Only for
    a directory no write is using (a store opening at start-up). Returns what it removed."""
    removed = [p for p in directory.glob(".*") if TEMPORARY.fullmatch(p.name) and p.is_file()]
    for path in removed:
        path.unlink()
    return removed


def temporary(path: Path) -> Path:
    """Where a write of ``path`` goes before it is renamed into place (``.<name>.tmp``)."""
    return path.with_name(f".{path.name}.tmp")


def write_json(path: Path, payload: Any) -> None:
    write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def write_text(path: Path, text: str, *, mode: int | None = None) -> None:
    write_bytes(path, text.encode("utf-8"), mode=mode)


def write_bytes(path: Path, data: bytes, *, mode: int | None = None) -> None:
    """Replace ``path`` with ``data`` atomically; with ``mode``, the file has exactly that
    mode from its first byte (a key is never readable by others, whatever the umask)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary(path)
    tmp.unlink(missing_ok=True)  # a write cut short before
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else mode)
    try:
        if mode is not None:
            os.fchmod(fd, mode)  # the umask may have narrowed it
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
    commit(tmp, path)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))
