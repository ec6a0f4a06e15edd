"""Fixed-width big-endian byte codecs for ciphertext and plaintext vectors.

A serialized ciphertext vector is ``len · ciphertext_bytes`` bytes: each value
big-endian in exactly ``2 · ceil(bits / 8)`` bytes, no separators, no header (the
framing layer carries count and key fingerprint). Plaintexts likewise in
``ceil(bits / 8)`` bytes. These functions know nothing of frames or msgpack.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from gmpy2 import mpz

from fedcore.crypto.vector import validate_ciphertexts
from fedcore.errors import InvalidCiphertextError

if TYPE_CHECKING:
    from fedcore.crypto.keys import PublicKey

__all__ = [
    "ciphertext_count",
    "deserialize_ciphertexts",
    "deserialize_plaintexts",
    "serialize_ciphertexts",
    "serialize_plaintexts",
]


def _to_fixed_width(values: Sequence[Any], width: int, what: str) -> bytes:
    try:
        return b"".join([v.to_bytes(width, "big") for v in values])
    except (OverflowError, AttributeError):
        for index, v in enumerate(values):
            if not isinstance(v, int | mpz) or not 0 <= v < (1 << (8 * width)):
                raise ValueError(
                    f"{what} at index {index} must be an integer in [0, 2^{8 * width})"
                ) from None
        raise


def serialize_ciphertexts(ciphertexts: Sequence[Any], public_key: PublicKey) -> bytes:
    """Concatenate ciphertexts, each big-endian in ``public_key.ciphertext_bytes`` bytes."""
    return _to_fixed_width(ciphertexts, public_key.ciphertext_bytes, "ciphertext")


def ciphertext_count(
    data: bytes | memoryview, public_key: PublicKey, *, index_offset: int = 0
) -> int:
    """How many fixed-width ciphertexts ``data`` holds; InvalidCiphertextError if ragged."""
    width = public_key.ciphertext_bytes
    count, remainder = divmod(len(data), width)
    if remainder:
        raise InvalidCiphertextError(
            f"ciphertext bytes length {len(data)} is not a multiple of {width}",
            index=index_offset + count,
        )
    return count


def deserialize_ciphertexts(
    data: bytes | memoryview, public_key: PublicKey, *, validate: bool = True, index_offset: int = 0
) -> list[mpz]:
    """Split ``data`` into fixed-width ciphertexts; validate them unless told not to.

    Raises InvalidCiphertextError when the length is not a multiple of the width (its
    ``index`` names the truncated value) and, with ``validate``, as
    :func:`validate_ciphertexts` does, with indices shifted by ``index_offset``.
    """
    width = public_key.ciphertext_bytes
    ciphertext_count(data, public_key, index_offset=index_offset)
    view = memoryview(data)
    from_bytes = mpz.from_bytes
    ciphertexts = [from_bytes(view[i : i + width], "big") for i in range(0, len(data), width)]
    if validate:
        validate_ciphertexts(ciphertexts, public_key, index_offset=index_offset)
    return ciphertexts


def serialize_plaintexts(values: Sequence[int], public_key: PublicKey) -> bytes:
    """Concatenate plaintexts ``0 <= m < n``, each big-endian in ``plaintext_bytes`` bytes."""
    n = public_key.n
    for index, v in enumerate(values):
        if not 0 <= v < n:
            raise ValueError(f"plaintext at index {index} must satisfy 0 <= m < n")
    return _to_fixed_width(values, public_key.plaintext_bytes, "plaintext")


def deserialize_plaintexts(data: bytes, public_key: PublicKey) -> list[int]:
    """Inverse of :func:`serialize_plaintexts`; ValueError on a bad length or a value >= n."""
    width = public_key.plaintext_bytes
    if len(data) % width:
        raise ValueError(f"plaintext bytes length {len(data)} is not a multiple of {width}")
    n = public_key.n
    out = [int.from_bytes(data[i : i + width], "big") for i in range(0, len(data), width)]
    for index, v in enumerate(out):
        if v >= n:
            raise ValueError(f"plaintext at index {index} is not below n")
    return out
