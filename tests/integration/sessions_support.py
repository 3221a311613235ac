"""Helpers for the dial-out session tests: which TCP ports a process listens on (read from
``/proc``, no tool needed), a raw ``OpenSession`` a test drives message by message, members'
sessions as ``ListMembers`` shows them, and a bounded poll."""

from __future__ import annotations

import datetime as dt
import os
import queue
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import grpc

from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.consortium.v1 import consortium_pb2_grpc as pb_grpc
from tapestry.coordinator.session_service import PROTOCOL_VERSION
from tapestry.demo.launcher import LocalConsortium
from tapestry.pki.authority import issue_certificate, load_authority
from tapestry.pki.layout import COORDINATOR_SERVER_NAME, node_server_name, spiffe_id, write_pair
from tapestry.wire.grpc_plumbing import open_channel

T = TypeVar("T")
LISTEN = "0A"  # TCP_LISTEN, as /proc/net/tcp writes a socket's state
ESTABLISHED = "01"
EVER = dt.datetime.min.replace(tzinfo=dt.UTC)  # before any session opened


def _sockets(pid: int, state: str) -> list[tuple[tuple[str, int], tuple[str, int]]]:
    """The ``(local, remote)`` endpoints of the TCP sockets process ``pid`` holds in
    ``state`` (as ``/proc/net/tcp`` writes it), IPv4 and IPv6: its socket inodes
    (``/proc/<pid>/fd``) matched against the entries of ``/proc/<pid>/net/tcp`` and ``tcp6``
    (the process's own network namespace). Addresses stay in the kernel's hex."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed between listing and reading
            continue
        if target.startswith("socket:["):
            inodes.add(target.removeprefix("socket:[").removesuffix("]"))
    found = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == state and fields[9] in inodes:
                found.append((_endpoint(fields[1]), _endpoint(fields[2])))
    return sorted(found)


def _endpoint(text: str) -> tuple[str, int]:
    address, port = text.split(":")
    return address, int(port, 16)


def listening_ports(pid: int) -> list[tuple[str, int]]:
    """The ``(local address, port)`` of every TCP socket process ``pid`` listens on."""
    return [local for local, _ in _sockets(pid, LISTEN)]


def established(pid: int) -> list[tuple[int, int]]:
    """The ``(local port, remote port)`` of every TCP connection process ``pid`` holds."""
    return [(local[1], remote[1]) for local, remote in _sockets(pid, ESTABLISHED)]


def hello(
    node_id: str,
    jurisdiction: str,
    consortium_id: str,
    protocol_version: int = PROTOCOL_VERSION,
) -> pb.SessionOpen:
    """The ``SessionOpen`` a node of that name would send."""
    return pb.SessionOpen(
        protocol_version=protocol_version,
        consortium_id=consortium_id,
        node_id=node_id,
        jurisdiction=jurisdiction,
        release="test",
    )


class RawSession:
    """An ``OpenSession`` call to the coordinator at ``address`` with ``credentials``
    (``None``: plaintext), its first message ``opening``; further messages go with
    :meth:`send`, replies come from :meth:`next` (a failed call raises its
    :class:`grpc.RpcError`). The channel asks for the coordinator's name, as a node does."""

    def __init__(
        self,
        address: str,
        credentials: grpc.ChannelCredentials | None,
        opening: pb.SessionOpen,
    ) -> None:
        self.channel = open_channel(
            address,
            credentials,
            server_name=COORDINATOR_SERVER_NAME if credentials is not None else None,
        )
        self._requests: queue.SimpleQueue[pb.OpenSessionRequest | None] = queue.SimpleQueue()
        self._requests.put(pb.OpenSessionRequest(open=opening))
        stub = pb_grpc.CoordinatorServiceStub(self.channel)
        self.call = stub.OpenSession(self._messages(), timeout=120)
        self._replies: Iterator[pb.OpenSessionResponse] = iter(self.call)

    def _messages(self) -> Iterator[pb.OpenSessionRequest]:
        while (message := self._requests.get()) is not None:
            yield message

    def send(self, message: pb.OpenSessionRequest) -> None:
        self._requests.put(message)

    def next(self) -> pb.OpenSessionResponse:
        """The coordinator's next message (raises the call's error once it ends)."""
        return next(self._replies)

    def ended(self) -> grpc.RpcError:
        """Read until the call ends; its error (the test fails if it ends with OK)."""
        while True:
            try:
                self.next()
            except grpc.RpcError as error:
                return error
            except StopIteration:
                raise AssertionError("the session ended with OK, not an error") from None

    def close(self) -> None:
        self._requests.put(None)
        self.call.cancel()
        self.channel.close()

    def __enter__(self) -> RawSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def refusal(
    address: str, credentials: grpc.ChannelCredentials | None, opening: pb.SessionOpen
) -> grpc.RpcError:
    """Open a session that must be refused before any welcome; the error."""
    with RawSession(address, credentials, opening) as session:
        try:
            first = session.next()
        except grpc.RpcError as error:
            return error
    raise AssertionError(f"the session was not refused; the coordinator answered {first}")


def poll(
    what: str, probe: Callable[[], T | None], timeout_s: float = 15.0, every_s: float = 0.1
) -> T:
    """``probe()`` again and again until it returns something other than ``None`` (or
    ``False``); that value. Past ``timeout_s`` the test fails, saying ``what`` it waited for."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout_s:.0f} s for {what}")
        time.sleep(every_s)


# -- members' sessions -------------------------------------------------------------------


def members(consortium: LocalConsortium) -> dict[str, pb.MemberSession]:
    """Every member's session, by node id, as the operator lists them."""
    with consortium.client() as client:
        return {m.node_id: m for m in client.list_members(timeout_s=10)}


def since(member: pb.MemberSession) -> dt.datetime:
    return member.since.ToDatetime(dt.UTC)


def connected_after(
    consortium: LocalConsortium, node_id: str, moment: dt.datetime = EVER
) -> pb.MemberSession:
    """Wait until ``node_id`` holds a session opened after ``moment``; its listing."""

    def probe() -> pb.MemberSession | None:
        member = members(consortium)[node_id]
        return member if member.connected and since(member) > moment else None

    return poll(f"{node_id} to hold a session opened after {moment:%H:%M:%S.%f}", probe)


def disconnected(
    consortium: LocalConsortium, node_id: str, timeout_s: float = 15.0
) -> pb.MemberSession:
    """Wait until ``node_id`` holds no session; its listing."""
    return poll(
        f"{node_id} to lose its session",
        lambda: m if not (m := members(consortium)[node_id]).connected else None,
        timeout_s,
    )


class Log:
    """A server's log from now on (``<workdir>/logs/<name>.log``)."""

    def __init__(self, consortium: LocalConsortium, name: str) -> None:
        self.path = consortium.workdir / "logs" / f"{name}.log"
        self.start = len(self._text())

    def _text(self) -> str:
        return self.path.read_text(errors="replace") if self.path.exists() else ""

    def new(self) -> str:
        """What was written since this object was made."""
        return self._text()[self.start :]


def issue_node_pair(certs: Path, folder: Path, node_id: str, consortium: str) -> Path:
    """Another certificate from the CA in ``certs``, naming ``node_id`` of ``consortium``,
    written to ``folder``; the folder."""
    ca_cert, ca_key = load_authority(certs)
    cert, key = issue_certificate(
        ca_cert,
        ca_key,
        common_name=f"node {node_id}",
        identity=spiffe_id(consortium, "node", node_id),
        hosts=["127.0.0.1"],
        server=True,
        server_names=[node_server_name(node_id)],
    )
    write_pair(folder, cert, key)
    return folder
