"""The yardstick for a round's overhead: how long the same bytes take over a bare socket on
127.0.0.1, plain and under TLS (the services run mutual TLS, so TLS is the fair floor).

One sender thread writes from a buffer, one receiver reads into a preallocated buffer with
``recv_into``: no per-byte Python work, so this is what the kernel (and, for TLS, the
cipher) costs, nothing of ours.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from pathlib import Path

BLOCK = 4 << 20  # bytes per send/recv call: large enough that syscalls do not dominate


def _serve_once(listener: socket.socket, nbytes: int, wrap: ssl.SSLContext | None) -> None:
    conn, _ = listener.accept()
    if wrap is not None:
        conn = wrap.wrap_socket(conn, server_side=True)
    sink = bytearray(BLOCK)
    view = memoryview(sink)
    left = nbytes
    with conn:
        while left:
            got = conn.recv_into(view, min(BLOCK, left))
            if not got:
                raise ConnectionError("loopback sender stopped early")
            left -= got
        conn.sendall(b"k")  # the receiver holds every byte: stop the clock on the sender


def transfer_seconds(nbytes: int, tls: tuple[ssl.SSLContext, ssl.SSLContext] | None) -> float:
    """Seconds to move ``nbytes`` from one thread to another over 127.0.0.1 (connection and
    handshake excluded), with ``tls`` = (server, client) contexts or in plain TCP."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    server_ctx, client_ctx = tls if tls is not None else (None, None)
    receiver = threading.Thread(target=_serve_once, args=(listener, nbytes, server_ctx))
    receiver.start()
    raw = socket.create_connection(("127.0.0.1", port))
    conn = (
        client_ctx.wrap_socket(raw, server_hostname="localhost") if client_ctx is not None else raw
    )
    source = memoryview(bytearray(BLOCK))
    try:
        start = time.perf_counter()
        left = nbytes
        while left:
            step = min(BLOCK, left)
            conn.sendall(source[:step])
            left -= step
        if conn.recv(1) != b"k":
            raise ConnectionError("loopback receiver did not confirm")
        return time.perf_counter() - start
    finally:
        conn.close()
        receiver.join()
        listener.close()


def mutual_tls(ca: Path, server: Path, client: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server, client) contexts over certificate folders holding ``cert.pem``/``key.pem``,
    each requiring the other's certificate, as the services do."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(server / "cert.pem", server / "key.pem")
    server_ctx.load_verify_locations(ca)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.load_cert_chain(client / "cert.pem", client / "key.pem")
    client_ctx.load_verify_locations(ca)
    client_ctx.check_hostname = False  # the node's certificate names it, not "localhost"
    return server_ctx, client_ctx
