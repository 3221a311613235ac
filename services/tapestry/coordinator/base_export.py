"""``tapestry base export``: the shared base as one safetensors file, for use outside Tapestry.

The file holds the base's tensors exactly as GetBase served them (bit for bit) and, in the
safetensors metadata (strings only):

- ``round_num``: the round that committed this base (0: the initial base);
- ``sha256``: the base's Tapestry state digest (sha256 over every tensor's name, dtype,
  shape and bytes in key order, :func:`~tapestry.training.consortium.tensors.state_digest`),
  the digest the round journal records as ``shared_base_sha256``; not a hash of the file;
- ``model``: the model spec as JSON (its proto fields), so the file says what to build.

It is written like every state here: to a temporary file, fsynced, then renamed into place.
"""

from __future__ import annotations

import json
from pathlib import Path

from tapestry.coordinator.client import FetchedBase
from tapestry.errors import UserError
from tapestry.state_files import save_state
from tapestry.wire.codec import message_to_dict


def check_destination(out: Path, *, force: bool) -> None:
    """Refuse, before anything is fetched, a destination that is a directory, or an
    existing file unless ``force``."""
    if out.is_dir():
        raise UserError(
            f"{out} is a directory; give --out a file name, e.g. {out}/base.safetensors"
        )
    if out.exists() and not force:
        raise UserError(f"{out} already exists; pass --force to replace it")


def export_metadata(base: FetchedBase) -> dict[str, str]:
    return {
        "round_num": str(base.round_num),
        "sha256": base.sha256,
        "model": json.dumps(message_to_dict(base.model), sort_keys=True),
    }


def write_base(base: FetchedBase, out: Path) -> None:
    """Write ``base`` to ``out`` atomically, with :func:`export_metadata`."""
    save_state(out, base.state, export_metadata(base))
