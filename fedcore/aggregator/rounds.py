"""Round bookkeeping without I/O: selection, upload buffers, contributors, the running sum.

The asyncio service drives these objects; everything here is synchronous and testable
with plain values. An update is folded into the running sum only when it is complete and
checked, and a client is folded at most once per round: that is the "never half-counted,
never double-counted" rule, enforced in one place (`RoundState.fold`).
"""

from __future__ import annotations

import enum
import hashlib
import math
import random
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fedcore.contracts import RejectReason
from fedcore.errors import FedcoreError

__all__ = [
    "DEFAULT_UPLOAD_MIN_RATE",
    "DEFAULT_UPLOAD_START_TIMEOUT",
    "RejectedUpdate",
    "RoundPhase",
    "RoundReport",
    "RoundState",
    "Upload",
    "UploadPace",
    "pick_unmaskers",
    "select_clients",
]

DEFAULT_UPLOAD_MIN_RATE = 64 * 1024.0
"""Bytes per second a granted upload must keep up: a 512 kbit/s link. The seed MLP's
update at 2048 bits (6,870 ciphertexts of 512 bytes, 3.5 MB) then takes at most 54 s."""
DEFAULT_UPLOAD_START_TIMEOUT = 10.0
"""Seconds of latency a grant allows on top of the bytes: round trips, a busy event loop."""


