"""Run a built server in the foreground until SIGTERM/SIGINT, then drain and stop."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health

from tapestry.wire.grpc_plumbing import mark_serving, write_ready_file

log = logging.getLogger(__name__)

STOP_GRACE_S = 10.0


def serve_forever(
    server: grpc.Server,
    port: int,
    health_servicer: health.HealthServicer,
    service_names: Sequence[str],
    ready_file: Path | None = None,
) -> None:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    mark_serving(health_servicer, service_names)
    if ready_file is not None:
        write_ready_file(ready_file, port)
    log.info("serving %s on port %d", ", ".join(service_names), port)
    stop.wait()
    log.info("stopping: draining calls for up to %.0f s", STOP_GRACE_S)
    health_servicer.enter_graceful_shutdown()
    server.stop(STOP_GRACE_S).wait()
