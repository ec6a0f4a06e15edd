"""A key holder's committee role: checked decryption and unmasking (fedcore.client.committee).

Real pieces throughout: a Paillier keypair, a federation PKI, tokens signed with the
clients' certificate keys as `Client._do_round` signs them, and updates sealed (weighted,
masked, encrypted) by `fedcore.client.pipeline.seal`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedcore.client.committee import CommitteeMember, CommitteeRefusal, derive_member_mask_key
from fedcore.client.pipeline import PreparedUpdate, TrainedUpdate, seal
from fedcore.codec import EncryptedCodec, codec_for
from fedcore.contracts import FederationParams, SessionInfo
from fedcore.credentials import (
    CertificateAuthority,
    ContributorToken,
    Signer,
    pack_tokens,
    unpack_tokens,
)
from fedcore.crypto import (
    PrivateKey,
    PublicKey,
    deserialize_ciphertexts,
    deserialize_plaintexts,
    fold_update,
    generate_keypair,
    serialize_ciphertexts,
    serialize_plaintexts,
)
from fedcore.crypto.masking import public_key_bytes
from fedcore.errors import PackingError
from protocol.errors import ErrorCode
from protocol.messages import DecryptRequest, UnmaskRequest
from protocol.tls import FederationPKI

VECTORS = Path(__file__).resolve().parent.parent / "vectors"
_KEY = json.loads((VECTORS / "paillier_512.json").read_text())["key"]
PRIVATE_KEY = PrivateKey(PublicKey(int(_KEY["n"])), int(_KEY["p"]), int(_KEY["q"]))
FEDERATION = FederationParams(mode="shared", public_key=PRIVATE_KEY.public_key, min_clients=3)
SESSION = SessionInfo(num_values=50, chunk_items=2, model_layout="[]", rounds=10)
MODEL_A = bytes(range(32))
MODEL_B = bytes(range(1, 33))


@pytest.fixture(scope="module")
def codec() -> EncryptedCodec:
    built = codec_for(FEDERATION, SESSION)
    assert isinstance(built, EncryptedCodec)
    assert built.item_count == 3  # 50 values + W + E + 2 metrics = 54 slots, 19 per plaintext
    return built


@pytest.fixture
def member(signers: list[Signer], ca: CertificateAuthority) -> CommitteeMember:
    """A fresh member (no rounds served yet) for each test."""
    return CommitteeMember(PRIVATE_KEY, signers[0], ca, FEDERATION)


def _token(signer: Signer, **changes: Any) -> bytes:
    """A signed token for an upload that was never made (for the refusal rules)."""
    values: dict[str, Any] = {
        "federation": FEDERATION.digest(),
        "round_id": 5,
        "model_digest": MODEL_A,
        "client_public": public_key_bytes(X25519PrivateKey.generate()),
        "unmaskers": (bytes(32),),
        "item_count": 3,
        "upload_digest": secrets.token_bytes(32),
        "certificate": signer.certificate_der,
    }
    values.update(changes)
    return ContributorToken(**values).signed_by(signer).to_wire()


def _seal(
    signer: Signer,
    codec: EncryptedCodec,
    *,
    round_id: int,
    unmaskers: tuple[bytes, ...],
    update: np.ndarray,
    samples: int,
    report: tuple[float, ...] | None,
    federation: FederationParams = FEDERATION,
    model: bytes = MODEL_A,
) -> tuple[PreparedUpdate, bytes]:
    """An update sealed by the client pipeline, and its token as `Client._do_round` signs it."""
    trained = TrainedUpdate(
        model_digest=model, update=update, samples=samples, report=report, timings={}, iterations=1
    )
    prepared = seal(trained, codec, federation, unmaskers, None)
    token = (
        ContributorToken(
            federation=federation.digest(),
            round_id=round_id,
            model_digest=model,
            client_public=prepared.client_public,
            unmaskers=unmaskers,
            item_count=prepared.item_count,
            upload_digest=prepared.digest,
            certificate=signer.certificate_der,
        )
        .signed_by(signer)
        .to_wire()
    )
    return prepared, token


def _fold(prepared: list[PreparedUpdate]) -> bytes:
    """What the aggregator decrypts: the product of the uploads' ciphertexts."""
    public_key = PRIVATE_KEY.public_key
    running: list[Any] | None = None
    for update in prepared:
        ciphertexts = deserialize_ciphertexts(b"".join(update.payloads), public_key)
        if running is None:
            running = ciphertexts
        else:
            fold_update(running, ciphertexts, public_key)
    assert running is not None
    return serialize_ciphertexts(running, public_key)


