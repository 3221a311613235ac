"""A TCP forwarder that records every byte each side sends, and a reader that turns the
recorded bytes back into the gRPC messages they carried (HTTP/2 DATA frames ->
length-prefixed gRPC messages). Lets a test see exactly what a node put on the wire."""

from __future__ import annotations

import contextlib
import socket
import threading
from dataclasses import dataclass, field

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, PADDED = 0x0, 0x8


@dataclass
class Recording:
    upstream: bytearray = field(default_factory=bytearray)  # client -> server
    downstream: bytearray = field(default_factory=bytearray)  # server -> client


class RecordingProxy:
    """Listens on 127.0.0.1:<free port> and forwards to ``target``, recording both ways."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self._target = (host, int(port))
        self.recording = Recording()
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._sockets: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self._target)
            self._sockets += [client, server]
            threading.Thread(
                target=self._pump, args=(client, server, "upstream"), daemon=True
            ).start()
            threading.Thread(
                target=self._pump, args=(server, client, "downstream"), daemon=True
            ).start()

    def _pump(self, source: socket.socket, sink: socket.socket, direction: str) -> None:
        try:
            while data := source.recv(65536):
                with self._lock:
                    getattr(self.recording, direction).extend(data)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._listener.close()
        for sock in self._sockets:
            sock.close()


def data_payloads(raw: bytes) -> dict[int, bytearray]:
    """HTTP/2 DATA payloads per stream id from one direction of a connection."""
    if raw.startswith(H2_PREFACE):
        raw = raw[len(H2_PREFACE) :]
    streams: dict[int, bytearray] = {}
    at = 0
    while at + 9 <= len(raw):
        length = int.from_bytes(raw[at : at + 3], "big")
        kind, flags = raw[at + 3], raw[at + 4]
        stream = int.from_bytes(raw[at + 5 : at + 9], "big") & 0x7FFFFFFF
        payload = raw[at + 9 : at + 9 + length]
        at += 9 + length
        if kind != DATA:
            continue
        if flags & PADDED:
            pad = payload[0]
            payload = payload[1 : len(payload) - pad]
        streams.setdefault(stream, bytearray()).extend(payload)
    return streams


def grpc_messages(payload: bytes) -> list[bytes]:
    """Split a stream's DATA bytes into gRPC messages (1-byte flag, 4-byte length)."""
    out, at = [], 0
    while at + 5 <= len(payload):
        if payload[at] != 0:
            raise AssertionError("compressed gRPC message: the test expects none")
        length = int.from_bytes(payload[at + 1 : at + 5], "big")
        out.append(bytes(payload[at + 5 : at + 5 + length]))
        at += 5 + length
    return out
