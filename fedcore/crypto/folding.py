"""The aggregator's running sum of one range of ciphertext positions, with staged updates.

An update is folded in two steps so that a bad update never touches the sum, even when
the sum is split across processes: `SliceSum.stage` parses and validates the update's
slice and keeps it aside; `commit` multiplies it in (one modular multiplication per
ciphertext) and `abort` drops it. The aggregator commits an update only when every
slice staged cleanly. Multiplication mod n² is commutative and associative, so commits
of different updates may land in any order. Also a vectorized range check on raw
ciphertext bytes, cheap enough to run on every chunk as it arrives.

Holds the public modulus only; knows nothing of sockets, rounds or processes.
"""

from __future__ import annotations

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

__all__ = ["SliceSum", "check_ciphertext_bytes"]


def check_ciphertext_bytes(data: bytes, public_key: PublicKey, *, index_offset: int = 0) -> int:
    """Check fixed-width big-endian ciphertexts for ``0 < c < n²`` without parsing them.

    Equal-width big-endian integers compare like their byte strings, so ``c < n²`` is:
    at the first byte where c and n² differ, c's byte is smaller. numpy finds that byte
    for every row at once. Returns the number of ciphertexts; raises
    InvalidCiphertextError naming the first bad index (offset by ``index_offset``).
    The gcd(c, n) = 1 half of validation needs the integers: `SliceSum.stage` does it.
    """
    width = public_key.ciphertext_bytes
    count = ciphertext_count(data, public_key, index_offset=index_offset)
    if count == 0:
        return 0
    rows = np.frombuffer(data, dtype=np.uint8).reshape(count, width)
    bound = np.frombuffer(int(public_key.nsquare).to_bytes(width, "big"), dtype=np.uint8)
    differs = rows != bound
    first = differs.argmax(axis=1)
    below = differs.any(axis=1) & (rows[np.arange(count), first] < bound[first])
    good = below & rows.any(axis=1)
    if not good.all():
        index = index_offset + int(np.argmin(good))
        raise InvalidCiphertextError(
            f"ciphertext at index {index} is outside 0 < c < n²", index=index
        )
    return count


class SliceSum:
    """Running encrypted sum of positions [start, stop) of every update, plus staged updates."""

    def __init__(self, n: int, start: int, stop: int) -> None:
        if not 0 <= start <= stop:
            raise ValueError(f"slice must satisfy 0 <= start <= stop; got [{start}, {stop})")
        self.public_key = PublicKey(n)
        self.start, self.stop = start, stop
        self.running: list[Any] = [gmpy2.mpz(1)] * (stop - start)  # 1 = E(0) with r = 1
        self._staged: dict[int, list[Any]] = {}

    def reset(self) -> None:
        """Start a new round: the sum is E(0) again and nothing is staged."""
        self.running = [gmpy2.mpz(1)] * (self.stop - self.start)
        self._staged.clear()

    def stage(self, update_id: int, data: bytes) -> tuple[int | None, str] | None:
        """Parse and fully validate this slice of an update; None when it is good.

        Returns (index, reason) instead of raising, so the answer crosses a process
        boundary as plain values.
        """
        try:
            values = deserialize_ciphertexts(
                data, self.public_key, validate=True, index_offset=self.start
            )
        except InvalidCiphertextError as exc:
            return exc.index, str(exc)
        if len(values) != len(self.running):
            return None, f"slice holds {len(values)} ciphertexts, expected {len(self.running)}"
        self._staged[update_id] = values
        return None

    def commit(self, update_id: int) -> None:
        """Fold a staged update in: running[i] = running[i] · update[i] mod n²."""
        fold_update(self.running, self._staged.pop(update_id), self.public_key)

    def abort(self, update_id: int) -> None:
        """Forget a staged update (it failed validation elsewhere, or its round closed)."""
        self._staged.pop(update_id, None)

    def serialized(self) -> bytes:
        """The running sum of this slice as fixed-width bytes."""
        return serialize_ciphertexts(self.running, self.public_key)


# Worker-process side: one SliceSum per process, driven by the functions below.
_slice: SliceSum | None = None


def worker_init(n: int, start: int, stop: int) -> None:
    """Process-pool initializer: build this worker's slice."""
    global _slice
    _slice = SliceSum(n, start, stop)


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
