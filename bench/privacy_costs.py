"""What protocol 3's privacy checks cost, one fedcore call at a time (used by bench micro).

Each function times the fedcore functions a party really calls, on the micro
benchmark's key, and returns figures whose names say the unit:

- `encryption_costs`: a random factor with the ceil(k/2)-bit exponent fedcore now uses
  (`ShortExponentRandomizer`) against the 224-bit exponent it used before (a
  `FixedBaseTable` of 224 bits on the same base), each with its encryption, and pooled
  encryption; decryption with and without the Z*_{n²} check `decrypt_vector` now makes.
- `masking_costs`: a client's masks (`derive_mask_key`, `mask_values`, `add_masks`),
  an unmasker's mask sum per contributor (`MaskSum.add`) and its reduction, and
  removing the masks from a decrypted sum (`remove_masks`).
- `credential_costs`: signing and verifying one contributor token and one committee
  credential (cold: a fresh `CertificateAuthority`; warm: its certificate cache hit),
  and `check_modulus` on the key.
- `committee_at_scale`: the committee's unmask work for N signed tokens on the seed
  MLP's ciphertext count (a `CommitteeMember` answering every UnmaskRequest of a whole
  update: token-set verification, mask sums over every position), its parts alone,
  and the aggregator's token checks, for each N asked.

Cheap operations take the best of ``repeats`` runs (the machine is shared). Measures;
never asserts.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedcore.client.committee import CommitteeMember
from fedcore.codec import EncryptedCodec, codec_for
from fedcore.contracts import FederationParams, SessionInfo
from fedcore.credentials import (
    CertificateAuthority,
    CommitteeCredential,
    ContributorToken,
    Signer,
    pack_tokens,
)
from fedcore.crypto import (
    EncryptionPool,
    PrivateKey,
    PublicKey,
    deserialize_plaintexts,
    serialize_plaintexts,
    validate_ciphertexts,
)
from fedcore.crypto.decrypt import CrtConstants, crt_decrypt
from fedcore.crypto.encrypt import (
    FixedBaseTable,
    ShortExponentRandomizer,
    encrypt_with_factors,
    short_exponent_bits,
)
from fedcore.crypto.keys import check_modulus
from fedcore.crypto.masking import (
    MaskSum,
    add_masks,
    derive_mask_key,
    mask_values,
    public_key_bytes,
    remove_masks,
)
from protocol.framing import DEFAULT_MAX_FRAME_SIZE
from protocol.messages import UnmaskRequest
from protocol.tls import write_federation_pki

__all__ = [
    "BEFORE_EXPONENT_BITS",
    "best_of",
    "committee_at_scale",
    "credential_costs",
    "encryption_costs",
    "masking_costs",
]

BEFORE_EXPONENT_BITS = 224
"""The random-factor exponent length fedcore used before ceil(k/2) (twice 112-bit security)."""
MAX_WEIGHT = 64  # fedcore's default weight bound: the headroom holds N clients of it


def best_of(repeats: int, action: Callable[[], object]) -> float:
    """The shortest of ``repeats`` (at least one) timed runs of ``action``, in seconds."""
    best = float("inf")
    for _ in range(max(1, repeats)):
        started = time.perf_counter()
        action()
        best = min(best, time.perf_counter() - started)
    return best


def _timed(action: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    value = action()
    return value, time.perf_counter() - started


# ---------------------------------------------------------------------------- encryption
def encryption_costs(
    pk: PublicKey, sk: PrivateKey, plaintexts: Sequence[int], slots: int, repeats: int
) -> dict[str, Any]:
    """Encryption before (224-bit exponent) and after (ceil(k/2) bits), pooled, decryption.

    ``plaintexts`` is a sample of packed plaintexts (one per ciphertext), ``slots`` the
    values per ciphertext. "before" is the same fixed-base method with the old exponent
    length: ``FixedBaseTable(hs, n², 224)`` on the randomizer's own base ``hs``.
    """
    count = len(plaintexts)
    n, nsquare = pk.n, pk.nsquare
    pk.encrypt_vector([0])  # the key's own table, which the pool uses, is built untimed
    after_bits = short_exponent_bits(pk.bits)
    randomizer, after_table_s = _timed(lambda: ShortExponentRandomizer(n))
    before_table, before_table_s = _timed(
        lambda: FixedBaseTable(randomizer.hs, nsquare, BEFORE_EXPONENT_BITS)
    )

    def before_factors() -> list[Any]:
        return [before_table.power(secrets.randbits(BEFORE_EXPONENT_BITS)) for _ in range(count)]

    # alternate before/after so both see the same machine load
    factor_s = {"before": float("inf"), "after": float("inf")}
    encrypt_s = {"before": float("inf"), "after": float("inf")}
    for _ in range(max(1, repeats)):
        for name, make in (
            ("before", before_factors),
            ("after", lambda: randomizer.factors(count)),
        ):
            factors, seconds = _timed(make)
            _, combine = _timed(partial(encrypt_with_factors, plaintexts, factors, n, nsquare))
            factor_s[name] = min(factor_s[name], seconds / count)
            encrypt_s[name] = min(encrypt_s[name], (seconds + combine) / count)

    pool = EncryptionPool(pk, count, background=False)
    _, fill_s = _timed(pool.fill)
    ciphertexts, pooled_s = _timed(lambda: pool.encrypt_vector(plaintexts))
    pool.close()

    constants = CrtConstants(sk.p, sk.q)
    decrypt_before = best_of(repeats, lambda: crt_decrypt(ciphertexts, constants))
    decrypt_after = best_of(repeats, lambda: sk.decrypt_vector(ciphertexts))
    check = best_of(repeats, lambda: validate_ciphertexts(ciphertexts, pk))
    return {
        "encrypt_sample_ciphertexts": count,
        "encrypt_exponent_bits_before": BEFORE_EXPONENT_BITS,
        "encrypt_exponent_bits_after": after_bits,
        "randomizer_table_build_s_before": before_table_s,
        "randomizer_table_build_s_after": after_table_s,
        "encrypt_factor_s_before": factor_s["before"],
        "encrypt_factor_s_after": factor_s["after"],
        "encrypt_s_per_ciphertext_before": encrypt_s["before"],
        "encrypt_s_per_ciphertext_after": encrypt_s["after"],
        "encrypt_s_per_value_before": encrypt_s["before"] / slots,
        "encrypt_s_per_value_after": encrypt_s["after"] / slots,
        "encrypt_after_vs_before": encrypt_s["after"] / encrypt_s["before"],
        "pool_fill_s_per_ciphertext": fill_s / count,
        "pool_encrypt_s_per_ciphertext": pooled_s / count,
        "decrypt_s_per_ciphertext_before": decrypt_before / count,
        "decrypt_s_per_ciphertext_after": decrypt_after / count,
        "decrypt_zn2_check_s_per_ciphertext": check / count,
        "decrypt_after_vs_before": decrypt_after / decrypt_before,
    }


# ---------------------------------------------------------------------------- masking
def masking_costs(
    pk: PublicKey, plaintexts: Sequence[int], slots: int, repeats: int
) -> dict[str, Any]:
    """A client's masking, an unmasker's mask sum and the masks' removal, per ciphertext.

    ``plaintexts`` is one update's packed plaintexts; the masks are for one unmasker
    (the federation default). ``client_mask_s_*`` is `seal`'s whole masking (key, mask
    stream, masks combined, added to the plaintexts); the parts are timed alone too.
    """
    count = len(plaintexts)
    n = pk.n
    unmasker = X25519PrivateKey.generate()
    unmasker_public = public_key_bytes(unmasker)
    federation, model = os.urandom(32), os.urandom(32)
    clients = [X25519PrivateKey.generate() for _ in range(max(2, repeats))]

    def client_key(client: X25519PrivateKey) -> bytes:
        own = public_key_bytes(client)
        return derive_mask_key(
            client,
            unmasker_public,
            client_public=own,
            unmasker_public=unmasker_public,
            federation=federation,
            model_digest=model,
        )

    def unmasker_key(client: X25519PrivateKey) -> bytes:
        own = public_key_bytes(client)
        return derive_mask_key(
            unmasker,
            own,
            client_public=own,
            unmasker_public=unmasker_public,
            federation=federation,
            model_digest=model,
        )

    key = client_key(clients[0])
    if key != unmasker_key(clients[0]):
        raise RuntimeError("client and unmasker derived different mask keys")
    key_s = best_of(repeats, lambda: client_key(clients[0]))
    masks = mask_values(key, n, 0, count)
    values_s = best_of(repeats, lambda: mask_values(key, n, 0, count))
    masked = add_masks(plaintexts, masks, n)
    add_s = best_of(repeats, lambda: add_masks(plaintexts, masks, n))

    def seal_masking() -> list[int]:
        # fedcore.client.pipeline.seal's masking for one unmasker, line for line
        combined = add_masks([0] * count, mask_values(client_key(clients[0]), n, 0, count), n)
        return add_masks(plaintexts, combined, n)

    client_s = best_of(repeats, seal_masking)

    unmask_key_s = best_of(repeats, lambda: unmasker_key(clients[1]))
    keys = [unmasker_key(client) for client in clients]
    sum_add_s = float("inf")
    for client_mask_key in keys:
        fresh = MaskSum(n, 0, count)
        _, seconds = _timed(partial(fresh.add, client_mask_key))
        sum_add_s = min(sum_add_s, seconds)
    total = MaskSum(n, 0, count)
    total.add_all(keys)
    sums, result_s = _timed(total.result)
    remove_s = best_of(repeats, lambda: remove_masks(masked, sums, n))
    if remove_masks(masked, mask_values(key, n, 0, count), n) != [int(m) for m in plaintexts]:
        raise RuntimeError("removing a client's masks did not give its plaintexts back")
    return {
        "mask_ciphertexts": count,
        "client_mask_key_s_per_unmasker": key_s,
        "client_mask_values_s_per_ciphertext": values_s / count,
        "client_mask_add_s_per_ciphertext": add_s / count,
        "client_mask_s_per_update": client_s,
        "client_mask_s_per_ciphertext": client_s / count,
        "client_mask_s_per_value": client_s / count / slots,
        "unmask_key_s_per_contributor": unmask_key_s,
        "unmask_mask_sum_add_s_per_contributor_per_ciphertext": sum_add_s / count,
        "unmask_mask_sum_result_s_per_ciphertext": result_s / count,
        "remove_masks_s_per_ciphertext": remove_s / count,
    }


# ---------------------------------------------------------------------------- credentials
def _token(
    signer: Signer,
    *,
    federation: bytes,
    model: bytes,
    unmaskers: tuple[bytes, ...],
    item_count: int,
    round_id: int = 1,
) -> ContributorToken:
    """A contributor token as `fedcore.client` signs it (fresh ephemeral key, random digest)."""
    return ContributorToken(
        federation=federation,
        round_id=round_id,
        model_digest=model,
        client_public=public_key_bytes(X25519PrivateKey.generate()),
        unmaskers=unmaskers,
        item_count=item_count,
        upload_digest=os.urandom(32),
        certificate=signer.certificate_der,
    ).signed_by(signer)


def credential_costs(pk: PublicKey, repeats: int) -> dict[str, Any]:
    """Sign and verify one token and one committee credential; check the modulus.

    Cold verification uses a fresh `CertificateAuthority` each time (certificate path
    validation included), warm a second verification on the same one (its cache hit:
    signature only), as the aggregator sees a client's token in its second round.
    """
    runs = max(2, repeats)
    with tempfile.TemporaryDirectory(prefix="fedcore-micro-pki-") as tmp:
        pki = Path(tmp)
        write_federation_pki(pki, clients=2)
        signer = Signer.load(pki / "client-0.pem", pki / "client-0.key")
        member = Signer.load(pki / "client-1.pem", pki / "client-1.key")
        authorities = [CertificateAuthority.load(pki / "ca.pem") for _ in range(2 * runs + 1)]
    federation = os.urandom(32)
    unmaskers = (public_key_bytes(X25519PrivateKey.generate()),)
    fields: dict[str, Any] = {
        "federation": federation,
        "model": os.urandom(32),
        "unmaskers": unmaskers,
        "item_count": 7000,
    }
    sign_s = best_of(repeats, lambda: _token(signer, **fields))
    wires = [_token(signer, **fields).to_wire() for _ in range(runs)]

    def check(wire: bytes, ca: CertificateAuthority) -> str:
        return ContributorToken.from_wire(wire).verify(ca)  # what the aggregator does

    cold = min(
        _timed(partial(check, w, ca))[1] for w, ca in zip(wires, authorities[:runs], strict=True)
    )
    warm_ca = authorities[-1]
    check(wires[0], warm_ca)
    warm = best_of(repeats, lambda: check(wires[0], warm_ca))
    credential = CommitteeCredential.issue(member, federation=federation, mask_public=unmaskers[0])
    credential_sign_s = best_of(
        repeats,
        lambda: CommitteeCredential.issue(member, federation=federation, mask_public=unmaskers[0]),
    )
    credential_cold = min(
        _timed(partial(credential.verify, ca, federation=federation))[1]
        for ca in authorities[runs : 2 * runs]
    )
    check_modulus(pk.n, min_bits=pk.bits)  # the first call builds the small-prime product
    modulus_s = best_of(repeats, lambda: check_modulus(pk.n, min_bits=pk.bits))
    return {
        "token_sign_s": sign_s,
        "token_verify_cold_s": cold,
        "token_verify_warm_s": warm,
        "committee_credential_sign_s": credential_sign_s,
        "committee_credential_verify_cold_s": credential_cold,
        "check_modulus_s": modulus_s,
        "token_bytes": len(wires[0]),
    }


# ---------------------------------------------------------------------------- at scale
def _federation(pk: PublicKey, contributors: int) -> FederationParams:
    """The federation an aggregator derives for ``contributors`` clients per round."""
    return FederationParams(
        mode="shared",
        public_key=pk,
        headroom_bits=max(1, (contributors * MAX_WEIGHT - 1).bit_length()),
        min_clients=min(3, contributors),
        max_weight=MAX_WEIGHT,
    )


def _codec(federation: FederationParams, n_values: int) -> EncryptedCodec:
    session = SessionInfo(num_values=n_values, chunk_items=256, model_layout="[]", rounds=1)
    codec = codec_for(federation, session)
    assert isinstance(codec, EncryptedCodec)
    return codec


def _client_mask_sums(
    clients: list[X25519PrivateKey],
    unmasker_public: bytes,
    codec: EncryptedCodec,
    federation: bytes,
    model: bytes,
) -> list[int]:
    """``Σ M_i`` over every position, from the clients' side of each key agreement.

    The same operations as the unmasker's mask sums (one X25519 + HKDF per token, one
    AES-CTR stream and limb add per token, one reduction): the shared key is the same
    from either side.
    """
    total = MaskSum(codec.public_key.n, 0, codec.item_count)
    for client in clients:
        own = public_key_bytes(client)
        total.add(
            derive_mask_key(
                client,
                unmasker_public,
                client_public=own,
                unmasker_public=unmasker_public,
                federation=federation,
                model_digest=model,
            )
        )
    return total.result()


def _check_tokens(tokens: list[bytes], ca: CertificateAuthority) -> None:
    """The aggregator's cryptographic check of each UpdateDone token (parse + verify)."""
    for wire in tokens:
        ContributorToken.from_wire(wire).verify(ca)


