"""Committee decryption: the round's summed ciphertexts, in shards, to key-holding clients.

Shards go to whichever member is free; a member that drops, times out or answers with
the wrong shape loses its shard to another, and a shard nobody decrypts fails the
round. The aggregator holds no private key: this module only sends ciphertexts out and
checks the shape of what comes back. Knows nothing of folding or checkpoints.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Mapping

from fedcore.aggregator.config import AggregatorConfig
from fedcore.aggregator.registry import ClientHandle, close_client
from fedcore.codec import EncryptedCodec
from fedcore.errors import InvalidCiphertextError, RoundError
from fedcore.metrics import AggregatorMetrics
from protocol.errors import ErrorCode, ProtocolError
from protocol.framing import DEFAULT_MAX_FRAME_SIZE
from protocol.messages import DecryptRequest

__all__ = ["CommitteeDecryption"]

log = logging.getLogger(__name__)


class CommitteeDecryption:
    """Spreads one round's sum over the connected key holders and collects plaintexts."""

    def __init__(
        self,
        *,
        config: AggregatorConfig,
        codec: EncryptedCodec,
        metrics: AggregatorMetrics,
        clients: Mapping[str, ClientHandle],
    ) -> None:
        self.config = config
        self.codec = codec
        self.metrics = metrics
        self._clients = clients

    async def decrypt(self, round_id: int, summed: bytes) -> list[int]:
        """The plaintexts of ``summed`` (serialized ciphertexts), shard by shard."""
        c = self.config
        members = [h for h in self._clients.values() if h.can_decrypt]
        if not members:
            raise RoundError("no key-holding client is connected to decrypt the sum")
        rng = random.Random(f"{c.seed}:committee:{round_id}")
        rng.shuffle(members)
        members = members[: c.committee_size]
        width = self.codec.public_key.ciphertext_bytes
        # a shard travels in one DecryptRequest frame: use at most half the frame limit
        max_items = max(1, (DEFAULT_MAX_FRAME_SIZE // 2) // width)
        shard_count = max(len(members), -(-(len(summed) // width) // max_items))
        shards = self.codec.sum_to_payloads(summed, shard_count)
        free: asyncio.Queue[ClientHandle] = asyncio.Queue()
        for member in members:
            free.put_nowait(member)
        results: dict[int, list[int]] = {}

        async def decrypt_shard(shard_id: int, start: int, payload: bytes, count: int) -> None:
            for _attempt in range(3 * len(members) + 3):
                try:
                    member = await asyncio.wait_for(free.get(), c.decrypt_shard_timeout)
                except TimeoutError:
                    break
                if self._clients.get(member.client_id) is not member:
                    continue  # disconnected while queued; it never comes back to the queue
                ok = await self._request_shard(member, round_id, shard_id, payload, count)
                if ok is not None:
                    results[start] = ok
                    free.put_nowait(member)
                    return
                if self._clients.get(member.client_id) is member:
                    free.put_nowait(member)
            raise RoundError(f"no committee member decrypted shard {shard_id}")

        t0 = time.monotonic()
        tasks = [
            asyncio.create_task(decrypt_shard(i, start, payload, count))
            for i, (start, payload, count) in enumerate(shards)
        ]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:  # one shard failed the round: stop waiting for the others
                task.cancel()
        log.info(
            "round %d: %d shards decrypted by %d committee members in %.2f s",
            round_id,
            len(shards),
            len(members),
            time.monotonic() - t0,
        )
        out: list[int] = []
        for start in sorted(results):
            out.extend(results[start])
        return out

    async def _request_shard(
        self, member: ClientHandle, round_id: int, shard_id: int, payload: bytes, count: int
    ) -> list[int] | None:
        loop = asyncio.get_running_loop()
        member.decrypt_waiter = loop.create_future()
        try:
            await member.send(
                DecryptRequest(
                    round_id=round_id, shard_id=shard_id, item_count=count, payload=payload
                )
            )
            result = await asyncio.wait_for(
                member.decrypt_waiter, self.config.decrypt_shard_timeout
            )
        except (ProtocolError, OSError, ConnectionError, TimeoutError) as exc:
            log.warning("committee member %s failed shard %d: %r", member.client_id, shard_id, exc)
            if isinstance(exc, TimeoutError):
                await close_client(member, ErrorCode.TIMEOUT, "decrypt shard timed out")
            return None
        finally:
            member.decrypt_waiter = None
        if result.shard_id != shard_id or result.round_id != round_id:
            return None
        try:
            values = self.codec.parse_plaintexts(result.payload, count)
        except (InvalidCiphertextError, ValueError) as exc:
            self.metrics.updates_rejected_total.labels(reason="bad_decrypt_result").inc()
            await close_client(member, ErrorCode.BAD_DECRYPT_RESULT, str(exc))
            return None
        self.metrics.decryption_time_seconds.observe(result.seconds)
        return values
