"""Issue #17's attacks that play the round protocol: the committee, the upload slots.

1a ``keyless-member``   claims the committee without the key (no KeyProof), answers zeros
1b ``lie-*``            holds the key, proves it, answers its shard with wrong plaintexts
                        (zeros, negated, random) and the true randomness
3  ``upload-squat``     max_inflight_uploads identities take every grant and send nothing
6b ``upload-takeover``  a second connection with a client's certificate asks to upload
                        while that client's upload is half done, to inherit its chunks

Each is an async function of an `AttackContext` returning what the attacker saw; every
loop ends with a count or the daemon's exit. Knows nothing of processes or RSS.
"""

from __future__ import annotations

import asyncio
import collections
import random
import time
from typing import Any

from bench.hostile_context import (
    FIRST_ROUND,
    AttackContext,
    AttackFn,
    next_message,
    serve_until_exit,
)
from bench.hostile_peer import Peer, keyless_credential, random_ciphertexts, seal_update
from fedcore.client.committee import CommitteeMember, CommitteeRefusal
from fedcore.credentials import CertificateAuthority, Signer
from fedcore.crypto import PrivateKey, deserialize_plaintexts, serialize_plaintexts
from protocol.errors import ErrorCode
from protocol.messages import (
    Ack,
    Bye,
    DecryptRequest,
    DecryptResult,
    Error,
    RoundEnd,
    RoundStart,
    UnmaskRequest,
    UpdateChunk,
    UpdateDone,
    UploadGrant,
    UploadRequest,
)

__all__ = [
    "LIES",
    "keyless_member",
    "lying_member",
    "upload_squat",
    "upload_takeover",
]

LIES = ("zeros", "negated", "random")


# ---------------------------------------------------------------------------- 1: the committee
async def keyless_member(ctx: AttackContext) -> dict[str, Any]:
    """1a: a committee credential without the key; answers any DecryptRequest with zeros.

    It joins once round 1 has selected its clients (so it is not asked to train) and
    never sends a KeyProof: it cannot compute one.
    """
    ctx.ready.set()
    if not await ctx.log_line(FIRST_ROUND):
        return {"skipped": "round 1 never started"}
    identity = ctx.identities[0]
    credential = keyless_credential(ctx.pki, identity, ctx.federation)
    peer = await Peer.open(ctx.pki, identity, ctx.port)
    welcome = await peer.hello(committee=credential)
    width = ctx.federation.public_key.plaintext_bytes if ctx.federation.public_key else 1

    async def zeros(message: Any) -> None:
        if isinstance(message, DecryptRequest):
            await peer.send(
                DecryptResult(
                    round_id=message.round_id,
                    shard_id=message.shard_id,
                    item_count=message.item_count,
                    payload=bytes(width * message.item_count),
                    seconds=0.1,
                    randomness=bytes(width * message.item_count),
                )
            )

    try:
        seen = await serve_until_exit(ctx, peer, zeros)
    finally:
        await peer.close()
    return {
        "identity": identity,
        "key_challenge": bool(welcome.key_challenge),
        "decrypt_requests": seen["DecryptRequest"],
        "messages": dict(seen),
    }


def _lie(kind: str, result: DecryptResult, member: CommitteeMember, rng: random.Random) -> bytes:
    """Wrong plaintexts of the same shape as ``result``'s (its randomness stays true)."""
    assert isinstance(member.private_key, PrivateKey)  # shared mode: the whole key
    public = member.private_key.public_key
    true = deserialize_plaintexts(result.payload, public)
    n = int(public.n)
    lied = {
        "zeros": lambda: [0] * len(true),
        "negated": lambda: [(n - m) % n for m in true],
        "random": lambda: [rng.randrange(n) for _ in true],
    }[kind]()
    return serialize_plaintexts(lied, public)


