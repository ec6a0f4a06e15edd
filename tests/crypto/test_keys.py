"""Key generation, phe conversion, bytes and key files (fedcore.crypto.keys)."""

from __future__ import annotations

import os
import pickle
import stat
from pathlib import Path

import pytest

from fedcore.crypto import PrivateKey, PublicKey, generate_keypair
from fedcore.errors import KeyFileError


def test_generate_keypair_sizes_and_widths() -> None:
    pk, sk = generate_keypair(512)
    assert pk.bits == 512
    assert pk.plaintext_bytes == 64
    assert pk.ciphertext_bytes == 128
    assert pk.nsquare == pk.n * pk.n
    assert sk.p * sk.q == pk.n
    assert sk.p < sk.q
    assert sk.public_key == pk


@pytest.mark.parametrize("bits", [0, 256, 504, 513, 1020, 100000])
def test_generate_keypair_refuses_bad_bits(bits: int) -> None:
    with pytest.raises(ValueError, match="bits"):
        generate_keypair(bits)


def test_generate_keypair_refuses_non_int_bits() -> None:
    with pytest.raises(TypeError, match="bits"):
        generate_keypair(2048.0)  # type: ignore[arg-type]


def test_phe_conversion_round_trip(private_key: PrivateKey) -> None:
    phe_sk = private_key.to_phe()
    assert phe_sk.public_key.n == int(private_key.public_key.n)
    assert PrivateKey.from_phe(phe_sk) == private_key
    assert PublicKey.from_phe(private_key.public_key.to_phe()) == private_key.public_key


def test_public_key_bytes_round_trip(public_key: PublicKey) -> None:
    data = public_key.to_bytes()
    assert b'"n":"' in data  # integers travel as decimal strings
    again = PublicKey.from_bytes(data)
    assert again == public_key
    assert again.fingerprint() == public_key.fingerprint()
    assert again.to_bytes() == data


def test_fingerprint_is_short_hex_and_key_specific(public_key: PublicKey) -> None:
    other, _ = generate_keypair(512)
    fp = public_key.fingerprint()
    assert len(fp) == 16
    int(fp, 16)
    assert fp != other.fingerprint()


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not json",
        b"[]",
        b'{"type":"fedcore-paillier-public-key","version":1,"n":12}',
        b'{"type":"fedcore-paillier-public-key","version":1,"n":"12"}',
        b'{"type":"fedcore-paillier-public-key","version":2,"n":"12"}',
        b'{"type":"fedcore-paillier-private-key","version":1,"n":"12"}',
        b'{"type":"fedcore-paillier-public-key","version":1,"n":"-5"}',
    ],
)
def test_public_key_from_bytes_refuses_garbage(data: bytes) -> None:
    with pytest.raises(ValueError):
        PublicKey.from_bytes(data)


def test_public_key_refuses_even_modulus() -> None:
    with pytest.raises(ValueError, match="odd"):
        PublicKey(2**600)


def test_private_key_refuses_wrong_factors(private_key: PrivateKey) -> None:
    with pytest.raises(ValueError):
        PrivateKey(private_key.public_key, private_key.p, private_key.p)
    with pytest.raises(ValueError):
        PrivateKey(private_key.public_key, private_key.p + 2, private_key.q)


def test_key_equality_with_foreign_types(private_key: PrivateKey) -> None:
    assert private_key.public_key.__eq__(object()) is NotImplemented
    assert private_key.__eq__("key") is NotImplemented
    assert str(private_key.p) not in repr(private_key)


def test_save_load_round_trip(tmp_path: Path, private_key: PrivateKey) -> None:
    pk_path, sk_path = tmp_path / "key.pub", tmp_path / "key.priv"
    private_key.public_key.save(pk_path)
    private_key.save(sk_path)
    assert PublicKey.load(pk_path) == private_key.public_key
    assert PrivateKey.load(sk_path) == private_key


def test_private_key_file_is_0600_even_over_existing_file(
    tmp_path: Path, private_key: PrivateKey
) -> None:
    path = tmp_path / "key.priv"
    path.write_text("old")
    path.chmod(0o644)
    private_key.save(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["key.priv"]  # no temp file left


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644, 0o610])
def test_private_key_load_refuses_group_or_world_access(
    tmp_path: Path, private_key: PrivateKey, mode: int
) -> None:
    path = tmp_path / "key.priv"
    private_key.save(path)
    path.chmod(mode)
    with pytest.raises(KeyFileError, match="chmod 600"):
        PrivateKey.load(path)


@pytest.mark.parametrize(
    "content",
    [
        b"{garbage",
        b'{"type":"fedcore-paillier-private-key","version":1}',
        b'{"type":"fedcore-paillier-private-key","version":1,"n":"15","p":"3","q":"5"}',
        b"\xff\xfe",
    ],
)
def test_private_key_load_refuses_malformed_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "key.priv"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(KeyFileError, match="malformed"):
        PrivateKey.load(path)


def test_private_key_with_mismatched_n_refused(tmp_path: Path, private_key: PrivateKey) -> None:
    other_pk, _ = generate_keypair(512)
    data = private_key.to_bytes().replace(
        str(private_key.public_key.n).encode(), str(other_pk.n).encode()
    )
    path = tmp_path / "key.priv"
    path.write_bytes(data)
    path.chmod(0o600)
    with pytest.raises(KeyFileError):
        PrivateKey.load(path)


def test_missing_key_files_raise_key_file_error(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError):
        PublicKey.load(tmp_path / "nope.pub")
    with pytest.raises(KeyFileError):
        PrivateKey.load(tmp_path / "nope.priv")


