"""The encrypted and plaintext update codecs and how both sides build them (fedcore.codec)."""

from __future__ import annotations

import itertools
import json
import math
import secrets
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedcore.codec import EncryptedCodec, PlaintextCodec, codec_for
from fedcore.contracts import FederationParams, SessionInfo
from fedcore.crypto import (
    PrivateKey,
    PublicKey,
    deserialize_ciphertexts,
    fold_update,
    serialize_ciphertexts,
)
from fedcore.crypto.masking import MaskSum, SecureUniform, add_masks, mask_values, remove_masks
from fedcore.errors import InvalidCiphertextError, PackingError
from fedcore.packing import ContributionSum

VECTORS = Path(__file__).resolve().parent / "vectors"
_KEY = json.loads((VECTORS / "paillier_512.json").read_text())["key"]
PRIVATE_KEY = PrivateKey(PublicKey(int(_KEY["n"])), int(_KEY["p"]), int(_KEY["q"]))
PUBLIC_KEY = PRIVATE_KEY.public_key
SESSION = SessionInfo(num_values=40, chunk_items=2, model_layout="[]", rounds=1)


def _federation(mode: str, **changes: Any) -> FederationParams:
    values: dict[str, Any] = {
        "mode": mode,
        "public_key": PUBLIC_KEY if mode == "shared" else None,
        "clip": 0.5,
        "min_clients": 3,
    }
    values.update(changes)
    return FederationParams(**values)


def test_codec_for_builds_the_encrypted_codec() -> None:
    federation = _federation("shared", value_bits=12, headroom_bits=9, max_weight=32)
    codec = codec_for(federation, SESSION)
    assert isinstance(codec, EncryptedCodec)
    assert codec.encrypted
    assert codec.public_key == PUBLIC_KEY
    assert codec.spec == federation.packing_spec()
    assert codec.n_values == 40 and codec.chunk_items == 2
    assert codec.report_bounds == (1.0, 10.0)
    assert codec.min_total_weight == federation.min_clients
    # 40 values + W + E + 2 metrics = 44 slots of 21 bits, 24 per 512-bit plaintext
    assert codec.slot_count == 44
    assert codec.item_count == 2
    assert codec.chunk_count == 1


def test_codec_for_builds_the_plaintext_codec() -> None:
    federation = _federation("plaintext", clip=0.25, report_metrics=(("accuracy", 1.0),))
    codec = codec_for(federation, SESSION)
    assert isinstance(codec, PlaintextCodec)
    assert not codec.encrypted
    assert codec.n_values == 40 and codec.chunk_items == 2
    assert codec.report_bounds == (1.0,)
    assert codec.clip == 0.25
    assert codec.max_weight == federation.max_contributors * federation.max_weight
    assert codec.item_count == 40 + 2 + 1
    assert codec.chunk_count == math.ceil(43 / 2)


_CLIENTS = [  # (samples, report): weights 1, 3 and 64 under samples_per_weight 100
    (50, (0.9, 0.4)),
    (250, None),
    (10**6, (0.5, 30.0)),  # loss clipped to its bound 10
]


def _updates(n_values: int) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.normal(0, 0.4, n_values).astype(np.float32) for _ in _CLIENTS]


def _plaintext_sum(federation: FederationParams) -> ContributionSum:
    codec = codec_for(federation, SESSION)
    assert isinstance(codec, PlaintextCodec)
    running = np.zeros(codec.item_count)
    for (samples, report), update in zip(_CLIENTS, _updates(codec.n_values), strict=True):
        encoded = codec.encode(
            update, weight=federation.weight_for(samples), report=report, rng=None
        )
        chunks = []
        for index, payload in enumerate(codec.chunk_payloads(encoded)):
            values, count = codec.parse_chunk(payload, index * codec.chunk_items)
            assert count == len(values)
            chunks.append(values)
        assert len(chunks) == codec.chunk_count
        codec.fold(running, codec.join(chunks))
    return codec.decode(running)


