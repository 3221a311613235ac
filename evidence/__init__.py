"""The evidence run (``scripts/evidence OUT_DIR``): does the consortium learn, for whom, and
with which integration strategy, measured on held-out text.

- :mod:`~evidence.settings`: the model and training sizes of a run;
- :mod:`~evidence.heldout`: every jurisdiction's held-out split, rebuilt from the
  node files, and one function that scores any state on all of them;
- :mod:`~evidence.services`: the local consortium (real processes, gRPC, mutual
  TLS) for N rounds, then every model on every split (the N+1 outcome);
- :mod:`~evidence.inprocess`: the strategy comparison and the poisoned member,
  with the in-process core (same corpora, splits, model, seeds);
- :mod:`~evidence.claims`: the issue's claims checked against the numbers;
- :mod:`~evidence.run`: all of it, writing ``evidence.json``, ``report.png`` and
  ``report.html``.
"""
