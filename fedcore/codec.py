"""How an update travels: the encrypted (packed, masked Paillier) and the plaintext encodings.

Both sides of a round build the same `UpdateCodec` from the federation parameters and
the session settings (`codec_for`): the client turns a flat float update, its own
FedAvg weight and its evaluation report into chunk payloads; the aggregator range-checks
chunk payloads, folds complete updates, and turns the decrypted, unmasked sum into a
`ContributionSum` (the weighted mean, the total weight, the mean report). The plaintext
codec exists for comparison runs (`fedcore demo --plaintext`): same protocol, float
slots, no privacy. No sockets here.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedcore.contracts import FederationParams, SessionInfo
from fedcore.crypto import (
    DecryptPool,
    PrivateKey,
    PublicKey,
    deserialize_ciphertexts,
    deserialize_plaintexts,
    serialize_ciphertexts,
    serialize_plaintexts,
)
from fedcore.crypto.decrypt_proof import check_decryptions
from fedcore.crypto.folding import check_ciphertext_bytes
from fedcore.errors import InvalidCiphertextError, PackingError
from fedcore.packing import (
    CONTRIBUTION_TAIL_SLOTS,
    ContributionSum,
    PackingSpec,
    decode_contribution_sum,
    encode_contribution,
)

__all__ = [
    "EncryptedCodec",
    "PlaintextCodec",
    "UpdateCodec",
    "codec_for",
]

PLAINTEXT_CHUNK_FLOATS = 32_768  # 128 KiB of float32 per chunk


@dataclass(frozen=True, slots=True, kw_only=True)
class EncryptedCodec:
    """Packed Paillier: ``spec.slots_per_ciphertext`` quantized slots per ciphertext.

    The slots of one update are its ``n_values`` model values, then its weight, its
    evaluated weight and one slot per report metric (see `encode_contribution`).
    """

    public_key: PublicKey
    spec: PackingSpec
    n_values: int
    chunk_items: int
    report_bounds: tuple[float, ...] = ()
    min_total_weight: int = 1

    encrypted = True

    @property
    def slot_count(self) -> int:
        """Slots in one update: model values, weight, evaluated weight, report metrics."""
        return self.n_values + CONTRIBUTION_TAIL_SLOTS + len(self.report_bounds)

    @property
    def item_count(self) -> int:
        """Ciphertexts in one complete update."""
        return self.spec.ciphertexts_for(self.slot_count)

    @property
    def chunk_count(self) -> int:
        """Chunks in one complete update."""
        return -(-self.item_count // self.chunk_items)

    # -- client side -------------------------------------------------------------------
    def encode(
        self,
        update: np.ndarray,
        *,
        weight: int,
        report: Sequence[float] | None,
        rng: Any,
    ) -> list[int]:
        """Clip, quantize, weight and pack ``update`` (and weight, report) into plaintexts."""
        return encode_contribution(
            update,
            self.spec,
            weight=weight,
            report=report,
            report_bounds=self.report_bounds,
            rng=rng,
        )

    def chunk_payloads(self, ciphertexts: Sequence[Any], start: int = 0) -> Iterator[bytes]:
        """Serialize ciphertexts chunk by chunk, from chunk index ``start``."""
        for first in range(start * self.chunk_items, len(ciphertexts), self.chunk_items):
            yield serialize_ciphertexts(
                ciphertexts[first : first + self.chunk_items], self.public_key
            )

    # -- aggregator side ---------------------------------------------------------------
    def parse_chunk(self, payload: bytes, index_offset: int) -> tuple[bytes, int]:
        """Range-check one chunk's ciphertexts as bytes (the gcd check comes at fold time)."""
        return payload, check_ciphertext_bytes(payload, self.public_key, index_offset=index_offset)

    def join(self, chunks: list[Any]) -> bytes:
        """One update from its chunks (the client already applied its own weight)."""
        return b"".join(chunks)

    def shard_ranges(self, shards: int) -> list[tuple[int, int]]:
        """``(start, count)`` of ``shards`` contiguous ranges covering every ciphertext."""
        total = self.item_count
        size = max(1, math.ceil(total / max(1, shards)))
        return [(first, min(size, total - first)) for first in range(0, total, size)]

    def shard_payload(self, summed: bytes, start: int, count: int) -> bytes:
        """The serialized ciphertexts ``[start, start + count)`` of a serialized sum."""
        width = self.public_key.ciphertext_bytes
        return summed[start * width : (start + count) * width]

    def decrypt_payload(
        self,
        payload: bytes,
        private_key: PrivateKey,
        *,
        workers: int = 1,
        constant_time: bool = True,
        pool: DecryptPool | None = None,
    ) -> tuple[bytes, bytes, int]:
        """Committee side: a shard's plaintexts and each ciphertext's randomness, as bytes.

        The randomness lets the aggregator re-encrypt the answer and so check it
        (`check_decryption`); it belongs to ciphertexts whose plaintexts are revealed.
        ``pool`` (the member's `DecryptPool`) replaces ``workers``.
        """
        # open_vector refuses values outside Z*_{n²}: no second check here
        ciphertexts = deserialize_ciphertexts(payload, self.public_key, validate=False)
        plaintexts, randomness = private_key.open_vector(
            ciphertexts, workers=workers, constant_time=constant_time, pool=pool
        )
        key = self.public_key
        return (
            serialize_plaintexts(plaintexts, key),
            serialize_plaintexts(randomness, key),
            len(plaintexts),
        )

    def parse_plaintexts(self, payload: bytes, count: int) -> list[int]:
        """Aggregator side: check a committee answer has the promised shape."""
        values = deserialize_plaintexts(payload, self.public_key)
        if len(values) != count:
            raise InvalidCiphertextError(
                f"committee answer holds {len(values)} values, expected {count}"
            )
        return values

    def check_decryption(
        self, ciphertext_payload: bytes, plaintexts: Sequence[int], randomness_payload: bytes
    ) -> str:
        """Aggregator side: why a key holder's decrypted shard is wrong ("" when it is right).

        Re-encrypts the answer with its randomness, batched (`fedcore.crypto.decrypt_proof`):
        a single wrong plaintext is caught except with probability 2^-64.
        """
        key = self.public_key
        try:
            randomness = self.parse_plaintexts(randomness_payload, len(plaintexts))
        except (InvalidCiphertextError, ValueError) as exc:
            return f"malformed randomness: {exc}"
        ciphertexts = deserialize_ciphertexts(ciphertext_payload, key, validate=False)
        if not check_decryptions(key, ciphertexts, plaintexts, randomness):
            return "its plaintexts do not re-encrypt to the shard's ciphertexts"
        return ""

    def decode(self, plaintexts: Sequence[int]) -> ContributionSum:
        """The weighted mean and totals from the unmasked sum (PackingError if impossible)."""
        return decode_contribution_sum(
            plaintexts,
            self.spec,
            n_values=self.n_values,
            report_bounds=self.report_bounds,
            min_total_weight=self.min_total_weight,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class PlaintextCodec:
    """float32 slots in the clear, for comparison runs only: the aggregator sees each one.

    An update is ``[w·u_1 .. w·u_V, w, e, e·r_1 .. e·r_K]`` as float32, the same layout
    the encrypted codec packs, so both runs aggregate the same way.
    """

    n_values: int
    chunk_items: int = PLAINTEXT_CHUNK_FLOATS
    report_bounds: tuple[float, ...] = ()
    clip: float = 0.5
    max_weight: int = 1 << 20
    min_total_weight: int = 1

    encrypted = False

    @property
    def slot_count(self) -> int:
        """Floats in one update: model values, weight, evaluated weight, report metrics."""
        return self.n_values + CONTRIBUTION_TAIL_SLOTS + len(self.report_bounds)

    @property
    def item_count(self) -> int:
        """Floats in one complete update."""
        return self.slot_count

    @property
    def chunk_count(self) -> int:
        """Chunks in one complete update."""
        return -(-self.item_count // self.chunk_items)

    def encode(
        self, update: np.ndarray, *, weight: int, report: Sequence[float] | None, rng: Any
    ) -> np.ndarray:
        """The clipped, weighted update and its tail as float32 (no quantization)."""
        del rng
        k = len(self.report_bounds)
        tail = np.zeros(CONTRIBUTION_TAIL_SLOTS + k, dtype=np.float64)
        tail[0] = weight
        if report is not None:
            tail[1] = weight
            tail[CONTRIBUTION_TAIL_SLOTS:] = weight * np.clip(
                np.asarray(report, dtype=np.float64), 0.0, self.report_bounds
            )
        values = weight * np.clip(np.asarray(update, dtype=np.float64), -self.clip, self.clip)
        return np.concatenate([values, tail]).astype(np.float32)

    def chunk_payloads(self, values: np.ndarray, start: int = 0) -> Iterator[bytes]:
        """float32 bytes chunk by chunk, from chunk index ``start``."""
        for first in range(start * self.chunk_items, len(values), self.chunk_items):
            yield values[first : first + self.chunk_items].tobytes()

    def parse_chunk(self, payload: bytes, index_offset: int) -> tuple[np.ndarray, int]:
        """float32 values; refuses a ragged payload and non-finite values."""
        if len(payload) % 4:
            raise InvalidCiphertextError(
                f"plaintext chunk of {len(payload)} bytes is not whole float32 values",
                index=index_offset,
            )
        values = np.frombuffer(payload, dtype=np.float32)
        if not np.isfinite(values).all():
            bad = int(np.flatnonzero(~np.isfinite(values))[0])
            raise InvalidCiphertextError(
                f"value {index_offset + bad} is not finite", index=index_offset + bad
            )
        return values, len(values)

    def join(self, chunks: list[Any]) -> np.ndarray:
        """One update (float64, so the sum is exact enough to compare)."""
        return np.concatenate(chunks).astype(np.float64)

    def fold(self, running: np.ndarray, update: np.ndarray) -> None:
        """running += update."""
        running += update

    def decode(self, running: np.ndarray) -> ContributionSum:
        """The weighted mean and totals from the summed float slots."""
        v = self.n_values
        weight = round(float(running[v]))
        evaluated = round(float(running[v + 1]))
        if not self.min_total_weight <= weight <= self.max_weight:
            raise PackingError(
                f"the sum's total weight {weight} is outside {self.min_total_weight}.."
                f"{self.max_weight}"
            )
        means = None
        if evaluated:
            means = tuple(float(x) / evaluated for x in running[v + CONTRIBUTION_TAIL_SLOTS :])
        return ContributionSum(
            mean_update=(running[:v] / weight).astype(np.float32),
            total_weight=weight,
            evaluated_weight=evaluated,
            report_means=means,
        )


UpdateCodec = EncryptedCodec | PlaintextCodec


def codec_for(federation: FederationParams, session: SessionInfo) -> UpdateCodec:
    """The codec both sides use for this federation and session."""
    bounds = tuple(bound for _, bound in federation.report_metrics)
    if not federation.encrypted:
        return PlaintextCodec(
            n_values=session.num_values,
            chunk_items=session.chunk_items,
            report_bounds=bounds,
            clip=federation.clip,
            max_weight=federation.max_contributors * federation.max_weight,
            min_total_weight=federation.min_clients,
        )
    assert federation.public_key is not None
    return EncryptedCodec(
        public_key=federation.public_key,
        spec=federation.packing_spec(),
        n_values=session.num_values,
        chunk_items=session.chunk_items,
        report_bounds=bounds,
        min_total_weight=federation.min_clients,
    )
