"""The ``tapestry`` command: serve, trigger and inspect rounds, run the demo."""

from tapestry.cli.app import main

__all__ = ["main"]
