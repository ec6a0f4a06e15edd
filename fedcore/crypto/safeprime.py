"""Safe primes ``p = 2p' + 1`` for the threshold key ceremony, found with gmpy2.

A threshold Paillier key (Shoup 2000; Damgård–Jurik 2001, §4) needs ``n = p·q`` with
``p = 2p' + 1`` and ``q = 2q' + 1`` where ``p'`` and ``q'`` are prime: then the squares
of Z*_{n²} form a cyclic group of order ``n·p'·q'`` with no small prime factor, which
is what makes the shares' verification proofs sound. gmpy2 has no safe-prime search,
so this module sieves candidates for ``p'`` against every prime below 2^16 (for ``p'``
and for ``2p' + 1`` at once), then lets ``gmpy2.is_prime`` (Miller–Rabin) decide.
A 1,024-bit safe prime takes tens of seconds; ``progress`` is told each batch.

Knows nothing of Paillier keys or shares.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

import gmpy2
import numpy as np
from gmpy2 import mpz

__all__ = ["SafePrimeProgress", "random_safe_prime"]

SafePrimeProgress = Callable[[int], None]
"""Called with the number of candidates tried so far, after each sieved window."""

_SIEVE_BOUND = 1 << 16
_MIN_BITS = 64  # candidates stay far above the sieve's primes and the window fits
_WINDOW = 1 << 15  # candidates p' = base + 2k, k < _WINDOW, per sieve pass
_MR_ROUNDS = 40  # Miller–Rabin rounds for the final checks (error < 4^-40)
_small_primes: np.ndarray | None = None


def _sieve_primes() -> np.ndarray:
    global _small_primes
    if _small_primes is None:
        flags = np.ones(_SIEVE_BOUND, dtype=bool)
        flags[:2] = False
        for i in range(2, int(_SIEVE_BOUND**0.5) + 1):
            if flags[i]:
                flags[i * i :: i] = False
        _small_primes = np.flatnonzero(flags)[1:]  # odd primes only
    return _small_primes


def random_safe_prime(bits: int, progress: SafePrimeProgress | None = None) -> mpz:
    """A uniformly placed random safe prime ``p = 2p' + 1`` of exactly ``bits`` bits.

    The two top bits are set, so the product of two such primes has exactly ``2·bits``
    bits. Candidates ``p'`` come from :mod:`secrets`; ``p'`` and ``2p' + 1`` must both
    survive the sieve, a base-2 Fermat test, and ``gmpy2.is_prime`` with 40 rounds.
    """
    if bits < _MIN_BITS:
        raise ValueError(f"bits must be >= {_MIN_BITS} for a safe prime, got {bits}")
    primes = _sieve_primes()
    inverse_two = (primes + 1) // 2  # 2^-1 mod r for odd r
    tried = 0
    while True:
        # p' has bits - 1 bits with its top two bits set, and is odd
        base = mpz(secrets.randbits(bits - 3)) | (mpz(3) << (bits - 3)) | 1
        if base + 2 * _WINDOW >= mpz(1) << (bits - 1):
            continue
        alive = np.ones(_WINDOW, dtype=bool)
        residues = np.array([int(base % int(r)) for r in primes], dtype=np.int64)
        # p' = base + 2k ≡ 0 (mod r)   ⇔ k ≡ -base · 2^-1
        # 2p' + 1 ≡ 0 (mod r)          ⇔ p' ≡ (r - 1)/2 ⇔ k ≡ ((r-1)/2 - base) · 2^-1
        first = (-residues % primes) * inverse_two % primes
        second = (((primes - 1) // 2 - residues) % primes) * inverse_two % primes
        for r, a, b in zip(primes.tolist(), first.tolist(), second.tolist(), strict=True):
            alive[a::r] = False
            alive[b::r] = False
        for k in np.flatnonzero(alive).tolist():
            candidate = base + 2 * k
            if gmpy2.powmod(2, candidate - 1, candidate) != 1:
                continue
            p = 2 * candidate + 1
            if gmpy2.powmod(2, p - 1, p) != 1:
                continue
            if gmpy2.is_prime(candidate, _MR_ROUNDS) and gmpy2.is_prime(p, _MR_ROUNDS):
                if progress is not None:
                    progress(tried + k + 1)
                return p
        tried += _WINDOW
        if progress is not None:
            progress(tried)
