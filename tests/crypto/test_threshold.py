"""Threshold Paillier: dealing, partial decryption, proofs, combination, key files.

Covers fedcore.crypto.threshold and fedcore.crypto.threshold_proof, on fresh 512-bit
3-of-5 keys and on the known-answer vectors in tests/vectors/threshold_512.json.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import secrets
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gmpy2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from phe import paillier

from fedcore.crypto import threshold_proof
from fedcore.crypto.threshold import (
    MAX_PARTIES,
    KeyShare,
    PartialDecryption,
    ThresholdPublicKey,
    combine,
    deal,
    verify,
)
from fedcore.crypto.threshold_proof import EqualityProof, batch_bases, prove
from fedcore.errors import InvalidCiphertextError, KeyFileError
from protocol.committee_messages import MAX_PROOF_LEN

_VECTORS: dict[str, Any] = json.loads(
    (Path(__file__).resolve().parent.parent / "vectors" / "threshold_512.json").read_text()
)
CONTEXT = b"federation f, round 7, items 0..7"


@dataclass(frozen=True)
class _Answered:
    """One decryption request and every member's honest answer to it."""

    plaintexts: list[int]
    ciphertexts: list[int]
    partials: list[PartialDecryption]  # member i's answer at position i - 1


@pytest.fixture(scope="module")
def dealt() -> tuple[ThresholdPublicKey, list[KeyShare]]:
    return deal(512, 3, 5)


@pytest.fixture(scope="module")
def key(dealt: tuple[ThresholdPublicKey, list[KeyShare]]) -> ThresholdPublicKey:
    return dealt[0]


@pytest.fixture(scope="module")
def shares(dealt: tuple[ThresholdPublicKey, list[KeyShare]]) -> list[KeyShare]:
    return dealt[1]


