"""Issue #17's hostile peers: the transport-level attacks, and the list of all of them.

Each attack is an async function of an `AttackContext` (the daemon's port, the
federation, certificates of its own that are not the honest clients', how big to make
the attack) returning what the attacker saw: error codes, frames sent, how long the
daemon kept a connection. Every loop is bounded (a count, ``AttackScale``'s seconds, or
the daemon's exit). `ATTACKS` lists all of issue #17's attacks (those that play the
round protocol are in `bench.hostile_round_attacks`) with the daemon settings each
needs; `bench.hostile` runs them against a `fedcore aggregator` process while an honest
federation trains, and measures the daemon. Knows nothing of processes or RSS.

2  ``msgpack-bomb``     ~7 MB frames of millions of empty arrays, before and after Hello
4  ``partial-frames``   connections that send 8 MiB - 1 byte of an 8 MiB frame, then wait
5  ``connection-cap``   hundreds of connections on one certificate, kept alive by
                        Heartbeats before Hello, while the honest clients try to join
6a ``heartbeat-flood``  Heartbeats as fast as the daemon takes them (before, after Hello)
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Callable
from typing import Any

from bench.hostile_context import FIRST_ROUND, Attack, AttackContext, AttackScale
from bench.hostile_peer import (
    CONNECT_TIMEOUT_S,
    Peer,
    bomb_frame,
    heartbeat_frame,
    partial_frame,
)
from bench.hostile_round_attacks import (
    LIES,
    keyless_member,
    lying_member,
    upload_squat,
    upload_takeover,
)
from protocol.messages import Hello, UpdateChunk

__all__ = ["ATTACKS", "LIES", "Attack", "AttackContext", "AttackScale"]


# ---------------------------------------------------------------------------- 2: msgpack bombs
async def _bomb_once(
    ctx: AttackContext, identity: str, data: bytes, *, after_hello: bool
) -> dict[str, Any]:
    try:
        peer = await Peer.open(ctx.pki, identity, ctx.port)
        if after_hello:
            await peer.hello()
    except (OSError, ConnectionError, TimeoutError) as exc:
        return {"after_hello": after_hello, "outcome": f"not connected: {type(exc).__name__}"}
    t0 = time.monotonic()
    try:
        await peer.send_raw(data)
        outcome = await peer.outcome(ctx.scale.read_timeout_s)
    except (OSError, ConnectionError):
        outcome = "closed"
    finally:
        await peer.close()
    return {"after_hello": after_hello, "outcome": outcome, "seconds": time.monotonic() - t0}


async def msgpack_bombs(ctx: AttackContext) -> dict[str, Any]:
    """2: waves of bomb frames from ``bomb_connections`` connections at once, first
    before Hello (as the first frame), then after Hello (distinct certificates)."""
    ctx.ready.set()
    if not await ctx.log_line(FIRST_ROUND):
        return {"skipped": "round 1 never started"}
    before, arrays = bomb_frame(Hello.type_id)
    after, _ = bomb_frame(UpdateChunk.type_id)
    k = ctx.scale.bomb_connections
    shots: list[dict[str, Any]] = []
    for _wave in range(ctx.scale.bomb_waves):
        for after_hello, data in ((False, before), (True, after)):
            if ctx.stopped.is_set():
                break
            wave = [
                _bomb_once(
                    ctx, ctx.identities[i % len(ctx.identities)], data, after_hello=after_hello
                )
                for i in range(k)
            ]
            shots += await asyncio.gather(*wave)
    return {
        "frames_sent": len(shots),
        "frame_bytes": len(before),
        "empty_arrays_per_frame": arrays,
        "outcomes": dict(collections.Counter(s["outcome"] for s in shots)),
        "max_seconds_to_close": max((s.get("seconds", 0.0) for s in shots), default=0.0),
    }


# ---------------------------------------------------------------------------- 4: partial frames
async def _hold_partial(
    ctx: AttackContext, identity: str, data: bytes, sent: Callable[[], None]
) -> dict[str, Any]:
    try:
        peer = await Peer.open(ctx.pki, identity, ctx.port)
    except (OSError, ConnectionError, TimeoutError) as exc:
        sent()
        return {"outcome": f"not connected: {type(exc).__name__}", "sent": 0}
    t0 = time.monotonic()
    try:
        try:
            await peer.send_raw(data)
        finally:
            sent()
        outcome = await peer.outcome(max(0.0, ctx.scale.partial_hold_s - (time.monotonic() - t0)))
    except (OSError, ConnectionError):
        outcome = "closed"
    finally:
        await peer.close()
    return {"outcome": outcome, "sent": peer.bytes_sent, "seconds": time.monotonic() - t0}


async def partial_frames(ctx: AttackContext) -> dict[str, Any]:
    """4: connections that never say Hello, each sending all but the last byte of a
    maximal frame, then holding it for ``partial_hold_s`` (certificates round-robin).
    The honest clients start once every frame is sent: the federation runs while they
    are held."""
    data = partial_frame(Hello.type_id)
    n = ctx.scale.partial_connections
    sent = [0]

    def one_sent() -> None:
        sent[0] += 1
        if sent[0] == n:
            ctx.ready.set()  # every frame is in: now the honest federation runs

    holds = await asyncio.gather(
        *(
            _hold_partial(ctx, ctx.identities[i % len(ctx.identities)], data, one_sent)
            for i in range(n)
        )
    )
    ctx.ready.set()
    closed = [h["seconds"] for h in holds if h["outcome"] != "open" and "seconds" in h]
    return {
        "connections": n,
        "mib_sent": round(sum(h["sent"] for h in holds) / 2**20, 1),
        "outcomes": dict(collections.Counter(h["outcome"] for h in holds)),
        "held_full_time": sum(h["outcome"] == "open" for h in holds),
        "median_seconds_to_close": sorted(closed)[len(closed) // 2] if closed else None,
    }


# ---------------------------------------------------------------------------- 5: connection cap
async def connection_cap(ctx: AttackContext) -> dict[str, Any]:
    """5: ``cap_connections`` connections on one certificate, each sending a Heartbeat
    before Hello every ``cap_heartbeat_s`` (resetting the first-message timeout), held for
    ``cap_hold_s``; the honest clients start once they are all up."""
    scale = ctx.scale
    identity = ctx.identities[0]
    beat = heartbeat_frame()
    opening = asyncio.Semaphore(32)
    settled = 0
    open_now = max_open = 0
    # the hold counts from when the honest clients start (all connections tried)
    hold_until = [time.monotonic() + 2 * CONNECT_TIMEOUT_S + scale.cap_hold_s]

    async def hold(index: int) -> str:
        nonlocal settled, open_now, max_open
        try:
            async with opening:
                peer = await Peer.open(ctx.pki, identity, ctx.port)
        except (OSError, ConnectionError, TimeoutError) as exc:
            return f"not connected: {type(exc).__name__}"
        finally:
            settled += 1
            if settled == scale.cap_connections:
                ctx.ready.set()
        open_now += 1
        max_open = max(max_open, open_now)
        try:
            while not ctx.stopped.is_set():
                left = hold_until[0] - time.monotonic()
                if left <= 0:
                    return "held"
                outcome = await peer.outcome(min(scale.cap_heartbeat_s, left))
                if outcome != "open":
                    return outcome
                await peer.send_raw(beat)
            return "held"
        except (OSError, ConnectionError):
            return "closed"
        finally:
            open_now -= 1
            await peer.close()

    tasks = [asyncio.create_task(hold(i)) for i in range(scale.cap_connections)]
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ctx.ready.wait(), CONNECT_TIMEOUT_S * 2)
        ctx.ready.set()
        hold_until[0] = time.monotonic() + scale.cap_hold_s
        accepted_at_ready = open_now
        outcomes = await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
    return {
        "identity": identity,
        "connections": scale.cap_connections,
        "open_when_honest_started": accepted_at_ready,
        "max_open": max_open,
        "outcomes": dict(collections.Counter(outcomes)),
    }


# ---------------------------------------------------------------------------- 6a: heartbeats
async def _flood(ctx: AttackContext, identity: str, *, after_hello: bool) -> dict[str, Any]:
    scale = ctx.scale
    peer = await Peer.open(ctx.pki, identity, ctx.port)
    if after_hello:
        await peer.hello()
    batch = heartbeat_frame() * scale.flood_batch
    watcher = asyncio.create_task(peer.outcome(scale.flood_s + scale.read_timeout_s))
    sent, t0 = 0, time.monotonic()
    try:
        while time.monotonic() - t0 < scale.flood_s and not watcher.done():
            if ctx.stopped.is_set() or peer.writer.transport.is_closing():
                break  # what is written after the close is not the daemon's work
            await peer.send_raw(batch)
            sent += scale.flood_batch
    except (OSError, ConnectionError):
        pass
    seconds = time.monotonic() - t0
    try:
        outcome = await asyncio.wait_for(asyncio.shield(watcher), 2.0)
    except TimeoutError:
        outcome = "open"
    finally:
        watcher.cancel()
        await peer.close()
    return {
        "after_hello": after_hello,
        "frames_sent": sent,
        "seconds": round(seconds, 2),
        "frames_per_s": round(sent / seconds) if seconds else 0,
        "outcome": outcome,
    }


async def heartbeat_flood(ctx: AttackContext) -> dict[str, Any]:
    """6a: two connections (one before Hello, one after) send Heartbeats as fast as the
    daemon reads them for ``flood_s``; the daemon's CPU over that time is measured."""
    ctx.ready.set()
    if not await ctx.log_line(FIRST_ROUND):
        return {"skipped": "round 1 never started"}
    cpu0, t0 = ctx.cpu_seconds(), time.monotonic()
    floods = await asyncio.gather(
        _flood(ctx, ctx.identities[0], after_hello=False),
        _flood(ctx, ctx.identities[1], after_hello=True),
    )
    wall = time.monotonic() - t0
    return {
        "frames_sent": sum(f["frames_sent"] for f in floods),
        "frames_per_s": round(sum(f["frames_sent"] for f in floods) / wall) if wall else 0,
        "daemon_cpu_percent": round(100 * (ctx.cpu_seconds() - cpu0) / wall, 1) if wall else 0,
        "connections": floods,
    }


