"""The consortium coordinator: runs rounds over any nodes with ``run_sovereign_cycle``.

A round is a transaction the coordinator owns from start to end::

    snapshot ──▶ every node's cycle (parallel) ──▶ checks ──▶ policy ──▶ integration
       ──▶ commit step (the caller's: persist it) ──▶ the coordinator moves to the new base

The commit step sees the finished round before any in-memory state changes, so a commit that
fails leaves the coordinator exactly as it was: nothing needs undoing by hand. Progress is
reported to an event sink from the core itself, so in-process and remote runs report alike.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Protocol

import torch
from torch import nn

from tapestry.training.consortium.admission import Refused, admit, describe_failure
from tapestry.training.consortium.deferred import DeferredState
from tapestry.training.consortium.events import EventSink, Reporter, RoundStage
from tapestry.training.consortium.integration import check_contribution
from tapestry.training.consortium.messages import (
    ConsortiumRoundResult,
    ModelState,
    SovereignContribution,
    SovereignCycleResult,
    SovereignModelArtifact,
)
from tapestry.training.consortium.model import (
    install_model_state,
    load_model_state,
    model_state,
)
from tapestry.training.consortium.policy import ContributionPolicy, PolicyDecision
from tapestry.training.consortium.relay import run_cycle
from tapestry.training.consortium.strategies import StrategyName, momentum_mismatch
from tapestry.training.consortium.tensors import (
    Snapshot,
    all_finite,
    clone_state,
    state_digest,
    state_mismatch,
    state_norm,
)

log = logging.getLogger(__name__)

CommitStep = Callable[[ConsortiumRoundResult], None]
"""Persists a finished round (its result holds the new base); raising aborts the round."""


class ConsortiumNode(Protocol):
    """What the coordinator needs of a node: in-process or a remote proxy alike."""

    node_id: str

    def run_sovereign_cycle(
        self, round_num: int, base_state: ModelState
    ) -> SovereignCycleResult: ...


class ConsortiumCoordinator:
    """Keeps the shared base and runs rounds: every node trains from the same snapshot (in
    parallel threads), the policy weighs their contributions, and the accepted deltas are
    integrated by the policy's strategy: by default ``base + Σ wᵢ·Δᵢ`` in the order the
    nodes were given (see :mod:`~tapestry.training.consortium.strategies`).

    **Outer momentum.** Under ``diloco`` the coordinator keeps the outer optimizer's
    momentum (``outer_momentum``) with the base: a round's result carries the momentum in
    force after it (``None`` stands for zeros), the commit step persists it with the base,
    and :meth:`load_base_state` restores it. A round that integrates nothing leaves it as
    it was; a rollback installs the momentum committed with the round it restores (none
    given: zeros).

    A node whose cycle raises, or whose contribution fails :func:`check_contribution`, is
    reported in ``failed_nodes`` and the round goes on with the others. With no accepted
    node the base stays bitwise identical.

    **Quorum.** With ``min_nodes`` (keyword-only; default 0, the proof of concept's
    behaviour: every round takes effect), a round in which fewer nodes contributed (their
    contribution arrived and passed every check, whatever the policy then makes of it) is
    *aborted*: the policy is not consulted, nothing is integrated, and the result says why
    in ``aborted_reason``. An aborted round is still a round: the commit step records it
    and the round number moves on (the nodes that answered keep their artifacts of it),
    but the base is bitwise unchanged and the stage reported last is ``ABORTED``.

    **Copies.** By default the coordinator copies every state that crosses its boundary,
    as the proof of concept did: the model it is given, the base each round hands the
    nodes, the states in a result. With ``copy_states=False`` (keyword-only) it copies
    none, so a round holds the base and the one new state integration builds, whatever the
    number of nodes: the coordinator keeps the model it is given (the caller must not use
    it), every node is handed the base's own tensors (it must only read them: a remote
    proxy that sends them over the wire, never a node that trains in place), a result's
    ``previous_base_state`` and ``shared_base_state`` are the coordinator's own tensors
    before and after the round (read, never edit), and a committed new base becomes the
    model's tensors rather than being copied into them. For services, which send the base
    and persist results; the bits of every result are the same either way.
    """

    def __init__(
        self,
        base_model: nn.Module,
        contribution_policy: ContributionPolicy | None = None,
        *,
        round_num: int = 0,
        assessed_quality: Mapping[str, float] | None = None,
        min_nodes: int = 0,
        copy_states: bool = True,
    ) -> None:
        """``assessed_quality`` (node id -> score) is the consortium's own assessment of a
        member, e.g. from evaluation on held-out data; where given it replaces the score the
        node reports about itself when the policy weighs contributions. ``min_nodes`` is the
        quorum: a round with fewer contributing nodes is aborted (see the class)."""
        if isinstance(min_nodes, bool) or not isinstance(min_nodes, int) or min_nodes < 0:
            raise ValueError(f"min_nodes must be an integer >= 0, got {min_nodes!r}")
        self.min_nodes = min_nodes
        self.copy_states = copy_states
        self.base_model = copy.deepcopy(base_model) if copy_states else base_model
        self.assessed_quality = dict(assessed_quality or {})
        self.contribution_policy = contribution_policy or ContributionPolicy()
        self.round_num = round_num
        self.sovereign_artifacts: dict[str, SovereignModelArtifact] = {}
        self._outer_momentum: ModelState | None = None  # diloco's; None: zeros
        self._base_sha256 = ""  # digest of the current base, once known
        self._round_lock = threading.Lock()

    @property
    def shared_base_state(self) -> ModelState:
        """A copy of the current base (clones: changing it leaves the base alone)."""
        return clone_state(model_state(self.base_model))

    @property
    def base_sha256(self) -> str:
        """:func:`state_digest` of the current base (computed once per base)."""
        if not self._base_sha256:
            self._base_sha256 = state_digest(model_state(self.base_model))
        return self._base_sha256

    @property
    def outer_momentum(self) -> ModelState | None:
        """A copy of diloco's outer momentum (``None``: zeros, or another strategy)."""
        momentum = self._outer_momentum
        return None if momentum is None else clone_state(momentum)

    def load_base_state(
        self,
        state: ModelState,
        round_num: int,
        *,
        sha256: str = "",
        artifacts: Mapping[str, SovereignModelArtifact] | None = None,
        momentum: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """Resume from a committed base (e.g. after a restart): the base, its round, its
        digest where the caller has verified it, the artifacts the nodes retain, and
        diloco's outer momentum committed with that base (``None``: zeros)."""
        problem = momentum_mismatch(momentum, state)
        if problem is not None:
            raise ValueError(problem)
        self._install(state)
        self.round_num = round_num
        self._base_sha256 = sha256
        self._outer_momentum = None if momentum is None else clone_state(momentum)
        if artifacts is not None:
            self.sovereign_artifacts = dict(artifacts)

    def run_round(
        self,
        nodes: Sequence[ConsortiumNode],
        *,
        events: EventSink | None = None,
        commit: CommitStep | None = None,
    ) -> ConsortiumRoundResult:
        """Run one round over ``nodes`` and return its result.

        ``events`` receives a :class:`RoundEvent` per step (calls are serialised). ``commit``
        is called with the finished result before the coordinator changes any state; if it
        raises, the exception propagates and the coordinator is exactly as before the round
        (base, round number, retained artifacts). One round at a time per coordinator.
        """
        node_ids = [node.node_id for node in nodes]
        if len(set(node_ids)) != len(node_ids):
            raise ValueError(f"node ids must be unique in a round, got {node_ids}")
        if not self._round_lock.acquire(blocking=False):
            raise RuntimeError(f"round {self.round_num + 1} is already running")
        try:
            return self._run_round(nodes, Reporter(self.round_num + 1, events), commit)
        finally:
            self._round_lock.release()

    def _run_round(
        self, nodes: Sequence[ConsortiumNode], report: Reporter, commit: CommitStep | None
    ) -> ConsortiumRoundResult:
        round_num = report.round_num
        started_at = datetime.now(UTC)
        previous_sha256 = self.base_sha256
        base = model_state(self.base_model)
        # What the nodes get: a copy, unless they only read it (copy_states=False).
        given = self.shared_base_state if self.copy_states else base
        snapshot = Snapshot(given, sha256=previous_sha256)
        # Deltas are checked against and integrated into the coordinator's own base, which
        # no node can reach; a node that edited its copy in place shifts nothing.
        outcomes = self._run_cycles(nodes, round_num, snapshot, base, report)
        if self.copy_states and any(not torch.equal(snapshot[name], base[name]) for name in base):
            snapshot = Snapshot(self.shared_base_state, sha256=previous_sha256)

        contributions: dict[str, SovereignContribution] = {}
        artifacts: dict[str, SovereignModelArtifact] = {}
        failed: dict[str, str] = {}
        for node, outcome in zip(nodes, outcomes, strict=True):
            if isinstance(outcome, Refused):
                failed[node.node_id] = outcome.reason
            else:
                contributions[node.node_id] = outcome.contribution
                artifacts[node.node_id] = outcome.artifact

        policy = self.contribution_policy
        node_ids = [node.node_id for node in nodes]
        # Deltas a node still holds (a remote node's, after its result header): only those
        # the policy accepts are fetched, so a rejected delta never crosses the wire. The
        # policy weighs norms measured from the bytes, never a node's claim: with norm
        # bounds or clipping every delta is fetched first.
        deferred = {
            n: c.weight_delta
            for n, c in contributions.items()
            if isinstance(c.weight_delta, DeferredState)
        }
        try:
            if policy.needs_delta_norms:
                self._fetch(list(deferred), deferred, base, contributions, failed, report)
            while True:
                scores = {
                    node_id: self.assessed_quality.get(node_id, c.quality_score)
                    for node_id, c in contributions.items()
                }
                norms = (
                    {n: state_norm(c.weight_delta) for n, c in contributions.items()}
                    if policy.needs_delta_norms
                    else None
                )
                aborted_reason = self._quorum_problem(len(contributions), len(nodes))
                # An aborted round consults no policy: nobody is weighed, nobody accepted.
                decision = PolicyDecision({}) if aborted_reason else policy.decide(scores, norms)
                wanted = [
                    n
                    for n in node_ids
                    if n in decision.weights and n in deferred and not deferred[n].fetched
                ]
                if not wanted:
                    break
                # A delta that fails its checks on arrival fails its node: weigh again.
                self._fetch(wanted, deferred, base, contributions, failed, report)
        finally:
            for delta in deferred.values():
                delta.release()  # not wanted (a no-op for those fetched)
        failed = {n: failed[n] for n in node_ids if n in failed}
        accepted = [n for n in node_ids if n in decision.weights]
        rejected = [
            n
            for n in node_ids
            if n in contributions and n not in decision.weights and not aborted_reason
        ]
        weighted = [(decision.weights[n], contributions[n].weight_delta) for n in accepted]
        # Metadata only from here on: the deltas are dropped once they are integrated.
        received = {
            n: dataclasses.replace(
                c, weight_delta={}, weight_delta_sha256=c.weight_delta_sha256 or _digest(c)
            )
            for n, c in contributions.items()
        }
        del outcomes, contributions
        integrated = (
            policy.strategy.apply(
                base,
                weighted,
                delta_norms=[norms[n] for n in accepted] if norms is not None else None,
                momentum=self._outer_momentum,
            )
            if weighted
            else None
        )
        del weighted
        new_state = integrated.state if integrated is not None else None
        diloco = policy.strategy.name is StrategyName.DILOCO
        momentum = self._outer_momentum if diloco else None
        if integrated is not None and not (
            all_finite(integrated.state)
            and (integrated.momentum is None or all_finite(integrated.momentum))
        ):
            # Finite deltas can still sum past the dtype's range: such a base (or momentum)
            # is never committed. Nothing is integrated; the accepted nodes are rejected.
            why = (
                "integrating the accepted deltas made the base non-finite (overflow; under "
                "diloco, the base or its momentum), so nothing was integrated this round"
            )
            rejected = [n for n in node_ids if n in received]
            rejection_reasons = {n: decision.rejection_reasons.get(n, why) for n in rejected}
            accepted, weights, new_state = [], {}, None
        else:
            if integrated is not None and diloco:
                momentum = integrated.momentum
            rejection_reasons = {n: decision.rejection_reasons[n] for n in rejected}
            weights = {n: decision.weights[n] for n in accepted}
        if new_state is not None:
            new_sha256 = state_digest(new_state)
        else:
            unchanged = clone_state(snapshot) if self.copy_states else dict(snapshot)
            new_state, new_sha256 = unchanged, previous_sha256
        if not aborted_reason:
            report(
                RoundStage.INTEGRATED,
                "",
                f"accepted {len(accepted)}, rejected {len(rejected)}, failed {len(failed)}; "
                f"base {previous_sha256[:12]} -> {new_sha256[:12]}",
            )
        result = ConsortiumRoundResult(
            round_num=round_num,
            previous_base_state=dict(snapshot),
            shared_base_state=new_state,
            accepted_nodes=accepted,
            rejected_nodes=rejected,
            contribution_weights=weights,
            rejection_reasons=rejection_reasons,
            failed_nodes=failed,
            quality_scores=scores,
            contributions=received,
            artifacts=artifacts,
            policy=policy,
            previous_base_sha256=previous_sha256,
            shared_base_sha256=new_sha256,
            started_at=started_at,
            finished_at=datetime.now(UTC),
            aborted_reason=aborted_reason,
            outer_momentum=momentum,
        )
        self._advance(result, commit, load_base=bool(accepted))
        if aborted_reason:
            report(RoundStage.ABORTED, "", aborted_reason)
        else:
            report(RoundStage.COMMITTED, "", f"base {new_sha256[:12]} is now the shared base")
        return result

    def roll_back(
        self,
        state: ModelState,
        to_round: int,
        *,
        sha256: str = "",
        events: EventSink | None = None,
        commit: CommitStep | None = None,
        momentum: Mapping[str, torch.Tensor] | None = None,
    ) -> ConsortiumRoundResult:
        """Make ``state``, the base committed by round ``to_round``, the shared base again,
        as a new round: history is never rewritten, a rollback is recorded like any round.
        Under ``diloco``, ``momentum`` is the outer momentum committed with that base; it
        comes back with it (``None``: the momentum restarts at zeros).

        A transaction exactly like :meth:`run_round`: the result (round ``round_num + 1``, no
        nodes, ``rolled_back_to=to_round``, the current policy) is handed to ``commit``
        before anything changes; if it raises, the coordinator is exactly as before. It
        takes the same one-round-at-a-time lock: while a round runs it is refused with
        ``RuntimeError``. ``to_round`` must be a round already committed (``0`` to
        ``round_num``; the current round is a recorded no-op); ``state`` must match the
        current base key for key (dtype, shape) and be finite, else ``ValueError``.
        ``sha256`` is the state's digest where the caller has verified it. Retained
        artifacts are left alone: they are the nodes' own history. The stage reported
        last is ``ROLLED_BACK``.
        """
        if isinstance(to_round, bool) or not isinstance(to_round, int) or to_round < 0:
            raise ValueError(f"to_round must be an integer >= 0, got {to_round!r}")
        if not self._round_lock.acquire(blocking=False):
            raise RuntimeError(f"round {self.round_num + 1} is already running; roll back after it")
        try:
            if to_round > self.round_num:
                raise ValueError(
                    f"cannot roll back to round {to_round}: the newest committed round is "
                    f"{self.round_num}"
                )
            current = model_state(self.base_model)
            problem = state_mismatch(
                state, current, what="rollback base", against="the current base"
            )
            problem = problem or momentum_mismatch(momentum, current)
            if problem is not None:
                raise ValueError(problem)
            diloco = self.contribution_policy.strategy.name is StrategyName.DILOCO
            restored = clone_state(momentum) if momentum is not None and diloco else None
            return self._roll_back(
                state, to_round, sha256, Reporter(self.round_num + 1, events), commit, restored
            )
        finally:
            self._round_lock.release()

    def _roll_back(
        self,
        state: ModelState,
        to_round: int,
        sha256: str,
        report: Reporter,
        commit: CommitStep | None,
        momentum: ModelState | None,
    ) -> ConsortiumRoundResult:
        started_at = datetime.now(UTC)
        previous_sha256 = self.base_sha256
        new_state = clone_state(state) if self.copy_states else dict(state)
        new_sha256 = sha256 or state_digest(new_state)
        result = ConsortiumRoundResult(
            round_num=report.round_num,
            previous_base_state=(
                self.shared_base_state if self.copy_states else model_state(self.base_model)
            ),
            shared_base_state=new_state,
            accepted_nodes=[],
            rejected_nodes=[],
            contribution_weights={},
            policy=self.contribution_policy,
            previous_base_sha256=previous_sha256,
            shared_base_sha256=new_sha256,
            started_at=started_at,
            finished_at=datetime.now(UTC),
            rolled_back_to=to_round,
            outer_momentum=momentum,
        )
        self._advance(result, commit, load_base=True)
        report(
            RoundStage.ROLLED_BACK,
            "",
            f"base {previous_sha256[:12]} -> {new_sha256[:12]}, the base of round {to_round}",
        )
        return result

    def _advance(
        self, result: ConsortiumRoundResult, commit: CommitStep | None, *, load_base: bool
    ) -> None:
        """The one way the coordinator moves on, for rounds and rollbacks alike: the commit
        step first (if it raises, nothing below happens and nothing needs undoing), then the
        result's base (when it changed), outer momentum, digest, retained artifacts and
        round number."""
        if commit is not None:
            commit(result)
        if load_base:
            self._install(result.shared_base_state)
        self._outer_momentum = result.outer_momentum
        self._base_sha256 = result.shared_base_sha256
        self.sovereign_artifacts.update(result.artifacts)
        self.round_num = result.round_num

    def _install(self, state: Mapping[str, torch.Tensor]) -> None:
        """``state`` becomes the base: copied into the model, or (``copy_states=False``)
        made the model's own tensors."""
        if self.copy_states:
            load_model_state(self.base_model, state)
        else:
            install_model_state(self.base_model, state)

    def _quorum_problem(self, contributed: int, members: int) -> str:
        """Why ``contributed`` of ``members`` nodes fall short of the quorum; ``""`` when
        they do not."""
        if contributed >= self.min_nodes:
            return ""
        return (
            f"quorum not met: {contributed} of {members} node(s) contributed and min_nodes "
            f"is {self.min_nodes}; nothing was integrated and the base is unchanged"
        )

    @staticmethod
    def _fetch(
        wanted: Sequence[str],
        deferred: Mapping[str, DeferredState],
        base: Mapping[str, torch.Tensor],
        contributions: dict[str, SovereignContribution],
        failed: dict[str, str],
        report: Reporter,
    ) -> None:
        """Fetch the ``wanted`` deferred deltas in parallel and check each as
        :func:`admit` checks a delta that came with its header; a node whose delta cannot
        be fetched or fails a check leaves ``contributions`` for ``failed``."""

        def fetch(node_id: str) -> str | None:
            contribution = contributions[node_id]
            try:
                deferred[node_id].fetch()
                check_contribution(
                    contribution, base, node_id=node_id, round_num=contribution.round_num
                )
            except ValueError as error:
                return Refused(f"invalid contribution: {error}").reason
            except Exception as error:  # a node's failure must not sink the round
                return Refused(describe_failure(error)).reason
            return None

        if not wanted:
            return
        with ThreadPoolExecutor(max_workers=len(wanted)) as pool:
            problems = list(pool.map(fetch, wanted))
        for node_id, problem in zip(wanted, problems, strict=True):
            if problem is not None:
                del contributions[node_id]
                failed[node_id] = problem
                report(RoundStage.NODE_FAILED, node_id, problem)

    @staticmethod
    def _run_cycles(
        nodes: Sequence[ConsortiumNode],
        round_num: int,
        snapshot: ModelState,
        base: Mapping[str, torch.Tensor],
        report: Reporter,
    ) -> list[SovereignCycleResult | Refused]:
        """Every node's cycle in parallel, each checked and reported as soon as it ends (a
        node that fails at once is reported at once, not when the slowest has finished)."""
        if not nodes:
            return []

        def cycle(node: ConsortiumNode) -> SovereignCycleResult | Refused:
            report(RoundStage.NODE_STARTED, node.node_id, "training from the round's base")
            try:
                outcome: object = run_cycle(node, round_num, snapshot, report)
            except Exception as error:  # a node's failure must not sink the round
                outcome = error
            try:
                checked = admit(outcome, base, node, round_num)
            except Refused as refusal:
                delta = getattr(getattr(outcome, "contribution", None), "weight_delta", None)
                if isinstance(delta, DeferredState):
                    delta.release()  # refused on its header: its delta is not wanted
                report(RoundStage.NODE_FAILED, node.node_id, refusal.reason)
                return refusal
            c = checked.contribution
            loss = c.metrics.get("loss")
            heldout = c.evaluation
            report(
                RoundStage.NODE_CONTRIBUTED,
                node.node_id,
                (f"loss {loss:.4f}, " if loss is not None else "")
                + (
                    f"held-out {heldout.base_loss:.4f} -> {heldout.sovereign_loss:.4f}, "
                    if heldout is not None
                    else ""
                )
                + f"quality {c.quality_score:.2f}, {c.token_count} tokens",
            )
            return checked

        with ThreadPoolExecutor(max_workers=len(nodes)) as pool:
            return list(pool.map(cycle, nodes))


def _digest(contribution: SovereignContribution) -> str:
    """The digest a fetched deferred delta arrived with (``""`` for any other delta)."""
    delta = contribution.weight_delta
    return delta.sha256 if isinstance(delta, DeferredState) else ""