def _decrypt_request(
    codec: EncryptedCodec,
    contributors: bytes,
    *,
    round_id: int = 5,
    start: int = 0,
    count: int | None = None,
    payload: bytes | None = None,
) -> DecryptRequest:
    count = codec.item_count - start if count is None else count
    if payload is None:
        payload = PRIVATE_KEY.public_key.encrypt_vector([1] * count)
        payload = serialize_ciphertexts(payload, PRIVATE_KEY.public_key)
    return DecryptRequest(
        round_id=round_id,
        shard_id=0,
        start=start,
        item_count=count,
        payload=payload,
        contributors=contributors,
    )


def _unmask_request(
    codec: EncryptedCodec,
    contributors: bytes,
    *,
    round_id: int = 5,
    start: int = 0,
    count: int | None = None,
    values: list[int] | None = None,
) -> UnmaskRequest:
    """An UnmaskRequest carrying decrypted sums (zeros unless ``values`` are given)."""
    count = codec.item_count - start if count is None else count
    values = [0] * count if values is None else values
    return UnmaskRequest(
        round_id=round_id,
        shard_id=0,
        start=start,
        item_count=count,
        contributors=contributors,
        payload=serialize_plaintexts(values, PRIVATE_KEY.public_key),
    )


def _plaintexts(payload: bytes) -> list[int]:
    return deserialize_plaintexts(payload, PRIVATE_KEY.public_key)


@pytest.fixture(scope="module")
def uploads(signers: list[Signer], codec: EncryptedCodec) -> dict[tuple[bytes, int], Any]:
    """Sealed uploads of client-1..4 for MODEL_A and MODEL_B, masked for client-0's key."""
    mask_public = public_key_bytes(
        derive_member_mask_key(PRIVATE_KEY, signers[0], FEDERATION.digest())
    )
    rng = np.random.default_rng(11)
    return {
        (model, i): _seal(
            signers[i],
            codec,
            round_id=5,
            unmaskers=(mask_public,),
            update=rng.normal(0, 0.2, 50).astype(np.float32),
            samples=100 * i,
            report=None,
            model=model,
        )[0]
        for model in (MODEL_A, MODEL_B)
        for i in (1, 2, 3, 4)
    }


def _named(
    uploads: dict[tuple[bytes, int], Any],
    signers: list[Signer],
    clients: tuple[int, ...],
    *,
    round_id: int = 5,
    model: bytes = MODEL_A,
) -> bytes:
    """The packed tokens of these clients' uploads, signed for ``round_id``."""
    tokens = []
    for i in clients:
        prepared: PreparedUpdate = uploads[(model, i)]
        token = ContributorToken(
            federation=FEDERATION.digest(),
            round_id=round_id,
            model_digest=model,
            client_public=prepared.client_public,
            unmaskers=prepared.unmaskers,
            item_count=prepared.item_count,
            upload_digest=prepared.digest,
            certificate=signers[i].certificate_der,
        )
        tokens.append(token.signed_by(signers[i]).to_wire())
    return pack_tokens(tokens)


def _decrypted_sum(
    uploads: dict[tuple[bytes, int], Any], clients: tuple[int, ...], model: bytes = MODEL_A
) -> list[int]:
    """The committee's decryption of the product of these uploads (still masked)."""
    summed = _fold([uploads[(model, i)] for i in clients])
    return PRIVATE_KEY.decrypt_vector(deserialize_ciphertexts(summed, PRIVATE_KEY.public_key))


# --- the honest path --------------------------------------------------------------------


_UPDATES = [  # (samples, report): weights 1, 3 and 10 under samples_per_weight 100
    (80, (0.75, 2.0)),
    (300, None),
    (1000, (0.5, 4.0)),
]


