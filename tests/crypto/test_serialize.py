"""Fixed-width byte codecs for ciphertexts and plaintexts (fedcore.crypto.serialize)."""

from __future__ import annotations

import secrets

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcore.crypto import (
    PrivateKey,
    PublicKey,
    deserialize_ciphertexts,
    deserialize_plaintexts,
    serialize_ciphertexts,
    serialize_plaintexts,
)
from fedcore.errors import InvalidCiphertextError


def test_ciphertext_round_trip(public_key: PublicKey) -> None:
    ciphertexts = public_key.encrypt_vector(list(range(25)))
    data = serialize_ciphertexts(ciphertexts, public_key)
    assert len(data) == 25 * public_key.ciphertext_bytes
    assert deserialize_ciphertexts(data, public_key) == ciphertexts


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_ciphertext_codec_is_fixed_width_big_endian(
    public_key: PublicKey, data: st.DataObject
) -> None:
    nsquare = int(public_key.nsquare)
    values = data.draw(st.lists(st.integers(min_value=1, max_value=nsquare - 1), max_size=20))
    encoded = serialize_ciphertexts(values, public_key)
    width = public_key.ciphertext_bytes
    assert [
        int.from_bytes(encoded[i : i + width], "big") for i in range(0, len(encoded), width)
    ] == values
    assert deserialize_ciphertexts(encoded, public_key, validate=False) == values


@settings(max_examples=50, deadline=None)
@given(cut=st.integers(min_value=1, max_value=127).flatmap(lambda c: st.sampled_from([c, c + 128])))
def test_truncated_bytes_raise_with_index(public_key: PublicKey, cut: int) -> None:
    data = serialize_ciphertexts(public_key.encrypt_vector([1, 2]), public_key)
    with pytest.raises(InvalidCiphertextError) as info:
        deserialize_ciphertexts(data[:-cut], public_key, index_offset=10)
    assert info.value.index == 10 + (len(data) - cut) // public_key.ciphertext_bytes


def test_deserialize_validates_with_offset(private_key: PrivateKey) -> None:
    pk = private_key.public_key
    ciphertexts = list(pk.encrypt_vector([1, 2, 3]))
    ciphertexts[2] = private_key.p * 3
    data = serialize_ciphertexts(ciphertexts, pk)
    with pytest.raises(InvalidCiphertextError) as info:
        deserialize_ciphertexts(data, pk, index_offset=78)
    assert info.value.index == 80
    assert len(deserialize_ciphertexts(data, pk, validate=False)) == 3


def test_deserialize_rejects_all_zero_and_all_ones(public_key: PublicKey) -> None:
    width = public_key.ciphertext_bytes
    with pytest.raises(InvalidCiphertextError) as info:
        deserialize_ciphertexts(bytes(width), public_key)
    assert info.value.index == 0
    with pytest.raises(InvalidCiphertextError):
        deserialize_ciphertexts(b"\xff" * width, public_key)


def test_serialize_refuses_values_too_wide(public_key: PublicKey) -> None:
    with pytest.raises(ValueError, match="index 1"):
        serialize_ciphertexts([1, 1 << (8 * public_key.ciphertext_bytes)], public_key)
    with pytest.raises(ValueError, match="index 0"):
        serialize_ciphertexts([-1], public_key)


def test_plaintext_round_trip(public_key: PublicKey) -> None:
    n = int(public_key.n)
    values = [0, 1, n - 1] + [secrets.randbelow(n) for _ in range(10)]
    data = serialize_plaintexts(values, public_key)
    assert len(data) == len(values) * public_key.plaintext_bytes
    assert deserialize_plaintexts(data, public_key) == values


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_plaintext_codec_property(public_key: PublicKey, data: st.DataObject) -> None:
    n = int(public_key.n)
    values = data.draw(st.lists(st.integers(min_value=0, max_value=n - 1), max_size=20))
    assert deserialize_plaintexts(serialize_plaintexts(values, public_key), public_key) == values


def test_plaintext_codec_refuses_bad_input(public_key: PublicKey) -> None:
    n = int(public_key.n)
    with pytest.raises(ValueError, match="index 1"):
        serialize_plaintexts([0, n], public_key)
    with pytest.raises(ValueError, match="multiple"):
        deserialize_plaintexts(b"\x00" * (public_key.plaintext_bytes + 1), public_key)
    with pytest.raises(ValueError, match="index 0"):
        deserialize_plaintexts(b"\xff" * public_key.plaintext_bytes, public_key)
