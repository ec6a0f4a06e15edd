"""How an update travels: the encrypted (packed Paillier) and the plaintext encodings.

Both sides of a round use the same `UpdateCodec`: the client turns a flat float update
into chunk payloads, the aggregator parses and checks chunk payloads, folds complete
updates into a running sum, and finally turns the sum into the FedAvg mean update.
The plaintext codec exists for comparison runs (`fedcore demo --plaintext`): same
protocol, float32 updates, no privacy. No sockets here.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedcore.crypto import (
    PrivateKey,
    PublicKey,
    deserialize_ciphertexts,
    deserialize_plaintexts,
    serialize_ciphertexts,
    serialize_plaintexts,
)
from fedcore.crypto.folding import check_ciphertext_bytes
from fedcore.errors import InvalidCiphertextError
from fedcore.packing import PackingSpec, decode_sum, encode_update

__all__ = [
    "EncryptedCodec",
    "PlaintextCodec",
    "UpdateCodec",
    "codec_from_session_config",
]

PLAINTEXT_CHUNK_FLOATS = 32_768  # 128 KiB of float32 per chunk


@dataclass(frozen=True, slots=True, kw_only=True)
class EncryptedCodec:
    """Packed Paillier: ``spec.slots_per_ciphertext`` quantized values per ciphertext."""

    public_key: PublicKey
    spec: PackingSpec
    n_values: int
    chunk_items: int

    encrypted = True

    @property
    def item_count(self) -> int:
        """Ciphertexts in one complete update."""
        return self.spec.ciphertexts_for(self.n_values)

    @property
    def chunk_count(self) -> int:
        """Chunks in one complete update."""
        return -(-self.item_count // self.chunk_items)

    # -- client side -------------------------------------------------------------------
    def encode(self, update: np.ndarray, *, weight: int, rng: np.random.Generator) -> list[int]:
        """Clip, quantize, weight and pack ``update`` into plaintext integers."""
        return encode_update(update, self.spec, weight=weight, rng=rng)

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

    def join(self, chunks: list[Any], weight: int) -> bytes:
        """One update from its chunks (the client already applied its weight)."""
        del weight
        return b"".join(chunks)

    def sum_to_payloads(self, summed: bytes, shards: int) -> list[tuple[int, bytes, int]]:
        """Split the serialized sum into ``shards`` (start index, bytes, count) pieces."""
        width = self.public_key.ciphertext_bytes
        total = len(summed) // width
        size = max(1, math.ceil(total / max(1, shards)))
        return [
            (first, summed[first * width : (first + size) * width], min(size, total - first))
            for first in range(0, total, size)
        ]

    def decrypt_payload(
        self,
        payload: bytes,
        private_key: PrivateKey,
        *,
        workers: int = 1,
        constant_time: bool = True,
    ) -> tuple[bytes, int]:
        """Committee side: decrypt a shard of summed ciphertexts into plaintext bytes."""
        ciphertexts = deserialize_ciphertexts(payload, self.public_key, validate=True)
        plaintexts = private_key.decrypt_vector(
            ciphertexts, workers=workers, constant_time=constant_time
        )
        return serialize_plaintexts(plaintexts, self.public_key), len(plaintexts)

    def parse_plaintexts(self, payload: bytes, count: int) -> list[int]:
        """Aggregator side: check a committee answer has the promised shape."""
        values = deserialize_plaintexts(payload, self.public_key)
        if len(values) != count:
            raise InvalidCiphertextError(
                f"decrypt result holds {len(values)} plaintexts, expected {count}"
            )
        return values

    def mean_update(self, plaintexts: Sequence[int], total_weight: int) -> np.ndarray:
        """Unpack the decrypted sum into the weighted mean update (float32)."""
        return decode_sum(plaintexts, self.spec, n_values=self.n_values, total_weight=total_weight)


@dataclass(frozen=True, slots=True, kw_only=True)
class PlaintextCodec:
    """float32 updates in the clear, for comparison runs only: the aggregator sees each one."""

    n_values: int
    chunk_items: int = PLAINTEXT_CHUNK_FLOATS

    encrypted = False

    @property
    def item_count(self) -> int:
        """Floats in one complete update."""
        return self.n_values

    @property
    def chunk_count(self) -> int:
        """Chunks in one complete update."""
        return -(-self.item_count // self.chunk_items)

    def encode(self, update: np.ndarray, *, weight: int, rng: np.random.Generator) -> np.ndarray:
        """The update itself as float32 (the aggregator applies the weight)."""
        del weight, rng
        return np.ascontiguousarray(update, dtype=np.float32)

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

    def join(self, chunks: list[Any], weight: int) -> np.ndarray:
        """One weighted update (float64, so the sum is exact enough to compare)."""
        return np.concatenate(chunks).astype(np.float64) * weight

    def fold(self, running: np.ndarray, update: np.ndarray) -> None:
        """running += update."""
        running += update

    def mean_update(self, running: np.ndarray, total_weight: int) -> np.ndarray:
        """The weighted mean update."""
        return (running / total_weight).astype(np.float32)


UpdateCodec = EncryptedCodec | PlaintextCodec


def codec_from_session_config(config: dict[str, Any], public_key: PublicKey | None) -> UpdateCodec:
    """Rebuild the aggregator's codec from a Welcome's session_config (client side)."""
    n_values = int(config["num_values"])
    if not config.get("encrypted", True):
        return PlaintextCodec(n_values=n_values, chunk_items=int(config["chunk_items"]))
    if public_key is None:
        raise ValueError("an encrypted federation needs the public key from Welcome")
    spec = PackingSpec(
        key_bits=int(config["key_bits"]),
        value_bits=int(config["value_bits"]),
        headroom_bits=int(config["headroom_bits"]),
        clip=float(config["clip"]),
    )
    return EncryptedCodec(
        public_key=public_key, spec=spec, n_values=n_values, chunk_items=int(config["chunk_items"])
    )
