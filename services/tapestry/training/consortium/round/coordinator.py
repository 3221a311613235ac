"""The consortium coordinator: runs rounds over any nodes with ``run_sovereign_cycle``.

A round is a transaction the coordinator owns from start to end, in the stages of
:mod:`.stages`::

    snapshot ──▶ collect (every node's cycle, in parallel) ──▶ decide and fetch (policy,
       headers first) ──▶ integrate (the strategy) ──▶ commit step (the caller's: persist it)
       ──▶ the coordinator moves to the new base

The commit step sees the finished round before any in-memory state changes, so a commit that
fails leaves the coordinator exactly as it was: nothing needs undoing by hand. Progress is
reported to an event sink from the core itself, so in-process and remote runs report alike.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import torch
from torch import nn

from tapestry.training.consortium.governance.acceptance import (
    AcceptancePolicy,
    Attempt,
    Validation,
    evaluated_scores,
)
from tapestry.training.consortium.governance.measured import reference_scores
from tapestry.training.consortium.governance.policy import ContributionPolicy
from tapestry.training.consortium.messages import (
    ConsortiumNode,
    ModelState,
    PlainNode,
    SovereignModelArtifact,
)
from tapestry.training.consortium.models.state import (
    install_model_state,
    load_model_state,
    model_state,
)
from tapestry.training.consortium.round import stages
from tapestry.training.consortium.round.events import EventSink, Reporter, RoundStage
from tapestry.training.consortium.round.ledger import RoundLedger
from tapestry.training.consortium.round.relay import as_consortium_node
from tapestry.training.consortium.round.result import ConsortiumRoundResult
from tapestry.training.consortium.round.stages import Integration
from tapestry.training.consortium.round.validation import probe_round, validate_candidate
from tapestry.training.consortium.strategies.base import Strategy
from tapestry.training.consortium.strategies.registry import make_strategy
from tapestry.training.consortium.tensors import (
    Snapshot,
    clone_state,
    known_digest,
    state_digest,
    state_mismatch,
)

log = logging.getLogger(__name__)

CommitStep = Callable[[ConsortiumRoundResult], None]
"""Persists a finished round (its result holds the new base); raising aborts the round."""


class ConsortiumCoordinator:
    """Keeps the shared base and runs rounds: every node trains from the same snapshot (in
    parallel threads), the policy weighs their contributions, and the accepted deltas are
    integrated by the policy's strategy: by default ``base + Σ wᵢ·Δᵢ`` in the order the
    nodes were given (see :mod:`~tapestry.training.consortium.strategies.settings`).

    **Strategy state.** The policy's strategy is an object the coordinator keeps across
    rounds (:mod:`~tapestry.training.consortium.strategies`); a strategy with state (diloco's
    outer momentum) carries it itself. A round's result carries the state in force after it
    (``strategy_state``; ``None``: none, or its initial value), the commit step persists it
    with the base, and :meth:`load_base_state` restores it. A round that integrates nothing
    leaves it as it was; a rollback restores the state committed with the round it restores
    (none given: the initial state). The coordinator never asks which strategy runs.

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

    **Copies.** By default the coordinator copies every state that crosses its boundary:
    the model it is given, the base each round hands the
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
        ledger: RoundLedger[Any] | None = None,
        acceptance: AcceptancePolicy | None = None,
        reference: ConsortiumNode | PlainNode | None = None,
    ) -> None:
        """``assessed_quality`` (node id -> score) is the consortium's own assessment of a
        member, e.g. from evaluation on held-out data; where given it replaces the score the
        node reports about itself when the policy weighs contributions. ``min_nodes`` is the
        quorum: a round with fewer contributing nodes is aborted (see the class). ``ledger``
        answers which transaction runs and which request ids are answered
        (:class:`~.ledger.RoundLedger`; a fresh one by default). ``acceptance`` turns on
        member-validated commit (:mod:`~tapestry.training.consortium.governance.acceptance`):
        the members that contributed evaluate the integrated candidate (nodes with
        ``evaluate_candidate``), and it is committed, shortened, or not at all as the rule
        says; off by default, as in the proof of concept. ``reference`` measures quality
        rather than taking it on a member's word
        (:mod:`~tapestry.training.consortium.governance.measured`): a node the coordinator
        runs itself on a public reference corpus, whose update each round every delta is
        scored against; those scores replace the reported and assessed ones in the round's
        weighting (its ``quality_scores``; each contribution keeps what its member said)."""
        if isinstance(min_nodes, bool) or not isinstance(min_nodes, int) or min_nodes < 0:
            raise ValueError(f"min_nodes must be an integer >= 0, got {min_nodes!r}")
        self.min_nodes = min_nodes
        self.acceptance = acceptance
        self.reference = None if reference is None else as_consortium_node(reference)
        self.copy_states = copy_states
        self.base_model = copy.deepcopy(base_model) if copy_states else base_model
        self.assessed_quality = dict(assessed_quality or {})
        self.contribution_policy = contribution_policy or ContributionPolicy()
        self.strategy: Strategy = make_strategy(self.contribution_policy.strategy)
        self.round_num = round_num
        self.sovereign_artifacts: dict[str, SovereignModelArtifact] = {}
        self.ledger: RoundLedger[Any] = ledger or RoundLedger()
        self._base_sha256 = ""  # digest of the current base, once known

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
    def strategy_state(self) -> ModelState | None:
        """A copy of the strategy's state (``None``: none, or its initial value)."""
        state = self.strategy.state
        return None if state is None else clone_state(state)

    @property
    def outer_momentum(self) -> ModelState | None:
        """Diloco's name for :attr:`strategy_state`: its outer momentum."""
        return self.strategy_state

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
        digest where the caller has verified it, the artifacts the nodes retain, and the
        strategy's state committed with that base (``momentum``, diloco's; ``None``: the
        initial state)."""
        problem = self.strategy.state_problem(momentum, state)
        if problem is not None:
            raise ValueError(problem)
        self._install(state)
        self.round_num = round_num
        self._base_sha256 = sha256
        self.strategy.adopt(self.strategy.restorable(None if momentum is None else dict(momentum)))
        if artifacts is not None:
            self.sovereign_artifacts = dict(artifacts)

    def run_round(
        self,
        nodes: Sequence[ConsortiumNode | PlainNode],
        *,
        events: EventSink | None = None,
        commit: CommitStep | None = None,
    ) -> ConsortiumRoundResult:
        """Run one round over ``nodes`` and return its result.

        ``events`` receives a :class:`RoundEvent` per step (calls are serialised). ``commit``
        is called with the finished result before the coordinator changes any state; if it
        raises, the exception propagates and the coordinator is exactly as before the round
        (base, round number, retained artifacts). One round at a time per coordinator: while
        a round or rollback runs, another is refused (``RuntimeError``): the ledger's
        :meth:`~RoundLedger.exclusive` hold. (A service answering triggers takes the ledger's
        :meth:`~RoundLedger.claim` first, so a retried request id never reaches here twice.)
        """
        node_ids = [node.node_id for node in nodes]
        if len(set(node_ids)) != len(node_ids):
            raise ValueError(f"node ids must be unique in a round, got {node_ids}")
        with self.ledger.exclusive(f"round {self.round_num + 1} is already running"):
            members = [as_consortium_node(node) for node in nodes]
            return self._run_round(members, Reporter(self.round_num + 1, events), commit)

    def _run_round(
        self, nodes: Sequence[ConsortiumNode], report: Reporter, commit: CommitStep | None
    ) -> ConsortiumRoundResult:
        started_at = datetime.now(UTC)
        previous_sha256 = self.base_sha256
        base = model_state(self.base_model)
        # What the nodes get: a copy, unless they only read it (copy_states=False).
        given = self.shared_base_state if self.copy_states else base
        snapshot = Snapshot(given, sha256=previous_sha256)
        # Deltas are checked against and integrated into the coordinator's own base, which
        # no node can reach; a node that edited its copy in place shifts nothing.
        collected = stages.collect(nodes, report.round_num, snapshot, base, report)
        # The reference trains from the round's base, not from a copy a node edited.
        snapshot = self._unedited(snapshot, base)
        measure = self._measure(report.round_num, snapshot)
        if measure is not None:
            snapshot = self._unedited(snapshot, base)
        decided = stages.decide(
            collected, self.contribution_policy, self.assessed_quality, self.min_nodes, base,
            report, measure,
        )  # fmt: skip
        artifacts = collected.artifacts
        del collected  # only the accepted deltas are held from here on
        decided, integrated, probes = self._integrated(decided, nodes, base, report)
        received, failed, scores = decided.received, decided.failed, decided.scores
        sources = decided.sources
        norms = decided.norms or {}
        aborted_reason = decided.aborted_reason
        # The deltas are let go here, unless validation may integrate again without one.
        kept = decided if self.acceptance is not None and self.acceptance.drop_one else None
        del decided  # metadata only from here on
        voters = [node for node in nodes if node.node_id in received]
        integrated, validation = self._validate(integrated, voters, report, base, kept, probes)
        del kept
        if integrated.new_state is not None:
            new_state, new_sha256 = integrated.new_state, known_digest(integrated.new_state)
        else:
            unchanged = clone_state(snapshot) if self.copy_states else dict(snapshot)
            new_state, new_sha256 = unchanged, previous_sha256
        if not aborted_reason:
            report(
                RoundStage.INTEGRATED,
                "",
                f"accepted {len(integrated.accepted)}, rejected {len(integrated.rejected)}, "
                f"failed {len(failed)}; base {previous_sha256[:12]} -> {new_sha256[:12]}",
            )
        result = self._finish(
            commit,
            ConsortiumRoundResult(
                round_num=report.round_num,
                previous_base_state=dict(snapshot),
                shared_base_state=new_state,
                accepted_nodes=integrated.accepted,
                rejected_nodes=integrated.rejected,
                contribution_weights=integrated.weights,
                rejection_reasons=integrated.rejection_reasons,
                failed_nodes=failed,
                quality_scores=scores,
                quality_sources=sources,
                delta_norms=norms,
                contributions=received,
                artifacts=artifacts,
                policy=self.contribution_policy,
                previous_base_sha256=previous_sha256,
                shared_base_sha256=new_sha256,
                started_at=started_at,
                finished_at=datetime.now(UTC),
                aborted_reason=aborted_reason,
                strategy_state=integrated.strategy_state,
                validation=validation,
            ),
            load_base=bool(integrated.accepted),
        )
        if aborted_reason:
            report(RoundStage.ABORTED, "", aborted_reason)
        else:
            report(RoundStage.COMMITTED, "", f"base {new_sha256[:12]} is now the shared base")
        return result

    def _validate(
        self,
        integrated: Integration,
        voters: Sequence[ConsortiumNode],
        report: Reporter,
        base: ModelState,
        decided: stages.Decided | None = None,
        probes: tuple[Attempt, ...] = (),
    ) -> tuple[Integration, Validation | None]:
        """The integration as the members' validation leaves it, and the validation
        (``None`` without an acceptance policy or a candidate), reported. With ``decided``
        (its deltas held) the fallback may integrate again without one of them; ``probes``
        are recorded with it."""
        if self.acceptance is None:
            return integrated, None
        if integrated.new_state is None:  # probed, and no contribution scored above 0
            nothing = Validation(None, (), (), self.acceptance, self.min_nodes, probes=probes)
            return integrated, nothing if probes else None
        # Hashed once here, for the proxies of remote members, which send the candidate.
        candidate = Snapshot(integrated.new_state, sha256=state_digest(integrated.new_state))
        built: dict[str, Integration] = {}  # the newest integration without one member
        policy, quorum = self.contribution_policy, self.min_nodes

        def without(node_id: str) -> ModelState | None:
            again = stages.without(decided, policy, node_id, quorum) if decided else None
            made = stages.integrate(again, self.strategy, base) if again else None
            built.clear()
            if made is None or made.new_state is None:  # too few left, or it overflowed
                return None
            built[node_id] = made
            return made.new_state

        drops: list[str] = []  # whose removal leaves a round the policy can integrate
        if decided is not None:
            drops = [n for n in decided.accepted if stages.without(decided, policy, n, quorum)]
        validation, validated = validate_candidate(
            self.acceptance, voters, report.round_num, Snapshot(base, sha256=self.base_sha256),
            candidate, quorum, copies=self.copy_states, drops=drops, without=without,
        )  # fmt: skip
        validation = dataclasses.replace(validation, probes=probes)
        report(RoundStage.VALIDATED, "", validation.reason)
        if validation.dropped:  # the candidate without it, or a shorter step toward it
            return dataclasses.replace(built[validation.dropped], new_state=validated), validation
        return _validated(integrated, validation, validated, self.strategy.state), validation

    def _integrated(
        self,
        decided: stages.Decided,
        nodes: Sequence[ConsortiumNode],
        base: ModelState,
        report: Reporter,
    ) -> tuple[stages.Decided, Integration, tuple[Attempt, ...]]:
        """The accepted deltas integrated. With the acceptance policy's ``measure`` and two
        contributions or more, the members first evaluate the probes (the candidate, and
        the candidate without each contribution), and the policy weighs the contributions
        again by the scores those give
        (:func:`~tapestry.training.consortium.governance.acceptance.evaluated_scores`)."""
        integrated = stages.integrate(decided, self.strategy, base)
        acceptance = self.acceptance
        if not (acceptance and acceptance.measure and integrated.new_state is not None):
            return decided, integrated, ()
        if len(decided.accepted) < 2:  # nothing to leave out
            return decided, integrated, ()

        def without(node_id: str) -> ModelState | None:
            probe = stages.probe_without(decided, node_id)
            made = stages.integrate(probe, self.strategy, base) if probe else None
            return made.new_state if made is not None else None

        voters = [node for node in nodes if node.node_id in decided.received]
        candidate = Snapshot(integrated.new_state, sha256=state_digest(integrated.new_state))
        probes = probe_round(
            acceptance, voters, report.round_num, Snapshot(base, sha256=self.base_sha256),
            candidate, decided.accepted, without, self.min_nodes, copies=self.copy_states,
        )  # fmt: skip
        scores = evaluated_scores(probes, acceptance.harm_scale)
        decided = stages.reweighed(decided, self.contribution_policy, scores)
        report(RoundStage.VALIDATED, "", f"evaluated scores {_scores(decided, probes)}")
        return decided, stages.integrate(decided, self.strategy, base), probes

    def _unedited(self, snapshot: Snapshot, base: ModelState) -> Snapshot:
        """``snapshot``, or a fresh copy of the base where whoever was handed it edited it
        in place (with copies on: without them, they only read it)."""
        if self.copy_states and any(not torch.equal(snapshot[name], base[name]) for name in base):
            return Snapshot(self.shared_base_state, sha256=snapshot.sha256)
        return snapshot

    def _measure(self, round_num: int, base: ModelState) -> stages.Measure | None:
        """The round's measured quality: the reference node's update from ``base``, which
        each delta is scored against (``None`` without a reference node). Its failure fails
        the round: it is the coordinator's own."""
        if self.reference is None:
            return None
        update = self.reference.run_sovereign_cycle(round_num, base).contribution.weight_delta
        # Checked as a member's delta is: a NaN update would score every member 0 (the
        # round recorded as theirs), one with other keys would fail the scoring bare.
        problem = state_mismatch(
            update, base, what="the reference node's update", against="the base"
        )
        if problem is not None:
            raise ValueError(problem)
        return lambda deltas: reference_scores(deltas, update)

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
        ``momentum`` is the strategy's state committed with that base (diloco's outer
        momentum); it comes back with it where the strategy keeps state (``None``: the
        initial state).

        A transaction exactly like :meth:`run_round`: the result (round ``round_num + 1``, no
        nodes, ``rolled_back_to=to_round``, the current policy) is handed to ``commit``
        before anything changes; if it raises, the coordinator is exactly as before. It
        takes the same one-at-a-time claim (:attr:`ledger`): while a round runs it is
        refused with ``RuntimeError``. ``to_round`` must be a round already committed (``0`` to
        ``round_num``; the current round is a recorded no-op); ``state`` must match the
        current base key for key (dtype, shape) and be finite, else ``ValueError``.
        ``sha256`` is the state's digest where the caller has verified it. Retained
        artifacts are left alone: they are the nodes' own history. The stage reported
        last is ``ROLLED_BACK``.
        """
        if isinstance(to_round, bool) or not isinstance(to_round, int) or to_round < 0:
            raise ValueError(f"to_round must be an integer >= 0, got {to_round!r}")
        with self.ledger.exclusive(
            f"round {self.round_num + 1} is already running; roll back after it"
        ):
            if to_round > self.round_num:
                raise ValueError(
                    f"cannot roll back to round {to_round}: the newest committed round is "
                    f"{self.round_num}"
                )
            current = model_state(self.base_model)
            problem = state_mismatch(
                state, current, what="rollback base", against="the current base"
            ) or self.strategy.state_problem(momentum, current)
            if problem is not None:
                raise ValueError(problem)
            started_at = datetime.now(UTC)
            restored = self.strategy.restorable(None if momentum is None else dict(momentum))
            report = Reporter(self.round_num + 1, events)
            previous_sha256 = self.base_sha256
            new_state = clone_state(state) if self.copy_states else dict(state)
            new_sha256 = sha256 or state_digest(new_state)
            result = self._finish(
                commit,
                ConsortiumRoundResult(
                    round_num=report.round_num,
                    previous_base_state=(self.shared_base_state if self.copy_states else current),
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
                    strategy_state=restored,
                ),
                load_base=True,
            )
            report(
                RoundStage.ROLLED_BACK,
                "",
                f"base {previous_sha256[:12]} -> {new_sha256[:12]}, the base of round {to_round}",
            )
            return result

    def _finish(
        self, commit: CommitStep | None, result: ConsortiumRoundResult, *, load_base: bool
    ) -> ConsortiumRoundResult:
        """The one way the coordinator moves on, for rounds and rollbacks alike: the commit
        step first (if it raises, nothing below happens and nothing needs undoing), then the
        result's base (when it changed), the strategy's state, digest, retained artifacts
        and round number."""
        if commit is not None:
            commit(result)
        if load_base:
            self._install(result.shared_base_state)
        state = result.strategy_state
        # With copies on, the result's state is the caller's to edit: the strategy keeps its own.
        self.strategy.adopt(clone_state(state) if self.copy_states and state is not None else state)
        self._base_sha256 = result.shared_base_sha256
        self.sovereign_artifacts.update(result.artifacts)
        self.round_num = result.round_num
        return result

    def _install(self, state: Mapping[str, torch.Tensor]) -> None:
        """``state`` becomes the base: copied into the model, or (``copy_states=False``)
        made the model's own tensors."""
        if self.copy_states:
            load_model_state(self.base_model, state)
        else:
            install_model_state(self.base_model, state)


def _validated(
    integrated: Integration,
    validation: Validation,
    state: ModelState | None,
    strategy_state: ModelState | None,
) -> Integration:
    """The integration as validation leaves it: its candidate, a shorter step toward it, or
    nothing (every node that counted is rejected with the validation's reason, the strategy's
    state is left as it was, and the base stays bitwise unchanged)."""
    if state is not None:
        return dataclasses.replace(integrated, new_state=state)
    why = f"{stages.NOT_ACCEPTED}: {validation.reason}"
    rejected = [*integrated.accepted, *integrated.rejected]
    reasons = {**{n: why for n in integrated.accepted}, **integrated.rejection_reasons}
    return Integration(None, strategy_state, [], rejected, {}, reasons)


def _scores(decided: stages.Decided, probes: Sequence[Attempt]) -> str:
    """The evaluated scores, for the round's progress."""
    probed = [p.dropped for p in probes if p.dropped]
    return ", ".join(f"{n} {decided.scores[n]:.2f}" for n in probed) or "none"
