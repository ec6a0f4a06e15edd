"""Round bookkeeping without I/O: selection, FedAvg weights, upload buffers, the running sum.

The asyncio service drives these objects; everything here is synchronous and testable
with plain values. An update is folded into the running sum only when it is complete and
checked, and a client is folded at most once per round: that is the "never half-counted,
never double-counted" rule, enforced in one place (`RoundState.fold`).
"""

from __future__ import annotations

import enum
import hashlib
import random
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fedcore.errors import FedcoreError

__all__ = [
    "RejectedUpdate",
    "RoundPhase",
    "RoundState",
    "Upload",
    "assign_weights",
    "select_clients",
]


class RejectedUpdate(FedcoreError):
    """An update (or part of one) was refused; ``reason`` is its metrics label and wire code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class RoundPhase(enum.Enum):
    """Where a round is in its life."""

    COLLECTING = "collecting"
    DECRYPTING = "decrypting"
    COMPLETED = "completed"
    FAILED = "failed"


def select_clients(candidates: Iterable[str], count: int, *, seed: int, round_id: int) -> list[str]:
    """Pick ``count`` clients (all of them if fewer), reproducibly for a seed and round."""
    pool = sorted(candidates)
    if count >= len(pool):
        return pool
    return sorted(random.Random(f"{seed}:{round_id}").sample(pool, count))


def assign_weights(sample_counts: Mapping[str, int], max_total_weight: int) -> dict[str, int]:
    """Integer FedAvg weights proportional to sample counts, summing to at most the headroom.

    Paillier slots carry integers, so each client multiplies its quantized update by an
    integer weight; the slot sum must stay below 2^(value_bits + headroom_bits), i.e. the
    weights of one round must total at most ``max_total_weight`` (= 2^headroom_bits).
    With k clients and S samples, w_i = max(1, floor(s_i (M - k) / S)) totals at most
    (M - k) + k = M. Equal sample counts give equal weights, as plain FedAvg would.
    """
    k = len(sample_counts)
    if k == 0:
        return {}
    if k > max_total_weight:
        raise ValueError(
            f"{k} clients cannot fit a total weight of {max_total_weight}; "
            "raise headroom_bits or select fewer clients"
        )
    total = sum(max(0, s) for s in sample_counts.values())
    budget = max_total_weight - k
    if total <= 0 or budget <= 0:
        return dict.fromkeys(sample_counts, 1)
    return {cid: max(1, (max(0, s) * budget) // total) for cid, s in sample_counts.items()}


@dataclass(slots=True)
class Upload:
    """One client's update as it streams in: checked chunks, kept until complete."""

    client_id: str
    round_id: int
    expected_items: int
    chunk_items: int
    chunks: list[Any] = field(default_factory=list)
    items: int = 0
    digest: Any = field(default_factory=hashlib.sha256)
    bytes_received: int = 0
    started_at: float = field(default_factory=time.monotonic)

    @property
    def expected_chunks(self) -> int:
        """Chunks a complete upload has: ceil(expected_items / chunk_items)."""
        return -(-self.expected_items // self.chunk_items)

    def add_chunk(self, seq: int, payload: bytes, items: Any, count: int) -> None:
        """Append the next chunk's parsed items; refuses gaps, overflows and oversize chunks."""
        if seq != len(self.chunks):
            raise RejectedUpdate(
                "wrong_chunk_count", f"chunk {seq} arrived, expected chunk {len(self.chunks)}"
            )
        if count > self.chunk_items or self.items + count > self.expected_items:
            raise RejectedUpdate(
                "wrong_chunk_count",
                f"chunk {seq} brings {count} items; the update holds {self.expected_items} "
                f"in chunks of at most {self.chunk_items}",
            )
        self.chunks.append(items)
        self.items += count
        self.digest.update(payload)
        self.bytes_received += len(payload)

    def finish(self, *, chunk_count: int, item_count: int, digest: bytes) -> list[Any]:
        """Check the client's UpdateDone against what arrived; return the chunks in order."""
        if chunk_count != len(self.chunks) or item_count != self.items:
            raise RejectedUpdate(
                "wrong_chunk_count",
                f"UpdateDone says {chunk_count} chunks / {item_count} items; received "
                f"{len(self.chunks)} / {self.items}",
            )
        if self.items != self.expected_items:
            raise RejectedUpdate(
                "wrong_chunk_count",
                f"update has {self.items} items; this model needs {self.expected_items}",
            )
        if digest != self.digest.digest():
            raise RejectedUpdate("digest_mismatch", "UpdateDone digest does not match the chunks")
        return self.chunks


@dataclass(slots=True)
class RoundState:
    """One round: who was asked, their weights, who has been folded, and the running sum."""

    round_id: int
    weights: dict[str, int]
    deadline: float
    phase: RoundPhase = RoundPhase.COLLECTING
    folded: dict[str, int] = field(default_factory=dict)
    running_sum: Any = None
    started_at: float = field(default_factory=time.monotonic)

    @property
    def total_weight(self) -> int:
        """Sum of the weights of the folded updates (the FedAvg denominator)."""
        return sum(self.folded.values())

    def check_can_upload(self, client_id: str) -> None:
        """Raise RejectedUpdate unless ``client_id`` may still send an update this round."""
        if self.phase is not RoundPhase.COLLECTING:
            raise RejectedUpdate("stale_round", f"round {self.round_id} is no longer collecting")
        if client_id not in self.weights:
            raise RejectedUpdate(
                "not_selected", f"{client_id} was not selected for round {self.round_id}"
            )
        if client_id in self.folded:
            raise RejectedUpdate(
                "replay", f"{client_id} already contributed to round {self.round_id}"
            )

    def fold(self, client_id: str, update: Any, fold_fn: Any) -> None:
        """Fold a complete, checked update into ``running_sum``, once per client."""
        self.check_can_upload(client_id)
        if self.running_sum is None:
            self.running_sum = update
        else:
            fold_fn(self.running_sum, update)
        self.folded[client_id] = self.weights[client_id]

    def mark_folded(self, client_id: str) -> None:
        """Record a client whose update was folded elsewhere (a `FoldEngine`), once."""
        self.check_can_upload(client_id)
        self.folded[client_id] = self.weights[client_id]

    @property
    def pending(self) -> set[str]:
        """Selected clients that have not been folded yet."""
        return set(self.weights) - set(self.folded)

    def summary(self) -> dict[str, Any]:
        """Plain-value record of the round, for checkpoints and logs."""
        return {
            "round_id": self.round_id,
            "phase": self.phase.value,
            "selected": sorted(self.weights),
            "contributors": dict(sorted(self.folded.items())),
            "total_weight": self.total_weight,
        }
