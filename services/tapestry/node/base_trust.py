"""Which bases a node trains from: one it trained from before, or one the members accepted.

A base the coordinator sends is its word. With member-validated commit each committed step
is also the members' word: every member that evaluated it signed its evaluation with its
own key (:mod:`tapestry.pki.statements`). A node whose ``[trust]`` asks for it
(``min_acceptances``, 2 by default) trains only on a base that is

- one it trained from before (the base of a round run again, an unchanged base, a rollback
  to a base it knew); or
- reached from one of those by validated commits (``CycleStart.base_proofs``), each signed
  by at least ``min_acceptances`` members, other than the coordinator, whose held-out loss
  did not rise past ``tolerance`` on the exact step, from the exact base before it, in this
  consortium.

With receipts kept (a node with a CA keeps them, :mod:`tapestry.node.receipts`), each such
commit must also be one the coordinator's signed record of that round shows: a state the
members judged without it being committed (a probe, a step the rule refused) is no base,
unless the coordinator signs a record saying it committed it, which every member then holds
and ``ledger verify`` checks.

So whoever holds the coordinator's key can still replay a base the members accepted, but
cannot make a node train on one they did not. A node that has trained from no base yet
trusts the first it is sent (trust on first use, logged): it has nothing to chain from.
The bases it trained from are kept in ``trusted-bases.json`` in its data directory (the
newest :data:`~tapestry.limits.MAX_TRUSTED_BASES`), so a restart keeps them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from tapestry.atomic_files import read_json, write_json
from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.errors import quoted
from tapestry.limits import MAX_BASE_PROOFS, MAX_PROOF_EVALUATIONS, MAX_TRUSTED_BASES
from tapestry.node.guard import CycleRefused
from tapestry.pki.statements import SignatureCheck, with_certificate

log = logging.getLogger(__name__)
TRUSTED_BASES = "trusted-bases.json"


class BaseTrust:
    """See the module. ``check`` ``None`` (a node without a CA: plaintext) or
    ``min_acceptances`` 0 trusts the coordinator's word for every base."""

    def __init__(
        self,
        node_id: str,
        consortium_id: str,
        data_dir: Path,
        check: SignatureCheck | None,
        min_acceptances: int,
        tolerance: float,
        committed: Callable[[int], tuple[str, str] | None] | None = None,
    ) -> None:
        """``committed``: what the coordinator's signed record of a round shows it
        committed, ``(base before, base after)`` (the node's receipts); ``None`` asks no
        record."""
        self._node_id = node_id
        self._committed = committed
        self._consortium_id = consortium_id
        self._path = data_dir / TRUSTED_BASES
        self._check = check
        self._min = min_acceptances
        self._tolerance = tolerance
        self._known = self._read()

    @property
    def enforced(self) -> bool:
        return self._check is not None and self._min > 0

    def _read(self) -> list[str]:
        try:
            found = read_json(self._path)
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as error:
            log.error(
                "cannot read %s (%s): the next base is trusted on first use", self._path, error
            )
            return []
        bases = found.get("bases") if isinstance(found, dict) else None
        return [b for b in bases if isinstance(b, str)] if isinstance(bases, list) else []

    def check(self, base_sha256: str, proofs: Sequence[pb.BaseProof]) -> None:
        """Refuse (:class:`CycleRefused`) a base this node may not train from."""
        if not self.enforced or base_sha256 in self._known:
            return
        if not self._known:
            log.warning("no base trained from yet: base %s trusted on first use", base_sha256[:12])
            return
        if len(proofs) > MAX_BASE_PROOFS:
            raise CycleRefused(
                f"the cycle carries {len(proofs)} base proofs, more than MAX_BASE_PROOFS = "
                f"{MAX_BASE_PROOFS}"
            )
        reachable = set(self._known)
        problems = []
        for proof in proofs:
            if proof.from_sha256 not in reachable:
                continue
            problem = self._unrecorded(proof) or self._proof_problem(proof)
            if problem is None:
                reachable.add(proof.to_sha256)
            else:
                problems.append(f"round {proof.round_num}: {problem}")
        if base_sha256 not in reachable:
            why = f" ({'; '.join(problems[-3:])})" if problems else ""
            raise CycleRefused(
                f"node {self._node_id!r} refuses base {quoted(base_sha256, 64)}: it did not "
                f"train from it before, and no commit accepted by at least {self._min} "
                f"members' signed evaluations leads to it from a base it did{why}"
            )

    def _unrecorded(self, proof: pb.BaseProof) -> str | None:
        """Why no signed record of the coordinator's shows ``proof``'s commit (``None``:
        one does, or no record is asked)."""
        if self._committed is None:
            return None
        step = (proof.from_sha256, proof.to_sha256)
        if self._committed(proof.round_num) == step:
            return None
        return (
            f"no receipt of the coordinator's shows {quoted(proof.to_sha256[:12])} committed "
            f"from {quoted(proof.from_sha256[:12])}"
        )

    def _proof_problem(self, proof: pb.BaseProof) -> str | None:
        """Why ``proof`` does not show ``min_acceptances`` members accepting its step."""
        assert self._check is not None
        accepted: set[str] = set()
        refused = []
        # Each signature costs a check: a coordinator cannot make this node check more than
        # MAX_PROOF_EVALUATIONS per proof, and it stops once enough accept.
        for evaluation in proof.evaluations[:MAX_PROOF_EVALUATIONS]:
            if len(accepted) >= self._min:
                break
            if evaluation.state_sha256 != proof.to_sha256:
                continue
            problem = self._check.evaluation_problem(
                self._consortium_id, proof.round_num, proof.from_sha256, _whole(evaluation, proof)
            )
            if problem is not None:
                refused.append(problem)
            elif evaluation.candidate_loss - evaluation.base_loss <= self._tolerance:
                accepted.add(evaluation.node_id)
        if len(accepted) >= self._min:
            return None
        said = f"; {refused[0]}" if refused else ""
        return (
            f"{len(accepted)} members' signed evaluations accept it, at least {self._min} "
            f"must{said}"
        )

    def trained_from(self, base_sha256: str) -> None:
        """Remember ``base_sha256``: this node trains from it (kept across restarts)."""
        if not base_sha256 or base_sha256 in self._known[-1:]:
            return
        known = [b for b in self._known if b != base_sha256] + [base_sha256]
        self._known = known[-MAX_TRUSTED_BASES:]
        write_json(self._path, {"bases": self._known})


def _whole(evaluation: pb.MemberEvaluation, proof: pb.BaseProof) -> pb.MemberEvaluation:
    """``evaluation`` with its signer's certificate, from the proof's where it carries none."""
    signature = with_certificate(evaluation.signature, proof.certificates, evaluation.node_id)
    if signature is evaluation.signature:
        return evaluation
    whole = pb.MemberEvaluation()
    whole.CopyFrom(evaluation)
    whole.signature.CopyFrom(signature)
    return whole
