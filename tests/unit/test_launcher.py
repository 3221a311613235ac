"""LocalConsortium writes its configuration from the config models (so it can only write files
the servers accept) and stops its processes together."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tapestry.config import ConfigError, ConsortiumConfig, NodeConfig, load_config, write_config
from tapestry.demo.launcher import LocalConsortium, LocalNodeSpec, Process

CORPUS = Path(__file__).parents[2] / "services" / "tapestry" / "demo" / "corpora" / "india.txt"
SPEC = LocalNodeSpec("india", "India", 0.88, [CORPUS], {"local_epochs": 2, "max_seq_len": 64})


def _local(tmp_path: Path, **kwargs: object) -> LocalConsortium:
    kwargs.setdefault("policy", {"quality_floor": 0.5})
    return LocalConsortium(tmp_path, [SPEC], **kwargs)  # type: ignore[arg-type]


def test_a_node_file_reads_back_as_the_config_it_was_written_from(tmp_path):
    local = _local(tmp_path)
    config = local.node_config(SPEC)
    path = write_config(local.node_config_path("india"), config)

    assert load_config(path, NodeConfig) == config
    assert (config.training.local_epochs, config.training.max_seq_len, config.seed) == (2, 64, 2026)
    assert config.corpus == [CORPUS.absolute()]


def test_a_consortium_file_reads_back_as_the_config_it_was_written_from(tmp_path):
    local = _local(
        tmp_path,
        settings={"node_timeout_s": 30.0},
        extra_members=[{"node_id": "ghost", "jurisdiction": "Nowhere", "address": "127.0.0.1:1"}],
    )
    config = local.consortium_config(
        [{"node_id": "india", "jurisdiction": "India", "address": "127.0.0.1:50063"}]
    )
    path = write_config(local.consortium_config_path, config)

    assert load_config(path, ConsortiumConfig) == config
    assert [m.node_id for m in config.nodes] == ["india", "ghost"]
    assert config.node_timeout_s == 30.0
    assert "quality_score" not in path.read_text()  # unset: TOML has no null, so left out


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"policy": {"max_node_weight": 2}},
            "local consortium: policy.max_node_weight: max_node_weight must be in (0, 1], got 2.0",
        ),
        (
            {"settings": {"node_timeout": 5}},
            "local consortium: node_timeout: Extra inputs are not permitted; did you mean "
            "'node_timeout_s'?",
        ),
        (
            {"extra_members": [{"node_id": "x", "jurisdiction": "X", "address": "x"}]},
            "local consortium: nodes.1.address: expected HOST:PORT with a port in "
            "1..65535, got 'x' (no port)",
        ),
    ],
)
def test_values_the_coordinator_would_refuse_are_refused_by_the_launcher(tmp_path, kwargs, message):
    local = _local(tmp_path, **kwargs)
    with pytest.raises(ConfigError) as caught:
        local.consortium_config([{"node_id": "india", "jurisdiction": "India", "address": "h:1"}])
    assert str(caught.value) == message


def test_a_node_the_server_would_refuse_is_refused_before_any_process_starts(tmp_path):
    bad = LocalNodeSpec("india", "India", float("nan"), [CORPUS])
    local = LocalConsortium(tmp_path, [bad])
    with pytest.raises(ConfigError) as caught, local:
        pass
    assert str(caught.value) == (
        "local node 'india': quality_score: Input should be a finite number"
    )
    assert local.processes == {}


class _Popen:
    """Records the calls a Popen receives, in one log shared by all of them."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log, self.running = name, log, True

    def poll(self) -> int | None:
        return None if self.running else 0

    def terminate(self) -> None:
        self.log.append(f"terminate {self.name}")

    def wait(self, timeout: float | None = None) -> int:
        self.log.append(f"wait {self.name}")
        self.running = False
        return 0

    def kill(self) -> None:
        self.log.append(f"kill {self.name}")


def test_stop_signals_every_process_before_waiting_for_any(tmp_path):
    local = _local(tmp_path)
    log: list[str] = []
    for name in ("vietnam", "india", "coordinator"):
        popen = _Popen(name, log)
        local.processes[name] = Process(name, popen, tmp_path / f"{name}.log")  # type: ignore[arg-type]
    local.stop()
    assert log == [
        "terminate vietnam",
        "terminate india",
        "terminate coordinator",
        "wait vietnam",
        "wait india",
        "wait coordinator",
    ]
    assert local.processes == {}


def test_a_process_that_outlives_the_grace_is_killed(tmp_path, monkeypatch):
    monkeypatch.setattr("tapestry.demo.launcher.STOP_TIMEOUT_S", 0.0)
    local = _local(tmp_path)
    log: list[str] = []

    class Stuck(_Popen):
        def wait(self, timeout: float | None = None) -> int:
            if timeout is not None:
                self.log.append(f"timed out {self.name}")
                raise subprocess.TimeoutExpired("tapestry", timeout)
            return super().wait()

        def kill(self) -> None:
            self.log.append(f"kill {self.name}")

    local.processes["india"] = Process("india", Stuck("india", log), tmp_path / "i.log")  # type: ignore[arg-type]
    local.stop()
    assert log == ["terminate india", "timed out india", "kill india", "wait india"]