@pytest.mark.parametrize("unmaskers", [1, 2], ids=["one-unmasker", "two-unmaskers"])
async def test_committee_decrypts_and_unmasks_the_weighted_mean(
    unmaskers: int, signers: list[Signer], ca: CertificateAuthority, codec: EncryptedCodec
) -> None:
    federation = dataclasses.replace(FEDERATION, unmaskers=unmaskers)
    members = [CommitteeMember(PRIVATE_KEY, signers[index], ca, federation) for index in (0, 5)][
        :unmaskers
    ]
    fed = federation.digest()
    for member, name in zip(members, ("client-0", "client-5"), strict=False):
        assert member.credential.verify(ca, federation=fed) == name  # what clients check
    mask_keys = tuple(member.mask_public for member in members)
    rng = np.random.default_rng(3)
    updates = [rng.normal(0, 0.3, 50).astype(np.float32) for _ in _UPDATES]
    sealed = [
        _seal(
            signers[1 + i],
            codec,
            round_id=5,
            unmaskers=mask_keys,
            update=update,
            samples=samples,
            report=report,
            federation=federation,
        )
        for i, (update, (samples, report)) in enumerate(zip(updates, _UPDATES, strict=True))
    ]
    contributors = pack_tokens([token for _, token in sealed])
    summed = _fold([prepared for prepared, _ in sealed])

    decrypted: list[int] = []
    partly: list[int] = []
    unmasked: list[int] = []
    for start, count in codec.shard_ranges(2):  # two shards, as a committee splits the sum
        request = _decrypt_request(
            codec,
            contributors,
            start=start,
            count=count,
            payload=codec.shard_payload(summed, start, count),
        )
        result = await members[-1].decrypt(request, codec)
        assert result.item_count == count and result.round_id == 5
        values = _plaintexts(result.payload)
        decrypted += values
        for index, member in enumerate(members):  # in the tokens' unmasker order
            answer = await member.unmask(
                _unmask_request(codec, contributors, start=start, count=count, values=values),
                codec,
            )
            assert answer.item_count == count
            values = _plaintexts(answer.payload)
            if index < len(members) - 1:
                partly += values
        unmasked += values
    with pytest.raises(PackingError):  # still masked: the decryption alone is noise
        codec.decode(decrypted)
    if unmaskers == 2:
        with pytest.raises(PackingError):  # one unmasker's masks are not enough
            codec.decode(partly)
    result_sum = codec.decode(unmasked)

    weights = [federation.weight_for(samples) for samples, _ in _UPDATES]
    assert weights == [1, 3, 10]
    assert result_sum.total_weight == 14
    assert result_sum.evaluated_weight == 11
    clipped = [np.clip(u.astype(np.float64), -FEDERATION.clip, FEDERATION.clip) for u in updates]
    expected = sum(w * c for w, c in zip(weights, clipped, strict=True)) / 14
    step = codec.spec.step
    assert np.max(np.abs(result_sum.mean_update - expected)) <= step + 1e-6
    assert result_sum.report_means is not None
    accuracy, loss = result_sum.report_means
    assert abs(accuracy - (0.75 * 1 + 0.5 * 10) / 11) <= 1.0 / codec.spec.levels
    assert abs(loss - (2.0 * 1 + 4.0 * 10) / 11) <= 10.0 / codec.spec.levels


async def test_the_last_unmasker_refuses_before_the_others_have_unmasked(
    signers: list[Signer], ca: CertificateAuthority, codec: EncryptedCodec
) -> None:
    federation = dataclasses.replace(FEDERATION, unmaskers=2)
    first, last = (CommitteeMember(PRIVATE_KEY, signers[i], ca, federation) for i in (0, 5))
    sealed = [
        _seal(
            signers[i],
            codec,
            round_id=5,
            unmaskers=(first.mask_public, last.mask_public),
            update=np.zeros(50, np.float32),
            samples=100,
            report=None,
            federation=federation,
        )
        for i in (1, 2, 3)
    ]
    contributors = pack_tokens([token for _, token in sealed])
    summed = _fold([prepared for prepared, _ in sealed])
    decrypted = PRIVATE_KEY.decrypt_vector(deserialize_ciphertexts(summed, PRIVATE_KEY.public_key))
    with pytest.raises(CommitteeRefusal, match="does not decode") as info:
        await last.unmask(_unmask_request(codec, contributors, values=decrypted), codec)
    assert info.value.code is ErrorCode.SUM_NOT_DECODABLE
    # in order, the same request succeeds (the refusal bound nothing)
    answer = await first.unmask(_unmask_request(codec, contributors, values=decrypted), codec)
    answer = await last.unmask(
        _unmask_request(codec, contributors, values=_plaintexts(answer.payload)), codec
    )
    assert codec.decode(_plaintexts(answer.payload)).total_weight == 3