@pytest.fixture(scope="module")
def answered(key: ThresholdPublicKey, shares: list[KeyShare]) -> _Answered:
    n = int(key.public_key.n)
    plaintexts = [0, 1, 2, 42, 2**64 + 7, n // 3, secrets.randbelow(n), n - 1]
    ciphertexts = [int(c) for c in key.public_key.encrypt_vector(plaintexts)]
    partials = [share.partial_decrypt(ciphertexts, context=CONTEXT) for share in shares]
    return _Answered(plaintexts, ciphertexts, partials)


def _random_unit(key: ThresholdPublicKey) -> int:
    """A random element of Z*_{n²} other than ±1."""
    n, nsquare = int(key.public_key.n), int(key.public_key.nsquare)
    while True:
        u = secrets.randbelow(nsquare - 3) + 2
        if gmpy2.gcd(u, n) == 1:
            return u


def _with_values(partial: PartialDecryption, values: list[Any]) -> PartialDecryption:
    return PartialDecryption(partial.index, tuple(values), partial.proof)


def _lie(
    key: ThresholdPublicKey, index: int, exponent_share: Any, ciphertexts: list[int]
) -> PartialDecryption:
    """Member ``index`` answering consistently with ``exponent_share`` instead of its s_i."""
    nsquare = key.public_key.nsquare
    witness = key.delta * exponent_share
    values = [gmpy2.powmod(c, 2 * witness, nsquare) for c in ciphertexts]
    big_c, big_d = batch_bases(key, index, CONTEXT, ciphertexts, values)
    return PartialDecryption(index, tuple(values), prove(key, index, witness, big_c, big_d))


# --- dealing ---------------------------------------------------------------------------


def test_deal_makes_a_key_of_the_requested_shape(
    key: ThresholdPublicKey, shares: list[KeyShare]
) -> None:
    assert key.public_key.bits == 512
    assert (key.threshold, key.parties, key.delta) == (3, 5, 120)
    assert len(key.verification_keys) == 5
    assert len(set(key.verification_keys)) == 5
    assert [share.index for share in shares] == [1, 2, 3, 4, 5]
    assert len({int(share.secret) for share in shares}) == 5
    assert all(share.public_key is key for share in shares)
    key.check(min_bits=512)  # n looks like a product of two large primes
    nsquare = key.public_key.nsquare
    for share, vk in zip(shares, key.verification_keys, strict=True):
        assert gmpy2.powmod(key.verification_base, key.delta * share.secret, nsquare) == vk


def test_deal_makes_a_fresh_key_each_time(key: ThresholdPublicKey) -> None:
    other, _ = deal(512, 3, 5)
    assert other.public_key.n != key.public_key.n
    assert other.sha256() != key.sha256()
    assert other != key


def test_deal_reports_progress() -> None:
    calls: list[tuple[str, int, int]] = []
    deal(512, 2, 3, progress=lambda step, done, total: calls.append((step, done, total)))
    steps = {step for step, _, _ in calls}
    assert {"safe prime p", "safe prime q", "verification keys"} <= steps
    assert ("safe prime p", 1, 1) in calls
    assert ("safe prime q", 1, 1) in calls
    assert [c for c in calls if c[0] == "verification keys"] == [
        ("verification keys", i, 3) for i in (1, 2, 3)
    ]


@pytest.mark.parametrize("bits", [0, 256, 496, 510, 520, 1000, 2040, 16384 + 16])
def test_deal_refuses_bad_bits(bits: int) -> None:
    with pytest.raises(ValueError, match="bits"):
        deal(bits, 3, 5)


@pytest.mark.parametrize("bits", [512.0, "512", True, None])
def test_deal_refuses_non_int_bits(bits: Any) -> None:
    with pytest.raises(TypeError, match="bits"):
        deal(bits, 3, 5)


@pytest.mark.parametrize(
    ("threshold", "parties", "name"),
    [
        (0, 5, "threshold"),
        (-1, 5, "threshold"),
        (6, 5, "threshold"),
        (1, 1, "parties"),
        (1, 0, "parties"),
        (3, MAX_PARTIES + 1, "parties"),
    ],
)
def test_deal_refuses_bad_counts(threshold: int, parties: int, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        deal(512, threshold, parties)


@pytest.mark.parametrize(
    ("threshold", "parties", "name"),
    [
        (3.0, 5, "threshold"),
        ("3", 5, "threshold"),
        (True, 5, "threshold"),
        (None, 5, "threshold"),
        (3, 5.0, "parties"),
        (3, "5", "parties"),
    ],
)
def test_deal_refuses_non_int_counts(threshold: Any, parties: Any, name: str) -> None:
    with pytest.raises(TypeError, match=name):
        deal(512, threshold, parties)


def test_threshold_equal_to_parties_needs_every_share() -> None:
    key, shares = deal(512, 4, 4)
    plaintexts = [0, 5, int(key.public_key.n) - 1]
    ciphertexts = key.public_key.encrypt_vector(plaintexts)
    partials = [share.partial_decrypt(ciphertexts) for share in shares]
    assert all(verify(key, ciphertexts, p) for p in partials)
    assert combine(key, partials) == plaintexts
    assert combine(key, partials[::-1]) == plaintexts
    with pytest.raises(ValueError, match="threshold"):
        combine(key, partials[:3])


def test_threshold_one_lets_each_share_decrypt_alone() -> None:
    key, shares = deal(512, 1, 3)
    plaintexts = [0, 99, int(key.public_key.n) - 1]
    ciphertexts = key.public_key.encrypt_vector(plaintexts)
    for share in shares:
        partial = share.partial_decrypt(ciphertexts)
        assert verify(key, ciphertexts, partial)
        assert combine(key, [partial]) == plaintexts


def test_public_key_refuses_wrong_number_of_verification_keys(key: ThresholdPublicKey) -> None:
    with pytest.raises(ValueError, match="4 verification keys for 5 parties"):
        ThresholdPublicKey(key.public_key, 3, 5, key.verification_base, key.verification_keys[:4])


@pytest.mark.parametrize("position", [0, 1, 5])
@pytest.mark.parametrize("bad", ["zero", "one", "n", "nsquare"])
def test_public_key_refuses_verification_values_outside_z_star(
    key: ThresholdPublicKey, position: int, bad: str
) -> None:
    n = int(key.public_key.n)
    value = {"zero": 0, "one": 1, "n": n, "nsquare": n * n}[bad]
    values = [key.verification_base, *key.verification_keys]
    values[position] = value
    what = "verification base" if position == 0 else f"verification key {position}"
    with pytest.raises(ValueError, match=what):
        ThresholdPublicKey(key.public_key, 3, 5, values[0], values[1:])


# --- combination -----------------------------------------------------------------------


@pytest.mark.parametrize("subset", list(itertools.combinations(range(1, 6), 3)))
def test_every_threshold_subset_combines_to_the_plaintexts(
    key: ThresholdPublicKey, answered: _Answered, subset: tuple[int, ...]
) -> None:
    chosen = [answered.partials[i - 1] for i in subset]
    assert combine(key, chosen) == answered.plaintexts
    assert combine(key, chosen[::-1]) == answered.plaintexts


def test_combine_uses_the_first_threshold_partials(
    key: ThresholdPublicKey, answered: _Answered
) -> None:
    p = answered.partials
    junk = _with_values(p[3], [2] * len(answered.ciphertexts))  # member 4, wrong values
    assert combine(key, [p[0], p[1], p[4], junk]) == answered.plaintexts
    assert combine(key, [p[0], p[1], junk, p[4]]) != answered.plaintexts


def test_combine_decrypts_phe_ciphertexts(key: ThresholdPublicKey, shares: list[KeyShare]) -> None:
    n = int(key.public_key.n)
    phe_pk = paillier.PaillierPublicKey(n)
    encoded = [0, 1, 12345, 2**300, phe_pk.max_int]
    ciphertexts = [phe_pk.encrypt(x).ciphertext(be_secure=True) for x in encoded]
    ciphertexts += [phe_pk.raw_encrypt(n - 1), phe_pk.raw_encrypt(0)]
    ciphertexts.append(phe_pk.encrypt(-5).ciphertext(be_secure=True))
    partials = [shares[i].partial_decrypt(ciphertexts, context=b"phe") for i in (1, 2, 4)]
    assert all(verify(key, ciphertexts, p, context=b"phe") for p in partials)
    result = combine(key, partials)
    assert result == [*encoded, n - 1, 0, n - 5]
    # what phe would decode: its encoding of -5 is n - 5
    assert paillier.EncodedNumber(phe_pk, result[-1], 0).decode() == -5


@settings(max_examples=20, deadline=None)
@given(
    raw=st.lists(st.integers(min_value=0, max_value=2**512), min_size=1, max_size=5),
    order=st.permutations(range(1, 6)),
)
def test_combine_random_plaintexts_with_random_members(
    key: ThresholdPublicKey, shares: list[KeyShare], raw: list[int], order: list[int]
) -> None:
    n = int(key.public_key.n)
    plaintexts = [x % n for x in raw]
    ciphertexts = key.public_key.encrypt_vector(plaintexts)
    partials = [shares[i - 1].partial_decrypt(ciphertexts) for i in order[:3]]
    assert combine(key, partials) == plaintexts


# --- fewer than T shares ---------------------------------------------------------------


def test_two_shares_do_not_decrypt(key: ThresholdPublicKey, shares: list[KeyShare]) -> None:
    n = int(key.public_key.n)
    plaintexts = [secrets.randbelow(n) for _ in range(50)]
    ciphertexts = key.public_key.encrypt_vector(plaintexts)
    partials = [share.partial_decrypt(ciphertexts) for share in shares]
    assert combine(key, partials[:3]) == plaintexts  # the same partials do decrypt with T
    # The same n, v and v_i, but claiming that two shares suffice: Lagrange over 2 indices.
    claims_two = ThresholdPublicKey(
        key.public_key, 2, 5, key.verification_base, key.verification_keys
    )
    for pair in itertools.combinations(partials, 2):
        guesses = combine(claims_two, list(pair))
        assert len(guesses) == 50
        assert sum(g == x for g, x in zip(guesses, plaintexts, strict=True)) == 0


@pytest.mark.parametrize("count", [0, 1, 2])
def test_combine_refuses_fewer_than_threshold(
    key: ThresholdPublicKey, answered: _Answered, count: int
) -> None:
    with pytest.raises(ValueError, match="at least the threshold"):
        combine(key, answered.partials[:count])


def test_combine_refuses_duplicate_members(key: ThresholdPublicKey, answered: _Answered) -> None:
    p = answered.partials
    with pytest.raises(ValueError, match="distinct"):
        combine(key, [p[0], p[1], p[0]])
    relabelled = PartialDecryption(2, p[2].values, p[2].proof)  # member 3's values as 2's
    with pytest.raises(ValueError, match="distinct"):
        combine(key, [p[0], p[1], relabelled])


@pytest.mark.parametrize("index", [0, -1, 6, 64])
def test_combine_refuses_indices_outside_the_key(
    key: ThresholdPublicKey, answered: _Answered, index: int
) -> None:
    p = answered.partials
    stranger = PartialDecryption(index, p[2].values, p[2].proof)
    with pytest.raises(ValueError, match=r"1\.\.5"):
        combine(key, [p[0], p[1], stranger])


def test_combine_refuses_partials_of_different_lengths(
    key: ThresholdPublicKey, answered: _Answered
) -> None:
    p = answered.partials
    short = _with_values(p[2], list(p[2].values[:-1]))
    with pytest.raises(ValueError, match="differ in length"):
        combine(key, [p[0], p[1], short])


# --- verify ----------------------------------------------------------------------------


def test_verify_accepts_honest_partials(key: ThresholdPublicKey, answered: _Answered) -> None:
    for partial in answered.partials:
        assert verify(key, answered.ciphertexts, partial, context=CONTEXT)


def test_partials_are_deterministic_and_proofs_randomized(
    key: ThresholdPublicKey, shares: list[KeyShare], answered: _Answered
) -> None:
    again = shares[1].partial_decrypt(answered.ciphertexts, context=CONTEXT)
    first = answered.partials[1]
    assert again.values == first.values
    assert again.proof != first.proof
    assert verify(key, answered.ciphertexts, again, context=CONTEXT)


def test_partial_decryption_of_nothing_is_empty(
    key: ThresholdPublicKey, shares: list[KeyShare]
) -> None:
    partials = [share.partial_decrypt([]) for share in shares[:3]]
    assert all(p.values == () and verify(key, [], p) for p in partials)
    assert combine(key, partials) == []


Tamper = Callable[
    [ThresholdPublicKey, list[KeyShare], _Answered], tuple[list[Any], PartialDecryption, bytes]
]


def _set_value(position: int, value: Callable[[ThresholdPublicKey, Any], Any]) -> Tamper:
    def tamper(
        key: ThresholdPublicKey, shares: list[KeyShare], a: _Answered
    ) -> tuple[list[Any], PartialDecryption, bytes]:
        values = list(a.partials[1].values)
        values[position] = value(key, values[position])
        return a.ciphertexts, _with_values(a.partials[1], values), CONTEXT

    return tamper


def _swap_values(key: ThresholdPublicKey, shares: list[KeyShare], a: _Answered) -> Any:
    values = list(a.partials[1].values)
    values[0], values[5] = values[5], values[0]
    return a.ciphertexts, _with_values(a.partials[1], values), CONTEXT


def _swap_ciphertexts(key: ThresholdPublicKey, shares: list[KeyShare], a: _Answered) -> Any:
    ciphertexts = list(a.ciphertexts)
    ciphertexts[1], ciphertexts[2] = ciphertexts[2], ciphertexts[1]
    return ciphertexts, a.partials[1], CONTEXT


def _relabel(key: ThresholdPublicKey, shares: list[KeyShare], a: _Answered) -> Any:
    p = a.partials[1]
    return a.ciphertexts, PartialDecryption(3, p.values, p.proof), CONTEXT


def _other_members_proof(key: ThresholdPublicKey, shares: list[KeyShare], a: _Answered) -> Any:
    return a.ciphertexts, PartialDecryption(2, a.partials[1].values, a.partials[2].proof), CONTEXT


def _context(context: bytes) -> Tamper:
    def tamper(key: ThresholdPublicKey, shares: list[KeyShare], a: _Answered) -> Any:
        return a.ciphertexts, a.partials[1], context

    return tamper


def _reencrypted(key: ThresholdPublicKey, shares: list[KeyShare], a: _Answered) -> Any:
    ciphertexts = list(a.ciphertexts)
    ciphertexts[0] = int(key.public_key.encrypt_vector([a.plaintexts[0]])[0])  # same plaintext
    return ciphertexts, a.partials[1], CONTEXT


def _answer_to_other_request(key: ThresholdPublicKey, shares: list[KeyShare], a: _Answered) -> Any:
    other = [int(c) for c in key.public_key.encrypt_vector(a.plaintexts)]
    return a.ciphertexts, shares[1].partial_decrypt(other, context=CONTEXT), CONTEXT


def _proof(change: Callable[[EqualityProof], EqualityProof]) -> Tamper:
    def tamper(key: ThresholdPublicKey, shares: list[KeyShare], a: _Answered) -> Any:
        p = a.partials[1]
        return a.ciphertexts, PartialDecryption(2, p.values, change(p.proof)), CONTEXT

    return tamper


def _flip(challenge: bytes, position: int) -> bytes:
    flipped = bytearray(challenge)
    flipped[position] ^= 0x01
    return bytes(flipped)


def _values(change: Callable[[tuple[Any, ...]], tuple[Any, ...]]) -> Tamper:
    def tamper(key: ThresholdPublicKey, shares: list[KeyShare], a: _Answered) -> Any:
        p = a.partials[1]
        return a.ciphertexts, _with_values(p, list(change(p.values))), CONTEXT

    return tamper


def _drop_ciphertext(key: ThresholdPublicKey, shares: list[KeyShare], a: _Answered) -> Any:
    return a.ciphertexts[:-1], a.partials[1], CONTEXT


def _index(index: Any) -> Tamper:
    def tamper(key: ThresholdPublicKey, shares: list[KeyShare], a: _Answered) -> Any:
        p = a.partials[1]
        return a.ciphertexts, PartialDecryption(index, p.values, p.proof), CONTEXT

    return tamper


_TAMPERS: dict[str, Tamper] = {
    "value_times_random_unit": _set_value(
        3, lambda k, v: v * _random_unit(k) % k.public_key.nsquare
    ),
    "value_times_square": _set_value(3, lambda k, v: v * 4 % k.public_key.nsquare),
    "value_times_1_plus_n": _set_value(
        0, lambda k, v: v * (1 + k.public_key.n) % k.public_key.nsquare
    ),
    "value_negated_original_proof": _set_value(2, lambda k, v: k.public_key.nsquare - v),
    "value_one": _set_value(4, lambda k, v: 1),
    "value_zero": _set_value(4, lambda k, v: 0),
    "value_n": _set_value(4, lambda k, v: k.public_key.n),
    "value_3n": _set_value(4, lambda k, v: 3 * k.public_key.n),
    "value_n_squared": _set_value(4, lambda k, v: k.public_key.nsquare),
    "value_n_squared_plus_own": _set_value(4, lambda k, v: k.public_key.nsquare + v),
    "value_negative": _set_value(4, lambda k, v: -v),
    "value_not_an_integer": _set_value(4, lambda k, v: float(v % 1000)),
    "values_swapped": _swap_values,
    "ciphertexts_swapped": _swap_ciphertexts,
    "member_2_relabelled_as_3": _relabel,
    "proof_of_member_3": _other_members_proof,
    "other_context": _context(b"federation f, round 8, items 0..7"),
    "empty_context": _context(b""),
    "reencrypted_ciphertext": _reencrypted,
    "answer_to_other_request": _answer_to_other_request,
    "response_plus_one": _proof(lambda p: EqualityProof(p.challenge, p.response + 1)),
    "response_minus_one": _proof(lambda p: EqualityProof(p.challenge, p.response - 1)),
    "response_zero": _proof(lambda p: EqualityProof(p.challenge, 0)),
    "challenge_first_bit_flipped": _proof(
        lambda p: EqualityProof(_flip(p.challenge, 0), p.response)
    ),
    "challenge_last_bit_flipped": _proof(
        lambda p: EqualityProof(_flip(p.challenge, 31), p.response)
    ),
    "one_value_missing": _values(lambda v: v[:-1]),
    "one_value_extra": _values(lambda v: (*v, v[0])),
    "no_values": _values(lambda v: ()),
    "one_ciphertext_missing": _drop_ciphertext,
    "index_zero": _index(0),
    "index_six": _index(6),
    "index_negative": _index(-2),
}


@pytest.mark.parametrize("name", list(_TAMPERS))
def test_verify_refuses_tampered_answers(
    key: ThresholdPublicKey, shares: list[KeyShare], answered: _Answered, name: str
) -> None:
    honest = answered.partials[1]
    assert verify(key, answered.ciphertexts, honest, context=CONTEXT)
    ciphertexts, partial, context = _TAMPERS[name](key, shares, answered)
    changed = (list(ciphertexts), partial.index, partial.values, partial.proof, context)
    assert changed != (answered.ciphertexts, 2, honest.values, honest.proof, CONTEXT)
    assert verify(key, ciphertexts, partial, context=context) is False


def test_sign_flip_passes_the_proof_but_combine_squares_it_away(
    key: ThresholdPublicKey, shares: list[KeyShare], answered: _Answered
) -> None:
    # Documented property: an order-2 error (d -> n² - d), re-proved with the honest
    # witness, verifies; the combination raises each partial to an even power.
    nsquare = key.public_key.nsquare
    honest = answered.partials[0]
    for flip in ([1], [0, 3, 7], list(range(len(honest.values)))):
        values = list(honest.values)
        for j in flip:
            values[j] = nsquare - values[j]
        assert values != list(honest.values)
        big_c, big_d = batch_bases(key, 1, CONTEXT, answered.ciphertexts, values)
        proof = prove(key, 1, key.delta * shares[0].secret, big_c, big_d)
        flipped = PartialDecryption(1, tuple(values), proof)
        assert verify(key, answered.ciphertexts, flipped, context=CONTEXT)
        p = answered.partials
        assert combine(key, [flipped, p[1], p[2]]) == answered.plaintexts
        assert combine(key, [p[3], flipped, p[4]]) == answered.plaintexts


# --- lying members ---------------------------------------------------------------------


def test_consistent_lie_with_a_wrong_share_fails_verify(
    key: ThresholdPublicKey, shares: list[KeyShare], answered: _Answered
) -> None:
    wrong_share = shares[1].secret + 1 + secrets.randbelow(1 << 64)
    lie = _lie(key, 2, wrong_share, answered.ciphertexts)
    honest = answered.partials[1]
    assert all(a != b for a, b in zip(lie.values, honest.values, strict=True))
    assert verify(key, answered.ciphertexts, lie, context=CONTEXT) is False
    # Combined unverified, the lie silently gives wrong plaintexts: why verify matters.
    p = answered.partials
    for chosen in ([p[0], lie, p[2]], [lie, p[3], p[4]]):
        result = combine(key, chosen)
        assert all(r != x for r, x in zip(result, answered.plaintexts, strict=True))


def test_member_answering_with_another_members_share_fails_verify(
    key: ThresholdPublicKey, shares: list[KeyShare], answered: _Answered
) -> None:
    lie = _lie(key, 2, shares[2].secret, answered.ciphertexts)  # share 3, claiming index 2
    assert lie.values == answered.partials[2].values
    assert verify(key, answered.ciphertexts, lie, context=CONTEXT) is False
    result = combine(key, [answered.partials[0], lie, answered.partials[4]])
    assert all(r != x for r, x in zip(result, answered.plaintexts, strict=True))


def test_honest_values_with_a_proof_for_a_wrong_witness_fail_verify(
    key: ThresholdPublicKey, shares: list[KeyShare], answered: _Answered
) -> None:
    honest = answered.partials[1]
    big_c, big_d = batch_bases(key, 2, CONTEXT, answered.ciphertexts, honest.values)
    proof = prove(key, 2, key.delta * (shares[1].secret + 1), big_c, big_d)
    partial = PartialDecryption(2, honest.values, proof)
    assert verify(key, answered.ciphertexts, partial, context=CONTEXT) is False


# --- partial_decrypt -------------------------------------------------------------------


@pytest.mark.parametrize("workers", [2, 3, 4])
def test_partial_decrypt_workers_give_the_same_partials(
    key: ThresholdPublicKey, shares: list[KeyShare], answered: _Answered, workers: int
) -> None:
    ciphertexts = answered.ciphertexts + answered.ciphertexts[:3]  # 11: uneven ranges
    serial = shares[3].partial_decrypt(ciphertexts, context=CONTEXT, workers=1)
    threaded = shares[3].partial_decrypt(ciphertexts, context=CONTEXT, workers=workers)
    assert threaded.values == serial.values
    assert threaded.values[:8] == answered.partials[3].values
    assert verify(key, ciphertexts, threaded, context=CONTEXT)
    assert verify(key, ciphertexts, serial, context=CONTEXT)


@pytest.mark.parametrize("bad", ["zero", "n", "2n", "nsquare", "nsquare_plus_one", "negative"])
def test_partial_decrypt_refuses_values_outside_z_star_n_squared(
    key: ThresholdPublicKey, shares: list[KeyShare], answered: _Answered, bad: str
) -> None:
    n = int(key.public_key.n)
    value = {
        "zero": 0,
        "n": n,
        "2n": 2 * n,
        "nsquare": n * n,
        "nsquare_plus_one": n * n + 1,
        "negative": -answered.ciphertexts[0],
    }[bad]
    ciphertexts = [answered.ciphertexts[0], value, answered.ciphertexts[1]]
    with pytest.raises(InvalidCiphertextError) as info:
        shares[0].partial_decrypt(ciphertexts)
    assert info.value.index == 1


# --- the batched proof -----------------------------------------------------------------


@pytest.mark.parametrize("count", [0, 1, 2, 3, 17, 100, 600])
def test_multi_exponent_is_the_product_of_powers(key: ThresholdPublicKey, count: int) -> None:
    nsquare = key.public_key.nsquare
    bases = [_random_unit(key) for _ in range(count)]
    stream = secrets.token_bytes(16 * count)
    expected = gmpy2.mpz(1)
    for j, base in enumerate(bases):
        rho = int.from_bytes(stream[16 * j : 16 * (j + 1)], "big") | 1
        expected = expected * gmpy2.powmod(base, rho, nsquare) % nsquare
    assert threshold_proof._multi_exponent(bases, stream, nsquare) == expected


def test_batch_bases_depend_on_every_input(key: ThresholdPublicKey, answered: _Answered) -> None:
    cts, values = answered.ciphertexts, list(answered.partials[1].values)
    reference = batch_bases(key, 2, CONTEXT, cts, values)
    assert batch_bases(key, 2, CONTEXT, cts, values) == reference
    assert batch_bases(key, 3, CONTEXT, cts, values) != reference
    assert batch_bases(key, 2, CONTEXT + b"!", cts, values) != reference
    assert batch_bases(key, 2, CONTEXT, cts[::-1], values[::-1]) != reference
    assert batch_bases(key, 2, CONTEXT, cts, [values[1], values[0], *values[2:]]) != reference


@settings(max_examples=50, deadline=None)
@given(
    challenge=st.binary(min_size=32, max_size=32),
    response=st.integers(min_value=0, max_value=(1 << (8 * 2048)) - 1),
)
def test_proof_bytes_round_trip(challenge: bytes, response: int) -> None:
    proof = EqualityProof(challenge, response)
    data = proof.to_bytes()
    assert data[:32] == challenge
    assert EqualityProof.from_bytes(data) == proof


def test_real_proof_bytes_round_trip(answered: _Answered) -> None:
    proof = answered.partials[0].proof
    assert EqualityProof.from_bytes(proof.to_bytes()) == proof


@pytest.mark.parametrize("length", [0, 31, 32, MAX_PROOF_LEN + 1, 10_000])
def test_proof_from_bytes_refuses_impossible_lengths(length: int) -> None:
    with pytest.raises(ValueError, match=rf"33\.\.{MAX_PROOF_LEN} bytes"):
        EqualityProof.from_bytes(b"\x01" * length)


@pytest.mark.parametrize("length", [33, MAX_PROOF_LEN])
def test_proof_from_bytes_accepts_the_limits(length: int) -> None:
    proof = EqualityProof.from_bytes(b"\x01" * length)
    assert proof.challenge == b"\x01" * 32
    assert proof.response == int.from_bytes(b"\x01" * (length - 32), "big")


@pytest.mark.parametrize("challenge", [b"", b"\x00" * 31, b"\x00" * 33, b"\x00" * 64])
def test_proof_refuses_wrong_challenge_length(challenge: bytes) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        EqualityProof(challenge, 1)


@pytest.mark.parametrize("response", [-1, -(1 << 600), 1.5, "7"])
def test_proof_refuses_bad_response(response: Any) -> None:
    with pytest.raises(ValueError, match="non-negative integer"):
        EqualityProof(b"\x00" * 32, response)


@pytest.mark.parametrize("bits", [8192, 16384])
def test_proof_size_of_the_largest_keys_round_trips(bits: int) -> None:
    # prove() draws r with |n²| + |Δ| + 256 + 128 bits; z = r + e·Δ·s_i is about that
    # long (for N = 64 parties |Δ| = 296 bits); the wire limit must hold it too
    r_bits = 2 * bits + math.factorial(64).bit_length() + 256 + 128 + 1
    proof = EqualityProof(b"\x00" * 32, (1 << (r_bits - 1)) | 1)
    assert EqualityProof.from_bytes(proof.to_bytes()) == proof
    assert len(proof.to_bytes()) <= MAX_PROOF_LEN


# --- the public key file ---------------------------------------------------------------


def test_public_key_bytes_round_trip(key: ThresholdPublicKey) -> None:
    data = key.to_bytes()
    again = ThresholdPublicKey.from_bytes(data)
    assert again == key
    assert again.to_bytes() == data
    assert again.sha256() == key.sha256()
    assert (again.threshold, again.parties) == (3, 5)
    assert again.verification_base == key.verification_base
    assert again.verification_keys == key.verification_keys
    assert again.public_key == key.public_key
    document = json.loads(data)
    assert document["sha256"] == key.sha256()
    assert key.fingerprint() == key.sha256()[:16]
    assert key.fingerprint() in repr(key)


def test_public_key_save_load_round_trip(tmp_path: Path, key: ThresholdPublicKey) -> None:
    path = tmp_path / "threshold.pub"
    key.save(path)
    assert ThresholdPublicKey.load(path) == key
    assert path.read_bytes() == key.to_bytes()


def _edit(field: str, value: Callable[[dict[str, Any]], Any]) -> Callable[[dict[str, Any]], None]:
    def edit(document: dict[str, Any]) -> None:
        document[field] = value(document)

    return edit


def _edit_vk(position: int, value: Callable[[int, int], Any]) -> Callable[[dict[str, Any]], None]:
    def edit(document: dict[str, Any]) -> None:
        n = int(document["n"])
        old = int(document["verification_keys"][position])
        document["verification_keys"][position] = value(old, n)

    return edit


def _copy_vk(source: int, target: int) -> Callable[[dict[str, Any]], None]:
    def edit(document: dict[str, Any]) -> None:
        document["verification_keys"][target] = document["verification_keys"][source]

    return edit


_DOCUMENT_EDITS: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "sha256_zeros": (_edit("sha256", lambda d: "0" * 64), "sha256"),
    "sha256_missing": (_edit("sha256", lambda d: None), "sha256"),
    "vk_times_four": (_edit_vk(1, lambda v, n: str(v * 4 % (n * n))), "sha256"),
    "vk_of_member_1_as_2": (_copy_vk(0, 1), "sha256"),
    "vk_zero": (_edit_vk(1, lambda v, n: "0"), "verification key 2"),
    "vk_n": (_edit_vk(4, lambda v, n: str(n)), "verification key 5"),
    "vk_number": (_edit_vk(0, lambda v, n: v), "decimal string"),
    "base_one": (_edit("verification_base", lambda d: "1"), "verification base"),
    "threshold_two": (_edit("threshold", lambda d: 2), "sha256"),
    "threshold_six": (_edit("threshold", lambda d: 6), "threshold"),
    "threshold_string": (_edit("threshold", lambda d: "3"), "threshold"),
    "parties_four": (_edit("parties", lambda d: 4), "5 verification keys for 4 parties"),
    "vks_not_a_list": (_edit("verification_keys", lambda d: "1,2"), "verification_keys"),
    "too_many_vks": (_edit("verification_keys", lambda d: ["4"] * 65), "verification_keys"),
    "type": (_edit("type", lambda d: "fedcore-paillier-public-key"), "type"),
    "version": (_edit("version", lambda d: 2), "version"),
}


@pytest.mark.parametrize("name", list(_DOCUMENT_EDITS))
def test_public_key_edited_document_is_refused(
    tmp_path: Path, key: ThresholdPublicKey, name: str
) -> None:
    edit, problem = _DOCUMENT_EDITS[name]
    document = json.loads(key.to_bytes())
    edit(document)
    assert document != json.loads(key.to_bytes())
    data = json.dumps(document).encode()
    with pytest.raises(ValueError, match=problem):
        ThresholdPublicKey.from_bytes(data)
    path = tmp_path / "threshold.pub"
    path.write_bytes(data)
    with pytest.raises(KeyFileError, match=problem) as info:
        ThresholdPublicKey.load(path)
    assert "malformed" in str(info.value)


@pytest.mark.parametrize(
    "data", [b"", b"not json", b"[]", b"{}", b'{"type":"fedcore-threshold-public-key"}']
)
def test_public_key_from_bytes_refuses_garbage(data: bytes) -> None:
    with pytest.raises(ValueError):
        ThresholdPublicKey.from_bytes(data)


def test_public_key_from_bytes_refuses_oversized_documents(key: ThresholdPublicKey) -> None:
    data = key.to_bytes()
    with pytest.raises(ValueError, match="limit"):
        ThresholdPublicKey.from_bytes(data + b" " * (1 << 20))


def test_missing_files_raise_key_file_error(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError):
        ThresholdPublicKey.load(tmp_path / "nope.pub")
    with pytest.raises(KeyFileError):
        KeyShare.load(tmp_path / "nope.share")


def test_equality_with_foreign_types(key: ThresholdPublicKey, shares: list[KeyShare]) -> None:
    assert key.__eq__(object()) is NotImplemented
    assert key.__eq__(key.public_key) is NotImplemented
    assert shares[0].__eq__("share") is NotImplemented
    assert shares[0] != shares[1]
    assert hash(ThresholdPublicKey.from_bytes(key.to_bytes())) == hash(key)


# --- share files -----------------------------------------------------------------------


def test_share_save_is_0600_and_loads_back(tmp_path: Path, shares: list[KeyShare]) -> None:
    path = tmp_path / "member3.share"
    path.write_text("old")
    path.chmod(0o644)
    shares[2].save(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["member3.share"]  # no temp file left
    loaded = KeyShare.load(path)
    assert loaded == shares[2]
    assert loaded.index == 3
    assert loaded.public_key == shares[2].public_key


def test_loaded_share_gives_the_same_partials(
    tmp_path: Path, shares: list[KeyShare], answered: _Answered
) -> None:
    path = tmp_path / "member5.share"
    shares[4].save(path)
    loaded = KeyShare.load(path)
    again = loaded.partial_decrypt(answered.ciphertexts, context=CONTEXT)
    assert again.values == answered.partials[4].values


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o610])
def test_share_load_refuses_group_or_world_access(
    tmp_path: Path, shares: list[KeyShare], mode: int
) -> None:
    path = tmp_path / "member1.share"
    shares[0].save(path)
    path.chmod(mode)
    with pytest.raises(KeyFileError, match="chmod 600"):
        KeyShare.load(path)


