"""A key holder that lies about a decryption, or claims a key it lacks, changes nothing.

Issue #17's first attack, run as an attacker would: a second committee member with a
valid credential joins a real shared-key federation (mutual TLS on 127.0.0.1, a real
1024-bit Paillier key, real torch clients) and answers its shard with zeros, negated or
random plaintexts (with the true randomness, or with none), or claims membership without
the key. What the aggregator hands the unmasker must be, bit for bit, the private key's
decryption of the round's sum, and the global model must equal the same federation's
without the attacker (up to the clients' secure stochastic rounding, which differs
between any two runs by less than a quantization step per value). The liar is counted,
named and excluded for the federation's life.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedcore.aggregator import Aggregator
from fedcore.aggregator.committee import PIPELINE
from fedcore.crypto import PrivateKey, deserialize_ciphertexts, serialize_plaintexts
from protocol.errors import ErrorCode
from protocol.messages import DecryptRequest, DecryptResult, KeyProof

from .conftest import Keys, aggregator_config, make_client
from .rogue import RogueClient

LIES = ("zeros", "negated", "random", "no randomness", "no key")


def _rejected(aggregator: Aggregator, reason: str) -> float:
    value = aggregator.metrics.registry.get_sample_value(
        "fedcore_updates_rejected_total", {"reason": reason}
    )
    return 0.0 if value is None else value


def _lie(kind: str, key: PrivateKey, request: DecryptRequest) -> DecryptResult:
    """A wrong answer to ``request`` that keeps its shape (so only the check can tell)."""
    public = key.public_key
    ciphertexts = deserialize_ciphertexts(request.payload, public)
    true, randomness = key.open_vector(ciphertexts)
    n = int(public.n)
    rng = random.Random(kind)
    lied = {
        "zeros": [0] * len(true),
        "negated": [(n - m) % n for m in true],
        "random": [rng.randrange(n) for _ in true],
        "no randomness": true,
    }[kind]
    return DecryptResult(
        round_id=request.round_id,
        shard_id=request.shard_id,
        item_count=request.item_count,
        payload=serialize_plaintexts(lied, public),
        seconds=0.1,
        randomness=b"" if kind == "no randomness" else serialize_plaintexts(randomness, public),
    )


async def _federation(
    tmp_path: Path, pki: Path, keys: Keys, digits: Any, attack: str | None
) -> tuple[Aggregator, Any, list[str]]:
    """One round with two honest clients (client-0 holds the key); ``attack`` adds a liar."""
    config = aggregator_config(
        tmp_path / (attack or "honest"),
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
    committee = aggregator._committee
    assert committee is not None
    sums: list[bytes] = []
    used: dict[int, list[int]] = {}  # start -> the decrypted values sent to the unmasker
    decrypt, request = committee.decrypt, committee._request

    async def record_sum(state: Any, summed: bytes) -> list[int]:
        sums.append(summed)
        return await decrypt(state, summed)

    async def record_unmask(member: Any, unmask: Any, count: int) -> list[int] | None:
        used[unmask.start] = committee.codec.parse_plaintexts(unmask.payload, count)
        return await request(member, unmask, count)

    committee.decrypt = record_sum  # type: ignore[method-assign]
    committee._request = record_unmask  # type: ignore[method-assign]
    task = asyncio.create_task(aggregator.run())
    await asyncio.wait_for(aggregator.wait_started(), 30)
    port = aggregator.port
    honest = [
        make_client(i, pki, keys, digits, 2, federation=aggregator.federation, holds_key=i == 0)
        for i in range(2)
    ]
    honest_tasks = [asyncio.create_task(c.run(f"127.0.0.1:{port}")) for c in honest]
    seen: list[str] = []
    if attack is not None:
        while aggregator.round is None:  # joins once the round chose client-0 to unmask
            await asyncio.sleep(0.05)
        liar = RogueClient(pki, 6)
        key = PrivateKey.load(keys.private)
        await liar.connect(
            port,
            committee=liar.credential(aggregator.federation),
            key=None if attack == "no key" else key,
        )

        async def serve() -> None:
            while (message := await liar.receive(timeout=60)) is not None:
                seen.append(type(message).__name__)
                if isinstance(message, DecryptRequest):
                    await liar.send(_lie(attack, key, message))

        honest_tasks.append(asyncio.create_task(serve()))
    checkpoint = await asyncio.wait_for(task, 120)
    await asyncio.wait_for(asyncio.gather(*honest_tasks), 30)
    # what the unmasker got is the true decryption of the sum, however the shards went
    key = PrivateKey.load(keys.private)
    (summed,) = sums
    truth = key.decrypt_vector(deserialize_ciphertexts(summed, key.public_key))
    assert [v for start in sorted(used) for v in used[start]] == truth
    return aggregator, checkpoint, seen


@pytest.mark.slow
@pytest.mark.parametrize("attack", LIES)
async def test_a_lying_or_keyless_committee_member_leaves_the_model_as_the_honest_run(
    tmp_path: Path, pki: Path, keys: Keys, digits: Any, attack: str
) -> None:
    _, honest, _ = await _federation(tmp_path, pki, keys, digits, None)
    aggregator, attacked, seen = await _federation(tmp_path, pki, keys, digits, attack)
    assert attacked.rounds_completed == honest.rounds_completed == 1
    fed = aggregator.federation
    step = 2 * fed.clip / (2**fed.value_bits - 1)
    gap = np.abs(attacked.global_weights - honest.global_weights).max()
    assert gap <= 2 * step, f"models differ by {gap}, more than rounding ({2 * step})"
    if attack == "no key":
        # never proved its key: never asked to decrypt, never counted as a liar
        assert "DecryptRequest" not in seen
        assert _rejected(aggregator, "bad_decrypt_result") == 0
        assert attacked.excluded_decryptors == []
    else:
        # given its PIPELINE shards at once, caught on its first answer and excluded for
        # good (its other answer is never looked at); its shards were redone by client-0
        assert seen.count("DecryptRequest") == PIPELINE
        assert _rejected(aggregator, "bad_decrypt_result") == 1
        assert attacked.excluded_decryptors == ["client-6"]


@pytest.mark.slow
async def test_a_forged_key_proof_gets_the_client_refused_and_counted(
    tmp_path: Path, pki: Path, keys: Keys, digits: Any
) -> None:
    config = aggregator_config(tmp_path, pki, keys, min_clients=2, rounds=1)
    aggregator = Aggregator(config)
    task = asyncio.create_task(aggregator.run())
    await asyncio.wait_for(aggregator.wait_started(), 30)
    rogue = RogueClient(pki, 7)
    welcome = await rogue.connect(
        aggregator.port, committee=rogue.credential(aggregator.federation)
    )
    assert len(welcome.key_challenge) == 32
    # without the factors of n, a guess is all it has
    width = PrivateKey.load(keys.private).public_key.plaintext_bytes
    await rogue.send(KeyProof(root=(12345).to_bytes(width, "big")))
    code = await rogue.error_code(timeout=30)
    aggregator.request_stop()
    await asyncio.wait_for(task, 60)
    assert code == ErrorCode.BAD_KEY_PROOF
    assert _rejected(aggregator, "bad_key_proof") == 1
    assert "client-7" not in aggregator.clients
