"""Modular exponentiation with a fixed secret exponent and modulus: the decryption core.

CRT decryption raises every ciphertext to ``p - 1`` mod ``p²`` (and ``q - 1`` mod
``q²``): secrets, so the exponentiation must not leak them through its timing or its
memory access pattern. Two constant-time implementations exist on a usual machine:

- OpenSSL's ``BN_mod_exp_mont_consttime`` (the routine behind RSA private-key
  operations: fixed 5-bit windows, Montgomery multiplication, a cache-timing-safe table
  gather, mulx/adx assembly). Reached with :mod:`ctypes` in the ``libcrypto`` that
  Python's own :mod:`ssl` module uses. About 2.3× faster than GMP's ``powm_sec`` for a
  2048-bit modulus and a 1024-bit exponent on this machine, and faster even than GMP's
  variable-time ``powm``.
- GMP's ``mpz_powm_sec`` (``gmpy2.powmod_sec``): the fallback when no usable
  ``libcrypto`` is found, or when ``FEDCORE_MODEXP=gmp`` is set.

``constant_time=False`` uses GMP's variable-time ``powm`` (what phe does). Nothing here
is a new primitive: both libraries do the arithmetic; this module only moves integers
in and out. Each OpenSSL result is the same integer GMP computes (tested against
``gmpy2.powmod``), and a self-test runs when the library is first loaded.

Knows nothing of Paillier, keys or packing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading
import weakref
from collections.abc import Sequence
from typing import Any

import gmpy2
from gmpy2 import mpz

__all__ = ["BACKEND_ENV", "FixedExponent", "constant_time_backend"]

log = logging.getLogger(__name__)

BACKEND_ENV = "FEDCORE_MODEXP"
"""Environment variable: ``gmp`` forces GMP's ``powm_sec`` even when OpenSSL is usable."""

# OpenSSL 1.1.0 made BN_set_flags a function and BN_bn2binpad public.
_MIN_OPENSSL_VERSION = 0x1010000F
_BN_FLG_CONSTTIME = 0x04

_c_void_p = ctypes.c_void_p


