"""Upload slots: a grant expires when its upload does not keep the minimum pace, and a
partial upload resumes only for the connection that shows its resume token.

The pace arithmetic is checked with plain values; the rest runs a real aggregator, real
torch clients and hand-written protocol clients (rogue.py) over mutual TLS on 127.0.0.1
with a 1024-bit Paillier key.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedcore.aggregator import Aggregator, Relay, RelayConfig
from fedcore.aggregator.config import AggregatorConfig
from fedcore.aggregator.rounds import (
    DEFAULT_UPLOAD_MIN_RATE,
    DEFAULT_UPLOAD_START_TIMEOUT,
    RejectedUpdate,
    RoundState,
    Upload,
    UploadPace,
)
from fedcore.contracts import RejectReason
from fedcore.errors import ConfigError
from fedcore.model import mlp
from fedcore.packing import CONTRIBUTION_TAIL_SLOTS, PackingSpec
from protocol.errors import ErrorCode
from protocol.messages import Ack, RoundStart, UpdateChunk, UpdateDone, UploadGrant, UploadRequest

from .conftest import Keys, aggregator_config, make_client
from .rogue import RogueClient

# ---------------------------------------------------------------------- the arithmetic


def test_the_deadline_moves_with_each_chunk_and_caps_at_the_whole_update() -> None:
    pace = UploadPace(min_rate=1000.0, start_timeout=5.0)

    def deadline(received: int) -> float:
        return pace.deadline(
            granted_at=100.0, received=received, chunk_bytes=2000, update_bytes=5000
        )

    # nothing yet: the first chunk is due after the start grace plus its own bytes
    assert deadline(0) == 100.0 + 5.0 + 2.0
    # each chunk in moves the deadline by its bytes at the minimum rate
    assert deadline(2000) == 100.0 + 5.0 + 4.0
    # the last, shorter chunk is due with the whole update; UpdateDone by then too
    assert deadline(4000) == deadline(5000) == 100.0 + 5.0 + 5.0
    assert pace.longest_hold(5000) == 10.0


def test_a_fast_client_banks_time_but_no_grant_outlasts_the_whole_update() -> None:
    """The pace is an average since the grant: a resume (same upload) keeps the clock."""
    pace = UploadPace(min_rate=100.0, start_timeout=1.0)
    upload = Upload(client_id="c", round_id=1, expected_items=10, chunk_items=2, granted_at=50.0)
    deadlines = []
    for seq in range(5):
        upload.add_chunk(seq, b"x" * 200, [seq], 2)  # 2 items of 100 bytes
        deadlines.append(
            pace.deadline(
                granted_at=upload.granted_at,
                received=upload.bytes_received,
                chunk_bytes=200,
                update_bytes=1000,
            )
        )
    assert deadlines == [55.0, 57.0, 59.0, 61.0, 61.0]
    assert max(deadlines) == upload.granted_at + pace.longest_hold(1000)


def test_the_defaults_take_the_seed_mlp_update_on_a_slow_link_within_a_round() -> None:
    """64 KiB/s = a 512 kbit/s link: the 535,818-parameter MLP at 2048 bits (6,870
    ciphertexts of 512 bytes, 3.5 MB) takes 54 s, well inside the default 300 s round;
    a grant that sends nothing is lost after 12 s (10 s + one 128 KiB chunk)."""
    n_values = sum(p.numel() for p in mlp().parameters())
    assert n_values == 535_818
    spec = PackingSpec(key_bits=2048, value_bits=16, headroom_bits=10, clip=0.5)
    items = spec.ciphertexts_for(n_values + CONTRIBUTION_TAIL_SLOTS + 2)  # accuracy, loss
    update_bytes = items * 512
    assert items == 6870 and update_bytes == 3_517_440
    pace = UploadPace()
    assert (pace.min_rate, pace.start_timeout) == (
        DEFAULT_UPLOAD_MIN_RATE,
        DEFAULT_UPLOAD_START_TIMEOUT,
    )
    assert 60 < pace.longest_hold(update_bytes) < 70
    squatter = pace.deadline(
        granted_at=0.0, received=0, chunk_bytes=256 * 512, update_bytes=update_bytes
    )
    assert squatter == 12.0
    default_round = AggregatorConfig(
        public_key=Path("k"), cert=Path("c"), key=Path("k"), ca=Path("ca"), state_dir=Path(".")
    ).round_timeout
    assert pace.longest_hold(update_bytes) < default_round / 4


@pytest.mark.parametrize(
    ("field", "value", "error", "match"),
    [
        ("min_rate", 0.0, ValueError, "min_rate"),
        ("min_rate", float("inf"), ValueError, "min_rate"),
        ("start_timeout", -1.0, ValueError, "start_timeout"),
        ("start_timeout", float("nan"), ValueError, "start_timeout"),
        ("min_rate", "fast", TypeError, "min_rate"),
        ("start_timeout", True, TypeError, "start_timeout"),
    ],
)
def test_a_pace_refuses_values_that_disable_it(
    field: str, value: Any, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        UploadPace(**{field: value})


def test_the_settings_are_validated_and_reach_the_pace(tmp_path: Path) -> None:
    base: dict[str, Any] = {
        "public_key": tmp_path / "k.json",
        "cert": tmp_path / "c.pem",
        "key": tmp_path / "c.key",
        "ca": tmp_path / "ca.pem",
        "state_dir": tmp_path,
    }
    config = AggregatorConfig.from_mapping(
        {**base, "upload_min_rate": 8192, "upload_start_timeout": 2.5}
    )
    assert config.upload_pace == UploadPace(min_rate=8192, start_timeout=2.5)
    for name in ("upload_min_rate", "upload_start_timeout"):
        with pytest.raises(ConfigError, match=name):
            AggregatorConfig.from_mapping({**base, name: 0})
    relay = {"upstream": "127.0.0.1:1", "cert": "c.pem", "key": "c.key", "ca": "ca.pem"}
    assert RelayConfig.from_mapping({**relay, "upload_min_rate": 1e6}).upload_pace.min_rate == 1e6
    with pytest.raises(ConfigError, match="upload_start_timeout"):
        RelayConfig.from_mapping({**relay, "upload_start_timeout": -1})


def test_a_stalled_client_is_refused_for_the_round_and_no_longer_waited_for() -> None:
    state = RoundState(round_id=3, selected=frozenset({"a", "b"}), deadline=0.0)
    state.mark_stalled("a")
    assert state.pending == {"b"}
    with pytest.raises(RejectedUpdate) as refused:
        state.check_can_upload("a")
    assert refused.value.reason is RejectReason.UPLOAD_STALLED
    state.check_can_upload("b")
    assert state.summary()["stalled"] == ["a"]


# ---------------------------------------------------------------------- end to end


def _rejected(aggregator: Aggregator, reason: str) -> float:
    value = aggregator.metrics.registry.get_sample_value(
        "fedcore_updates_rejected_total", {"reason": reason}
    )
    return 0.0 if value is None else value


async def _until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    """Poll ``condition`` until it holds (TimeoutError after ``timeout`` seconds)."""

    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.05)

    await asyncio.wait_for(poll(), timeout)


HONEST = 3
SQUATTERS = 4  # = max_inflight_uploads: every slot


async def _squatted_round(
    tmp_path: Path, pki: Path, keys: Keys, digits: Any, squatters: int
) -> tuple[Aggregator, Any, list[int | None], list[float]]:
    """One round of HONEST clients, with ``squatters`` more that take a grant and send
    nothing; the honest clients ask for a slot only once every squatter holds one."""
    config = aggregator_config(
        tmp_path / f"squatters-{squatters}",
        pki,
        keys,
        min_clients=HONEST,
        clients_per_round=HONEST + squatters,
        headroom_bits=9,  # the same packing with and without the squatters
        rounds=1,
        local_epochs=1,
        round_timeout=60.0,
        max_inflight_uploads=SQUATTERS,
        upload_start_timeout=4.0,
    )
    aggregator = Aggregator(config)
    task = asyncio.create_task(aggregator.run())
    await asyncio.wait_for(aggregator.wait_started(), 30)
    port = aggregator.port
    squatting = threading.Event()
    if not squatters:
        squatting.set()

    def after_the_squatters(train_fn: Any) -> Any:
        def train(model: Any, train_config: Any) -> int:
            squatting.wait(60)
            return int(train_fn(model, train_config))

        return train

    honest = [
        make_client(
            i,
            pki,
            keys,
            digits,
            HONEST,
            federation=aggregator.federation,
            train_wrapper=after_the_squatters,
        )
        for i in range(HONEST)
    ]
    honest_tasks = [asyncio.create_task(c.run(f"127.0.0.1:{port}")) for c in honest]
    rogues = [RogueClient(pki, HONEST + i) for i in range(squatters)]
    for rogue in rogues:
        await rogue.connect(port)

    async def squat(rogue: RogueClient) -> int | None:
        start = await rogue.expect(RoundStart)
        await rogue.send(UploadRequest(round_id=start.round_id))
        await rogue.expect(UploadGrant)
        return await rogue.error_code(timeout=60)

    squats = [asyncio.create_task(squat(rogue)) for rogue in rogues]
    await _until(lambda: len(aggregator.uploads.uploads) >= squatters)
    assert sorted(aggregator.uploads.uploads) == [f"client-{HONEST + i}" for i in range(squatters)]
    squatting.set()
    checkpoint = await asyncio.wait_for(task, 120)
    results = await asyncio.wait_for(asyncio.gather(*honest_tasks), 30)
    codes = list(await asyncio.wait_for(asyncio.gather(*squats), 30))
    for rogue in rogues:
        await rogue.close()
    assert all(r.rounds_contributed == 1 for r in results)
    waits = [aggregator.hub.reports[f"client-{i}"].timings["grant_wait_s"] for i in range(HONEST)]
    return aggregator, checkpoint, codes, waits


@pytest.mark.slow
async def test_squatters_lose_their_slots_and_the_round_completes_with_the_honest_model(
    tmp_path: Path, pki: Path, keys: Keys, digits: Any
) -> None:
    """max_inflight_uploads identities take every grant at RoundStart and send nothing:
    each grant expires, the squatter is refused (upload_stalled) and counted, the honest
    clients get the slots, and the model is the one the honest clients make alone."""
    _, alone, _, _ = await _squatted_round(tmp_path, pki, keys, digits, 0)
    aggregator, attacked, codes, waits = await _squatted_round(
        tmp_path, pki, keys, digits, SQUATTERS
    )
    record = attacked.history[-1]
    assert attacked.rounds_completed == alone.rounds_completed == 1
    assert record["contributors"] == [f"client-{i}" for i in range(HONEST)]
    assert record["stalled"] == [f"client-{HONEST + i}" for i in range(SQUATTERS)]
    assert codes == [ErrorCode.UPLOAD_STALLED] * SQUATTERS
    assert _rejected(aggregator, "upload_stalled") == SQUATTERS
    assert aggregator.metrics.registry.get_sample_value("fedcore_inflight_uploads") == 0
    # the honest clients did wait behind the squatters (their grants came once those expired)
    assert min(waits) > 0.5, waits
    print(f"honest clients waited {min(waits):.2f}..{max(waits):.2f} s for a slot")
    # same data, same seeds: the models differ only by the clients' stochastic rounding
    step = aggregator.codec.spec.step  # type: ignore[union-attr]
    gap = float(np.max(np.abs(attacked.global_weights - alone.global_weights)))
    assert gap <= 2 * step, f"models differ by {gap}, more than rounding ({2 * step})"


@pytest.mark.slow
async def test_another_connection_with_the_certificate_cannot_take_over_a_partial_upload(
    tmp_path: Path, pki: Path, keys: Keys, digits: Any
) -> None:
    """client-3 is half way through its upload when a second connection with its
    certificate asks to upload without the resume token: the partial chunks are dropped,
    it is granted chunk 0 (so it cannot complete the half upload with its own chunks),
    and the first connection's token no longer resumes anything either."""
    config = aggregator_config(
        tmp_path,
        pki,
        keys,
        clients_per_round=4,
        rounds=1,
        local_epochs=1,
        round_timeout=60.0,
        resume_grace=30.0,
        chunk_ciphertexts=8,
    )
    aggregator = Aggregator(config)
    task = asyncio.create_task(aggregator.run())
    await asyncio.wait_for(aggregator.wait_started(), 30)
    port = aggregator.port
    honest = [
        make_client(i, pki, keys, digits, 3, federation=aggregator.federation) for i in range(3)
    ]
    honest_tasks = [asyncio.create_task(c.run(f"127.0.0.1:{port}")) for c in honest]
    victim = RogueClient(pki, 3)
    await victim.connect(port)
    start = await victim.expect(RoundStart)
    payloads = victim.payloads(start, value=0.01)
    sent = len(payloads) // 2
    first = await victim.upload(start, payloads, last=sent, done=False)
    assert first.start_seq == 0 and len(first.resume_token) == 16
    await _until(lambda: aggregator.uploads.held_chunks("client-3", start.round_id) == sent)

    impostor = RogueClient(pki, 3)
    await impostor.connect(port)  # the victim's connection is closed: "replaced"
    resumed = await impostor.expect(RoundStart)
    assert resumed.chunks_received == sent
    own = impostor.payloads(resumed, value=-0.01)
    await impostor.send(UploadRequest(round_id=start.round_id))  # no token
    grant = await impostor.expect(UploadGrant)
    assert grant.start_seq == 0
    assert grant.resume_token and grant.resume_token != first.resume_token
    assert aggregator.uploads.held_chunks("client-3", start.round_id) == 0
    # Completing the victim's half with chunks of its own is a sequence violation.
    await impostor.send(UpdateChunk(round_id=start.round_id, seq=sent, payload=own[sent]))
    assert await impostor.error_code() == ErrorCode.BAD_SEQUENCE

    # The victim comes back with its token: the upload it belonged to is gone, so it
    # starts over too, and its whole update is what gets folded.
    again = RogueClient(pki, 3)
    await again.connect(port)
    again.prepared = victim.prepared
    fresh = await again.expect(RoundStart)
    assert fresh.chunks_received == 0
    await again.send(UploadRequest(round_id=start.round_id, resume_token=first.resume_token))
    grant = await again.expect(UploadGrant)
    assert grant.start_seq == 0
    await _send_rest(again, fresh, payloads, grant)
    await again.expect(Ack)
    checkpoint = await asyncio.wait_for(task, 120)
    await asyncio.wait_for(asyncio.gather(*honest_tasks), 30)
    assert checkpoint.history[-1]["contributors"] == [f"client-{i}" for i in range(4)]
    for rogue in (victim, impostor, again):
        await rogue.close()


