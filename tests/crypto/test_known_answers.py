"""Known-answer vectors from tests/vectors/paillier_512.json (fixed public test key)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gmpy2
import pytest

from fedcore.crypto import (
    PrivateKey,
    PublicKey,
    deserialize_ciphertexts,
    serialize_ciphertexts,
    validate_ciphertexts,
)
from fedcore.errors import InvalidCiphertextError

_VECTORS: dict[str, Any] = json.loads(
    (Path(__file__).resolve().parent.parent / "vectors" / "paillier_512.json").read_text()
)


def test_key_vector(private_key: PrivateKey, paillier_vectors: dict[str, Any]) -> None:
    pk = private_key.public_key
    assert pk.fingerprint() == paillier_vectors["fingerprint"]
    assert pk.sha256() == paillier_vectors["sha256"]
    assert pk.to_bytes().decode() == paillier_vectors["public_key_bytes"]
    assert PublicKey.from_bytes(paillier_vectors["public_key_bytes"].encode()) == pk


@pytest.mark.parametrize(
    "vector", _VECTORS["valid"], ids=[f"{v['source']}-{i}" for i, v in enumerate(_VECTORS["valid"])]
)
def test_valid_vector_decrypts(private_key: PrivateKey, vector: dict[str, str]) -> None:
    c, m = int(vector["ciphertext"]), int(vector["plaintext"])
    validate_ciphertexts([gmpy2.mpz(c)], private_key.public_key)
    assert private_key.decrypt_vector([c]) == [m]
    assert private_key.to_phe().raw_decrypt(c) == m


@pytest.mark.parametrize(
    "vector", [v for v in _VECTORS["valid"] if "r" in v], ids=lambda v: v["plaintext"][:12]
)
def test_phe_vector_is_deterministic_given_r(
    private_key: PrivateKey, vector: dict[str, str]
) -> None:
    pk = private_key.public_key
    m, r = int(vector["plaintext"]), int(vector["r"])
    expected = (1 + m * int(pk.n)) * pow(r, int(pk.n), int(pk.nsquare)) % int(pk.nsquare)
    assert int(vector["ciphertext"]) == expected


@pytest.mark.parametrize("vector", _VECTORS["invalid"], ids=lambda v: v["name"])
def test_invalid_vector_raises(public_key: PublicKey, vector: dict[str, Any]) -> None:
    ciphertexts = [gmpy2.mpz(c) for c in vector["ciphertexts"]]
    with pytest.raises(InvalidCiphertextError) as info:
        validate_ciphertexts(ciphertexts, public_key)
    assert info.value.index == vector["index"]


def test_serialized_vector(public_key: PublicKey, paillier_vectors: dict[str, Any]) -> None:
    serialized = paillier_vectors["serialized"]
    ciphertexts = [int(c) for c in serialized["ciphertexts"]]
    assert serialize_ciphertexts(ciphertexts, public_key).hex() == serialized["hex"]
    assert deserialize_ciphertexts(bytes.fromhex(serialized["hex"]), public_key) == ciphertexts
    with pytest.raises(InvalidCiphertextError) as info:
        deserialize_ciphertexts(bytes.fromhex(serialized["truncated_hex"]), public_key)
    assert info.value.index == serialized["truncated_index"]
