"""One proof per member per shard: its partial decryptions are the right powers.

A member with share ``s_i`` answers ciphertexts ``c_1 … c_K`` with ``d_j = c_j^(2Δ·s_i)``
mod n². It proves all K at once (Damgård–Jurik 2001, §5, the batched form of Aditya et
al., ACNS 2004, made non-interactive with Fiat–Shamir):

1. ``ρ_1 … ρ_K`` (128 bits each) come from SHAKE-256 over the context, the key, the
   member's index and every ``c_j`` and ``d_j``: the member cannot choose them.
2. ``C = Π c_j^ρ_j`` and ``D = Π d_j^ρ_j``; honest answers give ``D = C^(2Δ·s_i)``.
3. A proof of equality of discrete logs (Shoup 2000, §4) that
   ``log_{C^4}(D²) = log_v(v_i) = Δ·s_i``, where ``v`` is the key's verification base
   and ``v_i = v^(Δ·s_i)`` the member's published verification key: random ``r`` of
   ``|n²| + |Δ| + 384`` bits, ``a = C^(4r)``, ``b = v^r``, ``e = SHA-256(…, a, b)``,
   ``z = r + e·Δ·s_i`` (over the integers; ``r`` hides ``e·Δ·s_i`` statistically,
   2^-128). The verifier recomputes ``a = C^(4z)·D^(-2e)``, ``b = v^z·v_i^(-e)`` and
   checks the hash.

Why one wrong ``d_j`` cannot pass: everything is squared, so the errors
``ε_j = d_j² / c_j^(4Δ·s_i)`` live in the squares of Z*_{n²}, a group of order
``n·p'·q'`` with no prime factor below ``min(p', q')`` (safe primes). ``D²/C^(4Δ·s_i) =
Π ε_j^ρ_j``; for a single wrong answer that is 1 only if ``ord(ε) | ρ``, impossible for
``0 < ρ < 2^128``; for several, only with probability 2^-128 over the hash. An order-2
error (a sign flip) survives the proof but not the combination, which squares again.

Knows the public key and the numbers, not shares' files, messages or members' names.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import gmpy2
from gmpy2 import mpz

from fedcore.crypto.modexp import FixedExponent

if TYPE_CHECKING:
    from fedcore.crypto.threshold import ThresholdPublicKey

__all__ = ["EqualityProof", "batch_bases", "check_proof", "prove"]

_RHO_BYTES = 16  # 128-bit batching coefficients
_HASH_BYTES = 32  # e: SHA-256
_HIDING_BITS = 128
# z is about |n²| + |Δ| + 384 bits; room for the largest key (16384 bits) and N = 64
_MAX_Z_BYTES = 2 * 16384 // 8 + 256


@dataclass(frozen=True, slots=True)
class EqualityProof:
    """Fiat–Shamir proof ``(e, z)`` that a shard's partials use the member's share."""

    challenge: bytes
    response: int

    def __post_init__(self) -> None:
        if not isinstance(self.challenge, bytes) or len(self.challenge) != _HASH_BYTES:
            raise ValueError(f"proof challenge must be {_HASH_BYTES} bytes")
        if not isinstance(self.response, int | type(mpz(0))) or self.response < 0:
            raise ValueError("proof response must be a non-negative integer")

    def to_bytes(self) -> bytes:
        """``e`` (32 bytes) then ``z`` big-endian."""
        z = int(self.response)
        return self.challenge + z.to_bytes(max(1, (z.bit_length() + 7) // 8), "big")

    @classmethod
    def from_bytes(cls, data: bytes) -> EqualityProof:
        """Parse :meth:`to_bytes`; ValueError when the length is impossible."""
        if not _HASH_BYTES < len(data) <= _HASH_BYTES + _MAX_Z_BYTES:
            raise ValueError(f"a proof is 33..{_HASH_BYTES + _MAX_Z_BYTES} bytes, got {len(data)}")
        return cls(data[:_HASH_BYTES], int.from_bytes(data[_HASH_BYTES:], "big"))


def _digest_ints(hasher: Any, values: Sequence[Any], width: int) -> None:
    for value in values:
        hasher.update(int(value).to_bytes(width, "big"))


def batch_bases(
    key: ThresholdPublicKey,
    index: int,
    context: bytes,
    ciphertexts: Sequence[Any],
    partials: Sequence[Any],
) -> tuple[mpz, mpz]:
    """``(C, D) = (Π c_j^ρ_j, Π d_j^ρ_j) mod n²`` with ρ from SHAKE-256 of everything."""
    width = key.public_key.ciphertext_bytes
    shake = hashlib.shake_256(b"fedcore threshold batch v1")
    shake.update(key.sha256().encode() + index.to_bytes(4, "big"))
    shake.update(len(context).to_bytes(4, "big") + context)
    shake.update(len(ciphertexts).to_bytes(8, "big"))
    _digest_ints(shake, ciphertexts, width)
    _digest_ints(shake, partials, width)
    stream = shake.digest(_RHO_BYTES * len(ciphertexts))
    nsquare = key.public_key.nsquare
    return (
        _multi_exponent(ciphertexts, stream, nsquare),
        _multi_exponent(partials, stream, nsquare),
    )


def _multi_exponent(bases: Sequence[Any], stream: bytes, modulus: Any) -> mpz:
    """``Π b_j^ρ_j mod modulus`` with ``ρ_j`` the j-th 16 bytes of ``stream`` (low bit set).

    Pippenger's bucket method with c-bit digits (c chosen for the number of bases): for
    each digit position, every base is multiplied into the bucket of its digit, then
    ``Σ_k k·bucket_k`` is formed with two running products over the ``2^c`` buckets.
    About ``(128/c)·(K + 2^(c+1))`` multiplications for K bases instead of the ≈ 160·K
    of one 128-bit ``powmod`` each. Variable-time: bases and exponents are public.
    """
    count = len(bases)
    bits = 8 * _RHO_BYTES
    c = min(range(1, 13), key=lambda w: -(-bits // w) * (count + (2 << w)))
    mask = (1 << c) - 1
    rhos = [
        int.from_bytes(stream[j * _RHO_BYTES : (j + 1) * _RHO_BYTES], "big") | 1
        for j in range(count)
    ]
    result: Any = mpz(1)
    for shift in range(c * (-(-bits // c) - 1), -1, -c):  # most significant digit first
        for _ in range(c if result != 1 else 0):
            result = result * result % modulus
        buckets: list[Any] = [None] * (mask + 1)
        for base, rho in zip(bases, rhos, strict=True):
            digit = (rho >> shift) & mask
            if digit:
                held = buckets[digit]
                buckets[digit] = base if held is None else held * base % modulus
        running: Any = None
        total: Any = None
        for bucket in reversed(buckets[1:]):
            if bucket is not None:
                running = bucket if running is None else running * bucket % modulus
            if running is not None:
                total = running if total is None else total * running % modulus
        if total is not None:
            result = result * total % modulus
    return mpz(result)


def _challenge(key: ThresholdPublicKey, index: int, u: Any, u_tilde: Any, a: Any, b: Any) -> bytes:
    width = key.public_key.ciphertext_bytes
    hasher = hashlib.sha256(b"fedcore threshold dleq v1")
    hasher.update(key.sha256().encode() + index.to_bytes(4, "big"))
    _digest_ints(hasher, (key.verification_base, key.verification_keys[index - 1]), width)
    _digest_ints(hasher, (u, u_tilde, a, b), width)
    return hasher.digest()


def prove(
    key: ThresholdPublicKey, index: int, witness: Any, big_c: Any, big_d: Any
) -> EqualityProof:
    """Prove ``log_{C^4}(D²) = log_v(v_index) = witness`` (``witness = Δ·s_index``)."""
    nsquare = key.public_key.nsquare
    u, u_tilde = gmpy2.powmod(big_c, 4, nsquare), gmpy2.powmod(big_d, 2, nsquare)
    r_bits = nsquare.bit_length() + key.delta.bit_length() + 8 * _HASH_BYTES + _HIDING_BITS
    r = mpz(secrets.randbits(r_bits)) | 1
    a, b = FixedExponent(r, nsquare).powmod([u, key.verification_base])
    e = _challenge(key, index, u, u_tilde, a, b)
    return EqualityProof(e, int(r + int.from_bytes(e, "big") * mpz(witness)))


def check_proof(
    key: ThresholdPublicKey, index: int, big_c: Any, big_d: Any, proof: EqualityProof
) -> bool:
    """True iff ``proof`` shows ``log_{C^4}(D²) = log_v(v_index)``."""
    nsquare = key.public_key.nsquare
    if gmpy2.gcd(big_c, key.public_key.n) != 1 or gmpy2.gcd(big_d, key.public_key.n) != 1:
        return False
    u, u_tilde = gmpy2.powmod(big_c, 4, nsquare), gmpy2.powmod(big_d, 2, nsquare)
    e = int.from_bytes(proof.challenge, "big")
    z = mpz(proof.response)
    a = gmpy2.powmod(u, z, nsquare) * gmpy2.powmod(u_tilde, -e, nsquare) % nsquare
    v_i = key.verification_keys[index - 1]
    b = gmpy2.powmod(key.verification_base, z, nsquare) * gmpy2.powmod(v_i, -e, nsquare) % nsquare
    return secrets.compare_digest(_challenge(key, index, u, u_tilde, a, b), proof.challenge)
