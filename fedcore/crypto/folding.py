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

Batches (native engine): `SliceSum.stage_batch` validates k updates staged together
with one check instead of k. Their slot-wise product B = c_1 · … · c_k mod n² (the same k
multiplications a fold makes) is in Z*_{n²} iff every c_u is, so one gcd test of B
validates all of them; only when it fails is each update tested alone. Committing every
member folds B once; a member aborted (its round closed) breaks the batch, and its other
members fold one by one. `serialized` folds in whatever was committed before it, so the
sum it returns holds exactly the commits made before it, as without batches.

Holds the public modulus only; knows nothing of sockets, rounds or processes.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
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


@dataclass(slots=True, eq=False)
class _Batch:
    """Updates validated together: their product, and who has not committed or aborted yet."""

    product: bytes
    waiting: dict[int, Any]  # update id -> its data, until it commits or aborts
    committed: list[Any] = field(default_factory=list)  # data of members that committed
    broken: bool = False  # a member aborted: the others fold one by one


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

    def stage_batch(
        self, updates: Sequence[tuple[int, bytes | memoryview]]
    ) -> list[tuple[int | None, str] | None]:
        """`stage` each (update_id, data); with the native engine, one check for all.

        Returns one answer per update, as `stage` does. The data of every update staged
        here is kept by reference until it commits or aborts.
        """
        if self._native is None or len(updates) < 2:
            return self._stage_each(updates)
        try:  # checks every member's size and byte range before multiplying
            product = self._native.product([data for _, data in updates])
        except ValueError:  # a member is the wrong size or out of range: judge each alone
            return self._stage_each(updates)
        if self._native.validate(product) >= 0:  # some member is bad: find it, alone
            return self._stage_each(updates)
        batch = _Batch(product=product, waiting=dict(updates))
        for update_id in batch.waiting:
            self._staged[update_id] = batch
        return [None] * len(updates)

    def _stage_each(
        self, updates: Sequence[tuple[int, bytes | memoryview]]
    ) -> list[tuple[int | None, str] | None]:
        return [self.stage(update_id, data) for update_id, data in updates]

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
        if isinstance(staged, _Batch):
            data = staged.waiting.pop(update_id)
            if staged.broken:
                self._native.fold(data)
                return
            staged.committed.append(data)
            if not staged.waiting:  # every member committed: their product, once
                self._native.fold(staged.product, updates=len(staged.committed))
                staged.committed.clear()
        elif self._native is not None:
            self._native.fold(staged)
        else:
            fold_update(self._running, staged, self.public_key)

    def abort(self, update_id: int) -> None:
        """Forget a staged update (it failed validation elsewhere, or its round closed)."""
        staged = self._staged.pop(update_id, None)
        if isinstance(staged, _Batch):
            staged.waiting.pop(update_id, None)
            self._break(staged)

    def _break(self, batch: _Batch) -> None:
        """The batch's product will not be folded: fold its committed members one by one."""
        if not batch.broken:
            batch.broken = True
            for data in batch.committed:
                self._native.fold(data)
            batch.committed.clear()

    def serialized(self) -> bytes:
        """The running sum of this slice as fixed-width bytes (every commit made so far)."""
        if self._native is not None:
            for staged in {id(s): s for s in self._staged.values()}.values():
                if isinstance(staged, _Batch) and staged.committed:
                    self._break(staged)  # members still undecided will fold alone, if ever
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


def worker_stage_batch(
    updates: list[tuple[int, bytes]],
) -> list[tuple[int | None, str] | None]:
    """Stage several updates of this worker's slice (see `SliceSum.stage_batch`)."""
    return _current().stage_batch(updates)


def worker_commit(update_id: int) -> None:
    """Commit a staged update into this worker's slice."""
    _current().commit(update_id)


def worker_abort(update_id: int) -> None:
    """Drop a staged update."""
    _current().abort(update_id)


def worker_result() -> bytes:
    """This worker's running sum, serialized."""
    return _current().serialized()
