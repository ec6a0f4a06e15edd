"""End to end over real TLS on 127.0.0.1 with real Paillier keys and real torch models."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedcore.aggregator import Aggregator

from .conftest import Keys, accuracy_of, aggregator_config, make_client, run_federation


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
        clients = [make_client(i, pki, keys, digits, 4) for i in range(4)]
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
    assert abs(accuracy[True] - accuracy[False]) <= 0.01, accuracy
