"""Committee decryption: the round's summed ciphertexts to key holders, masks to unmaskers.

Shared mode: each shard of the sum goes to whichever key holder is free (only members
that proved at join that they hold the key); a member that drops or times out loses its
shard to another. Every answer is checked before a value of it is used: the member
sends each ciphertext's randomness with its plaintext, and re-encrypting must give the
shard back (batched, `fedcore.crypto.decrypt_proof`). Threshold mode: each shard goes to
T share holders of a rotating window, and every partial decryption is verified against
the member's proof before the T are combined. In both modes a member whose answer fails
its check is counted (``bad_decrypt_result``), named in a WARNING, excluded from
decrypting and unmasking for the federation's life (the list is checkpointed) and its
shard redone by another member; it is not disconnected (it may be this round's
unmasker, whose masks nobody else can remove).
Either way the decrypted (still masked) shard then goes to the round's unmasker, which
removes exactly the folded contributors' masks and releases the result only if it
decodes. Every request carries the signed tokens of the contributors, so members can
refuse anything but a quorum-sized, named set. The aggregator holds no private key, no
key share and no mask key: this module only moves ciphertexts, tokens and plaintexts,
and checks what comes back.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Mapping
from typing import Any, cast

from fedcore.aggregator.config import AggregatorConfig
from fedcore.aggregator.registry import ClientHandle, close_client
from fedcore.aggregator.rounds import RoundState
from fedcore.codec import EncryptedCodec
from fedcore.contracts import FederationParams, RejectReason, decryption_context
from fedcore.credentials import pack_tokens
from fedcore.crypto import (
    PartialDecryption,
    ThresholdPublicKey,
    combine,
    deserialize_ciphertexts,
    serialize_plaintexts,
    verify,
)
from fedcore.crypto.threshold_proof import EqualityProof
from fedcore.errors import InvalidCiphertextError, RoundError
from fedcore.metrics import AggregatorMetrics
from protocol.errors import ErrorCode, ProtocolError
from protocol.framing import DEFAULT_MAX_FRAME_SIZE
from protocol.messages import (
    DecryptRequest,
    DecryptResult,
    PartialDecryptRequest,
    PartialDecryptResult,
    UnmaskRequest,
    UnmaskResult,
)

__all__ = ["CommitteeDecryption", "SumNotDecodable"]

log = logging.getLogger(__name__)


PIPELINE = 2
"""Decryption requests a shared-mode member has in flight at once (protocol 7 allows
MAX_COMMITTEE_REQUESTS; one place stays free for an unmask request)."""


class _Withdrawn(Exception):
    """A request in flight to a member caught lying: its answer will not be used."""


class SumNotDecodable(RoundError):
    """The unmasker refused the round's sum: unmasked, it is not a sum of honest updates."""


