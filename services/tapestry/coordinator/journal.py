"""The coordinator's durable state: the shared base per round and the round journal.

Layout under ``<data-dir>``::

    consortium.json               identity: consortium id, seed, model spec (IDENTITY)
    base/round-000003.safetensors the shared base after round 3 (round 0: the initial base)
    momentum/round-000003.safetensors
                                  under diloco: the outer momentum after round 3 (none when
                                  it is zeros); its digest is in the round's journal entry
    rounds/round-000003.json      RoundRecord (consortium.proto, as proto JSON): the round's
                                  result, with its artifacts' metadata, and the request id
                                  that triggered it

Each journal entry is a link of a hash chain signed by the coordinator (the ledger,
consortium.proto's RoundRecord says exactly what is signed and hashed): it carries the digest
of the entry before it (round 1: the initial base's state digest), the operator who
triggered it, and the coordinator's signature made with its ``[tls]`` key as it commits (a
coordinator serving plaintext has none: its entries are chained but unsigned).
``tapestry ledger verify`` (:mod:`tapestry.coordinator.ledger_check`) checks them.

A round is committed when its journal entry is renamed into place, after its momentum file
(if any) and its base file. On start the store resumes at the newest journal entry whose
base file (and momentum file, where it names one) exists and matches the recorded digest,
so a crash mid-commit leaves the previous round in force; the
temporary files such a crash leaves are deleted when the store opens. The next commit then
takes the number of the entry skipped, replaces it, and chains to the entry in force (the
round before its own), never to the one it replaces.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tapestry.atomic_files import read_json, remove_temporaries, write_json, write_text
from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.errors import NotFound, UserError
from tapestry.pki.signing import Signer
from tapestry.pki.statements import hoist_certificates, signed_bytes
from tapestry.state_files import load_state, read_metadata, save_state
from tapestry.training.consortium.messages import ModelState
from tapestry.training.consortium.round.result import ConsortiumRoundResult
from tapestry.training.consortium.tensors import state_digest
from tapestry.wire.codec import (
    message_from_json,
    message_to_json,
    round_result_to_proto,
    signature_to_proto,
)

log = logging.getLogger(__name__)


IDENTITY = "consortium.json"


class StoreError(UserError, RuntimeError):
    """The data directory belongs to another consortium or cannot be used."""


def read_records(rounds_dir: Path) -> list[pb.RoundRecord]:
    """Every journal entry in ``rounds_dir``, oldest first; only reads, so it may be used on
    a live coordinator's data directory (``tapestry report --journal``)."""
    out = []
    for path in sorted(rounds_dir.glob("round-*.json")):
        try:
            out.append(message_from_json(path.read_text(encoding="utf-8"), pb.RoundRecord))
        except Exception as error:  # a damaged entry is reported, never fatal
            log.error("ignoring unreadable journal entry %s: %s", path, error)
    return out


def record_digest(record: pb.RoundRecord) -> str:
    """The record's link in the chain: SHA-256 (hex) of its whole deterministic binary
    serialization, signature included; the next record's ``previous_record_sha256``."""
    return hashlib.sha256(record.SerializeToString(deterministic=True)).hexdigest()


def read_identity(data_dir: Path) -> dict[str, Any] | None:
    """What a coordinator's data directory was written for (consortium id, seed and model,
    as :meth:`CoordinatorStore.check_identity` keeps it), or ``None`` when it holds none or
    it cannot be read; only reads, like :func:`read_records`."""
    try:
        found = read_json(data_dir / IDENTITY)
    except (OSError, ValueError) as error:
        log.error("cannot read %s: %s", data_dir / IDENTITY, error)
        return None
    return found if isinstance(found, dict) else None