def test_share_bytes_round_trip(shares: list[KeyShare]) -> None:
    data = shares[1].to_bytes()
    again = KeyShare.from_bytes(data)
    assert again == shares[1]
    assert again.to_bytes() == data
    assert str(shares[1].secret) not in repr(shares[1])


def test_share_of_another_key_is_refused(
    tmp_path: Path, key: ThresholdPublicKey, shares: list[KeyShare]
) -> None:
    other, other_shares = deal(512, 3, 5)
    with pytest.raises(ValueError, match="verification key 1"):
        KeyShare(other, 1, shares[0].secret)
    # a share file whose public key was swapped for another key's
    document = json.loads(shares[0].to_bytes())
    document["public_key"] = other.to_document()
    data = json.dumps(document).encode()
    with pytest.raises(ValueError, match="another key"):
        KeyShare.from_bytes(data)
    path = tmp_path / "member1.share"
    path.write_bytes(data)
    path.chmod(0o600)
    with pytest.raises(KeyFileError, match="malformed"):
        KeyShare.load(path)
    assert KeyShare(other, 1, other_shares[0].secret) == other_shares[0]


@pytest.mark.parametrize("index", [2, 3, 5])
def test_share_under_the_wrong_index_is_refused(
    key: ThresholdPublicKey, shares: list[KeyShare], index: int
) -> None:
    with pytest.raises(ValueError, match=f"share {index} does not match"):
        KeyShare(key, index, shares[0].secret)


