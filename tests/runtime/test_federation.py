"""End to end over real TLS on 127.0.0.1 with real Paillier keys and real torch models."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from fedcore.aggregator import Aggregator
from fedcore.crypto import PrivateKey
from protocol.messages import RoundStart, UploadGrant, UploadRequest

from .conftest import Keys, accuracy_of, aggregator_config, make_client, run_federation
from .rogue import RogueClient


@pytest.mark.slow
async def test_encrypted_fedavg_matches_plaintext_on_digits(
    tmp_path: Path, pki: Path, keys: Keys, digits
) -> None:
    accuracy = {}
    for encrypted in (True, False):
        config = aggregator_config(
            tmp_path / str(encrypted), pki, keys, rounds=8, local_epochs=4, learning_rate=0.1
        )
        aggregator = Aggregator(config, encrypted=encrypted)
        clients = [
            make_client(i, pki, keys, digits, 4, federation=aggregator.federation) for i in range(4)
        ]
        checkpoint, results = await run_federation(aggregator, clients)
        assert checkpoint.rounds_completed == 8
        for result in results:
            assert not isinstance(result, BaseException), result
            assert result.rounds_contributed == 8
        for record in checkpoint.history:
            assert sorted(record["contributors"]) == [f"client-{i}" for i in range(4)]
        if encrypted:
            assert sum(r.shards_decrypted for r in results) >= 8  # the committee decrypted
        accuracy[encrypted] = accuracy_of(checkpoint.global_weights, digits)
    print(f"digits accuracy: encrypted {accuracy[True]:.4f}, plaintext {accuracy[False]:.4f}")
    assert accuracy[True] >= 0.95, accuracy
    assert abs(accuracy[True] - accuracy[False]) <= 0.003, accuracy  # within 0.3 pp


@pytest.mark.slow
async def test_metrics_endpoint_reports_the_federation(
    tmp_path: Path, pki: Path, keys: Keys, digits
) -> None:
    import urllib.request

    scraped: list[str] = []
    health: list[int] = []

    def scrape(report, weights) -> None:
        port = aggregator.metrics_port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            scraped.append(r.read().decode())
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as r:
            health.append(r.status)

    config = aggregator_config(
        tmp_path, pki, keys, rounds=2, local_epochs=1, metrics_port=0, fold_workers=2
    )
    aggregator = Aggregator(config, on_round_complete=scrape)
    clients = [
        make_client(i, pki, keys, digits, 4, federation=aggregator.federation) for i in range(4)
    ]
    await run_federation(aggregator, clients)
    assert health == [200, 200]
    text = scraped[-1]

    def value(line_start: str) -> float:
        for line in text.splitlines():
            if line.startswith(line_start + " "):
                return float(line.split()[-1])
        raise AssertionError(f"{line_start} not exported")

    assert value("fedcore_training_iterations_total") == 2 * 4  # 1 epoch x 4 clients x 2
    assert value("fedcore_encryption_time_seconds_count") == 8
    assert value("fedcore_decryption_time_seconds_count") >= 2
    assert value("fedcore_unmask_time_seconds_count") >= 2  # one unmasking a round at least
    assert value("fedcore_updates_accepted_total") == 8
    assert value("fedcore_rounds_completed_total") == 2
    assert value("fedcore_bytes_received_total") > 8 * aggregator.codec.item_count * 128
    assert value("fedcore_connected_clients") == 4
    assert 'fedcore_round_phase_seconds_count{phase="decrypt"}' in text


@pytest.mark.slow
async def test_inflight_uploads_are_capped(tmp_path: Path, pki: Path, keys: Keys) -> None:
    """Beyond the cap a client is not granted a slot, so it streams nothing, until one frees."""
    config = aggregator_config(
        tmp_path,
        pki,
        keys,
        clients_per_round=3,
        rounds=1,
        max_inflight_uploads=2,
        round_timeout=30.0,
        receive_buffer=8192,
    )
    aggregator = Aggregator(config)
    task = asyncio.create_task(aggregator.run())
    await aggregator.wait_started()
    rogues = [RogueClient(pki, i) for i in range(3)]
    key = PrivateKey.load(keys.private)
    for rogue in rogues:  # the first one is a committee member: rounds need an unmasker
        first = rogue is rogues[0]
        credential = rogue.credential(aggregator.federation) if first else b""
        await rogue.connect(aggregator.port, committee=credential, key=key if first else None)
    assert aggregator._server is not None
    receive_buffers = {
        conn._writer.get_extra_info("socket").getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        for conn in aggregator._server.connections
    }
    assert receive_buffers == {2 * 8192}  # the config reached every client socket (Linux x2)
    starts = [await rogue.expect(RoundStart) for rogue in rogues]
    payloads = rogues[0].payloads(starts[0])
    for rogue, start in zip(rogues[:2], starts, strict=False):
        await rogue.upload(start, payloads, last=1, done=False)  # granted; first chunk only
    await rogues[2].send(UploadRequest(round_id=starts[2].round_id))
    with pytest.raises(TimeoutError):  # no grant while both slots are taken
        await asyncio.wait_for(rogues[2].receive(), 1.0)
    assert sorted(aggregator.uploads.uploads) == ["client-0", "client-1"]
    assert aggregator.metrics.registry.get_sample_value("fedcore_inflight_uploads") == 2
    rogues[0].abort()  # a slot frees (its partial upload has chunks, so after resume_grace)
    grant = await rogues[2].expect(UploadGrant, timeout=config.resume_grace + 30)
    assert grant.start_seq == 0
    assert sorted(aggregator.uploads.uploads) == ["client-1", "client-2"]
    aggregator.request_stop()
    await asyncio.wait_for(task, 30)
    for rogue in rogues[1:]:
        await rogue.close()
