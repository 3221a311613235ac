"""Training cores (no network): see :mod:`tapestry.training.consortium`."""
