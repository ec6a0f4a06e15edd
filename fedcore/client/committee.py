"""The committee role of a key-holding client: decrypt shards of round sums."""

from __future__ import annotations

import asyncio
import time

from fedcore.codec import EncryptedCodec
from fedcore.crypto import PrivateKey
from protocol.messages import DecryptRequest, DecryptResult

__all__ = ["decrypt_shard"]


async def decrypt_shard(
    codec: EncryptedCodec,
    private_key: PrivateKey,
    request: DecryptRequest,
    *,
    workers: int = 1,
    constant_time: bool = True,
) -> DecryptResult:
    """A committee member's answer to one DecryptRequest (decrypts in a worker thread)."""
    t0 = time.perf_counter()
    payload, count = await asyncio.to_thread(
        codec.decrypt_payload,
        request.payload,
        private_key,
        workers=workers,
        constant_time=constant_time,
    )
    return DecryptResult(
        round_id=request.round_id,
        shard_id=request.shard_id,
        item_count=count,
        payload=payload,
        seconds=time.perf_counter() - t0,
    )
