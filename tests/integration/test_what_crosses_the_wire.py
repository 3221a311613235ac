"""What a node puts on the wire: the delta, never its full state or its corpus text."""

from __future__ import annotations

import torch

from tapestry.consortium.v1 import consortium_pb2 as pb
from tapestry.state_files import load_state
from tapestry.training.consortium.tensors import state_digest, tensor_bytes
from tapestry.wire.tensor_stream import StateAssembler

from .conftest import CORPORA
from .recorder import H2_PREFACE, RecordingProxy, data_payloads, grpc_messages


def test_a_node_sends_its_delta_and_never_its_state_or_corpus(consortium_factory):
    proxies: dict[str, RecordingProxy] = {}

    def through_proxy(node_id: str, address: str) -> str:
        if node_id != "vietnam":
            return address
        proxies[node_id] = RecordingProxy(address)
        return proxies[node_id].address

    # Plaintext, to read what crossed the socket (with TLS it is ciphertext: see below).
    consortium = consortium_factory(route=through_proxy, tls=False)
    try:
        with consortium.client() as client:
            _, base = client.get_base()
            result = client.run_round()
        recording = proxies["vietnam"].recording
    finally:
        for proxy in proxies.values():
            proxy.close()
    assert "vietnam" in result.accepted_nodes

    # Decode every gRPC message the node sent, exactly as it crossed the socket: the node
    # dials out, so what it sends goes upstream, on its one session stream.
    streams = [
        grpc_messages(bytes(stream)) for stream in data_payloads(bytes(recording.upstream)).values()
    ]
    sent = b"".join(m for messages in streams for m in messages)
    (session,) = [[pb.OpenSessionRequest.FromString(m) for m in ms] for ms in streams if ms]
    assert session[0].WhichOneof("item") == "open"
    described = [m.described for m in session if m.WhichOneof("item") == "described"]
    # Described at the session's opening and again before the round sends any weights.
    assert len(described) == 2
    assert all((d.node_id, d.jurisdiction) == ("vietnam", "Vietnam") for d in described)
    exchanges: dict[int, list[pb.RunSovereignCycleResponse]] = {}
    for message in session:
        if message.WhichOneof("item") == "cycle":
            exchanges.setdefault(message.exchange_id, []).append(message.cycle)
    judged = [r for r in exchanges.values() if r[0].WhichOneof("item") == "evaluation"]
    (cycle_id,) = [k for k, r in exchanges.items() if r[0].WhichOneof("item") != "evaluation"]
    replies = exchanges[cycle_id]
    # Member-validated commit: each evaluation is answered with one MemberEvaluation, two
    # losses and the digest of the state judged: numbers, never a state.
    assert judged and all(len(r) == 1 and r[0].ByteSize() < 128 for r in judged)
    ends = [m.end for m in session if m.WhichOneof("item") == "end" and m.exchange_id == cycle_id]
    assert [end.code for end in ends] in ([], [0])  # the reply's end, if it left before the cancel
    # Progress first (numbers only: phase, steps, loss, sizes), then the result and delta.
    progress = [r.progress for r in replies if r.WhichOneof("item") == "progress"]
    assert progress and all(len(p.SerializeToString()) < 64 for p in progress)
    replies = replies[len(progress) :]
    kinds = [r.WhichOneof("item") for r in replies]
    assert kinds[0] == "result" and kinds[-1] == "delta_end"
    assert set(kinds[1:-1]) == {"delta_chunk"}

    assembler = StateAssembler()
    for reply in replies[1:-1]:
        assembler.add(reply.delta_chunk)
    delta = assembler.finish(replies[-1].delta_end)

    trained, _ = load_state(
        consortium.node_data_dir("vietnam") / "artifacts" / "round-000001" / "model.safetensors"
    )
    assert delta.keys() == trained.keys() == base.keys()
    for name in trained:
        assert torch.equal(delta[name], trained[name] - base[name])
        # The full trained tensor's bytes appear nowhere in what the node sent.
        assert bytes(tensor_bytes(trained[name])[:64]) not in sent
    for line in CORPORA["vietnam"]:
        for fragment in (line.encode(), line[:12].encode()):
            assert fragment not in sent
            assert fragment not in bytes(recording.downstream)
            assert fragment not in bytes(recording.upstream)
    header = replies[0].result
    assert header.artifact.model_state_sha256  # the state is described, not sent
    # The delta's digest is announced in the header (hashed before it, so the node signs
    # it there), and the trailer carries the same.
    assert header.contribution.weight_delta_sha256 == state_digest(delta)
    assert replies[-1].delta_end.sha256 == state_digest(delta)
    recorded = {c.node_id: c for c in result.contributions}["vietnam"]
    assert recorded.weight_delta_sha256 == replies[-1].delta_end.sha256


def test_with_mutual_tls_nothing_readable_crosses_the_wire(consortium_factory):
    """The default consortium: the same round through the same recording proxy, and the
    socket carries only TLS records — no HTTP/2 preface, no tensor bytes either way."""
    proxies: dict[str, RecordingProxy] = {}

    def through_proxy(node_id: str, address: str) -> str:
        proxies[node_id] = RecordingProxy(address)
        return proxies[node_id].address

    consortium = consortium_factory(route=through_proxy)
    try:
        with consortium.client() as client:
            _, base = client.get_base()
            result = client.run_round()
        recording = proxies["vietnam"].recording
    finally:
        for proxy in proxies.values():
            proxy.close()
    assert "vietnam" in result.accepted_nodes
    upstream, downstream = bytes(recording.upstream), bytes(recording.downstream)
    model_bytes = sum(tensor_bytes(t).nbytes for t in base.values())
    # The node dials out: the base comes downstream to it, its delta goes upstream.
    assert len(upstream) > model_bytes and len(downstream) > model_bytes
    # Each direction opens with a TLS handshake record (content type 22, version 3.x).
    assert upstream[:2] == downstream[:2] == b"\x16\x03"
    assert H2_PREFACE not in upstream
    trained, _ = load_state(
        consortium.node_data_dir("vietnam") / "artifacts" / "round-000001" / "model.safetensors"
    )
    for name in base:
        assert bytes(tensor_bytes(base[name])[:64]) not in downstream
        assert bytes(tensor_bytes(trained[name] - base[name])[:64]) not in upstream
    for line in CORPORA["vietnam"]:
        assert line[:12].encode() not in upstream
