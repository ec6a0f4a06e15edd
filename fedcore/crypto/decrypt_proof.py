"""Checking a shared-key holder: it proves it holds the key, and proves each decryption.

Shared-key mode only: in threshold mode each partial decryption carries its own proof
(`fedcore.crypto.threshold_proof`). Both checks here cost the verifier a small fraction
of what the prover spends, and neither turns the key holder into an oracle.

**Key proof** (once per connection). Both sides derive ``x = H(context) mod n`` (SHAKE-256
of a domain tag, the key and the verifier's fresh nonce); the holder answers with
``y = x^(n⁻¹ mod φ(n)) mod n``, the n-th root of x, and the verifier checks
``y^n ≡ x (mod n)``. Taking n-th roots modulo n is the RSA problem with exponent n, so
only someone who can factor n answers [Paillier, EUROCRYPT 1999, §3: the n-th
residuosity class problem; the proof is the standard proof of knowledge of an n-th
root, cf. Damgård–Jurik, PKC 2001, §4]. x is derived by hashing, never chosen by the
verifier: an aggregator cannot pass ``c mod n`` of a ciphertext and learn its randomness.

**Decryption proof** (every shard). Paillier decryption also recovers the randomness:
``c = (1+n)^m · r^n mod n²`` gives ``c ≡ r^n (mod n)``, so
``r = (c mod n)^(n⁻¹ mod φ(n)) mod n`` [Paillier 1999, §5]. The holder sends each
``(m_i, r_i)``; re-encrypting must give back ``c_i``. The verifier batches the check
with the small-exponents test [Bellare, Garay, Rabin, EUROCRYPT 1998, §3.2]: for secret
random 64-bit ``a_i`` drawn after the answer arrived,
``(1+n)^(Σ a_i m_i) · (Π r_i^a_i)^n ≡ Π c_i^a_i (mod n²)``. In
``Z*_{n²} ≅ Z_n × Z*_n`` the ``(1+n)`` component of the two sides differs by
``Σ a_i (m'_i - m_i) mod n``, which is zero for at most one ``a_j`` in 2^64 when some
``m'_j ≠ m_j``, and no choice of ``r'`` reaches that component. So a wrong plaintext
passes with probability at most 2^-64, and the products are multi-exponentiations with
64-bit exponents (bucket method) instead of one 2048-bit exponentiation per value.

What a proof reveals: ``r_i`` of a ciphertext whose plaintext the holder reveals
anyway (the decrypted, still masked shard), and nothing about any other ciphertext.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable, Sequence
from typing import Any

import gmpy2
from gmpy2 import mpz

from fedcore.crypto.decrypt import CrtConstants, DecryptPool, crt_decrypt, parallel_crt
from fedcore.crypto.keys import PublicKey

__all__ = [
    "BATCH_BITS",
    "check_decryptions",
    "key_challenge_value",
    "multi_powmod",
    "open_ciphertexts",
    "prove_key",
    "recover_randomness",
    "verify_key_proof",
]

BATCH_BITS = 64
"""Bits of each random coefficient: a wrong answer passes with probability ≤ 2^-64."""
_KEY_PROOF_DOMAIN = b"fedcore key proof v1"


def key_challenge_value(public_key: PublicKey, context: bytes) -> mpz:
    """``x = SHAKE-256(domain ‖ n ‖ context) mod n``: the value whose n-th root proves the key.

    ``context`` must hold the verifier's fresh nonce (and whatever binds the proof to
    one connection: the federation, the client's name). 128 extra bits make the
    reduction's bias negligible.
    """
    n = public_key.n
    width = public_key.plaintext_bytes + 16
    digest = hashlib.shake_256(
        b"".join((_KEY_PROOF_DOMAIN, int(n).to_bytes(public_key.plaintext_bytes, "big"), context))
    ).digest(width)
    x = mpz.from_bytes(digest, "big") % n
    return x if x > 1 else mpz(2)


def _nth_root(values: Sequence[Any], constants: CrtConstants, constant_time: bool) -> list[mpz]:
    """``v^(n⁻¹ mod φ(n)) mod n`` for each ``v`` in Z*_n, by the CRT (secret exponents)."""
    p, q = constants.p, constants.q
    p_side, q_side = constants.root_exponentiations(constant_time)
    rp = p_side.powmod([mpz(v) % p for v in values])
    rq = q_side.powmod([mpz(v) % q for v in values])
    p_inverse = constants.p_inverse
    return [a + (b - a) * p_inverse % q * p for a, b in zip(rp, rq, strict=True)]


def prove_key(constants: CrtConstants, context: bytes, public_key: PublicKey) -> bytes:
    """The key proof for ``context``: the n-th root of its challenge value, big-endian."""
    (root,) = _nth_root([key_challenge_value(public_key, context)], constants, True)
    return int(root).to_bytes(public_key.plaintext_bytes, "big")


def verify_key_proof(public_key: PublicKey, context: bytes, proof: bytes) -> bool:
    """True when ``proof`` is the n-th root of ``context``'s challenge value modulo n."""
    if len(proof) != public_key.plaintext_bytes:
        return False
    n = public_key.n
    root = mpz.from_bytes(proof, "big")
    if not 0 < root < n:
        return False
    return bool(gmpy2.powmod(root, n, n) == key_challenge_value(public_key, context))


