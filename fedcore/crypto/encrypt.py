"""Fast Paillier encryption: short-exponent random factors, a fixed-base table, a pool.

Paillier with ``g = n + 1`` encrypts ``m`` as ``c = g^m · r^n mod n²`` and, because
``(1 + n)^m = 1 + m·n mod n²`` (binomial theorem: every higher term has a factor n²),
the message part costs one multiplication. The random factor ``r^n mod n²`` is the
expensive part: a full ``powmod`` with an exponent as long as n (≈ 9 ms at 2048 bits).

This module makes random factors the Damgård–Jurik–Nielsen way (DJN 2010, "A
generalization of Paillier's public-key system with applications to electronic voting",
section 4.2): fix ``h = -x² mod n`` for a random ``x`` in Z*_n and ``hs = h^n mod n²``;
a random factor is ``hs^a = (h^a)^n mod n²`` for a fresh uniformly random *short*
exponent ``a``. ``hs`` is a fixed base, so ``hs^a`` is a product of table entries
``hs^(d_i · 2^(w·i))`` over the w-bit digits ``d_i`` of ``a`` (one multiplication per
non-zero digit), with the table computed once per key instance.

This module knows big integers and nothing of keys on disk, packing or the wire.
"""

from __future__ import annotations

import contextlib
import logging
import operator
import os
import secrets
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing import get_context
from typing import TYPE_CHECKING, Any

import gmpy2
from gmpy2 import mpz

if TYPE_CHECKING:
    from fedcore.crypto.keys import PublicKey

_logger = logging.getLogger(__name__)

__all__ = [
    "BACKGROUND_NICENESS",
    "DEFAULT_WINDOW_BITS",
    "EncryptionPool",
    "FixedBaseTable",
    "ShortExponentRandomizer",
    "check_plaintexts",
    "encrypt_with_factors",
    "short_exponent_bits",
]

DEFAULT_WINDOW_BITS = 8
"""Window width of the fixed-base table: 2^8 - 1 powers per window, ≈ 3.6 MB at 2048 bits."""