class CommitteeDecryption:
    """Spreads one round's sum over the connected key holders and collects the unmasked sum."""

    def __init__(
        self,
        *,
        config: AggregatorConfig,
        federation: FederationParams,
        codec: EncryptedCodec,
        metrics: AggregatorMetrics,
        clients: Mapping[str, ClientHandle],
        excluded: list[str] | None = None,
    ) -> None:
        self.config = config
        self.excluded = [] if excluded is None else excluded
        """Client ids caught answering wrongly (the checkpoint's list: appended to)."""
        self.federation = federation
        self._federation_digest = federation.digest()
        self.codec = codec
        self.metrics = metrics
        self._clients = clients
        self.member_seconds: dict[str, float] = {}
        """Seconds the committee reported for the last round: ``decrypt``, ``unmask``."""
        self.per_member_decrypt: dict[str, float] = {}
        """Seconds each member reported decrypting in the last round, by client id."""
        self._owed: set[asyncio.Task[None]] = set()  # slots of withdrawn requests

    def _shards(self, members: int) -> list[tuple[int, int]]:
        # a result travels in one frame to us: keep it within half our frame limit (a
        # partial decryption is as wide as a ciphertext, a plaintext half that)
        key = self.codec.public_key
        width = key.ciphertext_bytes if self.federation.threshold_key else key.plaintext_bytes
        max_items = max(1, (DEFAULT_MAX_FRAME_SIZE // 2) // width)
        # shared mode: PIPELINE shards a member; threshold mode: each member already gets
        # about T shards at once (one per window it is in), answered one after another
        per_member = PIPELINE if self.federation.threshold_key is None else 1
        count = max(per_member * members, -(-self.codec.item_count // max_items))
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
        threshold = self.federation.threshold_key
        if threshold is not None:
            members = self._share_holders(members, threshold)
        elif c.committee_size:  # 0: every connected key holder
            members = members[: c.committee_size]
        self.per_member_decrypt = {}
        contributors = pack_tokens([state.folded[cid] for cid in sorted(state.folded)])
        shards = self._shards(len(members))
        t0 = time.monotonic()
        unmasked: dict[int, list[int]] = {}
        # Each member is in the queue PIPELINE times: it gets its next shard while it
        # still works on one, so its cores never wait for a round trip.
        free: asyncio.Queue[ClientHandle] = asyncio.Queue()
        for _ in range(PIPELINE):
            for member in members:
                free.put_nowait(member)

        def usable(member: ClientHandle) -> bool:
            return member.can_decrypt and self._clients.get(member.client_id) is member

        async def decrypt_one(request: DecryptRequest) -> list[int]:
            for _attempt in range(3 * len(members) + 3):
                if free.empty() and not any(usable(m) for m in members):
                    break  # every member left or was caught lying: nobody to wait for
                try:
                    member = await asyncio.wait_for(free.get(), c.decrypt_shard_timeout)
                except TimeoutError:
                    break
                if not usable(member):
                    continue  # left or excluded while queued; it never comes back
                result = await self._exchange(member, request)
                if usable(member):  # free again while its answer is being checked
                    free.put_nowait(member)
                values = await self._checked_decryption(member, request, result)
                if values is not None:
                    return values
            raise RoundError(f"no committee member decrypted shard {request.shard_id}")

        async def shard(shard_id: int, start: int, count: int) -> None:
            request_type = DecryptRequest if threshold is None else PartialDecryptRequest
            decrypt_request = request_type(
                round_id=state.round_id,
                shard_id=shard_id,
                start=start,
                item_count=count,
                payload=self.codec.shard_payload(summed, start, count),
                contributors=contributors,
            )
            if isinstance(decrypt_request, PartialDecryptRequest):
                values = await self._threshold_shard(members, decrypt_request)
            else:
                values = await decrypt_one(decrypt_request)
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
            "round %d: %d shards %s by %d committee members and unmasked by %s in %.2f s "
            "(member seconds: %s)",
            state.round_id,
            len(shards),
            "decrypted" if threshold is None else f"decrypted {threshold.threshold} times",
            len(members),
            ", ".join(state.unmaskers),
            time.monotonic() - t0,
            ", ".join(f"{cid} {sec:.2f}" for cid, sec in sorted(self.per_member_decrypt.items())),
        )
        out: list[int] = []
        for start, _count in shards:
            out.extend(unmasked[start])
        return out

    @staticmethod
    def _share_holders(members: list[ClientHandle], key: ThresholdPublicKey) -> list[ClientHandle]:
        """One connected member per share index, in share order (RoundError below T)."""
        by_index: dict[int, ClientHandle] = {}
        for member in members:
            if not member.decrypt_excluded:
                by_index.setdefault(member.share_index, member)
        if len(by_index) < key.threshold:
            raise RoundError(
                f"{len(by_index)} distinct key shares are connected; this "
                f"{key.threshold}-of-{key.parties} key needs {key.threshold} to decrypt"
            )
        return [by_index[index] for index in sorted(by_index)]

    async def _threshold_shard(
        self, members: list[ClientHandle], request: PartialDecryptRequest
    ) -> list[int]:
        """One shard's masked plaintexts from T verified partial decryptions.

        The shard goes to T members of a rotating window over the share holders (so each
        does about T/N of the work); a member that fails, times out or sends a partial
        whose proof does not verify is replaced by the next one. A member with a bad
        proof is counted (``bad_decrypt_result``), named in the log and excluded from
        decrypting for as long as it stays connected (it is not disconnected: it may be
        the round's unmasker). With fewer than T verified partials the round
        fails and nothing of this shard is decrypted.
        """
        key = self.federation.threshold_key
        assert key is not None
        shard_id, count = request.shard_id, request.item_count
        context = decryption_context(
            self._federation_digest,
            request.round_id,
            request.start,
            count,
            request.contributors,
        )
        ciphertexts = deserialize_ciphertexts(request.payload, key.public_key, validate=False)
        first = shard_id * key.threshold % len(members)
        queue = members[first:] + members[:first]

        async def ask(member: ClientHandle) -> PartialDecryption | None:
            result = await self._exchange(member, request)
            if result is None:
                return None
            why = ""
            if result.share_index != member.share_index:
                why = f"answered with share {result.share_index}, its credential names share "
                why += str(member.share_index)
            else:
                try:
                    partial = PartialDecryption(
                        result.share_index,
                        tuple(deserialize_ciphertexts(result.payload, key.public_key)),
                        EqualityProof.from_bytes(result.proof),
                    )
                except (InvalidCiphertextError, ValueError) as exc:
                    why = f"malformed partial decryption: {exc}"
                else:
                    if len(partial.values) != count:
                        why = f"{len(partial.values)} partials for {count} ciphertexts"
                    elif not await asyncio.to_thread(
                        verify, key, ciphertexts, partial, context=context
                    ):
                        why = "its partial decryption proof does not verify"
            if why:
                self._exclude(member, request, why)
                return None
            self._count_seconds(member, request, result.seconds)
            return partial

        valid: list[PartialDecryption] = []
        pending: set[asyncio.Task[PartialDecryption | None]] = set()
        try:
            while len(valid) < key.threshold:
                while queue and len(valid) + len(pending) < key.threshold:
                    member = queue.pop(0)
                    if member.decrypt_excluded:
                        continue
                    if self._clients.get(member.client_id) is not member:
                        continue
                    pending.add(asyncio.create_task(ask(member)))
                if not pending:
                    raise RoundError(
                        f"shard {shard_id}: only {len(valid)} verified partial decryptions; "
                        f"the {key.threshold}-of-{key.parties} key needs {key.threshold} "
                        "(nothing was decrypted)"
                    )
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                valid += [partial for task in done if (partial := task.result()) is not None]
        finally:
            for task in pending:
                task.cancel()
        return await asyncio.to_thread(combine, key, valid[: key.threshold])

    async def _checked_decryption(
        self, member: ClientHandle, request: DecryptRequest, result: DecryptResult | None
    ) -> list[int] | None:
        """A shared-key member's plaintexts for one shard, once they re-encrypt to it."""
        if result is None:
            return None
        try:
            values = self.codec.parse_plaintexts(result.payload, request.item_count)
        except (InvalidCiphertextError, ValueError) as exc:
            why = f"malformed plaintexts: {exc}"
        else:
            why = await asyncio.to_thread(
                self.codec.check_decryption, request.payload, values, result.randomness
            )
        if why:
            self._exclude(member, request, why)
            return None
        self._count_seconds(member, request, result.seconds)
        return values

    def _exclude(
        self, member: ClientHandle, request: DecryptRequest | PartialDecryptRequest, why: str
    ) -> None:
        """A wrong decryption: count it, name the member, never ask it again."""
        member.decrypt_excluded = True
        # its other decryptions in flight go to other members now (an unmask it owes
        # stays: it may be this round's unmasker, whose masks nobody else can remove)
        for (answer, _round, _shard), waiter in list(member.committee_waiters.items()):
            if answer is not UnmaskResult and not waiter.done():
                waiter.set_exception(_Withdrawn())
        if member.client_id not in self.excluded:
            self.excluded.append(member.client_id)
        share = f" (key share {member.share_index})" if member.share_index else ""
        log.warning(
            "round %d: committee member %s%s excluded for the federation's life: shard %d: %s",
            request.round_id,
            member.client_id,
            share,
            request.shard_id,
            why,
        )
        label = RejectReason.BAD_DECRYPT_RESULT.label
        self.metrics.updates_rejected_total.labels(reason=label).inc()

    async def _request(
        self,
        member: ClientHandle,
        request: UnmaskRequest,
        count: int,
    ) -> list[int] | None:
        """Send one committee request and check the answer's shape (None on failure)."""
        result = await self._exchange(member, request)
        if result is None:
            return None
        try:
            values = self.codec.parse_plaintexts(result.payload, count)
        except (InvalidCiphertextError, ValueError) as exc:
            await self._bad_result(member, str(exc))
            return None
        self._count_seconds(member, request, result.seconds)
        return values

    async def _exchange(
        self,
        member: ClientHandle,
        request: DecryptRequest | UnmaskRequest | PartialDecryptRequest,
    ) -> Any:
        """Send ``request``, await the member's answer of the matching type (None on failure)."""
        kind = _KINDS[type(request)]
        await member.committee_slots.acquire()
        keep_slot = False  # a withdrawn request keeps its place until the member answers
        try:
            if self._clients.get(member.client_id) is not member:
                return None  # left while this request waited for its turn
            if member.decrypt_excluded and isinstance(request, PartialDecryptRequest):
                return None  # its proof failed while this request waited
            key = (_ANSWERS[type(request)], request.round_id, request.shard_id)
            loop = asyncio.get_running_loop()
            waiter: asyncio.Future[Any] = loop.create_future()
            member.committee_waiters[key] = waiter
            # the member works on its requests one after another: this one's time
            # starts when the ones ahead of it are done
            timeout = self.config.decrypt_shard_timeout * len(member.committee_waiters)
            try:
                member.committee_idle.clear()  # set again by its last answer or its departure
                await member.send(request)
                result: Any = await asyncio.wait_for(waiter, timeout)
            except _Withdrawn:
                log.info(
                    "shard %d goes to another member: %s was excluded",
                    request.shard_id,
                    member.client_id,
                )
                # The member still owes this answer and the protocol counts it among the
                # MAX_COMMITTEE_REQUESTS outstanding: its slot is freed when it comes.
                owed: asyncio.Future[Any] = loop.create_future()
                member.committee_waiters[key] = owed
                keep_slot = True
                task = loop.create_task(self._free_slot_when_answered(member, owed, timeout))
                self._owed.add(task)
                task.add_done_callback(self._owed.discard)
                return None
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
                if member.committee_waiters.get(key) is waiter:
                    del member.committee_waiters[key]
        finally:
            if not keep_slot:
                member.committee_slots.release()
        if not isinstance(result, _ANSWERS[type(request)]):
            return None
        answer = cast("DecryptResult | UnmaskResult | PartialDecryptResult", result)
        if answer.shard_id != request.shard_id or answer.round_id != request.round_id:
            return None
        return answer

    @staticmethod
    async def _free_slot_when_answered(
        member: ClientHandle, owed: asyncio.Future[Any], timeout: float
    ) -> None:
        """Free a withdrawn request's slot once its answer (ignored) or the member's end comes."""
        try:
            await asyncio.wait_for(owed, timeout)
        except TimeoutError:
            await close_client(member, ErrorCode.TIMEOUT, "decrypt shard timed out")
        except Exception:  # gone or closed: nothing is owed any more
            pass
        finally:
            member.committee_slots.release()

    async def _bad_result(self, member: ClientHandle, why: str) -> None:
        """Count, log and disconnect a member whose answer is wrong."""
        label = RejectReason.BAD_DECRYPT_RESULT.label
        self.metrics.updates_rejected_total.labels(reason=label).inc()
        await close_client(member, ErrorCode.BAD_DECRYPT_RESULT, why)

    def _count_seconds(
        self,
        member: ClientHandle,
        request: DecryptRequest | UnmaskRequest | PartialDecryptRequest,
        seconds: float,
    ) -> None:
        kind = "unmask" if isinstance(request, UnmaskRequest) else "decrypt"
        self.member_seconds[kind] = self.member_seconds.get(kind, 0.0) + seconds
        if kind == "decrypt":
            self.per_member_decrypt[member.client_id] = (
                self.per_member_decrypt.get(member.client_id, 0.0) + seconds
            )
            self.metrics.decryption_time_seconds.observe(seconds)
        else:
            self.metrics.unmask_time_seconds.observe(seconds)


_KINDS: dict[type, str] = {
    DecryptRequest: "decrypt",
    PartialDecryptRequest: "partially decrypt",
    UnmaskRequest: "unmask",
}
_ANSWERS: dict[type, type] = {
    DecryptRequest: DecryptResult,
    PartialDecryptRequest: PartialDecryptResult,
    UnmaskRequest: UnmaskResult,
}
