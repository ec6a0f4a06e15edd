"""The decryption exponentiation: OpenSSL's constant-time path, GMP's, and the fallback."""

from __future__ import annotations

import ctypes.util
import random

import gmpy2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcore.crypto import PrivateKey, modexp
from fedcore.crypto.modexp import BACKEND_ENV, FixedExponent, constant_time_backend

# p² for a 256-bit prime p, and the decryption exponent p - 1
PRIME = gmpy2.next_prime(gmpy2.mpz(2) ** 255 + 12345)
MODULUS = PRIME * PRIME
EXPONENT = PRIME - 1


@pytest.fixture
def gmp_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend libcrypto is unusable: the module must fall back to GMP's powm_sec."""
    monkeypatch.setenv(BACKEND_ENV, "gmp")
    monkeypatch.setattr(modexp, "_loaded", [])


def test_openssl_is_used_where_libcrypto_exists() -> None:
    if ctypes.util.find_library("crypto") is None:
        pytest.skip("no libcrypto on this machine")
    assert constant_time_backend() == "openssl"
    assert FixedExponent(EXPONENT, MODULUS).backend == "openssl"


@settings(max_examples=60, deadline=None)
@given(base=st.integers(min_value=0, max_value=2 * int(MODULUS)))
def test_constant_time_matches_gmp_powmod(base: int) -> None:
    expected = gmpy2.powmod(base, EXPONENT, MODULUS)
    assert FixedExponent(EXPONENT, MODULUS).powmod([base]) == [expected]


@pytest.mark.parametrize("base", [0, 1, 2, int(MODULUS) - 1, int(MODULUS), int(MODULUS) + 1])
@pytest.mark.parametrize("constant_time", [True, False])
def test_edge_bases(base: int, constant_time: bool) -> None:
    result = FixedExponent(EXPONENT, MODULUS, constant_time=constant_time).powmod([base])
    assert result == [gmpy2.powmod(base, EXPONENT, MODULUS)]


def test_gmp_fallback_when_forced(gmp_only: None) -> None:
    assert constant_time_backend() == "gmp"
    exponentiation = FixedExponent(EXPONENT, MODULUS)
    assert exponentiation.backend == "gmp-sec"
    bases = [random.Random(7).randrange(int(MODULUS)) for _ in range(5)]
    assert exponentiation.powmod(bases) == [gmpy2.powmod(b, EXPONENT, MODULUS) for b in bases]


def test_variable_time_is_gmp() -> None:
    assert FixedExponent(EXPONENT, MODULUS, constant_time=False).backend == "gmp"


@pytest.mark.parametrize(("exponent", "modulus"), [(5, 10), (5, 1), (0, 11), (-3, 11)])
def test_refuses_bad_parameters(exponent: int, modulus: int) -> None:
    with pytest.raises(ValueError, match=r"modulus|exponent"):
        FixedExponent(exponent, modulus)


def test_many_bases_in_one_call_and_many_objects() -> None:
    # Scratch space is per call and freed; tables are freed with their owner.
    rng = random.Random(11)
    bases = [rng.randrange(int(MODULUS)) for _ in range(200)]
    expected = [gmpy2.powmod(b, EXPONENT, MODULUS) for b in bases]
    for _ in range(20):
        assert FixedExponent(EXPONENT, MODULUS).powmod(bases) == expected


@pytest.mark.parametrize("backend", ["default", "gmp"])
@pytest.mark.parametrize("constant_time", [True, False])
def test_decryption_agrees_with_phe(
    private_key: PrivateKey,
    backend: str,
    constant_time: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if backend == "gmp":
        monkeypatch.setenv(BACKEND_ENV, "gmp")
        monkeypatch.setattr(modexp, "_loaded", [])
    # a fresh key object, so its cached exponentiations follow the backend chosen above
    key = PrivateKey.from_phe(private_key.to_phe())
    phe_pk = key.public_key.to_phe()
    rng = random.Random(3)
    plaintexts = [rng.randrange(int(key.public_key.n)) for _ in range(10)]
    ciphertexts = [phe_pk.raw_encrypt(m) for m in plaintexts]
    assert key.decrypt_vector(ciphertexts, constant_time=constant_time) == plaintexts