class RejectedUpdate(FedcoreError):
    """An update (or part of one) was refused; ``reason`` carries its label and wire code."""

    def __init__(self, reason: RejectReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class RoundPhase(enum.Enum):
    """Where a round is in its life."""

    COLLECTING = "collecting"
    DECRYPTING = "decrypting"
    FORWARDING = "forwarding"  # a relay uploading its sum upstream
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


@dataclass(frozen=True, slots=True, kw_only=True)
class UploadPace:
    """How fast a granted upload must progress to keep its slot (else it is refused).

    Counting from the grant, the bytes of chunk k (``b_k`` = every payload byte through
    chunk k) are due after ``start_timeout + b_k / min_rate`` seconds, and the
    UpdateDone with the last chunk. So the deadline moves as chunks arrive:
    ``granted_at + start_timeout + min(received + chunk_bytes, update_bytes) / min_rate``,
    where ``chunk_bytes`` is the largest chunk (one may be in flight) and
    ``update_bytes`` the whole update. A client ahead of the pace banks the time; none
    holds a slot longer than ``start_timeout + update_bytes / min_rate``, and one that
    sends nothing loses it after ``start_timeout + chunk_bytes / min_rate``.
    """

    min_rate: float = DEFAULT_UPLOAD_MIN_RATE
    start_timeout: float = DEFAULT_UPLOAD_START_TIMEOUT

    def __post_init__(self) -> None:
        for name in ("min_rate", "start_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"{name} must be a number, got {value!r}")
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")

    def deadline(
        self, *, granted_at: float, received: int, chunk_bytes: int, update_bytes: int
    ) -> float:
        """When an upload that has ``received`` bytes stalls unless more arrive."""
        due = min(received + chunk_bytes, update_bytes)
        return granted_at + self.start_timeout + due / self.min_rate

    def longest_hold(self, update_bytes: int) -> float:
        """The most seconds one grant keeps a slot: the whole update at the minimum rate."""
        return self.start_timeout + update_bytes / self.min_rate


@dataclass(slots=True)
class Upload:
    """One client's update as it streams in: checked chunks, kept until complete.

    ``granted_at`` starts its pace (`UploadPace`); a resume keeps it, so reconnecting
    buys no time. ``resume_token`` is the secret its grant carried: only a request
    showing it resumes this upload.
    """

    client_id: str
    round_id: int
    expected_items: int
    chunk_items: int
    chunks: list[Any] = field(default_factory=list)
    items: int = 0
    digest: Any = field(default_factory=hashlib.sha256)
    bytes_received: int = 0
    granted_at: float = field(default_factory=time.monotonic)
    resume_token: bytes = b""

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

    ``selected`` are the sources asked for an update: clients and relays. ``sources``
    are those whose upload was folded. ``folded`` maps each contributor (a client,
    whether it uploaded here or through a relay) to its signed contributor token
    (empty in plaintext runs): the committee decrypts only for exactly these
    contributors, and quorum counts them. ``relayed`` records which contributors
    each relay brought. ``capacity`` is the most contributors the sum can hold
    (the federation's slot headroom). The total weight is not known here: it comes
    out of the decrypted sum.
    """

    round_id: int
    selected: frozenset[str]
    deadline: float
    model_digest: bytes = b""
    unmaskers: tuple[str, ...] = ()
    unmasker_keys: tuple[bytes, ...] = ()
    capacity: int | None = None
    until_deadline: bool = False
    """Collect until the deadline even once every selected source is in (a relay that
    starts a round with no client yet cannot know how many will come back)."""
    phase: RoundPhase = RoundPhase.COLLECTING
    sources: set[str] = field(default_factory=set)
    given_up: set[str] = field(default_factory=set)
    """Selected relays that died and did not come back in time: no longer waited for."""
    stalled: set[str] = field(default_factory=set)
    """Sources whose grant expired (`UploadPace`): refused for the rest of the round."""
    folded: dict[str, bytes] = field(default_factory=dict)
    relayed: dict[str, tuple[str, ...]] = field(default_factory=dict)
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
        if client_id in self.sources or client_id in self.folded:
            raise RejectedUpdate(
                RejectReason.REPLAY, f"{client_id} already contributed to round {self.round_id}"
            )
        if client_id in self.stalled:
            raise RejectedUpdate(
                RejectReason.UPLOAD_STALLED,
                f"{client_id}'s upload stalled earlier in round {self.round_id}; "
                "it may upload again next round",
            )

    def _admit(self, source: str, contributors: Mapping[str, bytes]) -> None:
        self.check_can_upload(source)
        again = sorted(set(contributors) & set(self.folded))
        if again:
            raise RejectedUpdate(
                RejectReason.REPLAY,
                f"{', '.join(again[:5])} already contributed to round {self.round_id}",
            )
        if self.capacity is not None and len(self.folded) + len(contributors) > self.capacity:
            raise RejectedUpdate(
                RejectReason.OVER_CAPACITY,
                f"{len(contributors)} more contributors would exceed the {self.capacity} "
                f"this federation's slot headroom sums (round {self.round_id} has "
                f"{len(self.folded)}); give the relays a smaller clients_per_round",
            )
        self.sources.add(source)
        self.folded.update(contributors)

    def fold(self, client_id: str, update: Any, fold_fn: Any, token: bytes = b"") -> None:
        """Fold a complete, checked update into ``running_sum``, once per client."""
        self._admit(client_id, {client_id: token})
        if self.running_sum is None:
            self.running_sum = update
        else:
            fold_fn(self.running_sum, update)

    def mark_folded(
        self, source: str, contributors: Mapping[str, bytes], *, relay: bool = False
    ) -> None:
        """Record an upload folded elsewhere (a `FoldEngine`), once per source and client.

        ``contributors`` maps each client in the upload to its token: the source
        itself for a client, the clients folded into a relay's sum for a relay.
        """
        self._admit(source, contributors)
        if relay:
            self.relayed[source] = tuple(sorted(contributors))

    def mark_stalled(self, source: str) -> None:
        """A source's grant expired: refuse it for the rest of the round, stop waiting for it."""
        if source not in self.sources:
            self.stalled.add(source)

    @property
    def pending(self) -> set[str]:
        """Selected sources still waited for: not folded, not given up, not stalled."""
        return set(self.selected) - self.sources - self.given_up - self.stalled

    def summary(self) -> dict[str, Any]:
        """Plain-value record of the round, for checkpoints and logs."""
        relays = {relay: len(leaves) for relay, leaves in sorted(self.relayed.items())}
        return {
            "round_id": self.round_id,
            "phase": self.phase.value,
            "model": self.model_digest.hex(),
            "selected": sorted(self.selected),
            "contributors": sorted(self.folded),
            "unmaskers": list(self.unmaskers),
            "total_weight": self.total_weight,
            **({"relays": relays} if relays else {}),
            **({"relays_lost": sorted(self.given_up)} if self.given_up else {}),
            **({"stalled": sorted(self.stalled)} if self.stalled else {}),
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
    # mean client-reported seconds per phase (``*_s``) and pooled_factors (a share, 0..1)
    client_timings: dict[str, float]
    check_seconds: dict[str, float]  # privacy checks: token_check, member decrypt/unmask
    bytes_received: int
    fold_seconds: float
    member_decrypt_seconds: dict[str, float] = field(default_factory=dict)
    """Seconds each committee member reported decrypting (or partially decrypting)."""