class CoordinatorStore:
    def __init__(
        self, data_dir: Path, signer: Signer | None = None, *, read_only: bool = False
    ) -> None:
        """The store in ``data_dir``; ``signer`` (the coordinator's certificate and key)
        signs each journal entry as it is committed (``None``: entries are unsigned). With
        ``read_only`` it only reads (a check of a live coordinator's directory): it makes
        no folder and removes no temporary."""
        self.root = data_dir
        self.signer = signer
        self._head: tuple[int, str] | None = None  # (round, digest) of the last commit here
        self.base_dir = data_dir / "base"
        self.rounds_dir = data_dir / "rounds"
        self.momentum_dir = data_dir / "momentum"  # made by the first diloco commit
        if read_only:
            return
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.rounds_dir.mkdir(parents=True, exist_ok=True)
        for directory in (self.root, self.base_dir, self.rounds_dir, self.momentum_dir):
            remove_temporaries(directory)  # random names: never overwritten, they pile up

    @property
    def spill_dir(self) -> Path:
        """Scratch space for the deltas of the round in progress (see tapestry.wire.spill)."""
        return self.root / "spill"

    def clear_spill(self) -> None:
        shutil.rmtree(self.spill_dir, ignore_errors=True)

    def check_identity(self, identity: dict[str, object]) -> None:
        """Refuse to resume a data directory written for another consortium or model."""
        path = self.root / IDENTITY
        if not path.exists():
            write_json(path, identity)
            return
        found = read_json(path)
        if found != identity:
            raise StoreError(
                f"{self.root} holds state of {found}, not of this configuration {identity}; "
                "use another --data-dir or restore the matching configuration"
            )

    def base_path(self, round_num: int) -> Path:
        return self.base_dir / f"round-{round_num:06d}.safetensors"

    def momentum_path(self, round_num: int) -> Path:
        return self.momentum_dir / f"round-{round_num:06d}.safetensors"

    def record_path(self, round_num: int) -> Path:
        return self.rounds_dir / f"round-{round_num:06d}.json"

    def save_initial_base(self, state: ModelState) -> None:
        save_state(self.base_path(0), state, {"round_num": "0", "sha256": state_digest(state)})

    def commit_round(
        self,
        result: ConsortiumRoundResult,
        request_id: str = "",
        operator: str = "",
        signatures: Mapping[str, pb.Signature] | None = None,
        header_signatures: Mapping[str, pb.Signature] | None = None,
    ) -> pb.RoundRecord:
        """Make a finished round durable and return its journal record: the commit step
        the coordinator's core calls before it moves to the new base. ``request_id`` (the
        trigger's idempotency key) is kept with it, so it outlives a restart; ``operator``
        is who triggered it (a ``spiffe://`` URI; empty: unknown); ``signatures``, each
        member's over its contribution, as its delta's trailer carried it, and
        ``header_signatures``, as its result header carried it. The record is
        chained to the round before and signed (with a signer) before anything is written."""
        record = pb.RoundRecord(
            result=round_result_to_proto(result),
            request_id=request_id,
            previous_record_sha256=self._previous_digest(result.round_num),
        )
        record.result.operator = operator  # the service's knowledge, not the core's
        for contribution in record.result.contributions:
            signature = (signatures or {}).get(contribution.node_id)
            if signature is not None:
                contribution.signature.CopyFrom(signature)
            signature = (header_signatures or {}).get(contribution.node_id)
            if signature is not None:
                contribution.header_signature.CopyFrom(signature)
        hoist_certificates(record.result)  # each member's certificate once, not per signature
        record = self._sealed(record)
        if result.strategy_state is not None:  # before the entry that names its digest
            save_state(
                self.momentum_path(result.round_num),
                result.strategy_state,
                {
                    "round_num": str(result.round_num),
                    "sha256": record.result.outer_momentum_sha256,
                },
            )
        self.commit(record, result.shared_base_state)
        return record

    def commit(self, record: pb.RoundRecord, base: ModelState) -> None:
        """Write the base file, then the journal entry (the entry landing is the commit)."""
        round_num = record.result.round_num
        save_state(
            self.base_path(round_num),
            base,
            {"round_num": str(round_num), "sha256": record.result.shared_base_sha256},
        )
        write_text(self.record_path(round_num), message_to_json(record))
        self._head = (round_num, record_digest(record))

    def _sealed(self, record: pb.RoundRecord) -> pb.RoundRecord:
        """``record`` as its file will read back (proto JSON), signed where there is a
        signer: what is signed is exactly what a verifier reads."""
        sealed: pb.RoundRecord = message_from_json(message_to_json(record), pb.RoundRecord)
        if self.signer is not None:
            signature = self.signer.sign(signed_bytes(sealed))
            sealed.signature.CopyFrom(signature_to_proto(signature))
        return sealed

    def genesis(self) -> str:
        """The link of round 1: the initial base's state digest, as saved with it (``""``
        when it cannot be read)."""
        try:
            return read_metadata(self.base_path(0)).get("sha256", "")
        except Exception as error:
            log.error("cannot read %s: %s", self.base_path(0), error)
            return ""

    def _previous_digest(self, round_num: int) -> str:
        """The link round ``round_num``'s record carries: the digest of the record in force
        before it, round ``round_num - 1``'s (its file: after a resume that skipped a
        damaged newest entry, the entry this commit replaces is not the one chained to)."""
        if round_num <= 1:
            return self.genesis()
        if self._head is not None and self._head[0] == round_num - 1:
            return self._head[1]
        path = self.record_path(round_num - 1)
        try:
            previous = message_from_json(path.read_text(encoding="utf-8"), pb.RoundRecord)
        except Exception as error:
            raise StoreError(
                f"round {round_num - 1}'s journal entry {path} cannot be read ({error}): "
                f"round {round_num} cannot be chained to it"
            ) from None
        return record_digest(previous)

    def records(self) -> list[pb.RoundRecord]:
        """Every committed round, oldest first."""
        return read_records(self.rounds_dir)

    def latest(self) -> tuple[int, ModelState, list[pb.RoundRecord]] | None:
        """``(round_num, base, records)`` of the newest intact commit, or None when empty."""
        records = self.records()
        while records:
            record = records[-1]
            state = self._load_intact(record.result.round_num, record.result.shared_base_sha256)
            try:
                if state is not None:
                    self._strategy_state_of(record)
                    return record.result.round_num, state, records
            except StoreError:
                pass
            log.error(
                "round %d's base or momentum is missing or damaged; resuming from the round before",
                record.result.round_num,
            )
            records.pop()
        initial = self.base_path(0)
        if initial.exists():
            state, _ = load_state(initial)
            return 0, state, []
        return None

    def committed_base(
        self, round_num: int, records: list[pb.RoundRecord]
    ) -> tuple[ModelState, str]:
        """``(base, digest)`` committed by round ``round_num`` (0: the initial base), read
        back and checked against the digest the journal recorded for it (the initial base:
        the digest saved with it). ``records`` are the committed rounds, oldest first.
        Raises :class:`NotFound` for a round never committed and :class:`StoreError` for a
        base file that is missing or damaged."""
        sha256 = self._recorded_digest(round_num, records)
        state = self._load_intact(round_num, sha256) if sha256 else None
        if state is None:
            raise StoreError(
                f"the base of round {round_num} ({self.base_path(round_num)}) is missing or "
                f"does not match its recorded digest {sha256[:12] or '(none)'}; it cannot be "
                "restored"
            )
        return state, sha256

    def committed_digest(self, round_num: int, records: list[pb.RoundRecord]) -> str:
        """The digest the journal recorded for the base round ``round_num`` committed (0:
        the initial base's, saved with it), once its base file is known to be there; whoever
        reads the file checks it against this digest. ``records`` are the committed rounds,
        oldest first. Raises :class:`NotFound` for a round never committed and
        :class:`StoreError` for a missing base file (or an initial base whose digest cannot
        be read)."""
        sha256 = self._recorded_digest(round_num, records)
        if not sha256 or not self.base_path(round_num).is_file():
            raise StoreError(
                f"the base of round {round_num} ({self.base_path(round_num)}) is missing; it "
                "cannot be served"
            )
        return sha256

    def _recorded_digest(self, round_num: int, records: list[pb.RoundRecord]) -> str:
        """The digest the journal recorded for round ``round_num``'s base (0: the digest
        saved with the initial base; ``""`` when it cannot be read). Raises
        :class:`NotFound` for a round never committed."""
        if round_num == 0:
            return self.genesis()
        for record in records:
            if record.result.round_num == round_num:
                return record.result.shared_base_sha256
        newest = records[-1].result.round_num if records else 0
        raise NotFound(f"round {round_num} not found; committed rounds: 0..{newest}")

    def committed_momentum(
        self, round_num: int, records: list[pb.RoundRecord]
    ) -> ModelState | None:
        """The strategy's state (diloco's outer momentum) committed with round
        ``round_num``'s base, checked against its recorded digest; ``None`` when that round
        recorded none (round 0, a strategy without state). Raises :class:`StoreError` for a
        file missing or damaged."""
        found = [r for r in records if r.result.round_num == round_num and round_num > 0]
        return self._strategy_state_of(found[0]) if found else None

    def _strategy_state_of(self, record: pb.RoundRecord) -> ModelState | None:
        """The strategy state a record names (``None``: it names none); :class:`StoreError`
        when its file is missing or damaged. On disk it keeps its first name: the field
        ``outer_momentum_sha256`` and the folder ``momentum/``, so old journals read alike."""
        sha256 = record.result.outer_momentum_sha256
        if not sha256:
            return None
        path = self.momentum_path(record.result.round_num)
        try:
            state, _ = load_state(path)
        except Exception as error:
            log.error("cannot read %s: %s", path, error)
            state = None
        if state is None or state_digest(state) != sha256:
            raise StoreError(
                f"the outer momentum of round {record.result.round_num} ({path}), the "
                f"strategy's state, is missing or does not match its recorded digest "
                f"{sha256[:12]}; it cannot be restored"
            )
        return state

    def _load_intact(self, round_num: int, sha256: str) -> ModelState | None:
        path = self.base_path(round_num)
        try:
            state, _ = load_state(path)
        except Exception as error:  # missing, truncated or not safetensors at all
            log.error("cannot read %s: %s", path, error)
            return None
        return state if state_digest(state) == sha256 else None
