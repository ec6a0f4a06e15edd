"""Round bookkeeping without I/O: selection, upload buffers, contributors, the running sum.

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

from fedcore.contracts import RejectReason
from fedcore.errors import FedcoreError

__all__ = [
    "RejectedUpdate",
    "RoundPhase",
    "RoundReport",
    "RoundState",
    "Upload",
    "pick_unmaskers",
    "select_clients",
]


class RejectedUpdate(FedcoreError):
    """An update (or part of one) was refused; ``reason`` carries its label and wire code."""

    def __init__(self, reason: RejectReason, message: str) -> None:
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


def pick_unmaskers(candidates: Mapping[str, bytes], count: int, model_digest: bytes) -> list[str]:
    """``count`` unmaskers among ``candidates`` (id -> mask key), stable for a model version.

    Ranked by SHA-256(model digest ‖ mask key): a rerun of the same model version (after a
    failed round or a restart) picks the same members while they are connected, so the
    clients that already masked for them can take part again.
    """
    ranked = sorted(
        candidates, key=lambda cid: hashlib.sha256(model_digest + candidates[cid]).digest()
    )
    return ranked[:count]


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
                RejectReason.WRONG_CHUNK_COUNT,
                f"chunk {seq} arrived, expected chunk {len(self.chunks)}",
            )
        if count > self.chunk_items or self.items + count > self.expected_items:
            raise RejectedUpdate(
                RejectReason.WRONG_CHUNK_COUNT,
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
                RejectReason.WRONG_CHUNK_COUNT,
                f"UpdateDone says {chunk_count} chunks / {item_count} items; received "
                f"{len(self.chunks)} / {self.items}",
            )
        if self.items != self.expected_items:
            raise RejectedUpdate(
                RejectReason.WRONG_CHUNK_COUNT,
                f"update has {self.items} items; this model needs {self.expected_items}",
            )
        if digest != self.digest.digest():
            raise RejectedUpdate(
                RejectReason.DIGEST_MISMATCH, "UpdateDone digest does not match the chunks"
            )
        return self.chunks


@dataclass(slots=True)
class RoundState:
    """One round: who was asked, who has been folded (with their tokens), the running sum.

    ``folded`` maps each contributor to its signed contributor token (empty in plaintext
    runs): the committee decrypts only for exactly these contributors. The total
    weight is not known here: it comes out of the decrypted sum.
    """

    round_id: int
    selected: frozenset[str]
    deadline: float
    model_digest: bytes = b""
    unmaskers: tuple[str, ...] = ()
    unmasker_keys: tuple[bytes, ...] = ()
    phase: RoundPhase = RoundPhase.COLLECTING
    folded: dict[str, bytes] = field(default_factory=dict)
    running_sum: Any = None
    total_weight: int | None = None
    started_at: float = field(default_factory=time.monotonic)

    def check_can_upload(self, client_id: str) -> None:
        """Raise RejectedUpdate unless ``client_id`` may still send an update this round."""
        if self.phase is not RoundPhase.COLLECTING:
            raise RejectedUpdate(
                RejectReason.STALE_ROUND, f"round {self.round_id} is no longer collecting"
            )
        if client_id not in self.selected:
            raise RejectedUpdate(
                RejectReason.NOT_SELECTED,
                f"{client_id} was not selected for round {self.round_id}",
            )
        if client_id in self.folded:
            raise RejectedUpdate(
                RejectReason.REPLAY, f"{client_id} already contributed to round {self.round_id}"
            )

    def fold(self, client_id: str, update: Any, fold_fn: Any, token: bytes = b"") -> None:
        """Fold a complete, checked update into ``running_sum``, once per client."""
        self.check_can_upload(client_id)
        if self.running_sum is None:
            self.running_sum = update
        else:
            fold_fn(self.running_sum, update)
        self.folded[client_id] = token

    def mark_folded(self, client_id: str, token: bytes = b"") -> None:
        """Record a client whose update was folded elsewhere (a `FoldEngine`), once."""
        self.check_can_upload(client_id)
        self.folded[client_id] = token

    @property
    def pending(self) -> set[str]:
        """Selected clients that have not been folded yet."""
        return set(self.selected) - set(self.folded)

    def summary(self) -> dict[str, Any]:
        """Plain-value record of the round, for checkpoints and logs."""
        return {
            "round_id": self.round_id,
            "phase": self.phase.value,
            "model": self.model_digest.hex(),
            "selected": sorted(self.selected),
            "contributors": sorted(self.folded),
            "unmaskers": list(self.unmaskers),
            "total_weight": self.total_weight,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class RoundReport:
    """What one finished round did, handed to ``on_round_complete`` and written to history."""

    round_id: int
    rounds_completed: int
    contributors: tuple[str, ...]
    total_weight: int
    phase_seconds: dict[str, float]
    client_metrics: dict[str, float]  # weighted mean evaluation, from the encrypted sum
    client_timings: dict[str, float]  # mean client-reported seconds per phase
    check_seconds: dict[str, float]  # privacy checks: token_check, member decrypt/unmask
    bytes_received: int
    fold_seconds: float
    member_decrypt_seconds: dict[str, float] = field(default_factory=dict)
    """Seconds each committee member reported decrypting (or partially decrypting)."""
