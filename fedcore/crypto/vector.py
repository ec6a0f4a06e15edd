"""Homomorphic sums and validation of ciphertext vectors, for the aggregator.

The aggregator holds the public key only; nothing here needs or sees a private key.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import gmpy2

from fedcore.errors import InvalidCiphertextError

if TYPE_CHECKING:
    from fedcore.crypto.keys import PublicKey

__all__ = ["fold_update", "validate_ciphertexts"]


def fold_update(running: list[Any], update: Sequence[Any], public_key: PublicKey) -> None:
    """Add one encrypted update into a running encrypted sum, in place.

    ``running[i] = running[i] · update[i] mod n²``: Paillier is additively homomorphic,
    ``E(a) · E(b) = g^(a+b) · (r_a·r_b)^n = E(a + b)``, so one modular multiplication
    per ciphertext adds the packed plaintexts slot by slot (no carries while the slot
    headroom holds). Start ``running`` from a first update (or from ``[1] * len``:
    ``1 = E(0)`` with ``r = 1``, fine for a sum that gets other, random, terms).
    Raises ValueError when the lengths differ. Inputs are assumed validated.
    """
    if len(running) != len(update):
        raise ValueError(
            f"update has {len(update)} ciphertexts, the running sum has {len(running)}"
        )
    nsquare = public_key.nsquare
    running[:] = [a * b % nsquare for a, b in zip(running, update, strict=True)]


def validate_ciphertexts(
    ciphertexts: Sequence[Any], public_key: PublicKey, *, index_offset: int = 0
) -> None:
    """Check every ciphertext is in Z*_{n²}: ``0 < c < n²`` and ``gcd(c, n) = 1``.

    The range is checked per value (a comparison). For the gcd, ``gcd(Π c_i mod n, n) = 1``
    iff every ``gcd(c_i, n) = 1`` (n = p·q with p, q prime: a prime divides a product iff
    it divides a factor), so one running product mod n and one gcd replace a gcd per
    ciphertext (each ``c`` is reduced mod n before the multiplication, which is
    cheaper than reducing the 6144-bit product); only when that fails are the values
    searched one by one for the culprit.
    Raises InvalidCiphertextError whose ``index`` is the first bad position plus
    ``index_offset`` (so a chunk can report its position within the whole update).
    """
    n = public_key.n
    nsquare = public_key.nsquare
    product = gmpy2.mpz(1)
    for i, c in enumerate(ciphertexts):
        if not 0 < c < nsquare:
            index = index_offset + i
            raise InvalidCiphertextError(
                f"ciphertext at index {index} is outside 0 < c < n²", index=index
            )
        product = product * (c % n) % n
    if gmpy2.gcd(product, n) == 1:
        return
    for i, c in enumerate(ciphertexts):
        if gmpy2.gcd(c, n) != 1:
            index = index_offset + i
            raise InvalidCiphertextError(
                f"ciphertext at index {index} shares a factor with n (not in Z*_n²)",
                index=index,
            )
    raise AssertionError("unreachable: the product had a common factor with n")
