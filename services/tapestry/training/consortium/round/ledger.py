"""The round ledger: which transaction runs now, and which requests are answered already.

A round is triggered at most once per request id (a client that retries after a lost reply
gets the round its first try started, never a second round), and one transaction (a round or
a rollback) runs at a time. The ledger holds both facts for the core, whatever the records
are (the services keep their journal's records in it):

- :meth:`RoundLedger.claim` answers a trigger: the record of the round that id already
  started (:class:`Recorded`), the round now running (:class:`Running`, to wait on), or the
  claim to start one (:class:`Claimed`), which :meth:`~RoundLedger.settle` ends;
- :meth:`RoundLedger.exclusive` holds the coordinator for one transaction;
- :meth:`RoundLedger.record` adds a committed round, indexed by number and request id.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Generic, TypeVar

R = TypeVar("R")


@dataclass(frozen=True)
class Recorded(Generic[R]):
    """The request id started a round already: here is its record."""

    record: R


@dataclass(frozen=True)
class Running:
    """A round runs now, started by ``request_id`` (``""``: by a call without one, or a
    rollback); ``outcome`` ends with its round number or its error."""

    request_id: str
    outcome: Future[int]


@dataclass(frozen=True)
class Claimed:
    """The caller may start the round: it must :meth:`RoundLedger.settle` it."""

    request_id: str


class RoundLedger(Generic[R]):
    """See the module. ``key`` gives a record's round number and request id; records are
    given oldest first."""

    def __init__(
        self,
        records: Sequence[R] = (),
        key: Callable[[R], tuple[int, str]] | None = None,
    ) -> None:
        self._key = key
        self._lock = threading.Lock()
        self._transaction = threading.Lock()
        self._running: Running | None = None
        self._records: list[R] = []
        self._by_round: dict[int, R] = {}
        self._by_request_id: dict[str, R] = {}
        for record in records:
            self.record(record)

    def claim(self, request_id: str) -> Recorded[R] | Running | Claimed:
        """What a trigger with ``request_id`` (``""``: none) gets; see the module."""
        with self._lock:
            recorded = self._by_request_id.get(request_id) if request_id else None
            if recorded is not None:
                return Recorded(recorded)
            if self._running is not None:
                return self._running
            self._running = Running(request_id, Future())
            return Claimed(request_id)

    def settle(self, outcome: int | BaseException) -> None:
        """End the running claim with its round number (or its error), which every
        :class:`Running` waiter then gets; the coordinator is free again first."""
        with self._lock:
            running, self._running = self._running, None
        if running is None:
            return
        if isinstance(outcome, int):
            running.outcome.set_result(outcome)
        else:
            running.outcome.set_exception(outcome)

    @contextmanager
    def exclusive(self, busy: str) -> Iterator[None]:
        """Hold the coordinator for one transaction; ``RuntimeError(busy)`` if another
        holds it."""
        if not self._transaction.acquire(blocking=False):
            raise RuntimeError(busy)
        try:
            yield
        finally:
            self._transaction.release()

    def record(self, record: R) -> None:
        """Add a committed round's record (its request id, where it has one, is answered
        from now on)."""
        if self._key is None:
            raise TypeError("this ledger keeps no records: it was made without a key")
        round_num, request_id = self._key(record)
        with self._lock:
            self._records.append(record)
            self._by_round[round_num] = record
            if request_id:
                self._by_request_id[request_id] = record

    def records(self) -> list[R]:
        """Every record, oldest first (a copy)."""
        with self._lock:
            return list(self._records)

    def by_round(self, round_num: int) -> R | None:
        """Round ``round_num``'s record, if committed."""
        with self._lock:
            return self._by_round.get(round_num)