async def test_a_sum_that_does_not_decode_is_refused_and_binds_nothing(
    member: CommitteeMember,
    signers: list[Signer],
    codec: EncryptedCodec,
    uploads: dict[tuple[bytes, int], Any],
) -> None:
    """The aggregator folds four uploads but names three: the fourth mask stays in."""
    named = _named(uploads, signers, (1, 2, 3))
    with pytest.raises(CommitteeRefusal, match="does not decode") as info:
        await member.unmask(
            _unmask_request(codec, named, values=_decrypted_sum(uploads, (1, 2, 3, 4))), codec
        )
    assert info.value.code is ErrorCode.SUM_NOT_DECODABLE
    # nothing was released, so the model version is still free for the right set
    other = _named(uploads, signers, (2, 3, 4), round_id=6)
    answer = await member.unmask(
        _unmask_request(codec, other, round_id=6, values=_decrypted_sum(uploads, (2, 3, 4))),
        codec,
    )
    assert codec.decode(_plaintexts(answer.payload)).total_weight == 2 + 3 + 4


# --- refusals: the contributor set ------------------------------------------------------


async def _refused(
    member: CommitteeMember, codec: EncryptedCodec, tokens: list[bytes], rule: str
) -> None:
    """Both a decryption and an unmasking for these tokens are refused, naming ``rule``."""
    contributors = pack_tokens(tokens)
    with pytest.raises(CommitteeRefusal, match=rule) as info:
        await member.decrypt(_decrypt_request(codec, contributors), codec)
    assert info.value.code is ErrorCode.REQUEST_REFUSED
    with pytest.raises(CommitteeRefusal, match=rule):
        await member.unmask(_unmask_request(codec, contributors), codec)


async def test_too_few_contributors_are_refused(
    member: CommitteeMember, signers: list[Signer], codec: EncryptedCodec
) -> None:
    unmaskers = (member.mask_public,)
    tokens = [_token(signers[i], unmaskers=unmaskers) for i in (1, 2)]
    await _refused(member, codec, tokens, "2 contributors named; the quorum is 3")
    await _refused(member, codec, [], "0 contributors named")


async def test_a_client_named_twice_is_refused(
    member: CommitteeMember, signers: list[Signer], codec: EncryptedCodec
) -> None:
    unmaskers = (member.mask_public,)
    again = _token(signers[1], unmaskers=unmaskers)
    tokens = [
        again,
        _token(signers[1], unmaskers=unmaskers),
        _token(signers[2], unmaskers=unmaskers),
    ]
    await _refused(member, codec, tokens, "names a client twice")
    await _refused(member, codec, [again, again, again], "names a client twice")


async def test_a_token_of_another_round_is_refused(
    member: CommitteeMember, signers: list[Signer], codec: EncryptedCodec
) -> None:
    unmaskers = (member.mask_public,)
    tokens = [_token(signers[i], unmaskers=unmaskers) for i in (1, 2)]
    tokens.append(_token(signers[3], unmaskers=unmaskers, round_id=4))
    await _refused(member, codec, tokens, "client-3's token is for round 4, not 5")


async def test_tokens_for_another_model_version_are_refused(
    member: CommitteeMember, signers: list[Signer], codec: EncryptedCodec
) -> None:
    unmaskers = (member.mask_public,)
    tokens = [_token(signers[i], unmaskers=unmaskers) for i in (1, 2)]
    tokens.append(_token(signers[3], unmaskers=unmaskers, model_digest=MODEL_B))
    await _refused(member, codec, tokens, "different model versions")


async def test_tokens_for_mixed_unmaskers_are_refused(
    member: CommitteeMember, signers: list[Signer], codec: EncryptedCodec
) -> None:
    unmaskers = (member.mask_public,)
    tokens = [_token(signers[i], unmaskers=unmaskers) for i in (1, 2)]
    tokens.append(_token(signers[3], unmaskers=(member.mask_public, bytes(32))))
    await _refused(member, codec, tokens, "different unmaskers")


