"""A key holder proves its key and its decryptions: honest answers pass, every lie fails.

Real Paillier (the 512-bit test-vector key); each check is also computed the slow way
(re-encrypting one ciphertext at a time) to show the batched check agrees with it.
"""

from __future__ import annotations

import random
import secrets

import gmpy2
import pytest

from fedcore.crypto import PrivateKey, PublicKey
from fedcore.crypto.decrypt_proof import (
    check_decryptions,
    key_challenge_value,
    multi_powmod,
    verify_key_proof,
)


def _encrypt(public_key: PublicKey, m: int, r: int) -> int:
    n, nsquare = public_key.n, public_key.nsquare
    return int((1 + m * n) * gmpy2.powmod(r, n, nsquare) % nsquare)


@pytest.fixture(scope="module")
def shard(public_key: PublicKey) -> list[int]:
    rng = random.Random(7)
    n = int(public_key.n)
    return [_encrypt(public_key, rng.randrange(n), rng.randrange(1, n)) for _ in range(40)]


def test_opening_gives_the_plaintexts_and_randomness_that_re_encrypt_each_ciphertext(
    private_key: PrivateKey, public_key: PublicKey, shard: list[int]
) -> None:
    plaintexts, randomness = private_key.open_vector(shard)
    assert plaintexts == private_key.decrypt_vector(shard)
    # the reference: Paillier encryption, one ciphertext at a time
    assert [_encrypt(public_key, m, r) for m, r in zip(plaintexts, randomness, strict=True)] == [
        int(c) for c in shard
    ]
    assert check_decryptions(public_key, shard, plaintexts, randomness)


def test_opening_in_two_processes_equals_opening_in_one(
    private_key: PrivateKey, shard: list[int]
) -> None:
    assert private_key.open_vector(shard * 2, workers=2) == private_key.open_vector(shard * 2)


def _lies(n: int, true: list[int]) -> dict[str, list[int]]:
    rng = random.Random(11)
    return {
        "zeros": [0] * len(true),
        "negated": [(n - m) % n for m in true],
        "random": [rng.randrange(n) for _ in true],
        "one value off by one": [true[0] + 1, *true[1:]],
        "two values swapped": [true[1], true[0], *true[2:]],
        # keeps the shard's plain sum: a naive "sum of plaintexts" check would pass it
        "+1/-1 on two values": [true[0] + 1, true[1] - 1, *true[2:]],
    }


@pytest.mark.parametrize(
    "lie",
    [
        "zeros",
        "negated",
        "random",
        "one value off by one",
        "two values swapped",
        "+1/-1 on two values",
    ],
)
def test_a_lying_key_holder_is_caught_even_with_the_true_randomness(
    private_key: PrivateKey, public_key: PublicKey, shard: list[int], lie: str
) -> None:
    true, randomness = private_key.open_vector(shard)
    lied = _lies(int(public_key.n), true)[lie]
    assert lied != true
    assert not check_decryptions(public_key, shard, lied, randomness)
    # nor with the randomness re-derived for the lie from the ciphertexts' n-th roots:
    # that randomness belongs to the ciphertexts, so it cannot also fit other plaintexts
    assert not check_decryptions(public_key, shard, lied, randomness[::-1])


def test_a_liar_who_adjusts_the_randomness_to_a_known_combination_is_caught(
    private_key: PrivateKey, public_key: PublicKey, shard: list[int]
) -> None:
    """The attack the secret coefficients stop, measured over 200 fresh checks.

    With every coefficient 1 (a predictable combination), shifting one plaintext up and
    another down by the same amount passes: the product of the ciphertexts does not
    change. With secret random 64-bit coefficients the same lie never passes.
    """
    true, randomness = private_key.open_vector(shard)
    lied = [true[0] + 5, true[1] - 5, *true[2:]]
    assert check_decryptions(public_key, shard, lied, randomness, coefficient=lambda bits: 1)
    passed = sum(check_decryptions(public_key, shard, lied, randomness) for _ in range(200))
    assert passed == 0


def test_answers_of_the_wrong_shape_or_range_are_refused(
    private_key: PrivateKey, public_key: PublicKey, shard: list[int]
) -> None:
    true, randomness = private_key.open_vector(shard)
    n = int(public_key.n)
    assert not check_decryptions(public_key, shard, true[:-1], randomness)
    assert not check_decryptions(public_key, shard, true, randomness[:-1])
    assert not check_decryptions(public_key, shard, [true[0] + n, *true[1:]], randomness)
    assert not check_decryptions(public_key, shard, true, [0, *randomness[1:]])
    assert not check_decryptions(public_key, shard, true, [n, *randomness[1:]])
    assert check_decryptions(public_key, [], [], [])


@pytest.mark.parametrize("count", [1, 2, 3, 17, 300])
def test_multi_powmod_equals_the_product_of_single_exponentiations(count: int) -> None:
    rng = random.Random(count)
    modulus = gmpy2.next_prime(1 << 300) * gmpy2.next_prime(1 << 280)
    bases = [rng.randrange(1, int(modulus)) for _ in range(count)]
    exponents = [rng.getrandbits(64) for _ in range(count)]
    expected = 1
    for base, exponent in zip(bases, exponents, strict=True):
        expected = expected * pow(base, exponent, int(modulus)) % int(modulus)
    assert multi_powmod(bases, exponents, modulus, 64) == expected
    with pytest.raises(ValueError, match="bases"):
        multi_powmod(bases, exponents[:-1], modulus, 64)


def test_only_the_key_holder_proves_the_key(private_key: PrivateKey, public_key: PublicKey) -> None:
    context = b"federation|client-3|" + secrets.token_bytes(32)
    proof = private_key.prove_key(context)
    assert verify_key_proof(public_key, context, proof)
    # bound to its context: worthless on another connection
    assert not verify_key_proof(public_key, context + b"x", proof)
    # what someone without the factors can send instead
    width = public_key.plaintext_bytes
    x = int(key_challenge_value(public_key, context))
    for forged in (
        x.to_bytes(width, "big"),  # the challenge itself
        secrets.token_bytes(width),  # a guess
        bytes(width),  # zero
        proof[:-1],  # a truncated proof
        int(public_key.n).to_bytes(width, "big"),  # n, outside Z*_n
    ):
        assert not verify_key_proof(public_key, context, forged)


def test_the_challenge_value_is_a_hash_the_verifier_cannot_steer(public_key: PublicKey) -> None:
    """It depends on the whole context, and lies in Z*_n, whatever the nonce."""
    values = {int(key_challenge_value(public_key, bytes([i]) * 32)) for i in range(64)}
    assert len(values) == 64
    n = int(public_key.n)
    assert all(1 < v < n and gmpy2.gcd(v, n) == 1 for v in values)
