"""The error base the CLI reports as one clear line (no traceback), kept free of heavy
imports so that light commands such as ``tapestry health`` start fast."""

from __future__ import annotations

from typing import Any


class UserError(Exception):
    """Something the operator can fix: a configuration, corpus, data directory or launch."""


def describe_rpc_error(error: Any) -> str:
    """``CODE: details`` of a ``grpc.RpcError``."""
    return f"{error.code().name}: {error.details()}"