async def test_a_token_with_the_wrong_item_count_is_refused(
    member: CommitteeMember, signers: list[Signer], codec: EncryptedCodec
) -> None:
    unmaskers = (member.mask_public,)
    tokens = [_token(signers[i], unmaskers=unmaskers) for i in (1, 2)]
    tokens.append(_token(signers[3], unmaskers=unmaskers, item_count=4))
    await _refused(member, codec, tokens, "client-3's token counts 4 ciphertexts; the model has 3")


async def test_a_token_for_another_federation_is_refused(
    member: CommitteeMember, signers: list[Signer], codec: EncryptedCodec
) -> None:
    unmaskers = (member.mask_public,)
    other = dataclasses.replace(FEDERATION, clip=0.25).digest()
    tokens = [_token(signers[i], unmaskers=unmaskers) for i in (1, 2)]
    tokens.append(_token(signers[3], unmaskers=unmaskers, federation=other))
    await _refused(member, codec, tokens, "client-3's token is for another federation")


async def test_a_token_that_does_not_verify_is_refused(
    member: CommitteeMember, signers: list[Signer], codec: EncryptedCodec
) -> None:
    unmaskers = (member.mask_public,)
    tokens = [_token(signers[i], unmaskers=unmaskers) for i in (1, 2, 3)]
    genuine = ContributorToken.from_wire(tokens[2])
    tokens[2] = dataclasses.replace(genuine, upload_digest=bytes(32)).to_wire()
    await _refused(member, codec, tokens, "a contributor token does not verify")
    await _refused(member, codec, [b"garbage", *tokens[:2]], "a contributor token does not verify")


async def test_the_aggregator_cannot_name_itself_as_a_contributor(
    member: CommitteeMember, pki: FederationPKI, signers: list[Signer], codec: EncryptedCodec
) -> None:
    aggregator = Signer.load(pki.aggregator.cert, pki.aggregator.key)
    unmaskers = (member.mask_public,)
    tokens = [_token(signers[i], unmaskers=unmaskers) for i in (1, 2)]
    tokens.append(_token(aggregator, unmaskers=unmaskers))
    await _refused(member, codec, tokens, "does not verify")


async def test_unmasking_for_another_unmasker_is_refused(
    member: CommitteeMember, signers: list[Signer], codec: EncryptedCodec
) -> None:
    tokens = [_token(signers[i], unmaskers=(bytes(32),)) for i in (1, 2, 3)]
    contributors = pack_tokens(tokens)
    with pytest.raises(CommitteeRefusal, match="did not mask for this member"):
        await member.unmask(_unmask_request(codec, contributors), codec)
    await member.decrypt(_decrypt_request(codec, contributors), codec)  # any member decrypts


# --- refusals: ranges and rounds --------------------------------------------------------


@pytest.mark.parametrize(("start", "count"), [(2, 2), (3, 1), (0, 4), (1, 0), (100, 1)])
async def test_a_range_outside_the_model_is_refused(
    start: int,
    count: int,
    member: CommitteeMember,
    signers: list[Signer],
    codec: EncryptedCodec,
) -> None:
    unmaskers = (member.mask_public,)
    contributors = pack_tokens([_token(signers[i], unmaskers=unmaskers) for i in (1, 2, 3)])
    payload = serialize_ciphertexts(
        PRIVATE_KEY.public_key.encrypt_vector([1] * count), PRIVATE_KEY.public_key
    )
    with pytest.raises(CommitteeRefusal, match="outside the model's 3 ciphertexts"):
        await member.decrypt(
            _decrypt_request(codec, contributors, start=start, count=count, payload=payload),
            codec,
        )
    with pytest.raises(CommitteeRefusal, match="outside the model's 3 ciphertexts"):
        await member.unmask(_unmask_request(codec, contributors, start=start, count=count), codec)