def recover_randomness(
    ciphertexts: Sequence[Any], constants: CrtConstants, *, constant_time: bool = True
) -> list[int]:
    """Each ciphertext's ``r`` with ``c = (1+n)^m · r^n mod n²``: the n-th root of ``c mod n``."""
    n = constants.n
    return [int(r) for r in _nth_root([mpz(c) % n for c in ciphertexts], constants, constant_time)]


def _open_job(
    ciphertexts: Sequence[Any], constants: CrtConstants, constant_time: bool
) -> list[tuple[int, int]]:
    plaintexts = crt_decrypt(ciphertexts, constants, constant_time=constant_time)
    randomness = recover_randomness(ciphertexts, constants, constant_time=constant_time)
    return list(zip(plaintexts, randomness, strict=True))


def _open_chunk(p: int, q: int, data: bytes, width: int, ct: bool) -> list[tuple[int, int]]:
    """Worker-process job: `_open_job` on fixed-width big-endian ciphertexts."""
    values = [mpz.from_bytes(data[i : i + width], "big") for i in range(0, len(data), width)]
    return _open_job(values, CrtConstants(p, q), ct)


def open_ciphertexts(
    ciphertexts: Sequence[Any],
    constants: CrtConstants,
    *,
    workers: int = 1,
    constant_time: bool = True,
    pool: DecryptPool | None = None,
) -> tuple[list[int], list[int]]:
    """Plaintexts and randomness of each ciphertext (validate the ciphertexts first).

    Both come out of one pass per ciphertext, in the same worker (``pool``'s when given).
    """
    pairs = parallel_crt(
        _open_job,
        _open_chunk,
        ciphertexts,
        constants,
        workers,
        constant_time=constant_time,
        pool=pool,
    )
    return [m for m, _ in pairs], [r for _, r in pairs]


def multi_powmod(bases: Sequence[Any], exponents: Sequence[int], modulus: Any, bits: int) -> mpz:
    """``Π bases[i]^exponents[i] mod modulus`` for exponents below ``2^bits`` (bucket method).

    Pippenger's bucket method: per window of w bits, one multiplication per base into
    the bucket of its digit, then ``2·2^w`` to weigh the buckets, and w squarings; for
    a few hundred bases and 64-bit exponents that is about 10 multiplications per base
    instead of ~96 for a separate exponentiation each. Public data only (not
    constant-time).
    """
    count = len(bases)
    if count != len(exponents):
        raise ValueError(f"{count} bases for {len(exponents)} exponents")
    window = max(2, min(12, count.bit_length() - 2))
    mask = (1 << window) - 1
    mod = mpz(modulus)
    acc = mpz(1)
    top = -(-bits // window) * window
    for shift in range(top - window, -1, -window):
        if shift != top - window:
            for _ in range(window):
                acc = acc * acc % mod
        buckets: list[Any] = [None] * (mask + 1)
        for base, exponent in zip(bases, exponents, strict=True):
            digit = (exponent >> shift) & mask
            if digit:
                held = buckets[digit]
                buckets[digit] = base if held is None else held * base % mod
        running, total = mpz(1), mpz(1)
        started = False
        for digit in range(mask, 0, -1):
            held = buckets[digit]
            if held is not None:
                running = running * held % mod
                started = True
            if started:
                total = total * running % mod
        acc = acc * total % mod
    return acc


def check_decryptions(
    public_key: PublicKey,
    ciphertexts: Sequence[Any],
    plaintexts: Sequence[int],
    randomness: Sequence[int],
    *,
    coefficient: Callable[[int], int] = secrets.randbits,
) -> bool:
    """True when every ``(m_i, r_i)`` re-encrypts to ``c_i`` (batched; see the module doc).

    ``coefficient(bits)`` draws the secret random coefficients; it is a parameter only
    so that tests can show what a predictable one would let through.
    """
    count = len(ciphertexts)
    if len(plaintexts) != count or len(randomness) != count:
        return False
    n, nsquare = public_key.n, public_key.nsquare
    if any(not 0 <= m < n for m in plaintexts) or any(not 0 < r < n for r in randomness):
        return False
    if count == 0:
        return True
    weights = [coefficient(BATCH_BITS) for _ in range(count)]
    weighted_m = sum(a * m for a, m in zip(weights, plaintexts, strict=True)) % n
    r_product = multi_powmod([mpz(r) for r in randomness], weights, n, BATCH_BITS)
    left = (1 + weighted_m * n) * gmpy2.powmod(r_product, n, nsquare) % nsquare
    right = multi_powmod([mpz(c) for c in ciphertexts], weights, nsquare, BATCH_BITS)
    return bool(left == right)
