"""A member's receipts: the coordinator's signed records of the rounds since the newest one
this node trained, as each cycle's start carries them (``CycleStart.receipts``).

Each is kept as ``<data-dir>/receipts/round-NNNNNN.json`` (proto JSON, as the coordinator's
journal writes it) once its signature holds: made by the coordinator's certificate, from the
consortium CA in the node's ``[tls]``, not revoked by its CRL, over the record's signed bytes
(:func:`~tapestry.pki.statements.signed_bytes`). A receipt that does not hold is logged and
dropped; the cycle goes on. A receipt already kept is never replaced: a record the
coordinator sends again changed is logged, and the first one stays, the member's evidence
of what it was told. A plaintext node (no CA) can check nothing and keeps nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from tapestry.atomic_files import write_text
from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.limits import MAX_BASE_PROOFS, MAX_RECEIPT_BYTES
from tapestry.pki.signing import SignatureError
from tapestry.pki.statements import SignatureCheck, signed_bytes
from tapestry.wire.codec import message_from_json, message_to_json

log = logging.getLogger(__name__)

RECEIPTS = "receipts"


class Receipts:
    """See the module. ``check`` ``None`` (a plaintext node) keeps none."""

    def __init__(self, data_dir: Path, check: SignatureCheck | None) -> None:
        self.folder = data_dir / RECEIPTS
        self._check = check

    def path(self, round_num: int) -> Path:
        return self.folder / f"round-{round_num:06d}.json"

    def keep(self, receipts: Sequence[pb.RoundRecord]) -> list[int]:
        """Keep each receipt whose coordinator signature holds; the rounds kept."""
        if self._check is None or not receipts:
            return []
        kept = []
        for record in receipts[:MAX_BASE_PROOFS]:
            why = self._problem(record)
            if why:
                log.warning("receipt of round %d not kept: %s", record.result.round_num, why)
                continue
            if self._store(record):
                kept.append(record.result.round_num)
        return kept

    def committed(self, round_num: int) -> tuple[str, str] | None:
        """What the kept receipt of round ``round_num`` shows committed, as ``(base before,
        base after)``; ``None`` without one (or one that no longer reads)."""
        try:
            text = self.path(round_num).read_text(encoding="utf-8")
            result = message_from_json(text, pb.RoundRecord).result
        except FileNotFoundError:
            return None
        except Exception as error:  # a damaged receipt file: it shows nothing
            log.error("cannot read the receipt of round %d: %s", round_num, error)
            return None
        return result.previous_base_sha256, result.shared_base_sha256

    def _problem(self, record: pb.RoundRecord) -> str:
        """Why ``record`` is no receipt of the coordinator's (``""`` when it is)."""
        assert self._check is not None
        if record.ByteSize() > MAX_RECEIPT_BYTES:
            return f"{record.ByteSize()} bytes, more than {MAX_RECEIPT_BYTES}"
        if not record.HasField("signature"):
            return "not signed"
        try:
            who = self._check.signer(record.signature, signed_bytes(record))
        except SignatureError as error:
            return str(error)
        if who.role != "coordinator":
            return f"signed by {who.uri}, not by the coordinator"
        return ""

    def _store(self, record: pb.RoundRecord) -> bool:
        """Write ``record`` unless a receipt of its round is kept already (then a different
        one is logged); whether it was written."""
        path = self.path(record.result.round_num)
        text = message_to_json(record)
        if path.exists():
            try:
                same = message_from_json(path.read_text(encoding="utf-8"), pb.RoundRecord) == record
            except Exception as error:  # a damaged receipt file: leave it to its owner
                log.error("cannot read the receipt %s: %s", path, error)
                return False
            if not same:
                log.warning(
                    "the coordinator's record of round %d differs from the receipt kept in %s "
                    "(kept unchanged): its history was rewritten, or the round was committed "
                    "again after a crash",
                    record.result.round_num,
                    path,
                )
            return False
        write_text(path, text)
        return True
