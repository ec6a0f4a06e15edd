"""Committee decryption: the round's summed ciphertexts to key holders, masks to unmaskers.

Each shard of the sum goes to whichever key holder is free; a member that drops, times
out or answers with the wrong shape loses its shard to another. The decrypted (still
masked) shard then goes to the round's unmasker, which removes exactly the folded
contributors' masks and releases the result only if it decodes. Every request carries
the signed tokens of the contributors, so members can refuse anything but a
quorum-sized, named set. The aggregator holds no private key and no mask key: this
module only moves ciphertexts, tokens and plaintexts, and checks what comes back.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Mapping
from typing import Any

from fedcore.aggregator.config import AggregatorConfig
from fedcore.aggregator.registry import ClientHandle, close_client
from fedcore.aggregator.rounds import RoundState
from fedcore.codec import EncryptedCodec
from fedcore.contracts import RejectReason
from fedcore.credentials import pack_tokens
from fedcore.crypto import serialize_plaintexts
from fedcore.errors import InvalidCiphertextError, RoundError
from fedcore.metrics import AggregatorMetrics
from protocol.errors import ErrorCode, ProtocolError
from protocol.framing import DEFAULT_MAX_FRAME_SIZE
from protocol.messages import DecryptRequest, DecryptResult, UnmaskRequest, UnmaskResult

__all__ = ["CommitteeDecryption", "SumNotDecodable"]

log = logging.getLogger(__name__)


class SumNotDecodable(RoundError):
    """The unmasker refused the round's sum: unmasked, it is not a sum of honest updates."""


class CommitteeDecryption:
    """Spreads one round's sum over the connected key holders and collects the unmasked sum."""

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
        self.member_seconds: dict[str, float] = {}
        """Seconds the committee reported for the last round: ``decrypt``, ``unmask``."""

    def _shards(self, members: int) -> list[tuple[int, int]]:
        # a result travels in one frame to us: keep it within half our frame limit
        width = self.codec.public_key.plaintext_bytes
        max_items = max(1, (DEFAULT_MAX_FRAME_SIZE // 2) // width)
        count = max(members, -(-self.codec.item_count // max_items))
        return self.codec.shard_ranges(count)

    async def decrypt(self, state: RoundState, summed: bytes) -> list[int]:
        """The unmasked plaintexts of ``summed`` (the folded contributors' serialized sum).

        Each shard is decrypted by a free key holder, then handed to the round's
        unmasker(s) in order, the last of which releases it only if it decodes.
        """
        c = self.config
        self.member_seconds = {"decrypt": 0.0, "unmask": 0.0}
        unmaskers = [self._clients.get(cid) for cid in state.unmaskers]
        if not all(unmaskers):
            missing = [cid for cid, h in zip(state.unmaskers, unmaskers, strict=True) if not h]
            raise RoundError(f"unmasker(s) {', '.join(missing)} left before the round closed")
        members = [h for h in self._clients.values() if h.can_decrypt]
        if not members:
            raise RoundError("no key-holding client is connected to decrypt the sum")
        random.Random(f"{c.seed}:committee:{state.round_id}").shuffle(members)
        members = members[: c.committee_size]
        contributors = pack_tokens([state.folded[cid] for cid in sorted(state.folded)])
        shards = self._shards(len(members))
        t0 = time.monotonic()
        unmasked: dict[int, list[int]] = {}
        free: asyncio.Queue[ClientHandle] = asyncio.Queue()
        for member in members:
            free.put_nowait(member)

        async def decrypt_one(shard_id: int, start: int, count: int) -> list[int]:
            payload = self.codec.shard_payload(summed, start, count)
            for _attempt in range(3 * len(members) + 3):
                try:
                    member = await asyncio.wait_for(free.get(), c.decrypt_shard_timeout)
                except TimeoutError:
                    break
                if self._clients.get(member.client_id) is not member:
                    continue  # disconnected while queued; it never comes back to the queue
                request = DecryptRequest(
                    round_id=state.round_id,
                    shard_id=shard_id,
                    start=start,
                    item_count=count,
                    payload=payload,
                    contributors=contributors,
                )
                values = await self._request(member, request, count)
                if self._clients.get(member.client_id) is member:
                    free.put_nowait(member)
                if values is not None:
                    return values
            raise RoundError(f"no committee member decrypted shard {shard_id}")

        async def shard(shard_id: int, start: int, count: int) -> None:
            values = await decrypt_one(shard_id, start, count)
            for unmasker in unmaskers:
                assert unmasker is not None
                request = UnmaskRequest(
                    round_id=state.round_id,
                    shard_id=shard_id,
                    start=start,
                    item_count=count,
                    contributors=contributors,
                    payload=serialize_plaintexts(values, self.codec.public_key),
                )
                answer = await self._request(unmasker, request, count)
                if answer is None:
                    why = unmasker.last_error or "it failed or left"
                    kind = (
                        SumNotDecodable
                        if unmasker.last_error_code is ErrorCode.SUM_NOT_DECODABLE
                        else RoundError
                    )
                    raise kind(
                        f"unmasker {unmasker.client_id} did not unmask shard {shard_id}: {why}"
                    )
                values = answer
            unmasked[start] = values

        tasks = [
            asyncio.create_task(shard(i, start, count)) for i, (start, count) in enumerate(shards)
        ]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:  # one shard failed the round: stop waiting for the others
                task.cancel()
        log.info(
            "round %d: %d shards decrypted by %d committee members and unmasked by %s in %.2f s",
            state.round_id,
            len(shards),
            len(members),
            ", ".join(state.unmaskers),
            time.monotonic() - t0,
        )
        out: list[int] = []
        for start, _count in shards:
            out.extend(unmasked[start])
        return out

    async def _request(
        self, member: ClientHandle, request: DecryptRequest | UnmaskRequest, count: int
    ) -> list[int] | None:
        """Send one committee request and check the answer's shape (None on failure)."""
        kind = "decrypt" if isinstance(request, DecryptRequest) else "unmask"
        async with member.committee_lock:
            loop = asyncio.get_running_loop()
            waiter: asyncio.Future[Any] = loop.create_future()
            member.committee_waiter = waiter
            try:
                member.committee_idle.clear()  # set again by its answer or its departure
                await member.send(request)
                result = await asyncio.wait_for(waiter, self.config.decrypt_shard_timeout)
            except (ProtocolError, OSError, ConnectionError, TimeoutError) as exc:
                log.warning(
                    "committee member %s failed to %s shard %d: %r",
                    member.client_id,
                    kind,
                    request.shard_id,
                    exc,
                )
                if isinstance(exc, TimeoutError):
                    await close_client(member, ErrorCode.TIMEOUT, f"{kind} shard timed out")
                return None
            finally:
                member.committee_waiter = None
        expected = DecryptResult if kind == "decrypt" else UnmaskResult
        if (
            not isinstance(result, expected)
            or result.shard_id != request.shard_id
            or result.round_id != request.round_id
        ):
            return None
        try:
            values = self.codec.parse_plaintexts(result.payload, count)
        except (InvalidCiphertextError, ValueError) as exc:
            label = RejectReason.BAD_DECRYPT_RESULT.label
            self.metrics.updates_rejected_total.labels(reason=label).inc()
            await close_client(member, ErrorCode.BAD_DECRYPT_RESULT, str(exc))
            return None
        self.member_seconds[kind] = self.member_seconds.get(kind, 0.0) + result.seconds
        if kind == "decrypt":
            self.metrics.decryption_time_seconds.observe(result.seconds)
        else:
            self.metrics.unmask_time_seconds.observe(result.seconds)
        return values