@pytest.mark.parametrize("index", [0, -1, 6, 65])
def test_share_index_outside_the_key_is_refused(
    key: ThresholdPublicKey, shares: list[KeyShare], index: int
) -> None:
    with pytest.raises(ValueError, match=r"index must be in 1\.\.5"):
        KeyShare(key, index, shares[0].secret)


@pytest.mark.parametrize("index", ["1", 1.0, True, None])
def test_share_index_must_be_an_int(
    key: ThresholdPublicKey, shares: list[KeyShare], index: Any
) -> None:
    with pytest.raises(TypeError, match="index"):
        KeyShare(key, index, shares[0].secret)


@pytest.mark.parametrize("secret", [0, -1])
def test_share_must_be_positive(key: ThresholdPublicKey, secret: int) -> None:
    with pytest.raises(ValueError, match="positive"):
        KeyShare(key, 1, secret)


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("index", "1", "index"),
        ("index", None, "index"),
        ("share", 12, "share"),
        ("share", "-12", "share"),
        ("type", "fedcore-threshold-public-key", "type"),
    ],
)
def test_share_document_with_bad_fields_is_refused(
    shares: list[KeyShare], field: str, value: Any, problem: str
) -> None:
    document = json.loads(shares[0].to_bytes())
    document[field] = value
    with pytest.raises(ValueError, match=problem):
        KeyShare.from_bytes(json.dumps(document).encode())


