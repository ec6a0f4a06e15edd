"""A threshold committee member: partial decryptions under the same rules as a key holder.

Real pieces: a dealt 512-bit 3-of-5 key, a federation PKI, updates sealed by the client
pipeline and tokens signed as clients sign them. The aggregator's part (verify, combine)
is played with the library functions it uses.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from fedcore.client.committee import CommitteeMember, CommitteeRefusal
from fedcore.client.pipeline import PreparedUpdate
from fedcore.codec import EncryptedCodec, codec_for
from fedcore.contracts import FederationParams, SessionInfo, decryption_context
from fedcore.credentials import CertificateAuthority, Signer, pack_tokens
from fedcore.crypto import (
    PartialDecryption,
    combine,
    deal,
    deserialize_ciphertexts,
    deserialize_plaintexts,
    fold_update,
    serialize_ciphertexts,
    serialize_plaintexts,
    verify,
)
from fedcore.crypto.threshold_proof import EqualityProof
from fedcore.errors import PackingError
from protocol.messages import DecryptRequest, PartialDecryptRequest, UnmaskRequest
from tests.runtime.malicious import correlation, raw_estimate

from .test_committee import _seal

KEY, SHARES = deal(512, 3, 5)
FEDERATION = FederationParams(mode="threshold", public_key=None, threshold_key=KEY)
SESSION = SessionInfo(num_values=200, chunk_items=4, model_layout="[]", rounds=10)
# Noise has |correlation| with the truth of about 1/sqrt(N) (0.07 at N = 200): 5 of those
# never fail by chance (p < 1e-6), and a leaked update correlates at about 1.
LEAK_BOUND = 5 / math.sqrt(SESSION.num_values)


@pytest.fixture(scope="module")
def codec() -> EncryptedCodec:
    built = codec_for(FEDERATION, SESSION)
    assert isinstance(built, EncryptedCodec)
    return built


@pytest.fixture
def members(signers: list[Signer], ca: CertificateAuthority) -> list[CommitteeMember]:
    """client-0..2 hold shares 1..3 (client-0 unmasks); client-3..5 contribute."""
    return [CommitteeMember(SHARES[i], signers[i], ca, FEDERATION) for i in range(3)]


@pytest.fixture
def sealed(
    signers: list[Signer], codec: EncryptedCodec, members: list[CommitteeMember]
) -> list[tuple[PreparedUpdate, bytes, np.ndarray]]:
    """Uploads of client-3..5 masked for client-0, with their tokens and true updates."""
    rng = np.random.default_rng(5)
    out = []
    for i in (3, 4, 5):
        update = rng.normal(0, 0.2, SESSION.num_values).astype(np.float32)
        prepared, token = _seal(
            signers[i],
            codec,
            round_id=5,
            unmaskers=(members[0].mask_public,),
            update=update,
            samples=100,
            report=None,
            federation=FEDERATION,
        )
        out.append((prepared, token, update))
    return out


def _ciphertexts(prepared: PreparedUpdate) -> list[Any]:
    return deserialize_ciphertexts(b"".join(prepared.payloads), KEY.public_key)


def _fold(uploads: list[PreparedUpdate]) -> list[Any]:
    running = _ciphertexts(uploads[0])
    for upload in uploads[1:]:
        fold_update(running, _ciphertexts(upload), KEY.public_key)
    return running


def _request(ciphertexts: list[Any], contributors: bytes, **changes: Any) -> PartialDecryptRequest:
    values: dict[str, Any] = {
        "round_id": 5,
        "shard_id": 0,
        "start": 0,
        "item_count": len(ciphertexts),
        "payload": serialize_ciphertexts(ciphertexts, KEY.public_key),
        "contributors": contributors,
    }
    values.update(changes)
    return PartialDecryptRequest(**values)


def _unmask_request(masked: list[int], contributors: bytes) -> UnmaskRequest:
    return UnmaskRequest(
        round_id=5,
        shard_id=0,
        start=0,
        item_count=len(masked),
        contributors=contributors,
        payload=serialize_plaintexts(masked, KEY.public_key),
    )


async def _combined(
    members: list[CommitteeMember],
    codec: EncryptedCodec,
    ciphertexts: list[Any],
    contributors: bytes,
) -> list[int]:
    """What the aggregator gets from T members: each partial verified, then combined."""
    context = decryption_context(FEDERATION.digest(), 5, 0, len(ciphertexts), contributors)
    partials = []
    for member in members:
        answer = await member.partial_decrypt(_request(ciphertexts, contributors), codec)
        partial = PartialDecryption(
            answer.share_index,
            tuple(deserialize_ciphertexts(answer.payload, KEY.public_key)),
            EqualityProof.from_bytes(answer.proof),
        )
        assert verify(KEY, ciphertexts, partial, context=context)
        partials.append(partial)
    return combine(KEY, partials)


async def test_three_members_decrypt_and_the_unmasker_releases_the_mean(
    members: list[CommitteeMember],
    codec: EncryptedCodec,
    sealed: list[tuple[PreparedUpdate, bytes, np.ndarray]],
) -> None:
    contributors = pack_tokens([token for _, token, _ in sealed])
    masked = await _combined(members, codec, _fold([p for p, _, _ in sealed]), contributors)
    with pytest.raises(PackingError):
        codec.decode(masked)  # combined but still masked: noise to the aggregator
    answer = await members[0].unmask(_unmask_request(masked, contributors), codec)
    result = codec.decode(deserialize_plaintexts(answer.payload, KEY.public_key))
    clipped = [np.clip(u.astype(np.float64), -FEDERATION.clip, FEDERATION.clip) for *_, u in sealed]
    expected = sum(clipped) / 3
    assert result.total_weight == 3
    assert np.max(np.abs(result.mean_update - expected)) <= codec.spec.step + 1e-6


async def test_one_upload_dressed_up_as_the_sum_stays_noise(
    members: list[CommitteeMember],
    codec: EncryptedCodec,
    sealed: list[tuple[PreparedUpdate, bytes, np.ndarray]],
) -> None:
    """The attack of a deviating aggregator on a threshold committee, measured.

    It names a valid quorum but sends the victim's upload alone. Three members
    partially decrypt it (the set is valid, each range is new to them), so the
    aggregator combines a plaintext: the victim's values plus its mask. The unmasker
    refuses it (it does not decode), and what the aggregator holds is noise.
    """
    contributors = pack_tokens([token for _, token, _ in sealed])
    victim, _, truth = sealed[1]
    alone = await _combined(members, codec, _ciphertexts(victim), contributors)
    with pytest.raises(CommitteeRefusal, match="does not decode"):
        await members[0].unmask(_unmask_request(alone, contributors), codec)
    leak = abs(correlation(raw_estimate(alone, codec.spec, SESSION.num_values), truth))
    print(f"threshold: one upload decrypted alone, |correlation| with the victim {leak:.4f}")
    assert leak < LEAK_BOUND


async def test_partial_decryption_follows_the_contributor_rules(
    members: list[CommitteeMember],
    codec: EncryptedCodec,
    sealed: list[tuple[PreparedUpdate, bytes, np.ndarray]],
) -> None:
    member = members[1]
    summed = _fold([p for p, _, _ in sealed])
    two = pack_tokens([token for _, token, _ in sealed[:2]])
    with pytest.raises(CommitteeRefusal, match="2 contributors named; the quorum is 3"):
        await member.partial_decrypt(_request(summed, two), codec)
    contributors = pack_tokens([token for _, token, _ in sealed])
    await member.partial_decrypt(_request(summed, contributors), codec)
    with pytest.raises(CommitteeRefusal, match="already decrypted"):
        await member.partial_decrypt(_request(summed, contributors), codec)


async def test_a_member_answers_only_for_its_kind_of_key(
    members: list[CommitteeMember],
    codec: EncryptedCodec,
    sealed: list[tuple[PreparedUpdate, bytes, np.ndarray]],
) -> None:
    contributors = pack_tokens([token for _, token, _ in sealed])
    summed = _fold([p for p, _, _ in sealed])
    request = DecryptRequest(
        round_id=5,
        shard_id=0,
        start=0,
        item_count=len(summed),
        payload=serialize_ciphertexts(summed, KEY.public_key),
        contributors=contributors,
    )
    with pytest.raises(CommitteeRefusal, match="only partially decrypts"):
        await members[0].decrypt(request, codec)
    assert members[0].credential.share_index == 1
    assert members[2].credential.share_index == 3


def test_the_mask_key_differs_per_share_and_survives_a_restart(
    signers: list[Signer], ca: CertificateAuthority
) -> None:
    first = CommitteeMember(SHARES[0], signers[0], ca, FEDERATION)
    again = CommitteeMember(SHARES[0], signers[0], ca, FEDERATION)
    other = CommitteeMember(SHARES[1], signers[0], ca, FEDERATION)
    assert first.mask_public == again.mask_public != other.mask_public