def test_public_key_load_refuses_garbage(tmp_path: Path) -> None:
    path = tmp_path / "key.pub"
    path.write_text('{"n": 5}')
    with pytest.raises(KeyFileError, match="malformed"):
        PublicKey.load(path)


def test_keys_pickle_for_worker_processes(private_key: PrivateKey) -> None:
    pk = private_key.public_key
    pk.encrypt_vector([1])  # builds the per-instance table, which must not travel
    pk_copy = pickle.loads(pickle.dumps(pk))
    assert pk_copy == pk
    assert pk_copy._randomizer_cache is None
    sk_copy = pickle.loads(pickle.dumps(private_key))
    assert sk_copy == private_key
    assert sk_copy.decrypt_vector(pk_copy.encrypt_vector([99])) == [99]


# --- plausibility checks, key identity, ciphertexts outside Z*_{n²} ----------------------
# (imports for this part are kept here so that the part above stays as it was)

import hashlib  # noqa: E402
import json  # noqa: E402

import gmpy2  # noqa: E402

from fedcore.crypto.keys import MIN_SECURE_KEY_BITS, check_modulus  # noqa: E402
from fedcore.errors import InvalidCiphertextError  # noqa: E402

_LARGE_PRIME = int(gmpy2.next_prime(1 << 600))


@pytest.mark.parametrize(
    ("n", "reason"),
    [
        (3**323, "perfect power"),  # 512 bits, every factor 3
        (_LARGE_PRIME**2, "perfect power"),  # p = q
        (3 * 5 * 7 * _LARGE_PRIME, "small prime factor"),
        (65521 * _LARGE_PRIME, "small prime factor"),  # the largest prime below 2^16
        (_LARGE_PRIME, "n is prime"),
        (1 << 700, "even"),
        ((1 << 700) + 2, "even"),
        (2 * 3 * _LARGE_PRIME, "even"),
    ],
    ids=["3^323", "p^2", "3*5*7*P", "65521*P", "prime", "2^700", "2^700+2", "2*3*P"],
)
def test_check_modulus_refuses_implausible_moduli(n: int, reason: str) -> None:
    assert n.bit_length() >= 512
    with pytest.raises(ValueError, match=reason):
        check_modulus(n, min_bits=512)


def test_check_modulus_default_floor_is_2048_bits(private_key: PrivateKey) -> None:
    assert MIN_SECURE_KEY_BITS == 2048
    pk_1024, _ = generate_keypair(1024)
    with pytest.raises(ValueError, match="1024 bits; at least 2048"):
        check_modulus(pk_1024.n)
    with pytest.raises(ValueError, match="2048"):
        pk_1024.check()
    check_modulus(pk_1024.n, min_bits=1024)
    pk_1024.check(min_bits=1024)
    with pytest.raises(ValueError, match="at least 1024"):
        check_modulus(private_key.public_key.n, min_bits=1024)


def test_check_modulus_accepts_real_keypairs(private_key: PrivateKey) -> None:
    check_modulus(private_key.public_key.n, min_bits=512)
    private_key.public_key.check(min_bits=512)
    for _ in range(3):
        public, _ = generate_keypair(512)
        public.check(min_bits=512)


def test_check_modulus_refuses_non_integers() -> None:
    with pytest.raises(TypeError):
        check_modulus(2.0**600 + 1, min_bits=512)  # type: ignore[arg-type]


def test_sha256_is_the_digest_of_n_in_fixed_width(public_key: PublicKey) -> None:
    expected = hashlib.sha256(int(public_key.n).to_bytes(64, "big")).hexdigest()
    assert public_key.sha256() == expected
    assert public_key.fingerprint() == expected[:16]
    assert json.loads(public_key.to_bytes())["sha256"] == expected


@pytest.mark.parametrize(
    "stated",
    ["0" * 64, "sha256", "", 12, None],
    ids=["zeros", "word", "empty", "number", "null"],
)
def test_public_key_document_with_wrong_sha256_is_refused(
    public_key: PublicKey, stated: object, tmp_path: Path
) -> None:
    document = json.loads(public_key.to_bytes())
    document["sha256"] = stated
    data = json.dumps(document).encode()
    if stated is None:  # a document without an identity (older files) is still read
        assert PublicKey.from_bytes(data) == public_key
        return
    with pytest.raises(ValueError, match="sha256"):
        PublicKey.from_bytes(data)
    path = tmp_path / "key.pub"
    path.write_bytes(data)
    with pytest.raises(KeyFileError, match="sha256"):
        PublicKey.load(path)


def test_public_key_document_with_another_keys_sha256_is_refused(public_key: PublicKey) -> None:
    other, _ = generate_keypair(512)
    document = json.loads(public_key.to_bytes())
    document["sha256"] = other.sha256()
    with pytest.raises(ValueError, match=other.fingerprint()):
        PublicKey.from_bytes(json.dumps(document).encode())


def test_decrypt_vector_refuses_values_outside_z_star_n_squared(private_key: PrivateKey) -> None:
    pk = private_key.public_key
    n, p, q = int(pk.n), int(private_key.p), int(private_key.q)
    good = pk.encrypt_vector([5])[0]
    for bad in (n, 2 * n, p, q, p * p, 0, int(pk.nsquare), int(pk.nsquare) + 1):
        with pytest.raises(InvalidCiphertextError) as info:
            private_key.decrypt_vector([good, bad])
        assert info.value.index == 1
    assert private_key.decrypt_vector([good]) == [5]