# --- known-answer vectors (tests/vectors/threshold_512.json) ---------------------------


@pytest.fixture(scope="module")
def vector_key() -> ThresholdPublicKey:
    return ThresholdPublicKey.from_bytes(_VECTORS["public_key_bytes"].encode())


def _vector_ciphertexts() -> list[int]:
    return [int(row["ciphertext"]) for row in _VECTORS["ciphertexts"]]


def _vector_partial(entry: dict[str, Any]) -> PartialDecryption:
    return PartialDecryption(
        entry["index"],
        tuple(int(v) for v in entry["values"]),
        EqualityProof.from_bytes(bytes.fromhex(entry["proof_hex"])),
    )


def _honest_vector_partials() -> dict[int, PartialDecryption]:
    context = _VECTORS["context_hex"]
    return {
        e["index"]: _vector_partial(e)
        for e in _VECTORS["proofs"]
        if e["name"] == "honest" and e["context_hex"] == context
    }


def test_vector_key(vector_key: ThresholdPublicKey) -> None:
    assert vector_key == ThresholdPublicKey.from_document(_VECTORS["public_key"])
    assert vector_key.sha256() == _VECTORS["sha256"]
    assert vector_key.to_bytes().decode() == _VECTORS["public_key_bytes"]
    assert (vector_key.threshold, vector_key.parties, vector_key.public_key.bits) == (3, 5, 512)


