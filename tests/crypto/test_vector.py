"""Homomorphic folding and ciphertext validation (fedcore.crypto.vector)."""

from __future__ import annotations

import secrets

import gmpy2
import pytest

from fedcore.crypto import PrivateKey, PublicKey, fold_update, validate_ciphertexts
from fedcore.errors import InvalidCiphertextError


def test_fold_update_sums_plaintexts(private_key: PrivateKey) -> None:
    pk = private_key.public_key
    updates = [[secrets.randbelow(1 << 400) for _ in range(8)] for _ in range(5)]
    running = pk.encrypt_vector(updates[0])
    for update in updates[1:]:
        fold_update(running, pk.encrypt_vector(update), pk)
    expected = [sum(column) % int(pk.n) for column in zip(*updates, strict=True)]
    assert private_key.decrypt_vector(running) == expected


def test_fold_update_is_in_place_and_from_identity(private_key: PrivateKey) -> None:
    pk = private_key.public_key
    running: list[object] = [1, 1, 1]  # 1 = E(0) with r = 1
    alias = running
    fold_update(running, pk.encrypt_vector([4, 5, 6]), pk)
    assert alias is running
    assert private_key.decrypt_vector(running) == [4, 5, 6]  # type: ignore[arg-type]


def test_fold_update_wraps_mod_n(private_key: PrivateKey) -> None:
    pk = private_key.public_key
    n = int(pk.n)
    running = pk.encrypt_vector([n - 1])
    fold_update(running, pk.encrypt_vector([2]), pk)
    assert private_key.decrypt_vector(running) == [1]


def test_fold_update_length_mismatch(public_key: PublicKey) -> None:
    with pytest.raises(ValueError, match="ciphertexts"):
        fold_update([1, 1], [1], public_key)


def test_validate_accepts_good_ciphertexts(public_key: PublicKey) -> None:
    validate_ciphertexts(public_key.encrypt_vector(list(range(50))), public_key)
    validate_ciphertexts([], public_key)


def _bad_value(kind: str, pk: PublicKey, sk: PrivateKey) -> int:
    n, nsquare = int(pk.n), int(pk.nsquare)
    return {
        "zero": 0,
        "negative": -5,
        "n_squared": nsquare,
        "n_squared_plus_one": nsquare + 1,
        "multiple_of_p": int(sk.p) * 7,
        "multiple_of_q": int(sk.q) * (n + 3),
        "multiple_of_n": n * 2,
    }[kind]


@pytest.mark.parametrize(
    "kind",
    [
        "zero",
        "negative",
        "n_squared",
        "n_squared_plus_one",
        "multiple_of_p",
        "multiple_of_q",
        "multiple_of_n",
    ],
)
@pytest.mark.parametrize("position", [0, 17, 39])
def test_validate_names_first_bad_index(private_key: PrivateKey, kind: str, position: int) -> None:
    pk = private_key.public_key
    ciphertexts = list(pk.encrypt_vector(list(range(40))))
    ciphertexts[position] = gmpy2.mpz(_bad_value(kind, pk, private_key))
    with pytest.raises(InvalidCiphertextError) as info:
        validate_ciphertexts(ciphertexts, pk)
    assert info.value.index == position
    with pytest.raises(InvalidCiphertextError) as info:
        validate_ciphertexts(ciphertexts, pk, index_offset=1000)
    assert info.value.index == 1000 + position
    assert str(1000 + position) in str(info.value)


def test_validate_reports_first_of_two_gcd_failures(private_key: PrivateKey) -> None:
    pk = private_key.public_key
    ciphertexts = list(pk.encrypt_vector(list(range(10))))
    ciphertexts[3] = gmpy2.mpz(int(private_key.q) * 11)
    ciphertexts[7] = gmpy2.mpz(int(private_key.p) * 13)
    with pytest.raises(InvalidCiphertextError) as info:
        validate_ciphertexts(ciphertexts, pk)
    assert info.value.index == 3
