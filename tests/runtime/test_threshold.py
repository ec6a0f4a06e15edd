"""A 3-of-5 threshold federation end to end: real TLS, a dealt key, real torch models.

Five clients hold one key share each (from `fedcore keygen --threshold 3 --parties 5`);
nobody holds p and q. Members that die mid-decryption are replaced, a member that lies
about its partial decryptions is caught by its proof, named and excluded, and the round
still produces the right model.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedcore.aggregator import Aggregator
from fedcore.client import Client
from fedcore.contracts import decryption_context
from fedcore.crypto import KeyShare, deserialize_ciphertexts, serialize_ciphertexts
from fedcore.errors import FedcoreError
from protocol.messages import PartialDecryptRequest, PartialDecryptResult

from .conftest import (
    Keys,
    ThresholdKeys,
    accuracy_of,
    aggregator_config,
    make_client,
    run_federation,
)

HIDDEN = (32,)  # a small model: 2,410 parameters, about 90 ciphertexts at 1024 bits
MEMBERS = 5


def _rejected(aggregator: Aggregator, reason: str) -> float:
    value = aggregator.metrics.registry.get_sample_value(
        "fedcore_updates_rejected_total", {"reason": reason}
    )
    return 0.0 if value is None else value


def _federation(
    tmp_path: Path, pki: Path, keys: Keys, *, rounds: int, **changes: Any
) -> Aggregator:
    config = aggregator_config(
        tmp_path,
        pki,
        keys,
        rounds=rounds,
        clients_per_round=MEMBERS,
        model_kwargs={"in_features": 64, "hidden": list(HIDDEN)},
        local_epochs=2,
        learning_rate=0.1,
        committee_size=MEMBERS,
        decrypt_shard_timeout=10.0,
        # 16-bit values: the two modes' models then differ by less than 1e-3 (8-bit
        # rounding alone moves a weight by up to 1/255 of the clip range a round)
        value_bits=16,
        **changes,
    )
    return Aggregator(config)


def _threshold_clients(
    aggregator: Aggregator, pki: Path, tkeys: ThresholdKeys, digits: Any
) -> list[Client]:
    return [
        make_client(
            i,
            pki,
            _threshold_keys_as_keys(tkeys),
            digits,
            MEMBERS,
            federation=aggregator.federation,
            holds_key=False,
            key_share=tkeys.shares[i],
            hidden=HIDDEN,
        )
        for i in range(MEMBERS)
    ]


def _threshold_keys_as_keys(tkeys: ThresholdKeys) -> Keys:
    return Keys(public=tkeys.public, private=Path("unused"))


@pytest.mark.slow
async def test_a_3_of_5_federation_trains_like_shared_mode(
    tmp_path: Path, pki: Path, keys: Keys, threshold_keys: ThresholdKeys, digits: Any
) -> None:
    rounds = 4
    # shared mode: every committee client holds p and q
    shared = _federation(tmp_path / "shared", pki, keys, rounds=rounds)
    shared_clients = [
        make_client(i, pki, keys, digits, MEMBERS, federation=shared.federation, hidden=HIDDEN)
        for i in range(MEMBERS)
    ]
    shared_checkpoint, _ = await run_federation(shared, shared_clients)
    # threshold mode: the same federation, each member holds one share
    tkeys = _threshold_keys_as_keys(threshold_keys)
    aggregator = _federation(tmp_path / "threshold", pki, tkeys, rounds=rounds)
    assert aggregator.federation.mode == "threshold"
    clients = _threshold_clients(aggregator, pki, threshold_keys, digits)
    checkpoint, results = await run_federation(aggregator, clients)

    assert checkpoint.rounds_completed == rounds
    for result in results:
        assert not isinstance(result, BaseException), result
        assert result.rounds_contributed == rounds
    # every shard was partially decrypted by 3 members, spread over all 5
    decrypted = [r.shards_decrypted for r in results]
    assert all(count > 0 for count in decrypted), decrypted
    assert sum(decrypted) % 3 == 0 and sum(decrypted) >= 3 * rounds, decrypted
    # same data, same seeds: the models differ only by the clients' random rounding
    shared_weights = shared_checkpoint.global_weights
    gap = float(np.max(np.abs(checkpoint.global_weights - shared_weights)))
    assert gap < 1e-3, gap
    accuracy = accuracy_of(checkpoint.global_weights, digits, hidden=HIDDEN)
    shared_accuracy = accuracy_of(shared_weights, digits, hidden=HIDDEN)
    print(f"digits accuracy: threshold {accuracy:.4f}, shared {shared_accuracy:.4f}")
    assert accuracy >= 0.85
    assert abs(accuracy - shared_accuracy) <= 0.01


async def _run_with(
    tmp_path: Path,
    pki: Path,
    threshold_keys: ThresholdKeys,
    digits: Any,
    patch: dict[int, Any],
    **changes: Any,
) -> tuple[Aggregator, Any, list[Client]]:
    """One one-round threshold federation; client i serves the committee with ``patch[i]``.

    ``patch[i](aggregator, client, kill)`` returns a replacement for the member's
    ``partial_decrypt``; ``kill()`` drops the client's connection without a goodbye
    and stops it for good, as a killed process would.
    """
    tkeys = _threshold_keys_as_keys(threshold_keys)
    aggregator = _federation(tmp_path, pki, tkeys, rounds=1, **changes)
    clients = _threshold_clients(aggregator, pki, threshold_keys, digits)
    task = asyncio.create_task(aggregator.run())
    await asyncio.wait_for(aggregator.wait_started(), 30)
    runs: dict[int, asyncio.Task[Any]] = {}
    for index, make in patch.items():
        member = clients[index].committee
        assert member is not None
        member.partial_decrypt = make(  # type: ignore[method-assign]
            aggregator, clients[index], lambda i=index: runs[i].cancel()
        )
    for index, client in enumerate(clients):
        runs[index] = asyncio.create_task(client.run(f"127.0.0.1:{aggregator.port}"))
    try:
        checkpoint = await asyncio.wait_for(task, 180)
    finally:
        await asyncio.wait_for(asyncio.gather(*runs.values(), return_exceptions=True), 30)
    return aggregator, checkpoint, clients


def _name(client: Client) -> str:
    return client.config.cert.stem


def _dies(died: list[str], most: int) -> Any:
    """Members that die on their first partial-decryption request, ``most`` of them at most.

    The round's unmasker is spared: without it nothing can be unmasked, whatever the key.
    """

    def make(aggregator: Aggregator, client: Client, kill: Any) -> Any:
        member = client.committee
        assert member is not None
        honest = member.partial_decrypt

        async def partial_decrypt(request: PartialDecryptRequest, codec: Any) -> Any:
            assert aggregator.round is not None
            unmasker = _name(client) in aggregator.round.unmaskers
            if not unmasker and (_name(client) in died or len(died) < most):
                if _name(client) not in died:
                    died.append(_name(client))
                kill()
                await asyncio.sleep(3600)  # cancelled with the client
            return await honest(request, codec)

        return partial_decrypt

    return make


@pytest.mark.slow
async def test_the_round_completes_when_n_minus_t_members_die_mid_decryption(
    tmp_path: Path, pki: Path, threshold_keys: ThresholdKeys, digits: Any
) -> None:
    died: list[str] = []
    _aggregator, checkpoint, clients = await _run_with(
        tmp_path, pki, threshold_keys, digits, dict.fromkeys(range(MEMBERS), _dies(died, 2))
    )
    assert len(died) == 2, died  # N - T = 2 members died holding shard requests
    assert checkpoint.rounds_completed == 1
    survivors = [c for c in clients if _name(c) not in died]
    assert sum(c.result.shards_decrypted for c in survivors) >= 3
    accuracy = accuracy_of(checkpoint.global_weights, digits, hidden=HIDDEN)
    assert accuracy > 0.5, accuracy  # one round of two epochs: trained, not garbage


@pytest.mark.slow
async def test_fewer_than_t_members_fail_the_round_and_decrypt_nothing(
    tmp_path: Path,
    pki: Path,
    threshold_keys: ThresholdKeys,
    digits: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="fedcore.aggregator.service")
    died: list[str] = []
    with pytest.raises(FedcoreError, match="rounds in a row failed"):
        await _run_with(
            tmp_path,
            pki,
            threshold_keys,
            digits,
            dict.fromkeys(range(MEMBERS), _dies(died, 3)),
            max_failed_rounds=1,
            wait_for_clients_timeout=5.0,
        )
    assert len(died) == 3, died
    failed = [r.getMessage() for r in caplog.records if "round 1 failed" in r.getMessage()]
    assert len(failed) == 1, failed
    assert "needs 3" in failed[0] and "nothing was decrypted" in failed[0], failed


def _lies(liars: list[str], lies: list[int], *, unmasker: bool) -> Any:
    """One member lies: the first asked that is (or is not) the round's unmasker.

    Its partials use a wrong share (s_i + 1) and carry a proof made for that share: it
    passes every check a member makes and answers in time; only the proof against its
    published verification key can tell.
    """

    def make(aggregator: Aggregator, client: Client, kill: Any) -> Any:
        member = client.committee
        assert member is not None
        honest = member.partial_decrypt
        share = member.private_key
        assert isinstance(share, KeyShare)
        wrong = KeyShare.__new__(KeyShare)
        wrong.public_key, wrong.index = share.public_key, share.index
        wrong.secret, wrong._exponent, wrong._lock = share.secret + 1, None, threading.Lock()

        async def partial_decrypt(request: PartialDecryptRequest, codec: Any) -> Any:
            answer: PartialDecryptResult = await honest(request, codec)
            assert aggregator.round is not None
            is_unmasker = _name(client) in aggregator.round.unmaskers
            if not liars and is_unmasker == unmasker:
                liars.append(_name(client))
            if _name(client) not in liars:
                return answer
            context = decryption_context(
                aggregator.federation.digest(),
                request.round_id,
                request.start,
                request.item_count,
                request.contributors,
            )
            ciphertexts = deserialize_ciphertexts(request.payload, codec.public_key)
            lie = wrong.partial_decrypt(ciphertexts, context=context)
            lies.append(request.shard_id)
            payload = serialize_ciphertexts(lie.values, codec.public_key)
            assert payload != answer.payload
            return dataclasses.replace(answer, payload=payload, proof=lie.proof.to_bytes())

        return partial_decrypt

    return make


@pytest.mark.slow
@pytest.mark.parametrize("unmasker", [False, True], ids=["a-member", "the-unmasker"])
async def test_a_lying_member_is_caught_named_excluded_and_the_model_is_right(
    tmp_path: Path,
    pki: Path,
    threshold_keys: ThresholdKeys,
    digits: Any,
    caplog: pytest.LogCaptureFixture,
    unmasker: bool,
) -> None:
    # reference: the same one-round federation with five honest members
    _, honest, _ = await _run_with(tmp_path / "honest", pki, threshold_keys, digits, {})
    caplog.set_level(logging.WARNING, logger="fedcore.aggregator.committee")
    liars: list[str] = []
    lies: list[int] = []
    aggregator, checkpoint, _clients = await _run_with(
        tmp_path / "lying",
        pki,
        threshold_keys,
        digits,
        dict.fromkeys(range(MEMBERS), _lies(liars, lies, unmasker=unmasker)),
    )
    assert len(liars) == 1, liars
    assert checkpoint.rounds_completed == 1  # even when the liar must unmask the round
    # its first lie is caught; requests already on their way then (at most one per shard
    # it was asked for: each member is in 3 of the 5 windows) may bring more lies, which
    # are caught too or, once it is excluded, never looked at; it is asked nothing more
    assert 1 <= len(lies) <= 3 and len(set(lies)) == len(lies), lies
    caught = _rejected(aggregator, "bad_decrypt_result")
    assert 1 <= caught <= len(lies), (caught, lies)
    named = [r.getMessage() for r in caplog.records if "excluded" in r.getMessage()]
    assert len(named) == caught, named
    share = int(liars[0].removeprefix("client-")) + 1
    for line in named:
        assert f"{liars[0]} (key share {share})" in line and "proof does not verify" in line
    # the lie changed nothing: only verified partials were combined
    gap = float(np.max(np.abs(checkpoint.global_weights - honest.global_weights)))
    assert gap < 1e-3, gap
    assert accuracy_of(checkpoint.global_weights, digits, hidden=HIDDEN) > 0.5


def test_partial_decryption_answers_fit_the_aggregator_frame(
    tmp_path: Path, pki: Path, threshold_keys: ThresholdKeys
) -> None:
    """A partial is as wide as a ciphertext: shards are cut so each answer fits a frame."""
    from fedcore.aggregator.committee import CommitteeDecryption
    from fedcore.codec import EncryptedCodec, codec_for
    from fedcore.contracts import SessionInfo
    from fedcore.metrics import AggregatorMetrics
    from protocol.framing import DEFAULT_MAX_FRAME_SIZE

    tkeys = _threshold_keys_as_keys(threshold_keys)
    config = aggregator_config(tmp_path, pki, tkeys)
    federation = config.federation(config.load_public_key())
    session = SessionInfo(num_values=10_000_000, chunk_items=64, model_layout="[]", rounds=1)
    codec = codec_for(federation, session)
    assert isinstance(codec, EncryptedCodec)
    committee = CommitteeDecryption(
        config=config, federation=federation, codec=codec, metrics=AggregatorMetrics(), clients={}
    )
    shards = committee._shards(5)
    width = codec.public_key.ciphertext_bytes
    assert sum(count for _, count in shards) == codec.item_count
    assert max(count for _, count in shards) * width <= DEFAULT_MAX_FRAME_SIZE // 2
    assert len(shards) > 5  # the size, not the member count, decided the cut here