@pytest.mark.parametrize(
    "row", [r for r in _VECTORS["ciphertexts"] if "r" in r], ids=lambda r: r["plaintext"][:12]
)
def test_vector_ciphertext_is_the_phe_encryption(
    vector_key: ThresholdPublicKey, row: dict[str, str]
) -> None:
    n, nsquare = int(vector_key.public_key.n), int(vector_key.public_key.nsquare)
    m, r = int(row["plaintext"]), int(row["r"])
    assert int(row["ciphertext"]) == (1 + m * n) * pow(r, n, nsquare) % nsquare


@pytest.mark.parametrize("entry", _VECTORS["shares"], ids=lambda e: f"member{e['index']}")
def test_vector_share_reproduces_its_partials(
    vector_key: ThresholdPublicKey, entry: dict[str, Any]
) -> None:
    share = KeyShare(vector_key, entry["index"], int(entry["share"]))
    context = bytes.fromhex(_VECTORS["context_hex"])
    ciphertexts = _vector_ciphertexts()
    partial = share.partial_decrypt(ciphertexts, context=context)
    (stored,) = [p for p in _VECTORS["partials"] if p["index"] == entry["index"]]
    assert [str(v) for v in partial.values] == stored["values"]
    assert verify(vector_key, ciphertexts, partial, context=context)


