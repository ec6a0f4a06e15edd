"""The aggregator's running sum of one range of ciphertext positions, with staged updates.

An update is folded in two steps so that a bad update never touches the sum, even when
the sum is split across workers: `SliceSum.stage` validates the update's slice and
keeps it aside; `commit` multiplies it in (one modular multiplication per ciphertext)
and `abort` drops it. The aggregator commits an update only when every slice staged
cleanly. Multiplication mod n² is commutative and associative, so commits of different
updates may land in any order. Also a vectorized range check on raw ciphertext bytes,
cheap enough to run on every chunk as it arrives.

Two engines do the arithmetic, with the same results:

- native (``fedcore.crypto._montfold``, built from C by ``pip install`` when a compiler
  and OpenSSL's headers are present): loops over the raw bytes calling OpenSSL's
  Montgomery multiplication, with no Python object per ciphertext and without the GIL,
  so slices fold in threads of one process, on every core, with no copies between
  processes. Preferred when importable.
- gmpy2: parses the slice into integers, validates them with
  :func:`~fedcore.crypto.vector.validate_ciphertexts` and folds with
  :func:`~fedcore.crypto.vector.fold_update`. Holds the GIL, so the aggregator runs it
  in worker processes. Forced with ``FEDCORE_FOLD=gmp``.

Holds the public modulus only; knows nothing of sockets, rounds or processes.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import gmpy2
import numpy as np

from fedcore.crypto.keys import PublicKey
from fedcore.crypto.serialize import (
    ciphertext_count,
    deserialize_ciphertexts,
    serialize_ciphertexts,
)
from fedcore.crypto.vector import fold_update
from fedcore.errors import InvalidCiphertextError


def _load_native() -> Any:
    try:
        return importlib.import_module("fedcore.crypto._montfold")
    except ImportError:  # built without a C compiler or OpenSSL's headers
        return None


_montfold = _load_native()

__all__ = ["BACKEND_ENV", "SliceSum", "check_ciphertext_bytes", "native_available"]

BACKEND_ENV = "FEDCORE_FOLD"
"""Environment variable: ``gmp`` folds with gmpy2 even when the native engine is built."""


def native_available() -> bool:
    """Whether `SliceSum` folds natively (the C extension is built and not switched off)."""
    return _montfold is not None and os.environ.get(BACKEND_ENV, "").lower() != "gmp"


def check_ciphertext_bytes(
    data: bytes | memoryview, public_key: PublicKey, *, index_offset: int = 0
) -> int:
    """Check fixed-width big-endian ciphertexts for ``0 < c < n²`` without parsing them.

    Equal-width big-endian integers compare like their byte strings, so ``c < n²`` is:
    at the first byte where c and n² differ, c's byte is smaller. The native engine
    scans with memcmp; without it numpy finds that byte for every row at once. Returns
    the number of ciphertexts; raises InvalidCiphertextError naming the first bad index
    (offset by ``index_offset``). The gcd(c, n) = 1 half of validation needs the
    integers: `SliceSum.stage` does it.
    """
    width = public_key.ciphertext_bytes
    count = ciphertext_count(data, public_key, index_offset=index_offset)
    if count == 0:
        return 0
    bound = int(public_key.nsquare).to_bytes(width, "big")
    if _montfold is not None:  # the same check either way; FEDCORE_FOLD picks the fold
        bad = int(_montfold.first_out_of_range(data, bound))
    else:
        bad = _first_out_of_range_numpy(data, count, bound)
    if bad >= 0:
        index = index_offset + bad
        raise InvalidCiphertextError(
            f"ciphertext at index {index} is outside 0 < c < n²", index=index
        )
    return count


def _first_out_of_range_numpy(data: bytes | memoryview, count: int, bound_bytes: bytes) -> int:
    rows = np.frombuffer(data, dtype=np.uint8).reshape(count, len(bound_bytes))
    bound = np.frombuffer(bound_bytes, dtype=np.uint8)
    differs = rows != bound
    first = differs.argmax(axis=1)
    below = differs.any(axis=1) & (rows[np.arange(count), first] < bound[first])
    good = below & rows.any(axis=1)
    return -1 if good.all() else int(np.argmin(good))


class SliceSum:
    """Running encrypted sum of positions [start, stop) of every update, plus staged updates.

    ``native=None`` picks the native engine when `native_available`; ``False`` forces
    gmpy2 (``True`` requires the native one).
    """

    def __init__(self, n: int, start: int, stop: int, *, native: bool | None = None) -> None:
        if not 0 <= start <= stop:
            raise ValueError(f"slice must satisfy 0 <= start <= stop; got [{start}, {stop})")
        if native is None:
            native = native_available()
        if native and _montfold is None:
            raise RuntimeError("fedcore.crypto._montfold is not built (see setup.py)")
        self.public_key = PublicKey(n)
        self.start, self.stop = start, stop
        self._native: Any = None
        self._running: list[Any] = []
        if native:
            n_bytes = int(n).to_bytes(self.public_key.ciphertext_bytes // 2, "big")
            self._native = _montfold.SliceFolder(n_bytes, stop - start)
        self._staged: dict[int, Any] = {}
        self.reset()

    @property
    def native(self) -> bool:
        """Whether this slice folds with the C engine."""
        return self._native is not None

    @property
    def count(self) -> int:
        """Ciphertext positions in this slice."""
        return self.stop - self.start

    def reset(self) -> None:
        """Start a new round: the sum is E(0) again and nothing is staged."""
        if self._native is not None:
            self._native.reset()
        else:
            self._running = [gmpy2.mpz(1)] * self.count  # 1 = E(0) with r = 1
        self._staged.clear()

    def stage(self, update_id: int, data: bytes | memoryview) -> tuple[int | None, str] | None:
        """Fully validate this slice of an update and keep it; None when it is good.

        Returns (index, reason) instead of raising, so the answer crosses a process
        boundary as plain values. The native engine keeps a reference to ``data``
        (no copy): it must not change until `commit` or `abort`.
        """
        try:
            count = ciphertext_count(data, self.public_key, index_offset=self.start)
            if count != self.count:
                return None, f"slice holds {count} ciphertexts, expected {self.count}"
            if self._native is not None:
                self._check_native(data)
                staged: Any = data
            else:
                staged = deserialize_ciphertexts(
                    data, self.public_key, validate=True, index_offset=self.start
                )
        except InvalidCiphertextError as exc:
            return exc.index, str(exc)
        self._staged[update_id] = staged
        return None

    def _check_native(self, data: bytes | memoryview) -> None:
        bad = self._native.validate(data)
        if bad < 0:
            return
        width = self.public_key.ciphertext_bytes
        c = int.from_bytes(data[bad * width : (bad + 1) * width], "big")
        index = self.start + bad
        if 0 < c < self.public_key.nsquare:
            raise InvalidCiphertextError(
                f"ciphertext at index {index} shares a factor with n (not in Z*_n²)",
                index=index,
            )
        raise InvalidCiphertextError(
            f"ciphertext at index {index} is outside 0 < c < n²", index=index
        )

    def commit(self, update_id: int) -> None:
        """Fold a staged update in: sum[i] = sum[i] · update[i] mod n²."""
        staged = self._staged.pop(update_id)
        if self._native is not None:
            self._native.fold(staged)
        else:
            fold_update(self._running, staged, self.public_key)

    def abort(self, update_id: int) -> None:
        """Forget a staged update (it failed validation elsewhere, or its round closed)."""
        self._staged.pop(update_id, None)

    def serialized(self) -> bytes:
        """The running sum of this slice as fixed-width bytes."""
        if self._native is not None:
            return bytes(self._native.result())
        return serialize_ciphertexts(self._running, self.public_key)


# Worker-process side (the gmpy2 engine): one SliceSum per process, driven by the
# functions below.
_slice: SliceSum | None = None


def worker_init(n: int, start: int, stop: int) -> None:
    """Process-pool initializer: build this worker's slice (gmpy2 engine)."""
    global _slice
    _slice = SliceSum(n, start, stop, native=False)


def _current() -> SliceSum:
    if _slice is None:
        raise RuntimeError("fold worker used before worker_init")
    return _slice


def worker_reset() -> None:
    """Reset this worker's slice for a new round."""
    _current().reset()


def worker_stage(update_id: int, data: bytes) -> tuple[int | None, str] | None:
    """Stage this worker's slice of an update (see `SliceSum.stage`)."""
    return _current().stage(update_id, data)


def worker_commit(update_id: int) -> None:
    """Commit a staged update into this worker's slice."""
    _current().commit(update_id)


def worker_abort(update_id: int) -> None:
    """Drop a staged update."""
    _current().abort(update_id)


def worker_result() -> bytes:
    """This worker's running sum, serialized."""
    return _current().serialized()