class _LibCrypto:
    """The few BIGNUM functions of ``libcrypto`` we call, with their C signatures."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib
        self.version = self._fn("OpenSSL_version_num", ctypes.c_ulong, [])()
        if self.version < _MIN_OPENSSL_VERSION:
            raise OSError(f"OpenSSL {self.version:#x} is older than 1.1.0")
        self.bn_new = self._fn("BN_new", _c_void_p, [])
        self.bn_clear_free = self._fn("BN_clear_free", None, [_c_void_p])
        self.bn_set_flags = self._fn("BN_set_flags", None, [_c_void_p, ctypes.c_int])
        self.bn_bin2bn = self._fn(
            "BN_bin2bn", _c_void_p, [ctypes.c_char_p, ctypes.c_int, _c_void_p]
        )
        self.bn_bn2binpad = self._fn(
            "BN_bn2binpad", ctypes.c_int, [_c_void_p, ctypes.c_char_p, ctypes.c_int]
        )
        self.ctx_new = self._fn("BN_CTX_new", _c_void_p, [])
        self.ctx_free = self._fn("BN_CTX_free", None, [_c_void_p])
        self.mont_new = self._fn("BN_MONT_CTX_new", _c_void_p, [])
        self.mont_set = self._fn("BN_MONT_CTX_set", ctypes.c_int, [_c_void_p] * 3)
        self.mont_free = self._fn("BN_MONT_CTX_free", None, [_c_void_p])
        self.mod_exp = self._fn("BN_mod_exp_mont_consttime", ctypes.c_int, [_c_void_p] * 6)

    def _fn(self, name: str, restype: Any, argtypes: list[Any]) -> Any:
        fn = getattr(self.lib, name)  # AttributeError when the symbol is missing
        fn.restype = restype
        fn.argtypes = argtypes
        return fn

    def bignum(self, value: int, width: int, *, secret: bool) -> int:
        """A new BIGNUM holding ``value`` (``width`` bytes, big-endian)."""
        data = int(value).to_bytes(width, "big")
        bn = self.bn_bin2bn(data, width, None)
        if not bn:
            raise MemoryError("OpenSSL BN_bin2bn failed")
        if secret:
            self.bn_set_flags(bn, _BN_FLG_CONSTTIME)
        return int(bn)


def _candidate_paths() -> list[str]:
    """Where libcrypto may be: first the copy :mod:`ssl` already mapped into this process."""
    import ssl  # noqa: F401  (maps ssl's libcrypto, so /proc/self/maps names it)

    paths: list[str] = []
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                path = line.rsplit(" ", 1)[-1].strip()
                if "libcrypto" in os.path.basename(path) and path not in paths:
                    paths.append(path)
    except OSError:
        pass  # not Linux
    found = ctypes.util.find_library("crypto")
    paths += [p for p in (found, "libcrypto.so.3", "libcrypto.so.1.1") if p and p not in paths]
    return paths


_load_lock = threading.Lock()
_loaded: list[_LibCrypto | None] = []  # [] = not tried yet; [None] = unusable


def _libcrypto() -> _LibCrypto | None:
    """The loaded, self-tested libcrypto, or None (then GMP is used)."""
    with _load_lock:
        if not _loaded:
            _loaded.append(_load())
        return _loaded[0]


def _load() -> _LibCrypto | None:
    if os.environ.get(BACKEND_ENV, "").strip().lower() == "gmp":
        log.info("%s=gmp: constant-time exponentiation by GMP powm_sec", BACKEND_ENV)
        return None
    for path in _candidate_paths():
        try:
            candidate = _LibCrypto(ctypes.CDLL(path))
            _self_test(candidate)
        except (OSError, AttributeError, ArithmeticError, MemoryError) as exc:
            log.debug("libcrypto at %s not usable: %s", path, exc)
            continue
        log.info("constant-time exponentiation by OpenSSL %#x (%s)", candidate.version, path)
        return candidate
    log.info("no usable libcrypto: constant-time exponentiation by GMP powm_sec")
    return None


def _self_test(lib: _LibCrypto) -> None:
    """One known exponentiation through the library; raises ArithmeticError if wrong."""
    modulus = mpz(2**127 - 1) ** 2  # an odd square, like p²
    exponent = mpz(2**127 - 2)
    base = mpz(0x0123456789ABCDEF0123456789ABCDEF)
    table = _OpenSSLTable(lib, exponent, modulus)
    if table.powmod([base]) != [gmpy2.powmod(base, exponent, modulus)]:
        raise ArithmeticError("BN_mod_exp_mont_consttime disagrees with GMP")


def constant_time_backend() -> str:
    """Which library does constant-time exponentiation here: ``openssl`` or ``gmp``."""
    return "openssl" if _libcrypto() is not None else "gmp"


class _OpenSSLTable:
    """A Montgomery context for one secret (exponent, odd modulus), owned by OpenSSL."""

    def __init__(self, lib: _LibCrypto, exponent: Any, modulus: Any) -> None:
        self._lib = lib
        self.width = (int(modulus).bit_length() + 7) // 8
        self._exponent = lib.bignum(exponent, (int(exponent).bit_length() + 7) // 8, secret=True)
        self._modulus = lib.bignum(modulus, self.width, secret=True)
        self._mont = lib.mont_new()
        ctx = lib.ctx_new()
        try:
            if not self._mont or not ctx or lib.mont_set(self._mont, self._modulus, ctx) != 1:
                raise MemoryError("OpenSSL BN_MONT_CTX_set failed")
        finally:
            lib.ctx_free(ctx)
        weakref.finalize(self, _free, lib, self._exponent, self._modulus, self._mont)

    def powmod(self, bases: Sequence[Any]) -> list[Any]:
        """``base^exponent mod modulus`` for each base, which must be in [0, modulus)."""
        lib, width = self._lib, self.width
        ctx, base_bn, result_bn = lib.ctx_new(), lib.bn_new(), lib.bn_new()
        out_buffer = ctypes.create_string_buffer(width)
        from_bytes = mpz.from_bytes
        try:
            if not (ctx and base_bn and result_bn):
                raise MemoryError("OpenSSL BN_CTX_new/BN_new failed")
            lib.bn_set_flags(result_bn, _BN_FLG_CONSTTIME)
            results = []
            for base in bases:
                lib.bn_bin2bn(int(base).to_bytes(width, "big"), width, base_bn)
                if (
                    lib.mod_exp(result_bn, base_bn, self._exponent, self._modulus, ctx, self._mont)
                    != 1
                ):
                    raise ArithmeticError("OpenSSL BN_mod_exp_mont_consttime failed")
                lib.bn_bn2binpad(result_bn, out_buffer, width)
                results.append(from_bytes(out_buffer.raw, "big"))
            return results
        finally:
            lib.bn_clear_free(base_bn)
            lib.bn_clear_free(result_bn)
            lib.ctx_free(ctx)


def _free(lib: _LibCrypto, exponent: int, modulus: int, mont: int) -> None:
    lib.bn_clear_free(exponent)
    lib.bn_clear_free(modulus)
    lib.mont_free(mont)


class FixedExponent:
    """``x ↦ x^exponent mod modulus`` for a secret exponent and an odd secret modulus.

    ``constant_time=True`` (the default) runs OpenSSL's constant-time Montgomery
    exponentiation when a usable libcrypto is present, else GMP's ``powm_sec``;
    ``constant_time=False`` runs GMP's variable-time ``powm``. :attr:`backend` says which.
    Safe to share between threads (each call has its own OpenSSL scratch space).
    """

    __slots__ = ("__weakref__", "_exponent", "_modulus", "_table", "backend")

    def __init__(self, exponent: Any, modulus: Any, *, constant_time: bool = True) -> None:
        self._exponent, self._modulus = mpz(exponent), mpz(modulus)
        if self._modulus < 3 or self._modulus % 2 == 0:
            raise ValueError("modulus must be odd and >= 3")
        if self._exponent < 1:
            raise ValueError("exponent must be >= 1")
        self._table: _OpenSSLTable | None = None
        lib = _libcrypto() if constant_time else None
        if lib is not None:
            self._table = _OpenSSLTable(lib, self._exponent, self._modulus)
            self.backend = "openssl"
        else:
            self.backend = "gmp-sec" if constant_time else "gmp"

    def powmod(self, bases: Sequence[Any]) -> list[Any]:
        """Each base (reduced mod the modulus first) raised to the exponent, as mpz."""
        modulus = self._modulus
        if self._table is not None:
            return self._table.powmod([b % modulus for b in bases])
        powmod = gmpy2.powmod_sec if self.backend == "gmp-sec" else gmpy2.powmod
        exponent = self._exponent
        return [powmod(b % modulus, exponent, modulus) for b in bases]