@pytest.mark.parametrize(
    "combination", _VECTORS["combinations"], ids=lambda c: "-".join(map(str, c["indices"]))
)
def test_vector_subset_combines_to_the_plaintexts(
    vector_key: ThresholdPublicKey, combination: dict[str, Any]
) -> None:
    partials = _honest_vector_partials()
    result = combine(vector_key, [partials[i] for i in combination["indices"]])
    assert [str(x) for x in result] == combination["plaintexts"]
    assert result == [int(row["plaintext"]) for row in _VECTORS["ciphertexts"]]


@pytest.mark.parametrize(
    "entry", _VECTORS["proofs"], ids=lambda e: f"{e['name']}-member{e['index']}"
)
def test_vector_proof_verifies(vector_key: ThresholdPublicKey, entry: dict[str, Any]) -> None:
    partial = _vector_partial(entry)
    (stored,) = [p for p in _VECTORS["partials"] if p["index"] == entry["index"]]
    assert entry["values"] == stored["values"]  # partials do not depend on the context
    assert partial.proof.to_bytes().hex() == entry["proof_hex"]
    context = bytes.fromhex(entry["context_hex"])
    assert verify(vector_key, _vector_ciphertexts(), partial, context=context)


def test_vector_sign_flip_verifies_and_combines(vector_key: ThresholdPublicKey) -> None:
    entry = _VECTORS["sign_flip"]
    flipped = _vector_partial(entry)
    honest = _honest_vector_partials()
    assert flipped.values != honest[entry["index"]].values
    ciphertexts = _vector_ciphertexts()
    assert verify(vector_key, ciphertexts, flipped, context=bytes.fromhex(entry["context_hex"]))
    expected = [int(row["plaintext"]) for row in _VECTORS["ciphertexts"]]
    assert combine(vector_key, [flipped, honest[2], honest[3]]) == expected


@pytest.mark.parametrize("entry", _VECTORS["invalid"], ids=lambda e: e["name"])
def test_vector_invalid_answer_fails_verify(
    vector_key: ThresholdPublicKey, entry: dict[str, Any]
) -> None:
    partial = _vector_partial(entry)
    if "ciphertexts" in entry:
        ciphertexts = [int(c) for c in entry["ciphertexts"]]
    else:
        ciphertexts = _vector_ciphertexts()
    context = bytes.fromhex(entry["context_hex"])
    honest = _honest_vector_partials()[2]  # every invalid entry is one change from member 2's
    assert verify(
        vector_key, _vector_ciphertexts(), honest, context=bytes.fromhex(_VECTORS["context_hex"])
    )
    changed = (ciphertexts, partial.index, partial.values, partial.proof, context)
    assert changed != (
        _vector_ciphertexts(),
        2,
        honest.values,
        honest.proof,
        bytes.fromhex(_VECTORS["context_hex"]),
    )
    assert verify(vector_key, ciphertexts, partial, context=context) is False
