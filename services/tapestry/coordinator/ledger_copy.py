"""A live coordinator's ledger fetched over its RPCs (``tapestry ledger verify
--coordinator``): the journal's signed records (ListRoundRecords) and every round's base
(GetBase, round 0 the initial base), written into a folder laid out like the coordinator's
data directory, with the journal's own format, so that
:func:`~tapestry.coordinator.ledger_check.check_ledger` checks it as it checks a data
directory. Momentum files are not served: the check skips them for such a copy. The copy holds no
``consortium.json``: the coordinator proved its consortium with its TLS certificate."""

from __future__ import annotations

from pathlib import Path

import grpc

from tapestry.atomic_files import write_text
from tapestry.coordinator.client import CoordinatorClient
from tapestry.coordinator.journal import CoordinatorStore
from tapestry.errors import NotFound, WireError
from tapestry.state_files import save_state
from tapestry.wire.codec import message_to_json


def copy_ledger(client: CoordinatorClient, into: Path) -> list[str]:
    """Write the coordinator's records and bases under ``into``; returns one line per base
    that could not be fetched (its file is then missing, and the check says so too). A
    refused call (no certificate, a stranger's) raises :class:`grpc.RpcError`."""
    store = CoordinatorStore(into)
    records = list(client.iter_round_records())
    problems: list[str] = []
    for round_num in [0, *(r.result.round_num for r in records)]:
        try:
            base = client.fetch_base(round_num)
        except (grpc.RpcError, NotFound, WireError) as error:
            details = error.details() if isinstance(error, grpc.RpcError) else str(error)
            problems.append(f"round {round_num}: the base could not be fetched: {details}")
            continue
        save_state(
            store.base_path(round_num),
            base.state,
            {"round_num": str(round_num), "sha256": base.sha256},
        )
    for record in records:  # as the journal writes them (CoordinatorStore.commit)
        write_text(store.record_path(record.result.round_num), message_to_json(record))
    return problems