def lying_member(lie: str) -> AttackFn:
    """1b: a real key holder (real `CommitteeMember`, real KeyProof) that lies in its shard.

    It decrypts each DecryptRequest as an honest member does (every check, the true
    randomness), then swaps the plaintexts for ``lie``'s; an UnmaskRequest it answers
    honestly. It joins once round 1 has selected its clients.
    """
    if lie not in LIES:
        raise ValueError(f"lie must be one of {', '.join(LIES)}; got {lie!r}")

    async def attack(ctx: AttackContext) -> dict[str, Any]:
        ctx.ready.set()
        if not await ctx.log_line(FIRST_ROUND):
            return {"skipped": "round 1 never started"}
        identity = ctx.identities[0]
        member = CommitteeMember(
            PrivateKey.load(ctx.private_key),
            Signer.load(ctx.pki / f"{identity}.pem", ctx.pki / f"{identity}.key"),
            CertificateAuthority.load(ctx.pki / "ca.pem"),
            ctx.federation,
        )
        peer = await Peer.open(ctx.pki, identity, ctx.port)
        welcome = await peer.hello(member=member)
        codec = peer.codec(ctx.federation)
        rng = random.Random(lie)
        counts: collections.Counter[str] = collections.Counter()

        async def answer(message: Any) -> None:
            try:
                if isinstance(message, DecryptRequest):
                    result = await member.decrypt(message, codec)
                    payload = _lie(lie, result, member, rng)
                    counts["lies_sent"] += 1
                    await peer.send(
                        DecryptResult(
                            round_id=result.round_id,
                            shard_id=result.shard_id,
                            item_count=result.item_count,
                            payload=payload,
                            seconds=result.seconds,
                            randomness=result.randomness,
                        )
                    )
                elif isinstance(message, UnmaskRequest):
                    await peer.send(await member.unmask(message, codec))
                    counts["unmasked"] += 1
            except CommitteeRefusal as exc:
                counts[f"refused: {exc}"] += 1

        try:
            seen = await serve_until_exit(ctx, peer, answer)
        finally:
            await peer.close()
        return {
            "identity": identity,
            "lie": lie,
            "key_challenge": bool(welcome.key_challenge),
            "decrypt_requests": seen["DecryptRequest"],
            **counts,
            "messages": dict(seen),
        }

    return attack


# ---------------------------------------------------------------------------- 3: squatting
async def _squat(ctx: AttackContext, identity: str, rounds: int) -> list[dict[str, Any]]:
    """Take a grant at each RoundStart and send nothing; one record per round seen."""
    records: list[dict[str, Any]] = []
    peer: Peer | None = None
    try:
        for _ in range(rounds):
            if ctx.stopped.is_set():
                break
            if peer is None:
                try:
                    peer = await Peer.open(ctx.pki, identity, ctx.port)
                    await peer.hello()
                except (OSError, ConnectionError, TimeoutError):
                    break
            start = await next_message(ctx, peer, RoundStart)
            if not isinstance(start, RoundStart):
                peer = None
                continue
            await peer.send(UploadRequest(round_id=start.round_id))
            t0 = time.monotonic()
            record: dict[str, Any] = {"round_id": start.round_id, "granted": False}
            while True:
                message = await next_message(ctx, peer, UploadGrant, RoundEnd, Error, Bye)
                if isinstance(message, UploadGrant):
                    record["granted"] = True
                    continue
                record["held_s"] = round(time.monotonic() - t0, 2)
                record["ended_by"] = (
                    ErrorCode(message.code).name
                    if isinstance(message, Error)
                    else type(message).__name__
                    if message is not None
                    else "EOF"
                )
                if not isinstance(message, RoundEnd):
                    peer = None  # closed: come back for the next round
                break
            records.append(record)
    finally:
        if peer is not None:
            await peer.close()
    return records


async def upload_squat(ctx: AttackContext) -> dict[str, Any]:
    """3: ``squatters`` selected identities ask for an upload slot the moment RoundStart
    arrives and then send nothing (the daemon's max_inflight_uploads is ``squatters``)."""
    ctx.ready.set()
    rounds = 4  # the federation's rounds plus failures are fewer in every scenario here
    squatters = ctx.identities[: ctx.scale.squatters]
    per_squatter = await asyncio.gather(*(_squat(ctx, cid, rounds) for cid in squatters))
    records = [r for rs in per_squatter for r in rs]
    return {
        "squatters": len(squatters),
        "grants_taken": sum(r["granted"] for r in records),
        "ended_by": dict(collections.Counter(r.get("ended_by", "?") for r in records)),
        "max_held_s": max((r.get("held_s", 0.0) for r in records), default=0.0),
    }


