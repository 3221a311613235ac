"""Integration strategies: how the accepted deltas become the next base.

The policy decides *who* counts and with what weight; a strategy decides how the accepted
deltas are *combined* (:mod:`.settings` lists them). Each is a :class:`~.base.Strategy`
object built by :func:`~.registry.make_strategy`; one that keeps state across rounds (diloco's
momentum) carries it itself. This package's ``__init__`` imports nothing, so the settings are
read without torch.
"""
