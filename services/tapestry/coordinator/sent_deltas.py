"""The deltas each member has sent, by digest, so that one sent again is refused.

A member that replays an earlier delta (its own from round 1, say) would otherwise be
counted again each round: the digest is the same, so the same bits move the base the same
way once more. A delta is counted once: the coordinator remembers every delta digest a
member's cycle delivered (from the journal's round records at start, and each delta as its
trailer is verified), and a member that announces or delivers one of them again fails its
cycle with the round it was first sent in. The in-process core keeps the proof of concept's
semantics: this is the service's guard.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from tapestry.consortium.v1 import consortium_pb2 as pb


class ReplayedDelta(ValueError):
    """A member sent a delta it had sent before."""


class SentDeltas:
    """Per member, the digest of every delta it delivered and the round it came in."""

    def __init__(self, records: Iterable[pb.RoundRecord] = ()) -> None:
        self._lock = threading.Lock()
        self._sent: dict[str, dict[str, int]] = {}
        for record in records:
            for contribution in record.result.contributions:
                if contribution.weight_delta_sha256:
                    self.add(
                        contribution.node_id,
                        contribution.weight_delta_sha256,
                        record.result.round_num,
                    )

    def add(self, node_id: str, digest: str, round_num: int) -> None:
        """``node_id`` delivered the delta of ``digest`` in ``round_num`` (the first round
        it came in is kept)."""
        with self._lock:
            self._sent.setdefault(node_id, {}).setdefault(digest, round_num)

    def check(self, node_id: str, digest: str, round_num: int) -> None:
        """Raise :class:`ReplayedDelta` if ``node_id`` delivered ``digest`` in a round
        before ``round_num``. The same round is not a replay: a round that did not commit
        runs again under its number, and an honest node trains the same delta again (its
        generator is seeded by round), which is counted once, in that round."""
        with self._lock:
            first = self._sent.get(node_id, {}).get(digest)
        if first is not None and first < round_num:
            raise ReplayedDelta(
                f"node {node_id} sent this delta (sha256 {digest[:16]}…) in round {first} "
                "already: a delta is counted once"
            )

    def __len__(self) -> int:
        with self._lock:
            return sum(len(digests) for digests in self._sent.values())