# ---------------------------------------------------------------------------- the list
def _with_extra_clients(extra: int) -> Callable[[AttackScale, int], dict[str, Any]]:
    return lambda scale, honest: {"clients_per_round": honest + extra}


ATTACKS: dict[str, Attack] = {
    attack.name: attack
    for attack in (
        Attack(
            name="keyless-member",
            issue="1a",
            summary="committee credential, no key, no KeyProof; answers zeros",
            run=keyless_member,
        ),
        *(
            Attack(
                name=f"lie-{lie}",
                issue="1b",
                summary=f"proven key holder answers its shard with {lie} plaintexts",
                run=lying_member(lie),
            )
            for lie in LIES
        ),
        Attack(
            name="msgpack-bomb",
            issue="2",
            summary="~7 MB frames of 7.3 M empty msgpack arrays, before and after Hello",
            run=msgpack_bombs,
        ),
        Attack(
            name="upload-squat",
            issue="3",
            summary="max_inflight_uploads identities take every grant, send nothing",
            run=upload_squat,
            settings=lambda scale, honest: {
                "clients_per_round": honest + scale.squatters,
                "max_inflight_uploads": scale.squatters,
            },
        ),
        Attack(
            name="partial-frames",
            issue="4",
            summary="connections send 8 MiB - 1 byte of an 8 MiB frame before Hello, then wait",
            run=partial_frames,
            honest_when_ready=True,
        ),
        Attack(
            name="connection-cap",
            issue="5",
            summary="hundreds of connections on one certificate, heartbeats before Hello",
            run=connection_cap,
            settings=lambda scale, honest: {"max_connections": scale.cap_max_connections},
            honest_when_ready=True,
        ),
        Attack(
            name="heartbeat-flood",
            issue="6a",
            summary="Heartbeats as fast as the daemon reads them, before and after Hello",
            run=heartbeat_flood,
        ),
        Attack(
            name="upload-takeover",
            issue="6b",
            summary="a second connection with a client's certificate asks to upload mid-upload",
            run=upload_takeover,
            settings=_with_extra_clients(1),
            own_baseline=True,
        ),
    )
}
