"""Bad input is refused with its code and counted; the round goes on; nothing is lost.

Real TLS on 127.0.0.1, real 1024-bit Paillier keys, real torch clients; the misbehaving
clients write real frames by hand (see rogue.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedcore.aggregator import Aggregator
from fedcore.aggregator.committee import PIPELINE
from fedcore.crypto import PrivateKey
from fedcore.crypto.masking import public_key_bytes
from fedcore.errors import FedcoreError
from protocol.errors import ErrorCode
from protocol.messages import (
    Ack,
    DecryptRequest,
    DecryptResult,
    RoundStart,
    UpdateChunk,
    UpdateDone,
    UploadGrant,
    UploadRequest,
)

from .conftest import Keys, aggregator_config, make_client, weight_of
from .rogue import RogueClient


def _rejected(aggregator: Aggregator, reason: str) -> float:
    value = aggregator.metrics.registry.get_sample_value(
        "fedcore_updates_rejected_total", {"reason": reason}
    )
    return 0.0 if value is None else value


async def _start(aggregator: Aggregator) -> asyncio.Task[Any]:
    task = asyncio.create_task(aggregator.run())
    await asyncio.wait_for(aggregator.wait_started(), 30)
    return task


@pytest.mark.slow
async def test_bad_updates_are_refused_with_their_code_and_the_round_goes_on(
    tmp_path: Path, pki: Path, keys: Keys, digits
) -> None:
    config = aggregator_config(
        tmp_path, pki, keys, clients_per_round=8, rounds=1, round_timeout=20.0, local_epochs=1
    )
    aggregator = Aggregator(config)
    task = await _start(aggregator)
    port = aggregator.port
    honest = [
        make_client(i, pki, keys, digits, 2, federation=aggregator.federation) for i in range(2)
    ]
    honest_tasks = [asyncio.create_task(c.run(f"127.0.0.1:{port}")) for c in honest]
    rogues = {
        name: RogueClient(pki, i)
        for i, name in enumerate(
            ["invalid", "digest", "count", "replay", "stale", "ungranted"], start=2
        )
    }
    for rogue in rogues.values():
        await rogue.connect(port)
    starts = {name: await r.expect(RoundStart) for name, r in rogues.items()}
    payloads = rogues["replay"].payloads(starts["replay"])
    width = rogues["invalid"].codec.public_key.ciphertext_bytes  # type: ignore[union-attr]

    # An invalid ciphertext (c = 0) in the first chunk.
    r, s = rogues["invalid"], starts["invalid"]
    await r.request_upload(s)
    await r.send(UpdateChunk(round_id=s.round_id, seq=0, payload=bytes(width * 3)))
    # A complete update whose UpdateDone digest does not match its chunks.
    r, s = rogues["digest"], starts["digest"]
    await r.upload(s, r.payloads(s), digest=b"\x01" * 32)
    # One chunk of many, then UpdateDone claiming the update is complete.
    r, s = rogues["count"], starts["count"]
    await r.upload(s, r.payloads(s), last=1, done=False)
    await r.send(
        UpdateDone(
            round_id=s.round_id,
            chunk_count=1,
            item_count=aggregator.codec.item_count,
            digest=b"\x00" * 32,
        )
    )
    # A valid update, acknowledged, then sent again.
    r, s = rogues["replay"], starts["replay"]
    await r.upload(s, payloads)
    await r.expect(Ack)
    await r.send(UpdateChunk(round_id=s.round_id, seq=0, payload=payloads[0]))
    # A chunk for an earlier round.
    r, s = rogues["stale"], starts["stale"]
    await r.send(UpdateChunk(round_id=s.round_id - 1, seq=0, payload=payloads[0]))
    # A chunk streamed without asking for an upload slot first.
    r, s = rogues["ungranted"], starts["ungranted"]
    await r.send(UpdateChunk(round_id=s.round_id, seq=0, payload=payloads[0]))

    expected = {
        "invalid": (ErrorCode.INVALID_CIPHERTEXT, "invalid_ciphertext"),
        "digest": (ErrorCode.DIGEST_MISMATCH, "digest_mismatch"),
        "count": (ErrorCode.WRONG_CHUNK_COUNT, "wrong_chunk_count"),
        "replay": (ErrorCode.REPLAY, "replay"),
        "stale": (ErrorCode.STALE_ROUND, "stale_round"),
        "ungranted": (ErrorCode.PROTOCOL_VIOLATION, "protocol_error"),
    }
    for name, (code, label) in expected.items():
        assert await rogues[name].error_code() == code, name
        assert _rejected(aggregator, label) == 1, name

    checkpoint = await asyncio.wait_for(task, 120)
    await asyncio.wait_for(asyncio.gather(*honest_tasks), 30)
    assert checkpoint.rounds_completed == 1
    record = checkpoint.history[-1]
    # The honest clients and the replaying client's one valid update, each exactly once.
    assert sorted(record["contributors"]) == ["client-0", "client-1", "client-5"]
    fed = aggregator.federation
    assert record["total_weight"] == sum(weight_of(i, digits, 2, fed) for i in range(2)) + 1
    for rogue in rogues.values():
        await rogue.close()


@pytest.mark.slow
async def test_below_quorum_nothing_is_decrypted(
    tmp_path: Path, pki: Path, keys: Keys, digits
) -> None:
    config = aggregator_config(
        tmp_path,
        pki,
        keys,
        min_clients=2,
        clients_per_round=2,
        rounds=1,
        round_timeout=4.0,
        max_failed_rounds=1,
        wait_for_clients_timeout=10.0,
    )
    aggregator = Aggregator(config)
    task = await _start(aggregator)
    # The only honest client holds the key: it would be the committee.
    honest = make_client(0, pki, keys, digits, 2, federation=aggregator.federation)
    honest_task = asyncio.create_task(honest.run(f"127.0.0.1:{aggregator.port}"))
    silent = RogueClient(pki, 1)
    await silent.connect(aggregator.port)
    await silent.expect(RoundStart)  # ... and never uploads
    with pytest.raises(Exception, match="rounds in a row failed"):
        await asyncio.wait_for(task, 60)
    honest_task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await honest_task
    assert honest.result.shards_decrypted == 0
    assert not any(isinstance(m, DecryptRequest) for m in silent.received)
    assert aggregator.checkpoint.rounds_completed == 0
    assert aggregator.checkpoint.history[-1]["failure"].startswith("1 updates")
    failed = aggregator.metrics.registry.get_sample_value(
        "fedcore_rounds_failed_total", {"reason": "below_quorum"}
    )
    assert failed == 1
    await silent.close()


@pytest.mark.slow
async def test_client_killed_mid_upload_is_not_folded_and_rejoins(
    tmp_path: Path, pki: Path, keys: Keys, digits
) -> None:
    config = aggregator_config(
        tmp_path,
        pki,
        keys,
        min_clients=2,
        clients_per_round=3,
        rounds=2,
        round_timeout=10.0,
        local_epochs=1,
        resume_grace=0.0,
    )
    aggregator = Aggregator(config)
    task = await _start(aggregator)
    port = aggregator.port
    honest = [
        make_client(i, pki, keys, digits, 3, federation=aggregator.federation) for i in range(2)
    ]
    honest_tasks = [asyncio.create_task(c.run(f"127.0.0.1:{port}")) for c in honest]
    victim = RogueClient(pki, 2)
    await victim.connect(port)
    start = await victim.expect(RoundStart)
    # Chunks of a huge update: folded, they would wreck the model.
    payloads = victim.payloads(start, value=0.5)
    await victim.upload(start, payloads, last=len(payloads) // 2, done=False)
    await asyncio.sleep(0.5)
    victim.abort()  # killed: no Bye, no UpdateDone

    # Round 1 closes at its deadline with the two others; round 2 waits for 3 clients,
    # so start the returning client (same certificate) once round 1 is over.
    while aggregator.checkpoint.rounds_completed < 1:
        await asyncio.sleep(0.2)
    returning = make_client(2, pki, keys, digits, 3, federation=aggregator.federation)
    returning_task = asyncio.create_task(returning.run(f"127.0.0.1:{port}"))
    checkpoint = await asyncio.wait_for(task, 120)
    await asyncio.wait_for(asyncio.gather(*honest_tasks, returning_task), 30)
    first, second = checkpoint.history[-2], checkpoint.history[-1]
    assert sorted(first["contributors"]) == ["client-0", "client-1"]
    fed = aggregator.federation
    assert first["total_weight"] == sum(weight_of(i, digits, 3, fed) for i in range(2))
    assert sorted(second["contributors"]) == ["client-0", "client-1", "client-2"]
    assert returning.result.rounds_contributed == 1
    assert aggregator.metrics.registry.get_sample_value("fedcore_inflight_uploads") == 0
    # a killed client is counted as such, not as a client that broke the protocol
    rejected = "fedcore_updates_rejected_total"
    sample = aggregator.metrics.registry.get_sample_value
    assert sample(rejected, {"reason": "upload_interrupted"}) == 1
    assert not sample(rejected, {"reason": "protocol_error"})


@pytest.mark.slow
async def test_dropped_upload_resumes_where_it_stopped(
    tmp_path: Path, pki: Path, keys: Keys, digits
) -> None:
    config = aggregator_config(
        tmp_path,
        pki,
        keys,
        min_clients=2,
        clients_per_round=2,
        rounds=1,
        round_timeout=30.0,
        local_epochs=1,
        resume_grace=20.0,
    )
    aggregator = Aggregator(config)
    task = await _start(aggregator)
    honest = make_client(0, pki, keys, digits, 2, federation=aggregator.federation)
    honest_task = asyncio.create_task(honest.run(f"127.0.0.1:{aggregator.port}"))
    flaky = RogueClient(pki, 1)
    await flaky.connect(aggregator.port)
    start = await flaky.expect(RoundStart)
    payloads = flaky.payloads(start)
    sent = len(payloads) // 2
    first = await flaky.upload(start, payloads, last=sent, done=False)
    await asyncio.sleep(1.0)  # let the aggregator take the chunks in
    flaky.abort()

    # the same client reconnecting, with the update it had made and its grant's token
    again = RogueClient(pki, 1)
    await again.connect(aggregator.port)
    again.prepared = flaky.prepared
    resumed = await again.expect(RoundStart)
    assert resumed.round_id == start.round_id
    assert resumed.chunks_received == sent
    await again.send(UploadRequest(round_id=start.round_id, resume_token=first.resume_token))
    grant = await again.expect(UploadGrant)
    assert grant.start_seq == sent  # the kept chunks still hold their slot: no wait
    assert grant.resume_token == first.resume_token
    for seq in range(sent, len(payloads)):
        await again.send(UpdateChunk(round_id=start.round_id, seq=seq, payload=payloads[seq]))
    assert again.codec is not None
    await again.send(
        UpdateDone(
            round_id=start.round_id,
            chunk_count=len(payloads),
            item_count=sum(map(len, payloads)) // again.codec.public_key.ciphertext_bytes,
            digest=hashlib.sha256(b"".join(payloads)).digest(),
            token=again.token(start, payloads),
        )
    )
    await again.expect(Ack)
    checkpoint = await asyncio.wait_for(task, 60)
    await asyncio.wait_for(honest_task, 30)
    assert sorted(checkpoint.history[-1]["contributors"]) == ["client-0", "client-1"]
    await again.close()


@pytest.mark.slow
async def test_committee_shards_are_reassigned_when_members_fail(
    tmp_path: Path, pki: Path, keys: Keys, digits
) -> None:
    config = aggregator_config(
        tmp_path,
        pki,
        keys,
        min_clients=2,
        clients_per_round=2,
        rounds=1,
        local_epochs=1,
        committee_size=3,
        decrypt_shard_timeout=20.0,
    )
    aggregator = Aggregator(config)
    task = await _start(aggregator)
    port = aggregator.port
    # One honest key holder; the other honest client has no key.
    honest = [
        make_client(i, pki, keys, digits, 2, federation=aggregator.federation, holds_key=i == 0)
        for i in range(2)
    ]
    honest_tasks = [asyncio.create_task(c.run(f"127.0.0.1:{port}")) for c in honest]
    while aggregator.round is None:  # the round selects these two; client-0 unmasks
        await asyncio.sleep(0.05)
    # Two more key holders (valid credentials, proven keys) that misbehave: one vanishes,
    # one lies.
    dropper, liar = RogueClient(pki, 5), RogueClient(pki, 6)
    fed = aggregator.federation
    private_key = PrivateKey.load(keys.private)
    await dropper.connect(port, committee=dropper.credential(fed), key=private_key)
    await liar.connect(port, committee=liar.credential(fed), key=private_key)

    async def misbehave() -> None:
        request = await dropper.expect(DecryptRequest)
        assert request.item_count > 0
        dropper.abort()

    async def lie() -> None:
        request = await liar.expect(DecryptRequest)
        await liar.send(
            DecryptResult(
                round_id=request.round_id,
                shard_id=request.shard_id,
                item_count=request.item_count,
                payload=b"\x00" * 3,
                seconds=0.1,
                randomness=b"",
            )
        )

    rogue_tasks = [asyncio.create_task(misbehave()), asyncio.create_task(lie())]
    checkpoint = await asyncio.wait_for(task, 120)
    await asyncio.wait_for(asyncio.gather(*rogue_tasks, *honest_tasks), 30)
    assert checkpoint.rounds_completed == 1
    assert sorted(checkpoint.history[-1]["contributors"]) == ["client-0", "client-1"]
    # Every shard, including the failed ones, was decrypted by the honest key holder:
    # each of the 3 members had PIPELINE shards in flight.
    assert honest[0].result.shards_decrypted == 3 * PIPELINE
    assert _rejected(aggregator, "bad_decrypt_result") == 1
    assert checkpoint.excluded_decryptors == ["client-6"]
    # The liar was not disconnected (it could have been an unmasker) but never asked again.
    later = []
    while (message := await liar.receive(timeout=30)) is not None:
        later.append(type(message).__name__)
    # (the one request it had in flight beside the one it lied about was sent before)
    assert later.count("DecryptRequest") == PIPELINE - 1 and later[-1] == "Bye"


async def test_a_certificate_outside_allowed_clients_is_refused(
    tmp_path: Path, pki: Path, keys: Keys, digits
) -> None:
    config = aggregator_config(
        tmp_path,
        pki,
        keys,
        allowed_clients=["client-0", "client-1"],
        min_clients=2,
        clients_per_round=2,
    )
    aggregator = Aggregator(config)
    task = await _start(aggregator)
    stranger = RogueClient(pki, 5)  # a valid certificate of the CA, but not a member
    with pytest.raises(AssertionError, match="got Error"):
        await stranger.connect(aggregator.port)
    assert stranger.received[-1].code == ErrorCode.UNKNOWN_CLIENT
    client = make_client(6, pki, keys, digits, 8, federation=aggregator.federation)
    with pytest.raises(FedcoreError, match="refused this client"):
        await asyncio.wait_for(client.run(f"127.0.0.1:{aggregator.port}"), 30)
    assert _rejected(aggregator, "unknown_client") == 2
    assert not aggregator.clients
    aggregator.request_stop()
    await asyncio.wait_for(task, 30)


@pytest.mark.slow
async def test_a_sum_that_does_not_decode_fails_the_round_not_the_daemon(
    tmp_path: Path, pki: Path, keys: Keys, digits
) -> None:
    """A client masks for a key nobody holds: the unmasked sum is noise, the unmasker
    releases nothing, the round fails (counted, logged), and the rerun of the same model
    version, with another contributor set and the same unmasker, completes."""
    config = aggregator_config(
        tmp_path, pki, keys, min_clients=3, clients_per_round=3, rounds=1, local_epochs=1
    )
    aggregator = Aggregator(config)
    task = await _start(aggregator)
    port = aggregator.port
    fed = aggregator.federation
    # The unmasker refuses by closing its connection and comes back only after 2 s; by
    # then two fresh clients are waiting. The rerun must wait for the unmasker anyway:
    # the first round's contributors masked their update for it and for no other.
    honest = [
        make_client(i, pki, keys, digits, 4, federation=fed, backoff_base=2.0, backoff_max=2.0)
        for i in range(4)
    ]
    saboteur = RogueClient(pki, 5)
    await saboteur.connect(port)
    honest_tasks = [asyncio.create_task(c.run(f"127.0.0.1:{port}")) for c in honest[:2]]
    start = await saboteur.expect(RoundStart)  # round 1: client-0, client-1 and client-5
    honest_tasks += [asyncio.create_task(c.run(f"127.0.0.1:{port}")) for c in honest[2:]]
    stranger = public_key_bytes(X25519PrivateKey.generate())
    await saboteur.upload(start, saboteur.payloads(start, mask_for=(stranger,)))
    await saboteur.expect(Ack)
    await saboteur.close()
    checkpoint = await asyncio.wait_for(task, 120)
    await asyncio.wait_for(asyncio.gather(*honest_tasks), 30)
    failed = checkpoint.history[0]
    assert "the unmasked sum does not decode" in failed["failure"]
    assert "client-5" in failed["contributors"]
    label = {"reason": "decode_failed"}
    assert aggregator.metrics.registry.get_sample_value("fedcore_rounds_failed_total", label) == 1
    # the daemon ran on: the rerun completed, with the same unmasker, in one more round
    assert checkpoint.rounds_completed == 1 and len(checkpoint.history) == 2
    completed = checkpoint.history[-1]
    assert completed["unmaskers"] == failed["unmaskers"]
    assert completed["model"] == failed["model"]
    assert len(completed["contributors"]) == 3 and "client-5" not in completed["contributors"]


async def test_a_model_mismatch_names_both_layouts_and_the_flag(
    tmp_path: Path, pki: Path, keys: Keys, digits
) -> None:
    """A client whose model is not the aggregator's stops at once, saying how they differ."""
    aggregator = Aggregator(aggregator_config(tmp_path, pki, keys))
    task = await _start(aggregator)
    other = make_client(0, pki, keys, digits, 3, federation=aggregator.federation, hidden=(32,))
    try:
        with pytest.raises(FedcoreError) as info:
            await asyncio.wait_for(other.run(f"127.0.0.1:{aggregator.port}"), 60)
    finally:
        aggregator.request_stop()
        await asyncio.wait_for(task, 60)
    message = str(info.value)
    assert "tensor 0 is" in message and "[512, 64]" in message and "[32, 64]" in message
    assert "--model" in message and "\n" not in message
    assert other.result.reconnects == 0