def _unmask_requests(
    codec: EncryptedCodec, contributors: bytes, masked_sum: list[int]
) -> list[UnmaskRequest]:
    """The UnmaskRequests an aggregator sends for a whole sum, sharded as it shards them.

    A shard's answer must fit half a frame (`fedcore.aggregator.committee`). Requests
    carry the decrypted, still masked sums.
    """
    width = codec.public_key.plaintext_bytes
    max_items = max(1, (DEFAULT_MAX_FRAME_SIZE // 2) // width)
    shards = codec.shard_ranges(max(1, -(-codec.item_count // max_items)))
    return [
        UnmaskRequest(
            round_id=1,
            shard_id=shard_id,
            start=start,
            item_count=count,
            contributors=contributors,
            payload=serialize_plaintexts(masked_sum[start : start + count], codec.public_key),
        )
        for shard_id, (start, count) in enumerate(shards)
    ]


async def _unmask_all(
    member: CommitteeMember, requests: list[UnmaskRequest], codec: EncryptedCodec
) -> list[Any]:
    return [await member.unmask(request, codec) for request in requests]


def _one_set(
    pk: PublicKey, sk: PrivateKey, count: int, signers: list[Signer], ca: Path, n_values: int
) -> dict[str, Any]:
    """Sign ``count`` tokens, then time the committee's and the aggregator's work on them.

    Every client uploads the same contribution m (weight 1), so the masked sum is
    ``count·m + Σ M_i``; the unmasker's answer is checked against it.
    """
    federation = _federation(pk, count)
    codec = _codec(federation, n_values)
    fed, model = federation.digest(), os.urandom(32)

    def member() -> CommitteeMember:  # a fresh CA: no certificate cached yet
        return CommitteeMember(sk, signers[0], CertificateAuthority.load(ca), federation)

    unmasker = member()
    clients = [X25519PrivateKey.generate() for _ in range(count)]
    tokens = [
        ContributorToken(
            federation=fed,
            round_id=1,
            model_digest=model,
            client_public=public_key_bytes(client),
            unmaskers=(unmasker.mask_public,),
            item_count=codec.item_count,
            upload_digest=os.urandom(32),
            certificate=signers[1 + i].certificate_der,
        )
        .signed_by(signers[1 + i])
        .to_wire()
        for i, client in enumerate(clients)
    ]
    packed = pack_tokens(tokens)
    n = pk.n
    update = (np.random.default_rng(count).standard_normal(n_values) * 0.01).astype(np.float32)
    contribution = codec.encode(update, weight=1, report=None, rng=np.random.default_rng(0))
    plain_sum = [count * int(m) % n for m in contribution]

    _, verify_s = _timed(lambda: member().verify_contributors(1, packed, codec))
    masks, mask_s = _timed(
        lambda: _client_mask_sums(clients, unmasker.mask_public, codec, fed, model)
    )
    masked_sum = add_masks(plain_sum, masks, n)
    _, remove_s = _timed(lambda: remove_masks(masked_sum, masks, n))
    requests = _unmask_requests(codec, packed, masked_sum)
    answers, unmask_s = _timed(lambda: asyncio.run(_unmask_all(unmasker, requests, codec)))
    answer = [v for a in answers for v in deserialize_plaintexts(a.payload, pk)]
    if answer != plain_sum:
        raise RuntimeError("the committee member's unmasked answer is not the plain sum")
    aggregator_ca = CertificateAuthority.load(ca)
    _, cold_s = _timed(lambda: _check_tokens(tokens, aggregator_ca))
    _, warm_s = _timed(lambda: _check_tokens(tokens, aggregator_ca))
    return {
        "contributors": count,
        "ciphertexts": codec.item_count,
        "headroom_bits": federation.headroom_bits,
        "unmask_requests": len(requests),
        "committee_unmask_s": unmask_s,
        "committee_unmask_s_per_contributor": unmask_s / count,
        "committee_unmask_answers": "unmasked sums" if answer == plain_sum else "mask sums",
        "committee_verify_s": verify_s,
        "committee_mask_sums_s": mask_s,
        "remove_masks_s": remove_s,
        "aggregator_token_checks_cold_s": cold_s,
        "aggregator_token_checks_warm_s": warm_s,
        "aggregator_token_check_s_per_token_cold": cold_s / count,
        "tokens_bytes": len(packed),
    }


def committee_at_scale(
    pk: PublicKey,
    sk: PrivateKey,
    contributors: Sequence[int],
    n_values: int,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    """The committee's and the aggregator's per-round token and mask work for N contributors.

    For each N: N distinct CA-certified clients sign tokens for one model version,
    masked for one `CommitteeMember`; ``committee_unmask_s`` is that member (fresh CA:
    cold certificate cache) answering every UnmaskRequest of the whole update, sharded
    as the aggregator shards it: token-set check, one mask key and one mask stream per
    token over every position (`MaskSum`), and whatever else its ``unmask`` does.
    Alongside, alone: the token-set check by another fresh member
    (``committee_verify_s``), the mask sums over every position (``committee_mask_sums_s``,
    computed from the clients' side of each key agreement: the same operations) and
    their removal; and the aggregator parsing and verifying every token (cold CA: a new
    client's first round; warm: its certificate cached). Each N is measured once.
    """
    out: dict[str, Any] = {}
    largest = max(contributors)
    with tempfile.TemporaryDirectory(prefix="fedcore-micro-committee-") as tmp:
        pki = Path(tmp)
        _, pki_s = _timed(lambda: write_federation_pki(pki, clients=largest + 1))
        progress(f"committee at scale: {largest + 1} client certificates in {pki_s:.1f} s")
        signers = [
            Signer.load(pki / f"client-{i}.pem", pki / f"client-{i}.key")
            for i in range(largest + 1)
        ]
        for count in contributors:
            figures = _one_set(pk, sk, count, signers, pki / "ca.pem", n_values)
            progress(
                f"committee at scale: {count} tokens x {figures['ciphertexts']} ciphertexts: "
                f"unmask {figures['committee_unmask_s']:.2f} s (token-set check alone "
                f"{figures['committee_verify_s']:.2f} s, mask sums alone "
                f"{figures['committee_mask_sums_s']:.2f} s); aggregator token checks "
                f"{figures['aggregator_token_checks_cold_s']:.2f} s cold, "
                f"{figures['aggregator_token_checks_warm_s']:.2f} s warm"
            )
            out[str(count)] = figures
    out["pki_s"] = pki_s
    return out