def _encrypted_sum(federation: FederationParams, *, masked: bool) -> ContributionSum:
    codec = codec_for(federation, SESSION)
    assert isinstance(codec, EncryptedCodec)
    n = PUBLIC_KEY.n
    running: list[Any] | None = None
    mask_keys = []
    for (samples, report), update in zip(_CLIENTS, _updates(codec.n_values), strict=True):
        encoded = codec.encode(
            update, weight=federation.weight_for(samples), report=report, rng=SecureUniform()
        )
        assert len(encoded) == codec.item_count
        if masked:
            key = secrets.token_bytes(32)
            mask_keys.append(key)
            encoded = add_masks(encoded, mask_values(key, n, 0, len(encoded)), n)
        payloads = list(codec.chunk_payloads(PUBLIC_KEY.encrypt_vector(encoded)))
        assert len(payloads) == codec.chunk_count
        joined = codec.join(
            [codec.parse_chunk(p, i * codec.chunk_items)[0] for i, p in enumerate(payloads)]
        )
        update_ciphertexts = deserialize_ciphertexts(joined, PUBLIC_KEY)
        if running is None:
            running = update_ciphertexts
        else:
            fold_update(running, update_ciphertexts, PUBLIC_KEY)
    assert running is not None
    summed = serialize_ciphertexts(running, PUBLIC_KEY)
    plaintext_bytes, randomness, count = codec.decrypt_payload(summed, PRIVATE_KEY)
    plaintexts = codec.parse_plaintexts(plaintext_bytes, count)
    # the answer re-encrypts to the sum, and one changed plaintext no longer does
    assert codec.check_decryption(summed, plaintexts, randomness) == ""
    wrong = [plaintexts[0] ^ 1, *plaintexts[1:]]
    assert "do not re-encrypt" in codec.check_decryption(summed, wrong, randomness)
    if masked:
        with pytest.raises(PackingError):  # still masked: noise, refused
            codec.decode(plaintexts)
        masks = MaskSum(n, 0, count)
        masks.add_all(mask_keys)
        plaintexts = remove_masks(plaintexts, masks.result(), n)
    return codec.decode(plaintexts)


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
def test_plaintext_and_encrypted_codecs_agree(masked: bool) -> None:
    encrypted = _encrypted_sum(_federation("shared"), masked=masked)
    plaintext = _plaintext_sum(_federation("plaintext"))
    spec = _federation("shared").packing_spec()
    assert encrypted.total_weight == plaintext.total_weight == 1 + 3 + 64
    assert encrypted.evaluated_weight == plaintext.evaluated_weight == 1 + 64
    assert encrypted.mean_update.shape == plaintext.mean_update.shape == (40,)
    # quantization moves each value by less than one step; float32 adds ~1e-7
    assert np.max(np.abs(encrypted.mean_update - plaintext.mean_update)) <= spec.step + 1e-6
    assert encrypted.report_means is not None and plaintext.report_means is not None
    expected_report = ((0.9 * 1 + 0.5 * 64) / 65, (0.4 * 1 + 10.0 * 64) / 65)
    for bound, got_encrypted, got_plain, expected in zip(
        (1.0, 10.0), encrypted.report_means, plaintext.report_means, expected_report, strict=True
    ):
        assert got_plain == pytest.approx(expected, rel=1e-6)
        assert abs(got_encrypted - expected) <= bound / spec.levels + 1e-9


def test_plaintext_mean_is_the_clipped_weighted_mean() -> None:
    result = _plaintext_sum(_federation("plaintext"))
    weights = (1, 3, 64)
    clipped = [np.clip(u.astype(np.float64), -0.5, 0.5) for u in _updates(40)]
    expected = sum(w * c for w, c in zip(weights, clipped, strict=True)) / sum(weights)
    assert np.allclose(result.mean_update, expected, atol=1e-6)


