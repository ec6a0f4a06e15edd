"""What every hostile-peers attack is given and returns, and how it reads the daemon.

`AttackScale` says how big each attack is, `AttackContext` what an attack knows (the
daemon's port and log, the federation, certificates of its own, the daemon's CPU so
far) and `Attack` describes one attack of issue #17 with the daemon settings its
scenario needs. `next_message` and `serve_until_exit` are the reading loops the attacks
share, bounded by the daemon's exit. Knows nothing of particular attacks or processes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.hostile_peer import Peer
from fedcore.contracts import FederationParams
from protocol.errors import ErrorCode
from protocol.messages import Bye, Error

__all__ = [
    "FIRST_ROUND",
    "Attack",
    "AttackContext",
    "AttackFn",
    "AttackScale",
    "next_message",
    "serve_until_exit",
]

FIRST_ROUND = "round 1: selected"
"""The daemon's log line once round 1 chose its clients (attackers join after it)."""
_POLL_S = 0.05
_SELECT_TIMEOUT_S = 300.0  # the honest clients join within this (a 2048-bit keyed client)


@dataclass(frozen=True, slots=True, kw_only=True)
class AttackScale:
    """How big each attack is: the bench's defaults are issue #17's figures."""

    bomb_waves: int = 2
    bomb_connections: int = 4
    partial_connections: int = 40
    partial_hold_s: float = 30.0
    cap_connections: int = 300
    cap_max_connections: int = 256
    cap_heartbeat_s: float = 2.0
    cap_hold_s: float = 30.0
    squatters: int = 8
    flood_s: float = 10.0
    flood_batch: int = 256
    read_timeout_s: float = 60.0


@dataclass(kw_only=True)
class AttackContext:
    """What an attack knows: where the daemon is, its own certificates, how hard to push."""

    port: int
    pki: Path
    private_key: Path
    federation: FederationParams
    identities: tuple[str, ...]
    """Certificates of the attacker (never an honest client's unless an attack says so)."""
    honest: int
    scale: AttackScale
    log: Path
    """The daemon's log, read for its round lines."""
    cpu_seconds: Callable[[], float]
    """The daemon's CPU seconds so far."""
    stopped: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once the daemon exited."""
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    """Set by an attack that must be in place before the honest clients start."""
    dry_run: bool = False
    """Play the scenario's honest part only (an attack's own baseline)."""

    async def log_line(self, text: str, timeout: float = _SELECT_TIMEOUT_S) -> bool:
        """Wait until the daemon logs a line containing ``text`` (False: exited or timed out)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.stopped.is_set():
            with contextlib.suppress(OSError):
                if text in self.log.read_text(errors="replace"):
                    return True
            await asyncio.sleep(_POLL_S)
        return False

    async def pause(self, seconds: float) -> bool:
        """Sleep ``seconds`` or until the daemon exits; True if it exited."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopped.wait(), max(0.0, seconds))
        return self.stopped.is_set()


AttackFn = Callable[[AttackContext], Coroutine[Any, Any, dict[str, Any]]]


@dataclass(frozen=True, slots=True, kw_only=True)
class Attack:
    """One attack of issue #17 and the daemon settings its scenario needs."""

    name: str
    issue: str
    summary: str
    run: AttackFn
    settings: Callable[[AttackScale, int], dict[str, Any]] = lambda scale, honest: {}
    """Daemon setting overrides, given the scale and the number of honest clients."""
    honest_when_ready: bool = False
    """Start the honest clients only once the attack set ``ready`` (it must come first)."""
    own_baseline: bool = False
    """The scenario differs from the plain honest run (a victim uploads): compare it with
    its own dry run instead."""


async def next_message(ctx: AttackContext, peer: Peer, *kinds: type) -> Any:
    """The next message of one of ``kinds`` (others skipped), or None at EOF/daemon exit."""
    while True:
        try:
            message = await peer.receive(0.5)
        except TimeoutError:
            if ctx.stopped.is_set():
                return None
            continue
        if message is None or isinstance(message, kinds):
            return message
        if isinstance(message, Error | Bye):
            return None


async def serve_until_exit(
    ctx: AttackContext, peer: Peer, answer: Callable[[Any], Awaitable[None]]
) -> collections.Counter[str]:
    """Read until the daemon ends the connection; ``answer`` each message; count them."""
    seen: collections.Counter[str] = collections.Counter()
    while True:
        try:
            message = await peer.receive(0.5)
        except TimeoutError:
            if ctx.stopped.is_set():
                break
            continue
        if message is None:
            break
        seen[type(message).__name__] += 1
        if isinstance(message, Error):
            seen[f"Error:{ErrorCode(message.code).name}"] += 1
        await answer(message)
    return seen
