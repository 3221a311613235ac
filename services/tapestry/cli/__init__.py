"""The ``tapestry`` command: serve, trigger and inspect rounds, run the demo."""

from tapestry.cli.main import main

__all__ = ["main"]