def test_encrypted_shards_cover_the_sum() -> None:
    codec = EncryptedCodec(
        public_key=PUBLIC_KEY,
        spec=_federation("shared").packing_spec(),
        n_values=200,
        chunk_items=3,
    )
    assert codec.item_count == math.ceil(202 / 19)
    ciphertexts = PUBLIC_KEY.encrypt_vector(list(range(codec.item_count)))
    summed = serialize_ciphertexts(ciphertexts, PUBLIC_KEY)
    for shards in range(1, codec.item_count + 3):
        ranges = codec.shard_ranges(shards)
        assert len(ranges) <= shards
        assert ranges[0][0] == 0
        assert all(count >= 1 for _, count in ranges)
        assert all(a + n == b for (a, n), (b, _) in itertools.pairwise(ranges))
        assert sum(count for _, count in ranges) == codec.item_count
        pieces = [codec.shard_payload(summed, start, count) for start, count in ranges]
        assert b"".join(pieces) == summed
        start, count = ranges[-1]
        assert deserialize_ciphertexts(pieces[-1], PUBLIC_KEY) == ciphertexts[start:]
        assert len(pieces[-1]) == count * PUBLIC_KEY.ciphertext_bytes


def test_encrypted_parse_chunk_refuses_out_of_range_ciphertexts() -> None:
    codec = codec_for(_federation("shared"), SESSION)
    assert isinstance(codec, EncryptedCodec)
    good = PUBLIC_KEY.encrypt_vector([1, 2])
    for bad in (0, int(PUBLIC_KEY.nsquare)):
        payload = serialize_ciphertexts([good[0], bad], PUBLIC_KEY)
        with pytest.raises(InvalidCiphertextError) as info:
            codec.parse_chunk(payload, 10)
        assert info.value.index == 11
    with pytest.raises(InvalidCiphertextError):
        codec.parse_chunk(serialize_ciphertexts(good, PUBLIC_KEY)[:-1], 0)


def test_encrypted_parse_plaintexts_checks_the_count() -> None:
    codec = codec_for(_federation("shared"), SESSION)
    assert isinstance(codec, EncryptedCodec)
    width = PUBLIC_KEY.plaintext_bytes
    payload = (5).to_bytes(width, "big") * 2
    assert codec.parse_plaintexts(payload, 2) == [5, 5]
    with pytest.raises(InvalidCiphertextError, match="holds 2 values, expected 3"):
        codec.parse_plaintexts(payload, 3)
    with pytest.raises(ValueError):
        codec.parse_plaintexts(int(PUBLIC_KEY.n).to_bytes(width, "big"), 1)  # not below n


def test_encrypted_decode_refuses_a_sum_below_the_quorum() -> None:
    """One client's contribution alone (W = 1 < min_clients) is never decoded."""
    codec = codec_for(_federation("shared"), SESSION)
    encoded = codec.encode(
        np.zeros(40, np.float32), weight=1, report=None, rng=np.random.default_rng(0)
    )
    with pytest.raises(PackingError, match="total weight 1"):
        codec.decode(encoded)


def test_plaintext_parse_chunk_refuses_bad_payloads() -> None:
    codec = codec_for(_federation("plaintext"), SESSION)
    with pytest.raises(InvalidCiphertextError, match="float32"):
        codec.parse_chunk(b"\x00" * 7, 4)
    payload = np.array([1.0, np.nan], dtype=np.float32).tobytes()
    with pytest.raises(InvalidCiphertextError, match="not finite") as info:
        codec.parse_chunk(payload, 4)
    assert info.value.index == 5


@pytest.mark.parametrize("weight", [0.0, -3.0, 16 * 64 + 1.0])
def test_plaintext_decode_refuses_impossible_weights(weight: float) -> None:
    codec = codec_for(_federation("plaintext"), SESSION)
    running = np.zeros(codec.item_count)
    running[codec.n_values] = weight
    with pytest.raises(PackingError, match="total weight"):
        codec.decode(running)