async def test_a_payload_that_disagrees_with_its_count_is_refused(
    member: CommitteeMember, signers: list[Signer], codec: EncryptedCodec
) -> None:
    contributors = pack_tokens([_token(signers[i]) for i in (1, 2, 3)])
    payload = serialize_ciphertexts(
        PRIVATE_KEY.public_key.encrypt_vector([1, 1]), PRIVATE_KEY.public_key
    )
    with pytest.raises(CommitteeRefusal, match="payload holds 2 ciphertexts"):
        await member.decrypt(_decrypt_request(codec, contributors, count=3, payload=payload), codec)


async def test_a_range_is_decrypted_once_per_round(
    member: CommitteeMember, signers: list[Signer], codec: EncryptedCodec
) -> None:
    def contributors(round_id: int) -> bytes:
        return pack_tokens([_token(signers[i], round_id=round_id) for i in (1, 2, 3)])

    round_5 = contributors(5)
    await member.decrypt(_decrypt_request(codec, round_5, start=0, count=2), codec)
    with pytest.raises(CommitteeRefusal, match=r"ciphertexts \[0, 2\) of round 5"):
        await member.decrypt(_decrypt_request(codec, round_5, start=0, count=2), codec)
    with pytest.raises(CommitteeRefusal, match=r"ciphertexts \[1, 2\) of round 5"):
        await member.decrypt(_decrypt_request(codec, round_5, start=1, count=2), codec)
    await member.decrypt(_decrypt_request(codec, round_5, start=2, count=1), codec)
    # the next round may decrypt the same positions again
    await member.decrypt(
        _decrypt_request(codec, contributors(6), round_id=6, start=0, count=3), codec
    )


async def test_round_ids_never_go_back(
    member: CommitteeMember, signers: list[Signer], codec: EncryptedCodec
) -> None:
    def contributors(round_id: int) -> bytes:
        return pack_tokens([_token(signers[i], round_id=round_id) for i in (1, 2, 3)])

    await member.decrypt(_decrypt_request(codec, contributors(7), round_id=7, count=1), codec)
    with pytest.raises(CommitteeRefusal, match="round 6 is older than round 7"):
        await member.decrypt(
            _decrypt_request(codec, contributors(6), round_id=6, start=1, count=1), codec
        )


# --- refusals: one contributor set per model version ------------------------------------


async def test_one_contributor_set_per_model_version(
    member: CommitteeMember,
    signers: list[Signer],
    codec: EncryptedCodec,
    uploads: dict[tuple[bytes, int], Any],
) -> None:
    async def unmask(clients: tuple[int, ...], round_id: int, model: bytes = MODEL_A) -> Any:
        request = _unmask_request(
            codec,
            _named(uploads, signers, clients, round_id=round_id, model=model),
            round_id=round_id,
            values=_decrypted_sum(uploads, clients, model),
        )
        return await member.unmask(request, codec)

    first = await unmask((1, 2, 3), 5)
    assert codec.decode(_plaintexts(first.payload)).total_weight == 1 + 2 + 3
    for other_set in ((1, 2, 4), (1, 2, 3, 4), (2, 3, 4)):
        with pytest.raises(CommitteeRefusal, match="rerun protection"):
            await unmask(other_set, 6)
    # the same set again (a rerun: new round id, new tokens, the same uploads)
    again = await unmask((3, 2, 1), 7)
    assert again.payload == first.payload
    # another model version is a new question
    other_model = await unmask((1, 2, 4), 8, MODEL_B)
    assert codec.decode(_plaintexts(other_model.payload)).total_weight == 1 + 2 + 4


async def test_concurrent_requests_cannot_unmask_two_sets_of_one_model_version(
    signers: list[Signer],
    ca: CertificateAuthority,
    codec: EncryptedCodec,
    uploads: dict[tuple[bytes, int], Any],
) -> None:
    """Two requests in flight at once (a client serves each in its own task).

    Whether the second request reaches the check before the first is recorded depends
    on thread scheduling: in a measurement it did in about two trials of three, so 20
    fresh members all serializing by luck has probability below 1e-9.
    """
    requests = [
        _unmask_request(
            codec,
            _named(uploads, signers, clients),
            values=_decrypted_sum(uploads, clients),
        )
        for clients in ((1, 2, 3), (1, 2, 4))
    ]
    for _ in range(20):
        member = CommitteeMember(PRIVATE_KEY, signers[0], ca, FEDERATION)
        answers = await asyncio.gather(
            *(member.unmask(request, codec) for request in requests), return_exceptions=True
        )
        refused = [a for a in answers if isinstance(a, CommitteeRefusal)]
        assert len(refused) == 1, answers
        assert "rerun protection" in str(refused[0])


