"""Encryption, decryption, interop with phe, and the random-factor pool."""

from __future__ import annotations

import secrets

import gmpy2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from phe import paillier

from fedcore.crypto import EncryptionPool, PrivateKey, PublicKey, generate_keypair
from fedcore.crypto.encrypt import FixedBaseTable, ShortExponentRandomizer, short_exponent_bits


def _random_plaintexts(pk: PublicKey, count: int) -> list[int]:
    return [secrets.randbelow(int(pk.n)) for _ in range(count)] + [0, 1, int(pk.n) - 1]


def test_round_trip(private_key: PrivateKey) -> None:
    pk = private_key.public_key
    plaintexts = _random_plaintexts(pk, 20)
    assert private_key.decrypt_vector(pk.encrypt_vector(plaintexts)) == plaintexts


def test_decrypt_returns_python_ints(private_key: PrivateKey) -> None:
    out = private_key.decrypt_vector(private_key.public_key.encrypt_vector([7]))
    assert out == [7]
    assert type(out[0]) is int


def test_phe_opens_our_ciphertexts(private_key: PrivateKey) -> None:
    pk = private_key.public_key
    phe_sk = private_key.to_phe()
    plaintexts = _random_plaintexts(pk, 10)
    ours = pk.encrypt_vector(plaintexts)
    assert [phe_sk.raw_decrypt(int(c)) for c in ours] == plaintexts


def test_we_open_phe_ciphertexts(private_key: PrivateKey) -> None:
    phe_pk = private_key.public_key.to_phe()
    plaintexts = _random_plaintexts(private_key.public_key, 10)
    theirs = [phe_pk.raw_encrypt(m) for m in plaintexts]
    assert private_key.decrypt_vector(theirs) == plaintexts


def test_interop_with_fresh_phe_keypair() -> None:
    phe_pk, phe_sk = paillier.generate_paillier_keypair(n_length=512)
    sk = PrivateKey.from_phe(phe_sk)
    plaintexts = [3, 1 << 200, int(phe_pk.n) - 2]
    assert [phe_sk.raw_decrypt(int(c)) for c in sk.public_key.encrypt_vector(plaintexts)] == (
        plaintexts
    )
    assert sk.decrypt_vector([phe_pk.raw_encrypt(m) for m in plaintexts]) == plaintexts


def test_same_plaintext_gives_different_ciphertexts(public_key: PublicKey) -> None:
    ciphertexts = public_key.encrypt_vector([5] * 50)
    assert len({int(c) for c in ciphertexts}) == 50


@pytest.mark.parametrize("offset_from_n", [None, 0, 1])
def test_encrypt_refuses_out_of_range_plaintext(
    public_key: PublicKey, offset_from_n: int | None
) -> None:
    value = -1 if offset_from_n is None else int(public_key.n) + offset_from_n
    with pytest.raises(ValueError, match="index 1"):
        public_key.encrypt_vector([1, value])


def test_encrypt_refuses_floats(public_key: PublicKey) -> None:
    with pytest.raises(TypeError):
        public_key.encrypt_vector([1.5])  # type: ignore[list-item]


def test_decrypt_workers_2_equals_workers_1(private_key: PrivateKey) -> None:
    pk = private_key.public_key
    plaintexts = _random_plaintexts(pk, 150)
    ciphertexts = pk.encrypt_vector(plaintexts)
    assert private_key.decrypt_vector(ciphertexts, workers=2) == plaintexts
    assert private_key.decrypt_vector(ciphertexts, workers=1) == plaintexts


def test_variable_time_decryption_agrees(private_key: PrivateKey) -> None:
    pk = private_key.public_key
    plaintexts = _random_plaintexts(pk, 20)
    ciphertexts = pk.encrypt_vector(plaintexts)
    assert private_key.decrypt_vector(ciphertexts, constant_time=False) == plaintexts
    assert private_key.decrypt_vector(ciphertexts * 10, 2, constant_time=False) == plaintexts * 10


def test_decrypt_refuses_bad_workers(private_key: PrivateKey) -> None:
    with pytest.raises(ValueError, match="workers"):
        private_key.decrypt_vector([], workers=0)