@pytest.mark.slow
async def test_a_relay_holds_its_clients_uploads_to_the_same_pace(
    tmp_path: Path, pki: Path, keys: Keys, digits: Any
) -> None:
    """A squatter behind a relay takes the relay's only slot and sends nothing: the relay
    refuses it (upload_stalled), its honest clients get the slot, and the root counts them."""
    config = aggregator_config(
        tmp_path, pki, keys, clients_per_round=None, rounds=1, local_epochs=1
    )
    aggregator = Aggregator(config)
    root = asyncio.create_task(aggregator.run())
    await asyncio.wait_for(aggregator.wait_started(), 30)
    relay = Relay(
        RelayConfig.from_mapping(
            {
                "upstream": f"127.0.0.1:{aggregator.port}",
                "server_hostname": "localhost",
                "cert": pki / "relay-0.pem",
                "key": pki / "relay-0.key",
                "ca": pki / "ca.pem",
                "port": 0,
                "metrics_port": None,
                "name": "edge",
                "max_inflight_uploads": 1,
                "upload_start_timeout": 1.0,
            }
        )
    )
    relay_task = asyncio.create_task(relay.run())
    await asyncio.wait_for(relay.wait_started(), 30)
    assert relay.hub is not None
    assert relay.hub.uploads.pace == UploadPace(min_rate=DEFAULT_UPLOAD_MIN_RATE, start_timeout=1.0)
    squatting = threading.Event()

    def after_the_squatter(train_fn: Any) -> Any:
        def train(model: Any, train_config: Any) -> int:
            squatting.wait(60)
            return int(train_fn(model, train_config))

        return train

    fed = aggregator.federation
    clients = [
        make_client(
            i,
            pki,
            keys,
            digits,
            4,
            federation=fed,
            holds_key=i < 2,  # key holders connect to the root, the others to the relay
            train_wrapper=after_the_squatter,
        )
        for i in range(4)
    ]
    tasks = [asyncio.create_task(c.run(f"127.0.0.1:{relay.port}")) for c in clients[2:]]
    squatter = RogueClient(pki, 4)
    await squatter.connect(relay.port)
    hub = relay.hub
    await _until(lambda: hub.leaf_count == 3)  # the relay asks all three in the round
    tasks += [asyncio.create_task(c.run(f"127.0.0.1:{aggregator.port}")) for c in clients[:2]]
    start = await squatter.expect(RoundStart)
    await squatter.send(UploadRequest(round_id=start.round_id))
    await squatter.expect(UploadGrant)  # the relay's only slot
    squatting.set()
    assert await squatter.error_code() == ErrorCode.UPLOAD_STALLED
    checkpoint = await asyncio.wait_for(root, 120)
    await asyncio.wait_for(asyncio.gather(*tasks), 30)
    relay.request_stop()
    await asyncio.wait_for(relay_task, 30)
    await squatter.close()
    record = checkpoint.history[-1]
    assert record["contributors"] == [f"client-{i}" for i in range(4)]
    assert record["relays"] == {"relay-0/edge": 2}
    stalled = relay.metrics.registry.get_sample_value(
        "fedcore_updates_rejected_total", {"reason": "upload_stalled"}
    )
    assert stalled == 1


