"""Governance: who counts in a round and with what weight (:mod:`.policy`), what a node's
cycle must be to count (:mod:`.admission`), and the checks every number a member sends must
pass (:mod:`.checks`, against the bounds in :mod:`tapestry.limits`)."""
