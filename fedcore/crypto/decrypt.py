"""CRT Paillier decryption of whole vectors, in this process or spread over processes.

This module knows the private primes and big integers only: no key files, no packing.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from multiprocessing import get_context
from typing import Any, TypeVar

import gmpy2
from gmpy2 import mpz

from fedcore.crypto.modexp import FixedExponent, constant_time_backend

__all__ = ["CrtConstants", "DecryptPool", "crt_decrypt", "parallel_crt", "parallel_crt_decrypt"]

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


class DecryptPool:
    """Workers for decrypting vectors, started once and reused for every shard and round.

    ``workers`` is the number of ranges a vector is split into; the calling thread runs
    the first range itself. With OpenSSL's constant-time exponentiation (the default
    backend, see :mod:`fedcore.crypto.modexp`) the other ranges run in threads: each
    exponentiation is one foreign call made through :mod:`ctypes`, which releases the
    GIL, so threads use every core without a process start or any copying (1.9x on 2
    cores here). With GMP (``constant_time=False`` or no usable libcrypto) they run in
    ``workers - 1`` spawned processes (never a fork of a possibly threaded process),
    started on first use and kept. Use as a context manager or call :meth:`close`.
    """

    def __init__(self, workers: int) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers = workers
        self._threads: ThreadPoolExecutor | None = None
        self._processes: ProcessPoolExecutor | None = None
        self.processes_started = 0
        """How many times worker processes were started (0 or 1 for a pool's life)."""

    def _executor(self, constant_time: bool) -> Executor:
        # threads only where the exponentiations run without the GIL (OpenSSL's)
        if constant_time and constant_time_backend() == "openssl":
            if self._threads is None:
                self._threads = ThreadPoolExecutor(
                    max_workers=self.workers - 1, thread_name_prefix="fedcore-decrypt"
                )
            return self._threads
        if self._processes is None:
            self._processes = ProcessPoolExecutor(
                max_workers=self.workers - 1, mp_context=get_context("spawn")
            )
            self.processes_started += 1
        return self._processes

    def run(
        self,
        job: Job[T],
        chunk_job: ChunkJob[T],
        ciphertexts: Sequence[Any],
        constants: CrtConstants,
        *,
        constant_time: bool = True,
    ) -> list[T]:
        """``job`` over up to ``workers`` contiguous ranges of ``ciphertexts``, in order."""
        total = len(ciphertexts)
        workers = min(self.workers, max(1, total // _MIN_CIPHERTEXTS_PER_WORKER))
        if workers == 1:
            return job(ciphertexts, constants, constant_time)
        executor = self._executor(constant_time)
        bounds = [total * i // workers for i in range(workers + 1)]
        futures = []
        if isinstance(executor, ThreadPoolExecutor):
            for lo, hi in itertools.pairwise(bounds[1:]):
                futures.append(executor.submit(job, ciphertexts[lo:hi], constants, constant_time))
        else:
            # Processes get the ranges as fixed-width bytes and rebuild the constants.
            width = 2 * ((constants.n.bit_length() + 7) // 8)
            p, q = int(constants.p), int(constants.q)
            for lo, hi in itertools.pairwise(bounds[1:]):
                data = b"".join(mpz(c).to_bytes(width, "big") for c in ciphertexts[lo:hi])
                futures.append(executor.submit(chunk_job, p, q, data, width, constant_time))
        out = job(ciphertexts[: bounds[1]], constants, constant_time)
        for future in futures:
            out.extend(future.result())
        return out

    def close(self) -> None:
        """Stop the workers (a later :meth:`run` starts new ones)."""
        threads, self._threads = self._threads, None
        processes, self._processes = self._processes, None
        if threads is not None:
            threads.shutdown(wait=True, cancel_futures=True)
        if processes is not None:
            processes.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> DecryptPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def parallel_crt(
    job: Job[T],
    chunk_job: ChunkJob[T],
    ciphertexts: Sequence[Any],
    constants: CrtConstants,
    workers: int,
    *,
    constant_time: bool = True,
    pool: DecryptPool | None = None,
) -> list[T]:
    """``job`` over ``workers`` contiguous ranges of ``ciphertexts`` (see `DecryptPool`).

    With ``pool`` its workers do the work (``workers`` is then the pool's); without,
    a pool lives for this one call. Small inputs stay in the calling thread.
    """
    if pool is not None:
        return pool.run(job, chunk_job, ciphertexts, constants, constant_time=constant_time)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    with DecryptPool(workers) as once:
        return once.run(job, chunk_job, ciphertexts, constants, constant_time=constant_time)


def _decrypt_job(ciphertexts: Sequence[Any], constants: CrtConstants, ct: bool) -> list[int]:
    return crt_decrypt(ciphertexts, constants, constant_time=ct)


def parallel_crt_decrypt(
    ciphertexts: Sequence[Any],
    constants: CrtConstants,
    workers: int,
    *,
    constant_time: bool = True,
    pool: DecryptPool | None = None,
) -> list[int]:
    """:func:`crt_decrypt` split into ``workers`` contiguous ranges (see `parallel_crt`)."""
    return parallel_crt(
        _decrypt_job,
        _decrypt_chunk,
        ciphertexts,
        constants,
        workers,
        constant_time=constant_time,
        pool=pool,
    )
