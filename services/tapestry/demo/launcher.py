"""A consortium of real processes on 127.0.0.1: the demo and the integration tests use it.

Nodes dial out by default: the coordinator starts first, each node's file names it
(``coordinator``), and a node is ready once the coordinator has welcomed it (it opens no
port). With ``dial_out=False`` the nodes listen instead and the coordinator dials them (the
tests that call a node's own port use that). Every server binds port 0 and reports the port
it got through a ready file, so there is no race for a port chosen in advance; readiness is
then confirmed through ``grpc.health.v1``.
Every process started here is stopped by :meth:`LocalConsortium.stop` (also on errors).
The configuration files are built as :mod:`tapestry.config` models and written from them,
so the launcher cannot write a file the servers would refuse.

The consortium runs with mutual TLS unless told otherwise: on first start it creates its
certificates under ``<workdir>/certs`` (`tapestry certs init`'s layout: the CA, the
coordinator, one per node, and one operator, :data:`OPERATOR`), and everything that talks
to it here (:meth:`LocalConsortium.client`, :meth:`LocalConsortium.channel`, the health
checks) presents a certificate.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Final

import grpc

from tapestry.config import (
    ConsortiumConfig,
    MemberConfig,
    NodeConfig,
    TlsConfig,
    build_config,
    write_config,
)
from tapestry.errors import UserError
from tapestry.lifetime import STOP_WITH_PARENT
from tapestry.pki.access import PeerRole
from tapestry.pki.authority import init_consortium
from tapestry.pki.credentials import load_channel_credentials
from tapestry.pki.layout import Layout, node_server_name
from tapestry.wire.grpc_plumbing import STOP_GRACE_S, check_health, open_channel
from tapestry.wire.status import SERVER, describe_rpc_error

if TYPE_CHECKING:  # the client imports torch; writing a consortium's files does not need it
    from tapestry.coordinator.client import CoordinatorClient

START_TIMEOUT_S = 120.0
# The operator whose certificate the launcher creates and its clients present.
OPERATOR = "operator"
COORDINATOR: Final = "coordinator"
# The coordinator address in a node's file checked before the coordinator has one: each
# node's file is written again, with the coordinator's address, when the node starts.
NOT_STARTED = "127.0.0.1:1"
# A server drains its calls for up to STOP_GRACE_S after SIGTERM; past that (and a margin
# for its interpreter to exit) it is killed.
STOP_TIMEOUT_S = STOP_GRACE_S + 5.0


class LaunchError(UserError, RuntimeError):
    """A local server did not come up; the message includes the end of its log."""


@dataclass
class LocalNodeSpec:
    node_id: str
    jurisdiction: str
    quality_score: float
    corpus: list[Path]
    training: dict[str, Any] = field(default_factory=dict)
    # Fields of tapestry.config.NodeLimits (e.g. a short receive_timeout_s in tests).
    limits: dict[str, Any] = field(default_factory=dict)
    # More than 1: the node trains on that many processes under torchrun, rank 0 serving.
    processes: int = 1


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    address: str = ""
    metrics_port: int = 0  # with LocalConsortium(metrics=True)


class LocalConsortium:
    """Writes the configuration files under ``workdir`` and starts the servers."""

    def __init__(
        self,
        workdir: Path,
        nodes: Sequence[LocalNodeSpec],
        *,
        consortium_id: str = "tapestry-local",
        seed: int = 2026,
        model: dict[str, Any] | None = None,
        policy: dict[str, Any] | None = None,
        extra_members: Sequence[dict[str, str]] = (),
        route: Callable[[str, str], str] | None = None,
        settings: dict[str, Any] | None = None,
        tls: bool = True,
        metrics: bool = False,
        dial_out: bool = True,
    ) -> None:
        """``model`` and ``policy`` are the fields of :class:`~tapestry.config.ModelTable`
        and :class:`~tapestry.config.PolicyConfig`, a node's ``training`` those of
        :class:`~tapestry.config.TrainingConfig`; ``extra_members`` are added to the
        consortium file as they are (e.g. a node that is not running); ``route(node_id,
        address)`` may give the coordinator another address to reach a node by (e.g. a
        recording proxy in tests; with ``dial_out``, ``route(node_id, coordinator address)``
        gives the address that node dials instead); ``settings`` are further top-level fields of
        :class:`~tapestry.config.ConsortiumConfig` (e.g. ``node_timeout_s``). Values the
        servers would refuse raise :class:`~tapestry.config.ConfigError` here. With
        ``tls=False`` every server runs ``--insecure`` (plaintext); with ``metrics`` each
        serves Prometheus metrics on a free port (:meth:`metrics_url`)."""
        self.workdir = workdir
        self.nodes = list(nodes)
        self.consortium_id = consortium_id
        self.seed = seed
        self.model = model or {"architecture": "tiny-causal", "vocab_size": 256, "hidden_size": 32}
        self.policy = policy or {}
        self.extra_members = list(extra_members)
        self.route = route
        self.settings = dict(settings or {})
        self.tls = tls
        self.metrics = metrics
        self.dial_out = dial_out
        self.certs = Layout(workdir / "certs")
        self.processes: dict[str, Process] = {}
        self.coordinator_address = ""

    # -- lifecycle --------------------------------------------------------------------

    def __enter__(self) -> LocalConsortium:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def node_config_path(self, node_id: str) -> Path:
        return self.workdir / "config" / "nodes" / f"{node_id}.toml"

    def node_data_dir(self, node_id: str) -> Path:
        return self.workdir / "data" / node_id

    @property
    def coordinator_data_dir(self) -> Path:
        return self.workdir / "data" / "coordinator"

    def node_config(self, spec: LocalNodeSpec) -> NodeConfig:
        return build_config(
            NodeConfig,
            {
                "node_id": spec.node_id,
                "jurisdiction": spec.jurisdiction,
                "consortium_id": self.consortium_id,  # the one the coordinator sends
                "quality_score": spec.quality_score,
                "corpus": [Path(p).absolute() for p in spec.corpus],
                "seed": self.seed,
                # A node that dials out takes the model from the coordinator, unless it
                # trains under torchrun (its worker ranks build the model before it dials).
                **({"coordinator": self._dialed_address(spec.node_id)} if self.dial_out else {}),
                **({"model": self.model} if not self.dial_out or spec.processes > 1 else {}),
                "training": spec.training,
                "limits": spec.limits,
                # The consortium's link, seen from the node (the base's window).
                **({"link": self.settings["link"]} if "link" in self.settings else {}),
                "trust": self._trust(),
                **self._tls_section("node", spec.node_id),
            },
            f"local node {spec.node_id!r}",
        )

    def _trust(self) -> dict[str, Any]:
        """The nodes' ``[trust]``, as the consortium validates: the coordinator's word where
        it validates nothing, else its tolerance, and no more acceptances than it has
        members that sign (a lone member's own)."""
        acceptance = self.policy.get("acceptance", {})
        if acceptance.get("rule") == "off":
            return {"min_acceptances": 0}
        trust: dict[str, Any] = {"min_acceptances": min(2, len(self.nodes))}
        if "tolerance" in acceptance:
            trust["tolerance"] = acceptance["tolerance"]
        return trust

    def consortium_config(
        self, members: Sequence[MemberConfig | dict[str, Any]]
    ) -> ConsortiumConfig:
        return build_config(
            ConsortiumConfig,
            {
                "consortium_id": self.consortium_id,
                "seed": self.seed,
                **self.settings,
                "model": self.model,
                "policy": self.policy,
                "nodes": [*members, *self.extra_members],
                **self._tls_section(COORDINATOR, ""),
            },
            "local consortium",
        )

    def _tls_section(self, role: PeerRole, name: str) -> dict[str, Any]:
        if not self.tls:
            return {}
        pair = self.certs.holder(role, name)
        tls = TlsConfig(
            ca=self.certs.ca_cert,
            cert=pair / "cert.pem",
            key=pair / "key.pem",
            crl=self.certs.crl,
        )
        return {"tls": tls.model_dump()}

    def create_certificates(self) -> None:
        """The consortium's certificates, once: a restarted consortium keeps its own."""
        if not self.tls or self.certs.ca_cert.exists():
            return
        init_consortium(
            self.certs.root,
            self.consortium_id,
            coordinator_hosts=["127.0.0.1", "localhost"],
            nodes=[(spec.node_id, "127.0.0.1") for spec in self.nodes],
            operators=[OPERATOR],
        )

    def write_node_config(self, spec: LocalNodeSpec) -> Path:
        """Write the node file of ``spec``; its path."""
        return write_config(self.node_config_path(spec.node_id), self.node_config(spec))

    def write_consortium_config(self, addresses: Mapping[str, str] | None = None) -> Path:
        """Write the consortium file, each node a member at ``addresses[node_id]`` (without
        addresses, members that dial out); its path. The members are checked with the file
        (a :class:`ConfigError` naming the field)."""
        members = [
            {
                "node_id": s.node_id,
                "jurisdiction": s.jurisdiction,
                **({"address": addresses[s.node_id]} if addresses is not None else {}),
            }
            for s in self.nodes
        ]
        return write_config(self.consortium_config_path, self.consortium_config(members))

    def start(self) -> None:
        for spec in self.nodes:  # refused here, before any process starts
            self.node_config(spec)
        self.create_certificates()
        if self.dial_out:
            self.write_consortium_config()
            self._start_coordinator()
        for spec in self.nodes:
            self.start_node(spec.node_id, wait=False)
        for spec in self.nodes:
            self._await_ready(spec.node_id)
        if not self.dial_out:
            self.write_consortium_config({s.node_id: self._route(s.node_id) for s in self.nodes})
            self._start_coordinator()

    def start_node(self, node_id: str, *, wait: bool = True) -> None:
        """Start (or start again) the node ``node_id``; with ``wait``, until it is ready
        (welcomed by the coordinator, when it dials out)."""
        spec = next(spec for spec in self.nodes if spec.node_id == node_id)
        config = self.write_node_config(spec)
        data_dir = str(self.node_data_dir(node_id))
        self._spawn(
            node_id,
            ["node", "serve", "--config", str(config), "--data-dir", data_dir],
            processes=spec.processes,
        )
        if wait:
            self._await_ready(node_id)

    def _dialed_address(self, node_id: str) -> str:
        """The address node ``node_id`` dials: the coordinator's, or the route's."""
        if not self.coordinator_address:
            return NOT_STARTED  # a file checked before the coordinator starts, not written
        if self.route is None:
            return self.coordinator_address
        return self.route(node_id, self.coordinator_address)

    @property
    def consortium_config_path(self) -> Path:
        return self.workdir / "config" / "consortium.toml"

    def _start_coordinator(self, listen: str = "127.0.0.1:0") -> str:
        self._spawn(
            "coordinator",
            ["coordinator", "serve", "--config", str(self.consortium_config_path),
             "--data-dir", str(self.coordinator_data_dir)],
            listen=listen,
        )  # fmt: skip
        self.coordinator_address = self._await_ready("coordinator")
        return self.coordinator_address

    def _route(self, node_id: str) -> str:
        address = self.processes[node_id].address
        return self.route(node_id, address) if self.route else address

    def restart_coordinator(self) -> str:
        """Stop and start the coordinator on the same data (a restart, for resume tests).
        Nodes that dial out dial it again: it comes back on the same port, and this returns
        once every running node holds a session again."""
        if not self.dial_out:
            self._stop(["coordinator"])
            return self._start_coordinator()
        address = self.coordinator_address
        self._stop(["coordinator"])
        self._start_coordinator(listen=address)
        self.await_members()
        return address

    def await_members(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Wait until every running node that dials out holds a session (ListMembers)."""
        running = {name for name in self.processes if name != COORDINATOR}
        deadline = time.monotonic() + timeout_s
        with self.client() as client:
            while True:
                connected = {m.node_id for m in client.list_members() if m.connected}
                if running <= connected:
                    return
                if time.monotonic() > deadline:
                    raise LaunchError(
                        f"nodes {sorted(running - connected)} hold no session "
                        f"{timeout_s:.0f} s after the coordinator started"
                    )
                time.sleep(0.1)

    def stop_node(self, node_id: str) -> None:
        self._stop([node_id])

    def stop(self) -> None:
        self._stop(list(self.processes))

    # -- processes --------------------------------------------------------------------

    def _spawn(
        self, name: str, args: list[str], processes: int = 1, listen: str = "127.0.0.1:0"
    ) -> None:
        """Start ``tapestry ARGS``; with ``processes`` > 1 under ``torchrun`` (its module,
        ``torch.distributed.run``), whose process is the one kept and stopped: SIGTERM
        reaches every rank through it."""
        logs = self.workdir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        ready = logs / f"{name}.ready"
        ready.unlink(missing_ok=True)
        log_path = logs / f"{name}.log"
        log_file: IO[bytes] = open(log_path, "ab")  # noqa: SIM115 - lives with the process
        # The server stops when this process dies, even by SIGKILL (tapestry.cli.app): no
        # node that dials out is left dialing a coordinator that is gone.
        env = {**os.environ, "PYTHONUNBUFFERED": "1", STOP_WITH_PARENT: str(os.getpid())}
        popen = subprocess.Popen(
            [
                sys.executable,
                *(
                    ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
                    if processes > 1
                    else []
                ),
                "-m",
                "tapestry",
                *args,
                *([] if self.tls else ["--insecure"]),
                *(["--metrics-listen", "127.0.0.1:0"] if self.metrics else []),
                "--listen",
                listen,
                "--ready-file",
                str(ready),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
        )
        log_file.close()
        self.processes[name] = Process(name, popen, log_path)

    def _await_ready(self, name: str) -> str:
        process = self.processes[name]
        ready = self.workdir / "logs" / f"{name}.ready"
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready.exists():
            if process.popen.poll() is not None:
                raise LaunchError(
                    f"{name} exited with {process.popen.returncode} before "
                    f"serving:\n{self.log_tail(name)}"
                )
            if time.monotonic() > deadline:
                raise LaunchError(
                    f"{name} not ready after {START_TIMEOUT_S:.0f} s:\n{self.log_tail(name)}"
                )
            time.sleep(0.05)
        announced = json.loads(ready.read_text())
        process.metrics_port = int(announced.get("metrics_port", 0))
        if not announced["port"]:
            return ""  # a node that dials out: the coordinator welcomed it, it listens nowhere
        process.address = f"127.0.0.1:{announced['port']}"
        try:
            status = check_health(
                process.address, credentials=self.credentials(), server_name=self._name_of(name)
            )
        except grpc.RpcError as error:
            raise LaunchError(
                f"{name} health check failed: {describe_rpc_error(error, process.address, SERVER)}"
            ) from None
        if status != "SERVING":
            raise LaunchError(f"{name} reports {status}")
        return process.address

    def _stop(self, names: Sequence[str]) -> None:
        """SIGTERM every named process first, then wait for them together: they drain and
        exit in parallel, so stopping N servers costs about as long as stopping one."""
        stopping = [p for name in names if (p := self.processes.pop(name, None)) is not None]
        for process in stopping:
            if process.popen.poll() is None:
                process.popen.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for process in stopping:
            try:
                process.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.popen.kill()
                process.popen.wait()

    # -- talking to the servers -------------------------------------------------------

    def credentials(
        self, role: PeerRole = "operator", name: str = OPERATOR
    ) -> grpc.ChannelCredentials | None:
        """The credentials of a member (the operator by default; ``("coordinator", "")``
        or ``("node", node_id)`` to pose as one); ``None`` in a plaintext consortium."""
        if not self.tls:
            return None
        pair = self.certs.holder(role, name)
        return load_channel_credentials(pair / "cert.pem", pair / "key.pem", self.certs.ca_cert)

    def endpoints(self) -> dict[str, Any]:
        """Where each server answers and, with TLS, the absolute paths of the CA, the
        operator's and each node's credentials: what ``tapestry demo --keep-running`` writes
        to ``endpoints.json`` for a user's own tools (grpcurl, a script)."""
        nodes = [spec.node_id for spec in self.nodes]
        described: dict[str, Any] = {
            "coordinator": {"address": self.coordinator_address},
            # A node that dials out has no address: it listens nowhere.
            "nodes": {
                node_id: {"address": self.processes[node_id].address or None} for node_id in nodes
            },
        }
        if self.tls:

            def pair(role: PeerRole, name: str) -> dict[str, str]:
                folder = self.certs.holder(role, name).absolute()
                return {"cert": str(folder / "cert.pem"), "key": str(folder / "key.pem")}

            described["ca"] = str(self.certs.ca_cert.absolute())
            described["operator"] = pair("operator", OPERATOR)
            described["node_credentials"] = {n: pair("node", n) for n in nodes}
        return described

    def cli_env(self, role: PeerRole = "operator", name: str = OPERATOR) -> dict[str, str]:
        """The environment that makes a `tapestry` command call as that member (the
        operator by default): ``TAPESTRY_CA``, ``TAPESTRY_CERT`` and ``TAPESTRY_KEY``, or
        ``TAPESTRY_INSECURE`` in a plaintext consortium."""
        if not self.tls:
            return {"TAPESTRY_INSECURE": "1"}
        pair = self.certs.holder(role, name)
        return {
            "TAPESTRY_CA": str(self.certs.ca_cert),
            "TAPESTRY_CERT": str(pair / "cert.pem"),
            "TAPESTRY_KEY": str(pair / "key.pem"),
        }

    def client(self, role: PeerRole = "operator", name: str = OPERATOR) -> CoordinatorClient:
        """A client of the coordinator, as the operator unless another member is named."""
        from tapestry.coordinator.client import CoordinatorClient

        return CoordinatorClient(self.coordinator_address, self.credentials(role, name))

    def channel(
        self, target: str, role: PeerRole = "operator", name: str = OPERATOR
    ) -> grpc.Channel:
        """A channel to the process ``target`` (``"coordinator"`` or a node id), as the
        operator unless another member is named; a node's certificate is checked for its
        node id, as the coordinator checks it."""
        return open_channel(
            self.processes[target].address,
            self.credentials(role, name),
            server_name=self._name_of(target),
        )

    def _name_of(self, process: str) -> str | None:
        """The name a process's certificate is checked for (None: its address's host)."""
        return None if process == COORDINATOR or not self.tls else node_server_name(process)

    def metrics_url(self, name: str) -> str:
        """Where process ``name`` (``"coordinator"`` or a node id) serves its metrics."""
        port = self.processes[name].metrics_port
        if not port:
            raise LaunchError(f"{name} serves no metrics: start with LocalConsortium(metrics=True)")
        return f"http://127.0.0.1:{port}/metrics"

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.workdir / "logs" / f"{name}.log"
        if not path.exists():
            return "(no log)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
