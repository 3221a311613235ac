"""What a node accepts before it reads a base: a cycle of its own consortium, for a round it
can stand behind (DESIGN §5; docs/operating/security.md, "A node protects itself").

Anyone who can reach the port can pose as the coordinator until mutual TLS identifies it, so
a node checks what a ``CycleStart`` claims against what it knows, its configuration and its
own committed history (the rounds it retains):

- the consortium id must be the node's own;
- the round may not go back past the node's newest retained round: that round itself may
  run again (a coordinator re-running it after a crash; the earlier model is kept aside),
  an older one would rewrite history;
- the round may be at most ``max_round_gap`` rounds past the newest retained one. A node
  that was down or failed for some rounds legitimately sees a jump, so the bound is a gap,
  not "newest + 1"; a forged round far ahead, which would pin the node's "latest" and make
  it refuse every real round after, is refused.

Refusals are :class:`CycleRefused`, FAILED_PRECONDITION on the wire: the call is well
formed, but this node is not in a state to serve it. (The consortium id is not a credential,
so this is not PERMISSION_DENIED; identity is what mutual TLS will check.) Each message names
the bound and never echoes the caller's strings without a limit.
"""

from __future__ import annotations

from tapestry.errors import UserError, quoted


class CycleRefused(UserError):
    """A cycle this node will not run: another consortium, or a round outside its bounds."""


def check_cycle_start(
    node_id: str,
    consortium_id: str,
    round_num: int,
    *,
    own_consortium_id: str,
    newest_round: int,
    max_round_gap: int,
) -> None:
    """Refuse (:class:`CycleRefused`) a cycle for another consortium or a round outside
    ``[newest_round, newest_round + max_round_gap]`` (``newest_round`` is 0 when the node
    retains nothing). A round below 1 is left to the core node, which refuses it as an
    invalid argument."""
    if consortium_id != own_consortium_id:
        raise CycleRefused(
            f"node {node_id!r} does not serve consortium {quoted(consortium_id, 64)}: "
            "CycleStart.consortium_id must equal the consortium_id of the node's config "
            "(the coordinator's consortium file and the node's config must name the same one)"
        )
    if round_num < 1:
        return
    if round_num < newest_round:
        raise CycleRefused(
            f"node {node_id!r} refuses round {round_num}: it is below the node's newest "
            f"retained round {newest_round}, and a node never rewrites its history (only "
            f"round {newest_round} may run again)"
        )
    if round_num > newest_round + max_round_gap:
        raise CycleRefused(
            f"node {node_id!r} refuses round {round_num}: it is more than max_round_gap = "
            f"{max_round_gap} rounds past the node's newest retained round {newest_round} "
            f"(at most round {newest_round + max_round_gap}); raise [limits] max_round_gap "
            "in the node's config if the consortium really is that far ahead"
        )
