"""CRT Paillier decryption of whole vectors, in this process or spread over processes.

This module knows the private primes and big integers only: no key files, no packing.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any, TypeVar

import gmpy2
from gmpy2 import mpz

from fedcore.crypto.modexp import FixedExponent

__all__ = ["CrtConstants", "crt_decrypt", "parallel_crt", "parallel_crt_decrypt"]

T = TypeVar("T")

# Below this many ciphertexts per worker, starting a process costs more than it saves.
_MIN_CIPHERTEXTS_PER_WORKER = 32


class CrtConstants:
    """The per-key constants of CRT decryption (as in phe's ``PaillierPrivateKey``).

    With ``p < q``, ``g = n + 1`` and ``L_x(u) = (u - 1) / x``:
    ``hp = L_p(g^(p-1) mod p²)^-1 mod p``, ``hq`` likewise, ``p_inverse = p^-1 mod q``.
    """

    __slots__ = (
        "_exponentiations",
        "_roots",
        "hp",
        "hq",
        "n",
        "p",
        "p_inverse",
        "psquare",
        "q",
        "qsquare",
    )

    def __init__(self, p: int, q: int) -> None:
        p_, q_ = mpz(min(p, q)), mpz(max(p, q))
        self.p, self.q = p_, q_
        self.n = p_ * q_
        self.psquare, self.qsquare = p_ * p_, q_ * q_
        self.p_inverse = gmpy2.invert(p_, q_)
        g = self.n + 1
        self.hp = gmpy2.invert(_l_function(gmpy2.powmod(g, p_ - 1, self.psquare), p_), p_)
        self.hq = gmpy2.invert(_l_function(gmpy2.powmod(g, q_ - 1, self.qsquare), q_), q_)
        self._exponentiations: dict[bool, tuple[FixedExponent, FixedExponent]] = {}
        self._roots: dict[bool, tuple[FixedExponent, FixedExponent]] = {}

    def exponentiations(self, constant_time: bool) -> tuple[FixedExponent, FixedExponent]:
        """``c ↦ c^(p-1) mod p²`` and ``c ↦ c^(q-1) mod q²``, built once per mode."""
        pair = self._exponentiations.get(constant_time)
        if pair is None:
            pair = (
                FixedExponent(self.p - 1, self.psquare, constant_time=constant_time),
                FixedExponent(self.q - 1, self.qsquare, constant_time=constant_time),
            )
            self._exponentiations[constant_time] = pair
        return pair

    def root_exponentiations(self, constant_time: bool) -> tuple[FixedExponent, FixedExponent]:
        """``v ↦ v^(n⁻¹ mod p-1) mod p`` and the same mod q (n-th roots), built once per mode."""
        pair = self._roots.get(constant_time)
        if pair is None:
            p, q, n = self.p, self.q, self.n
            pair = (
                FixedExponent(gmpy2.invert(n, p - 1), p, constant_time=constant_time),
                FixedExponent(gmpy2.invert(n, q - 1), q, constant_time=constant_time),
            )
            self._roots[constant_time] = pair
        return pair


def _l_function(u: Any, x: Any) -> Any:
    """Paillier's ``L_x(u) = (u - 1) / x``, an exact division for u = 1 mod x."""
    return gmpy2.divexact(u - 1, x)


def crt_decrypt(
    ciphertexts: Sequence[Any], constants: CrtConstants, *, constant_time: bool = True
) -> list[int]:
    """Decrypt each ciphertext with the CRT: two half-size exponentiations instead of one.

    ``m_p = L_p(c^(p-1) mod p²) · hp mod p`` recovers ``m mod p``: in Z*_{p²},
    ``c^(p-1) = (1 + n)^(m(p-1)) · r^(n(p-1))`` and ``r^(n(p-1)) = 1`` (the group has
    order p(p-1) and p | n), while ``(1 + n)^(m(p-1)) = 1 + m(p-1)·n mod p²``, so
    ``L_p`` of it is ``m(p-1)q mod p`` and ``hp`` divides out ``(p-1)q``. Same mod q;
    Garner's formula ``m = m_p + ((m_q - m_p) · p^-1 mod q) · p`` gives ``m mod n``.
    The secret exponents ``p - 1`` and ``q - 1`` go through a constant-time
    exponentiation by default (OpenSSL's, else GMP's ``powm_sec``: see
    :mod:`fedcore.crypto.modexp`); ``constant_time=False`` uses GMP's variable-time
    ``powm`` (what phe does), acceptable only where no untrusted code shares the machine.
    Results are Python ints.
    """
    p, q = constants.p, constants.q
    hp, hq, p_inverse = constants.hp, constants.hq, constants.p_inverse
    p_side, q_side = constants.exponentiations(constant_time)
    divexact = gmpy2.divexact
    out: list[int] = []
    for up, uq in zip(p_side.powmod(ciphertexts), q_side.powmod(ciphertexts), strict=True):
        mp = divexact(up - 1, p) * hp % p
        mq = divexact(uq - 1, q) * hq % q
        out.append(int(mp + (mq - mp) * p_inverse % q * p))
    return out


def _decrypt_chunk(p: int, q: int, data: bytes, width: int, constant_time: bool) -> list[int]:
    """Worker-process job: decrypt fixed-width big-endian ciphertexts."""
    return crt_decrypt(_parse_chunk(data, width), CrtConstants(p, q), constant_time=constant_time)


def _parse_chunk(data: bytes, width: int) -> list[Any]:
    from_bytes = mpz.from_bytes
    return [from_bytes(data[i : i + width], "big") for i in range(0, len(data), width)]


Job = Callable[[Sequence[Any], CrtConstants, bool], list[T]]
"""In-process work on a range: ``(ciphertexts, constants, constant_time) -> results``."""
ChunkJob = Callable[[int, int, bytes, int, bool], list[T]]
"""The same work in a worker process: ``(p, q, fixed-width ciphertexts, width, ct)``."""


def parallel_crt(
    job: Job[T],
    chunk_job: ChunkJob[T],
    ciphertexts: Sequence[Any],
    constants: CrtConstants,
    workers: int,
    *,
    constant_time: bool = True,
) -> list[T]:
    """``job`` over ``workers`` contiguous ranges of ``ciphertexts``, one per process.

    The calling process runs the first range itself and ``workers - 1`` spawned
    processes the others (``spawn``: never a fork of a possibly threaded process).
    Ciphertexts travel as fixed-width bytes. Small inputs stay in this process.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    total = len(ciphertexts)
    workers = min(workers, max(1, total // _MIN_CIPHERTEXTS_PER_WORKER))
    if workers == 1:
        return job(ciphertexts, constants, constant_time)
    width = 2 * ((constants.n.bit_length() + 7) // 8)
    bounds = [total * i // workers for i in range(workers + 1)]
    with ProcessPoolExecutor(max_workers=workers - 1, mp_context=get_context("spawn")) as pool:
        futures = []
        for lo, hi in itertools.pairwise(bounds[1:]):
            data = b"".join(mpz(c).to_bytes(width, "big") for c in ciphertexts[lo:hi])
            futures.append(
                pool.submit(
                    chunk_job, int(constants.p), int(constants.q), data, width, constant_time
                )
            )
        out = job(ciphertexts[: bounds[1]], constants, constant_time)
        for future in futures:
            out.extend(future.result())
    return out


def _decrypt_job(ciphertexts: Sequence[Any], constants: CrtConstants, ct: bool) -> list[int]:
    return crt_decrypt(ciphertexts, constants, constant_time=ct)


def parallel_crt_decrypt(
    ciphertexts: Sequence[Any],
    constants: CrtConstants,
    workers: int,
    *,
    constant_time: bool = True,
) -> list[int]:
    """:func:`crt_decrypt` split into ``workers`` contiguous ranges (see `parallel_crt`)."""
    return parallel_crt(
        _decrypt_job,
        _decrypt_chunk,
        ciphertexts,
        constants,
        workers,
        constant_time=constant_time,
    )
