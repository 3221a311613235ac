"""The coordinator SIGKILLed again and again, mid-round and idle, and restarted on the same
data each time: every restart serves, bit for bit, the base of the last round its journal
committed, the journal numbers its rounds 1..N with no gap or repeat, and N never goes back.

CI runs TAPESTRY_CRASH_KILLS kills (4); ``scripts/crash-loop`` runs 25.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections import Counter

import grpc
import pytest

from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.coordinator.client import CoordinatorClient
from tapestry.demo.launcher import LocalConsortium
from tapestry.state_files import load_state
from tapestry.training.consortium.tensors import state_digest, tensor_bytes

pytestmark = pytest.mark.slow  # whole consortia of training processes

KILLS = int(os.environ.get("TAPESTRY_CRASH_KILLS", "4"))
SEED = 20261125
DEADLINE_S = 120.0  # for any one round, or a round's first progress event
NODES = ["vietnam", "switzerland", "india"]


def kill_coordinator(consortium: LocalConsortium) -> None:
    consortium.processes["coordinator"].popen.kill()  # SIGKILL: no drain, no clean-up


def check_resumed(consortium: LocalConsortium, at_least: int) -> int:
    """The restarted coordinator against its journal; returns the rounds committed, N."""
    with consortium.client() as client:
        served_round, base = client.get_base()
        rounds = client.list_rounds()
        latest = client.get_round() if rounds else None
    numbers = [r.round_num for r in rounds]
    committed = len(numbers)
    assert numbers == list(range(1, committed + 1)), f"journal rounds {numbers}"
    assert committed >= at_least, f"the journal went back from {at_least} to {committed} rounds"
    assert served_round == committed
    # Bit for bit: the digest the journal recorded, and the base file committed with it.
    on_disk, _ = load_state(
        consortium.coordinator_data_dir / "base" / f"round-{committed:06d}.safetensors"
    )
    if latest is not None:
        assert latest == rounds[-1]
        assert state_digest(base) == latest.shared_base_sha256
    assert state_digest(base) == state_digest(on_disk)
    assert sorted(base) == sorted(on_disk)
    for name, tensor in base.items():
        assert bytes(tensor_bytes(tensor)) == bytes(tensor_bytes(on_disk[name])), name
    # What a kill mid-write leaves (temporary files) is gone once the store has opened.
    for folder in ("", "base", "rounds"):
        directory = consortium.coordinator_data_dir / folder
        assert [p.name for p in directory.glob(".*")] == [], directory
    return committed


def time_from_start(client: CoordinatorClient) -> float:
    """Seconds from a round's first progress event to its result."""
    began: list[float] = []
    client.run_round(lambda _: began.append(time.monotonic()), timeout_s=DEADLINE_S)
    return time.monotonic() - began[0]


def kill_mid_round(consortium: LocalConsortium, delay_s: float) -> pb.ConsortiumRoundResult | None:
    """Trigger a round in the background, SIGKILL the coordinator ``delay_s`` after its
    first progress event; the round's result if it came back before the kill, else None."""
    started = threading.Event()
    outcome: list[pb.ConsortiumRoundResult | grpc.RpcError] = []
    client = consortium.client()

    def trigger() -> None:
        try:
            outcome.append(client.run_round(lambda _: started.set(), timeout_s=DEADLINE_S))
        except grpc.RpcError as error:
            outcome.append(error)
        finally:
            started.set()

    thread = threading.Thread(target=trigger, daemon=True)
    thread.start()
    try:
        assert started.wait(DEADLINE_S), "no progress event from the round"
        time.sleep(delay_s)  # the moment of the kill
        kill_coordinator(consortium)
        thread.join(DEADLINE_S)
        assert not thread.is_alive(), "the trigger did not end with its coordinator"
    finally:
        client.close()
    (ended,) = outcome
    if isinstance(ended, grpc.RpcError):
        # The connection died with the process; anything else would be a refusal.
        assert ended.code() == grpc.StatusCode.UNAVAILABLE, ended
        return None
    return ended


def test_the_coordinator_resumes_at_its_last_commit_after_every_kill(
    consortium_factory,
) -> None:
    rng = random.Random(SEED)
    consortium = consortium_factory()
    with consortium.client() as client:
        client.run_round(timeout_s=DEADLINE_S)  # the first is slow (every process warms up)
        # A typical round, from its first progress event (where mid-round kills count from)
        # to its result: the quicker of two.
        typical_s = min(time_from_start(client) for _ in range(2))
    committed = check_resumed(consortium, at_least=3)
    landed: Counter[str] = Counter()

    for kill in range(KILLS):
        before = committed
        if kill % 2 == 0:
            # The first mid-round kill comes right after the round starts, the others
            # anywhere in a typical round (some after the commit, before the reply).
            delay_s = 0.0 if kill == 0 else rng.uniform(0, typical_s)
            finished = kill_mid_round(consortium, delay_s)
        else:
            with consortium.client() as client:
                finished = client.run_round(timeout_s=DEADLINE_S)
            time.sleep(rng.uniform(0, typical_s))  # idle, for a while, then the kill
            kill_coordinator(consortium)
        consortium.restart_coordinator()
        committed = check_resumed(consortium, at_least=before)
        if finished is None:
            landed["mid-round"] += 1
            # It died before replying: its round committed or it did not, nothing between.
            assert committed in (before, before + 1)
            landed["mid-round, committed before the kill"] += committed - before
        else:
            landed["idle"] += 1
            assert committed == finished.round_num == before + 1  # what was answered stays

    with consortium.client() as client:
        final = client.run_round(timeout_s=DEADLINE_S)
    assert final.round_num == committed + 1
    assert list(final.accepted_nodes) == NODES and not final.aborted_reason
    assert check_resumed(consortium, at_least=final.round_num) == final.round_num

    print(
        f"\n{KILLS} kills over {final.round_num} rounds (typical round {typical_s:.2f} s): "
        f"{dict(landed)}"
    )
    if KILLS >= 4:
        assert landed["mid-round"] >= 1 and landed["idle"] >= 1, landed