async def _send_rest(
    rogue: RogueClient, start: RoundStart, payloads: list[bytes], grant: UploadGrant
) -> None:
    """Chunks from the grant's ``start_seq`` on, then the UpdateDone for all of them."""
    assert rogue.codec is not None
    for seq in range(grant.start_seq, len(payloads)):
        await rogue.send(UpdateChunk(round_id=start.round_id, seq=seq, payload=payloads[seq]))
    await rogue.send(
        UpdateDone(
            round_id=start.round_id,
            chunk_count=len(payloads),
            item_count=sum(len(p) for p in payloads) // rogue.codec.public_key.ciphertext_bytes,
            digest=hashlib.sha256(b"".join(payloads)).digest(),
            token=rogue.token(start, payloads),
        )
    )


@pytest.mark.slow
async def test_a_client_cut_mid_upload_resumes_with_its_token(
    tmp_path: Path, pki: Path, keys: Keys, digits: Any
) -> None:
    """The network drops a real client's connection after its 3rd chunk: it reconnects,
    shows its grant's token and is granted from chunk 2 (what the aggregator held)."""
    config = aggregator_config(
        tmp_path,
        pki,
        keys,
        clients_per_round=3,
        rounds=1,
        local_epochs=1,
        resume_grace=30.0,
        chunk_ciphertexts=8,
    )
    aggregator = Aggregator(config)
    task = asyncio.create_task(aggregator.run())
    await asyncio.wait_for(aggregator.wait_started(), 30)
    clients = [
        make_client(i, pki, keys, digits, 3, federation=aggregator.federation) for i in range(3)
    ]
    flaky = clients[2]
    grants: list[UploadGrant] = []
    requests: list[bytes] = []
    upload = flaky._upload

    async def cut_once(conn: Any, send_lock: Any, round_id: int, *args: Any) -> None:
        grant = args[-1]
        grant.add_done_callback(lambda f: grants.append(f.result()))
        send, chunks = conn.send, []

        async def watched(message: Any) -> None:
            if isinstance(message, UploadRequest):
                requests.append(message.resume_token)
            if isinstance(message, UpdateChunk) and len(grants) == 1:
                chunks.append(message.seq)
                if len(chunks) == 3:
                    conn._abort()  # no Bye, no close_notify: a network cut
                    raise ConnectionResetError("cut")
            await send(message)

        conn.send = watched
        await upload(conn, send_lock, round_id, *args)

    flaky._upload = cut_once  # type: ignore[method-assign,assignment]
    tasks = [asyncio.create_task(c.run(f"127.0.0.1:{aggregator.port}")) for c in clients]
    checkpoint = await asyncio.wait_for(task, 120)
    await asyncio.wait_for(asyncio.gather(*tasks), 30)
    assert [g.start_seq for g in grants] == [0, 2]
    assert requests == [b"", grants[0].resume_token]
    assert grants[1].resume_token == grants[0].resume_token  # the same upload, resumed
    assert checkpoint.history[-1]["contributors"] == ["client-0", "client-1", "client-2"]
    assert flaky.result.reconnects == 1