def short_exponent_bits(key_bits: int) -> int:
    """Length of the secret exponent ``a`` in ``hs^a``: ``ceil(key_bits / 2)``.

    ===========  =============
    key bits     exponent bits
    ===========  =============
    512          256 (tests)
    1024         512 (tests)
    2048         1024
    3072         1536
    ===========  =============

    This is the length Damgård, Jurik and Nielsen give for the fixed-base randomizer
    (DJN 2010, "A generalization of Paillier's public-key system with applications to
    electronic voting", IJIS 9(6), section 4.2), and the one SecretFlow's HEU uses for
    its DJN scheme (``r <- {0,1}^ceil(k/2)``). Under DCR, ``hs^a`` for such ``a`` is
    indistinguishable from a uniform n-th power, so ciphertexts stay semantically
    secure. An exponent of twice the key's security level (224 bits at 2048) would be
    4.6x cheaper and is out of reach of the generic kangaroo attack (2^112 steps), but
    its indistinguishability rests on a short-exponent assumption in a group of
    unknown order that we found no published analysis of for Paillier; fedcore does
    not use it. The cost is paid off the round's critical path: a client keeps an
    :class:`EncryptionPool` of factors made between rounds.
    """
    if key_bits <= 0:
        raise ValueError(f"key_bits must be positive, got {key_bits}")
    return -(-key_bits // 2)


class FixedBaseTable:
    """Powers of one fixed base mod ``modulus`` so that ``base^a`` costs one mulmod per digit.

    For w-bit windows, ``table[i][d - 1] = base^(d · 2^(w·i)) mod modulus`` for
    ``d = 1 .. 2^w - 1``. Writing ``a = Σ d_i · 2^(w·i)`` gives
    ``base^a = Π table[i][d_i - 1]`` over the non-zero digits: for the 1024-bit exponents
    of a 2048-bit key and w = 8 that is at most 128 multiplications (versus ≈ 1,500 for
    square-and-multiply), at the price of 128 · 255 precomputed entries (16 MiB).
    """

    __slots__ = ("_modulus", "_table", "exponent_bits", "window_bits")

    def __init__(
        self,
        base: int,
        modulus: int,
        exponent_bits: int,
        *,
        window_bits: int = DEFAULT_WINDOW_BITS,
    ) -> None:
        if not 1 <= window_bits <= 16:
            raise ValueError(f"window_bits must be in 1..16, got {window_bits}")
        if exponent_bits <= 0:
            raise ValueError(f"exponent_bits must be positive, got {exponent_bits}")
        self._modulus = mpz(modulus)
        self.exponent_bits = exponent_bits
        self.window_bits = window_bits
        windows = -(-exponent_bits // window_bits)
        table: list[list[Any]] = []
        window_base = mpz(base) % self._modulus
        for _ in range(windows):
            row = [window_base]
            for _ in range((1 << window_bits) - 2):
                row.append(row[-1] * window_base % self._modulus)
            table.append(row)
            # base^(2^(w·(i+1))) = (last entry) · (window base) = window_base^(2^w)
            window_base = row[-1] * window_base % self._modulus
        self._table = table

    def power(self, exponent: int) -> mpz:
        """``base^exponent mod modulus`` for ``0 <= exponent < 2^exponent_bits``."""
        if not 0 <= exponent < (1 << self.exponent_bits):
            raise ValueError(f"exponent must be in [0, 2^{self.exponent_bits}), got {exponent}")
        w = self.window_bits
        mask = (1 << w) - 1
        modulus = self._modulus
        result = mpz(1)
        e = int(exponent)
        for row in self._table:
            digit = e & mask
            if digit:
                result = result * row[digit - 1] % modulus
            e >>= w
        return result


class ShortExponentRandomizer:
    """Makes fresh Paillier random factors ``hs^a mod n²`` for one public modulus.

    ``hs = h^n mod n²`` with ``h = -x² mod n`` for a secrets-random ``x`` in Z*_n; each
    factor uses a fresh ``a`` of :func:`short_exponent_bits` bits from ``secrets``.
    ``hs^a = (h^a)^n`` is an n-th power, so ``(1 + m·n) · hs^a`` is a valid Paillier
    ciphertext of ``m`` for ``g = n + 1`` that any Paillier decryption (phe's included)
    opens: decryption raises the ciphertext to a multiple of λ(n), which kills every
    n-th power.
    """

    __slots__ = ("exponent_bits", "hs", "n", "nsquare", "table")

    def __init__(
        self,
        n: int,
        *,
        hs: int | None = None,
        window_bits: int = DEFAULT_WINDOW_BITS,
    ) -> None:
        self.n = mpz(n)
        self.nsquare = self.n * self.n
        if hs is None:
            hs = _random_hs(self.n, self.nsquare)
        self.hs = mpz(hs)
        self.exponent_bits = short_exponent_bits(self.n.bit_length())
        self.table = FixedBaseTable(
            self.hs, self.nsquare, self.exponent_bits, window_bits=window_bits
        )

    def factor(self) -> mpz:
        """One fresh random factor ``hs^a mod n²`` (never returned twice, barring 2^-t luck)."""
        return self.table.power(secrets.randbits(self.exponent_bits))

    def factors(self, count: int) -> list[mpz]:
        """``count`` fresh random factors, each with its own exponent."""
        power = self.table.power
        bits = self.exponent_bits
        return [power(secrets.randbits(bits)) for _ in range(count)]


def _random_hs(n: Any, nsquare: Any) -> Any:
    """``hs = (-x² mod n)^n mod n²`` for a random ``x`` in Z*_n (DJN's fixed base)."""
    while True:
        x = mpz(secrets.randbelow(int(n) - 2) + 2)
        if gmpy2.gcd(x, n) == 1:
            break
    h = (-(x * x)) % n
    return gmpy2.powmod(h, n, nsquare)


def encrypt_with_factors(
    plaintexts: Sequence[int], factors: Sequence[Any], n: Any, nsquare: Any
) -> list[mpz]:
    """Paillier-encrypt each plaintext with its own random factor ``rf`` (an n-th power).

    ``c = (1 + m·n) · rf mod n²`` is computed as ``rf + n · (m · rf mod n)``, then one
    conditional subtraction of n²: ``n · (m · rf)`` mod n² only depends on
    ``m · rf mod n``, so the big multiplication happens mod n (half the width), and the
    sum is below 2·n². Raises ValueError unless ``0 <= m < n`` for every plaintext.
    """
    if len(plaintexts) != len(factors):
        raise ValueError(
            f"need one random factor per plaintext: {len(plaintexts)} plaintexts, "
            f"{len(factors)} factors"
        )
    out: list[mpz] = []
    for index, (plaintext, rf) in enumerate(zip(plaintexts, factors, strict=True)):
        m = mpz(operator.index(plaintext))
        if m < 0 or m >= n:
            raise ValueError(f"plaintext at index {index} must satisfy 0 <= m < n, got {m}")
        c = rf + n * (m * (rf % n) % n)
        if c >= nsquare:
            c -= nsquare
        out.append(c)
    return out


def check_plaintexts(plaintexts: Sequence[int], n: Any) -> None:
    """Raise ValueError naming the first plaintext outside ``0 <= m < n`` (or TypeError)."""
    for index, plaintext in enumerate(plaintexts):
        m = operator.index(plaintext)
        if m < 0 or m >= n:
            raise ValueError(f"plaintext at index {index} must satisfy 0 <= m < n, got {m}")


# --- background factor generation -------------------------------------------------

_WORKER_RANDOMIZERS: dict[tuple[int, int], ShortExponentRandomizer] = {}


BACKGROUND_NICENESS = 10
"""How much the pool's worker lowers its scheduling priority (``os.nice``)."""


def _background_priority() -> None:
    """Worker initializer: yield the CPU to the app's foreground work (training, decrypting).

    Factors are made ahead of time, so the worker need not compete with what the client
    is doing now; whatever the pool lacks when an update is encrypted is computed then,
    at the caller's priority.
    """
    with contextlib.suppress(OSError):  # platforms without nice: run at normal priority
        os.nice(BACKGROUND_NICENESS)


def _make_factor_batch(n: int, hs: int, count: int) -> bytes:
    """Worker-process job: ``count`` fresh factors, fixed-width big-endian, concatenated.

    Randomness comes from ``secrets`` (the OS CSPRNG) inside the worker, so no random
    state is ever copied between processes.
    """
    key = (n, hs)
    randomizer = _WORKER_RANDOMIZERS.get(key)
    if randomizer is None:
        _WORKER_RANDOMIZERS.clear()
        randomizer = ShortExponentRandomizer(n, hs=hs)
        _WORKER_RANDOMIZERS[key] = randomizer
    width = 2 * ((n.bit_length() + 7) // 8)
    out = bytearray(width * count)
    for i, factor in enumerate(randomizer.factors(count)):
        out[i * width : (i + 1) * width] = factor.to_bytes(width, "big")
    return bytes(out)


class EncryptionPool:
    """Random factors made ahead of time so that a warm encryption costs ≈ one mulmod.

    The pool holds up to ``size`` factors ``hs^a mod n²`` (see
    :class:`ShortExponentRandomizer`). :meth:`encrypt_vector` pops one factor per
    plaintext — a factor is handed out at most once and then forgotten, because reusing
    randomness leaks the ratio of the two plaintexts' encodings — and computes fresh ones
    when the pool runs dry. With ``background=True`` a worker process (the ``spawn``
    start method: never a fork of a threaded process) refills the pool after each use,
    so a client can prepare between rounds, on another core. Finished background batches
    are collected by the calling thread on the next call, so the pool needs no lock; use
    one pool from one thread. Use as a context manager or call :meth:`close`.

    As with any ``spawn``-based multiprocessing, a script that makes a background pool
    must guard its entry point with ``if __name__ == "__main__":``; if the worker dies
    anyway, the pool logs a warning and computes factors in this process.
    """

    _BATCH = 512  # factors per background job: big enough to amortise pickling

    def __init__(self, public_key: PublicKey, size: int, *, background: bool = True) -> None:
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        self.public_key = public_key
        self.size = size
        self._factors: deque[Any] = deque()
        self._pending: dict[Future[bytes], int] = {}
        self.last_take: tuple[int, int] = (0, 0)
        """(factors from the pool, factors computed on the spot) of the last take."""
        self._executor: ProcessPoolExecutor | None = None
        if background and size > 0:
            self._executor = ProcessPoolExecutor(
                max_workers=1, mp_context=get_context("spawn"), initializer=_background_priority
            )
            self._schedule_refill()

    @property
    def available(self) -> int:
        """Number of unused factors ready now (collects finished background batches)."""
        self._collect(wait=False)
        return len(self._factors)

    def _schedule_refill(self) -> None:
        executor = self._executor
        if executor is None:
            return
        missing = self.size - len(self._factors) - sum(self._pending.values())
        if missing <= 0:
            return
        randomizer = self.public_key._randomizer()
        n, hs = int(randomizer.n), int(randomizer.hs)
        while missing > 0:
            count = min(self._BATCH, missing)
            try:
                future = executor.submit(_make_factor_batch, n, hs, count)
            except (AssertionError, RuntimeError, OSError) as exc:
                # e.g. a daemonic process may not start children: compute factors here
                _logger.warning("no background random-factor worker (%r); computing here", exc)
                self._executor = None
                executor.shutdown(wait=False, cancel_futures=True)
                return
            self._pending[future] = count
            missing -= count

    def _collect(self, *, wait: bool) -> None:
        """Move finished background batches into the pool (each factor once)."""
        width = self.public_key.ciphertext_bytes
        from_bytes = mpz.from_bytes
        for future in list(self._pending):
            if not (wait or future.done()):
                continue
            del self._pending[future]
            try:
                data = future.result()
            except Exception as exc:
                # A dead worker only costs speed: factors are made in this process instead.
                _logger.warning("random-factor worker failed (%r); computing factors here", exc)
                self._executor = None
                continue
            self._factors.extend(
                from_bytes(data[i : i + width], "big") for i in range(0, len(data), width)
            )

    def fill(self) -> None:
        """Block until the pool holds ``size`` factors (computing here what is not in flight)."""
        randomizer = self.public_key._randomizer()
        self._collect(wait=False)
        missing = self.size - len(self._factors) - sum(self._pending.values())
        if missing > 0:
            self._factors.extend(randomizer.factors(missing))
        self._collect(wait=True)
        missing = self.size - len(self._factors)
        if missing > 0:
            self._factors.extend(randomizer.factors(missing))

    def take_factors(self, count: int) -> list[mpz]:
        """Remove and return ``count`` factors: pooled ones first, then freshly computed."""
        self._collect(wait=False)
        taken: list[mpz] = []
        popleft = self._factors.popleft
        while len(taken) < count and self._factors:
            taken.append(popleft())
        pooled = len(taken)
        if pooled < count:
            taken.extend(self.public_key._randomizer().factors(count - pooled))
        self.last_take = (pooled, count - pooled)
        self._schedule_refill()
        return taken

    def encrypt_vector(self, plaintexts: Sequence[int]) -> list[mpz]:
        """Encrypt like :meth:`PublicKey.encrypt_vector`, with pooled random factors."""
        pk = self.public_key
        check_plaintexts(plaintexts, pk.n)
        factors = self.take_factors(len(plaintexts))
        return encrypt_with_factors(plaintexts, factors, pk.n, pk.nsquare)

    def close(self) -> None:
        """Stop the background worker and drop every unused factor."""
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
        self._pending.clear()
        self._factors.clear()

    def __enter__(self) -> EncryptionPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"EncryptionPool(key={self.public_key.fingerprint()}, size={self.size}, "
            f"available={len(self._factors)})"
        )