async def test_the_same_names_with_another_upload_are_a_different_set(
    member: CommitteeMember,
    signers: list[Signer],
    codec: EncryptedCodec,
    uploads: dict[tuple[bytes, int], Any],
) -> None:
    await member.unmask(
        _unmask_request(
            codec, _named(uploads, signers, (1, 2, 3)), values=_decrypted_sum(uploads, (1, 2, 3))
        ),
        codec,
    )
    # client-1 sealed a second, different update for MODEL_A (a new ephemeral key): an
    # aggregator that alternates model versions (A, B, A) gets one from an honest client
    resealed, token = _seal(
        signers[1],
        codec,
        round_id=6,
        unmaskers=(member.mask_public,),
        update=np.full(50, 0.3, np.float32),
        samples=100,
        report=None,
    )
    # the unchanged uploads of client-2 and client-3, with tokens for round 6
    unchanged = unpack_tokens(_named(uploads, signers, (2, 3), round_id=6))
    contributors = pack_tokens([token, *unchanged])
    summed = _fold([resealed, uploads[(MODEL_A, 2)], uploads[(MODEL_A, 3)]])
    values = PRIVATE_KEY.decrypt_vector(deserialize_ciphertexts(summed, PRIVATE_KEY.public_key))
    with pytest.raises(CommitteeRefusal, match="rerun protection"):
        await member.unmask(_unmask_request(codec, contributors, round_id=6, values=values), codec)


# --- refusals: malformed decrypted sums -------------------------------------------------


async def test_malformed_decrypted_sums_are_refused(
    member: CommitteeMember,
    signers: list[Signer],
    codec: EncryptedCodec,
    uploads: dict[tuple[bytes, int], Any],
) -> None:
    named = _named(uploads, signers, (1, 2, 3))
    decrypted = _decrypted_sum(uploads, (1, 2, 3))
    short = _unmask_request(codec, named, values=decrypted)
    short = dataclasses.replace(
        short, payload=short.payload[: 2 * PRIVATE_KEY.public_key.plaintext_bytes]
    )
    with pytest.raises(CommitteeRefusal, match="2 decrypted sums sent for a range of 3"):
        await member.unmask(short, codec)
    ragged = dataclasses.replace(short, payload=short.payload + b"\x00")
    with pytest.raises(CommitteeRefusal, match="malformed"):
        await member.unmask(ragged, codec)
    too_big = dataclasses.replace(
        short,
        payload=short.payload
        + int(PRIVATE_KEY.public_key.n).to_bytes(PRIVATE_KEY.public_key.plaintext_bytes, "big"),
    )
    with pytest.raises(CommitteeRefusal, match="malformed"):
        await member.unmask(too_big, codec)
    # none of that bound the model version: the right request is still answered
    answer = await member.unmask(_unmask_request(codec, named, values=decrypted), codec)
    assert codec.decode(_plaintexts(answer.payload)).total_weight == 6


# --- the member's mask key --------------------------------------------------------------


def test_member_mask_key_is_deterministic_and_bound_to_key_cert_and_federation(
    signers: list[Signer], ca: CertificateAuthority
) -> None:
    fed = FEDERATION.digest()

    def public(private_key: PrivateKey, signer: Signer, federation: bytes) -> bytes:
        return public_key_bytes(derive_member_mask_key(private_key, signer, federation))

    base = public(PRIVATE_KEY, signers[0], fed)
    assert base == public(PRIVATE_KEY, signers[0], fed)  # the same after a restart
    _, other_key = generate_keypair(512)
    variants = [
        public(other_key, signers[0], fed),
        public(PRIVATE_KEY, signers[5], fed),
        public(PRIVATE_KEY, signers[0], dataclasses.replace(FEDERATION, clip=0.25).digest()),
    ]
    assert len({base, *variants}) == 4
    # a member announces exactly that key in its signed credential
    member = CommitteeMember(PRIVATE_KEY, signers[0], ca, FEDERATION)
    assert member.mask_public == base == member.credential.mask_public
    assert member.credential.verify(ca, federation=fed) == "client-0"
