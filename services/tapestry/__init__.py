"""Tapestry Consortium: one governed shared base model plus one sovereign model per node."""

__version__ = "0.1.0"
