"""A server started by a launcher stops when the launcher dies, even by SIGKILL.

The launcher (:mod:`tapestry.demo.launcher`) puts its pid in :data:`STOP_WITH_PARENT`; a
``tapestry`` process whose parent is that pid asks Linux to send it SIGTERM when its parent
ends (``PR_SET_PDEATHSIG``), which it then handles like any SIGTERM. Set after ``exec``, in
the child itself: a ``preexec_fn`` would make ``subprocess`` fork a process that runs gRPC
threads, which aborts the child. Processes further down (torchrun's workers) have another
parent and are left to it. Elsewhere than Linux, nothing.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

STOP_WITH_PARENT = "TAPESTRY_STOP_WITH_PARENT"
_PR_SET_PDEATHSIG = 1


def stop_with_parent() -> None:
    """Arrange SIGTERM on the parent's death when :data:`STOP_WITH_PARENT` names it."""
    wanted = os.environ.get(STOP_WITH_PARENT, "")
    if not sys.platform.startswith("linux") or not wanted.isdigit():
        return
    if os.getppid() != int(wanted):
        return  # not the launcher's own child (or the launcher is already gone)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != int(wanted):  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)