# ---------------------------------------------------------------------------- 6b: takeover
async def upload_takeover(ctx: AttackContext) -> dict[str, Any]:
    """6b: the victim (an honest upload of a zero update, by hand) sends half its chunks;
    an impostor with the victim's certificate connects, asks to upload without the
    victim's resume token and, if it inherits chunks, appends two of its own; the
    victim reconnects with its token and sends the rest. ``dry_run``: no impostor."""
    ctx.ready.set()
    identity = ctx.identities[0]
    federation = ctx.federation
    signer = Signer.load(ctx.pki / f"{identity}.pem", ctx.pki / f"{identity}.key")
    victim = await Peer.open(ctx.pki, identity, ctx.port)
    await victim.hello()
    start = await next_message(ctx, victim, RoundStart)
    if not isinstance(start, RoundStart):
        return {"skipped": "the victim was not asked to train"}
    codec = victim.codec(federation)
    update = await asyncio.to_thread(seal_update, start, codec, federation, signer)
    total = len(update.payloads)
    half = total // 2
    report: dict[str, Any] = {"victim": identity, "chunks": total, "victim_sent_first": half}
    await victim.send(UploadRequest(round_id=start.round_id))
    grant = await next_message(ctx, victim, UploadGrant)
    if not isinstance(grant, UploadGrant):
        return {**report, "skipped": "the victim got no grant"}
    for seq in range(half):
        await victim.send(
            UpdateChunk(round_id=start.round_id, seq=seq, payload=update.payloads[seq])
        )
    await asyncio.sleep(1.0)  # the daemon takes the chunks in
    if not ctx.dry_run:
        impostor = await Peer.open(ctx.pki, identity, ctx.port)  # the victim is "replaced"
        await impostor.hello()
        resumed = await next_message(ctx, impostor, RoundStart)
        report["impostor_saw_chunks_received"] = getattr(resumed, "chunks_received", None)
        await impostor.send(UploadRequest(round_id=start.round_id))
        stolen = await next_message(ctx, impostor, UploadGrant, RoundEnd)
        inherited = stolen.start_seq if isinstance(stolen, UploadGrant) else None
        report["impostor_granted_from_chunk"] = inherited
        if isinstance(stolen, UploadGrant):
            for seq in range(stolen.start_seq, min(total, stolen.start_seq + 2)):
                items = len(update.payloads[seq]) // codec.public_key.ciphertext_bytes
                payload = random_ciphertexts(codec, items, seed=seq)
                await impostor.send(UpdateChunk(round_id=start.round_id, seq=seq, payload=payload))
            report["impostor_chunks_appended"] = min(total, stolen.start_seq + 2) - stolen.start_seq
        await asyncio.sleep(0.5)
        impostor.abort()
        victim.abort()
        victim = await Peer.open(ctx.pki, identity, ctx.port)
        await victim.hello()
        again = await next_message(ctx, victim, RoundStart)
        report["victim_saw_chunks_received"] = getattr(again, "chunks_received", None)
        await victim.send(UploadRequest(round_id=start.round_id, resume_token=grant.resume_token))
        grant = await next_message(ctx, victim, UploadGrant)
        if not isinstance(grant, UploadGrant):
            return {**report, "victim_outcome": "no grant after reconnecting"}
        report["victim_resumed_from_chunk"] = grant.start_seq
        first = grant.start_seq
    else:
        first = half
    try:
        for seq in range(first, total):
            await victim.send(
                UpdateChunk(round_id=start.round_id, seq=seq, payload=update.payloads[seq])
            )
        await victim.send(
            UpdateDone(
                round_id=start.round_id,
                chunk_count=total,
                item_count=update.item_count,
                digest=update.digest,
                token=update.token,
            )
        )
        answer = await next_message(ctx, victim, Ack, Error, RoundEnd)
    except (OSError, ConnectionError):
        answer = None
    report["victim_outcome"] = (
        ("accepted" if answer.accepted else f"refused: {answer.reason}")
        if isinstance(answer, Ack)
        else type(answer).__name__
        if answer is not None
        else "closed (see the daemon log)"
    )
    await ctx.pause(ctx.scale.read_timeout_s)  # stay until the federation ends
    await victim.close()
    return report