@pytest.mark.parametrize(
    ("key_bits", "exponent_bits"), [(512, 256), (1024, 512), (2048, 1024), (3072, 1536)]
)
def test_randomizer_exponents_are_half_the_key_as_in_djn(key_bits: int, exponent_bits: int) -> None:
    assert short_exponent_bits(key_bits) == exponent_bits


@settings(max_examples=50, deadline=None)
@given(exponent=st.integers(min_value=0, max_value=2**160 - 1), window=st.sampled_from([1, 5, 8]))
def test_fixed_base_table_matches_powmod(exponent: int, window: int) -> None:
    modulus = gmpy2.mpz(2**127 - 1) ** 2
    table = FixedBaseTable(3, modulus, 160, window_bits=window)
    assert table.power(exponent) == gmpy2.powmod(3, exponent, modulus)


def test_fixed_base_table_refuses_long_exponent() -> None:
    table = FixedBaseTable(3, 1009, 16)
    with pytest.raises(ValueError, match="exponent"):
        table.power(1 << 16)


def test_random_factors_are_fresh_nth_powers(private_key: PrivateKey) -> None:
    randomizer = ShortExponentRandomizer(private_key.public_key.n)
    assert randomizer.exponent_bits == 256  # ceil(512 / 2)
    assert randomizer.hs != ShortExponentRandomizer(private_key.public_key.n).hs
    factors = randomizer.factors(20)
    assert len({int(f) for f in factors}) == 20
    # A factor is itself E(0): it is an n-th power, so it decrypts to 0 (phe agrees).
    assert private_key.decrypt_vector(factors) == [0] * 20
    assert private_key.to_phe().raw_decrypt(int(factors[0])) == 0


def test_pool_encryption_decrypts(private_key: PrivateKey) -> None:
    pk = private_key.public_key
    plaintexts = _random_plaintexts(pk, 30)
    with EncryptionPool(pk, 40, background=False) as pool:
        pool.fill()
        assert pool.available == 40
        ciphertexts = pool.encrypt_vector(plaintexts)
        assert pool.available == 40 - len(plaintexts)
    assert private_key.decrypt_vector(ciphertexts) == plaintexts


def test_pool_never_hands_out_a_factor_twice(public_key: PublicKey) -> None:
    # E(0) = 1 · factor, so encrypting zeros exposes the factors themselves.
    with EncryptionPool(public_key, 30, background=False) as pool:
        pool.fill()
        first = pool.encrypt_vector([0] * 20)  # from the pool
        second = pool.encrypt_vector([0] * 20)  # 10 pooled, 10 fresh (pool ran dry)
        pool.fill()
        third = pool.encrypt_vector([0] * 30)
    factors = [int(c) for c in first + second + third]
    assert len(set(factors)) == len(factors) == 70


def test_background_pool_fills_and_decrypts(private_key: PrivateKey) -> None:
    pk = private_key.public_key
    with EncryptionPool(pk, 600) as pool:
        pool.fill()
        assert pool.available == 600
        zeros = pool.encrypt_vector([0] * 600)
        plaintexts = _random_plaintexts(pk, 50)
        ciphertexts = pool.encrypt_vector(plaintexts)
        pool.fill()  # waits for the background refill
        assert pool.available == 600
        more = pool.encrypt_vector([0] * 600)
    assert private_key.decrypt_vector(ciphertexts) == plaintexts
    factors = {int(c) for c in zeros + more}
    assert len(factors) == 1200
    assert private_key.decrypt_vector(zeros[:5] + more[:5]) == [0] * 10


def test_pool_refuses_negative_size(public_key: PublicKey) -> None:
    with pytest.raises(ValueError, match="size"):
        EncryptionPool(public_key, -1)


@pytest.mark.slow
def test_round_trip_and_interop_2048() -> None:
    pk, sk = generate_keypair(2048)
    plaintexts = [0, 1, (1 << 2027) + 5, int(pk.n) - 1]
    ciphertexts = pk.encrypt_vector(plaintexts)
    assert sk.decrypt_vector(ciphertexts) == plaintexts
    assert [sk.to_phe().raw_decrypt(int(c)) for c in ciphertexts] == plaintexts
    assert sk.decrypt_vector([pk.to_phe().raw_encrypt(m) for m in plaintexts]) == plaintexts
