"""Connected clients: one handle per certificate identity, and how to talk to them safely.

A handle serialises writes on its connection (a round task and a committee task may
both send), remembers the committee request it is waiting on, and counts the bytes
already reported to metrics. Sending never raises for a client that went away: its
connection handler cleans up. Knows nothing of rounds, folding or decryption.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

from fedcore.metrics import AggregatorMetrics
from protocol.errors import ErrorCode, ProtocolError
from protocol.messages import Error
from protocol.session import MAX_COMMITTEE_REQUESTS
from protocol.transport import Connection

__all__ = ["ClientHandle", "close_client", "count_bytes", "send_quietly"]

log = logging.getLogger(__name__)


@dataclass(slots=True, eq=False)
class ClientHandle:
    """One connected client: its identity, connection and per-connection bookkeeping.

    ``credential`` is a key holder's verified committee credential (its wire bytes,
    which RoundStart relays to clients) and ``mask_public`` its mask key; both are
    empty for a client without the private key; ``share_index`` is the threshold key
    share the credential names (0 in shared mode); ``key_challenge`` is the nonce of
    its Welcome and ``key_proven`` whether it proved it holds the key (shared mode: a
    KeyProof; threshold mode: each partial decryption carries its proof instead);
    ``decrypt_excluded`` is set once a decryption of its failed its check (it is never
    asked again, nor picked to unmask, for the life of the federation).
    ``relay`` marks a relay (an edge aggregator uploading its clients' folded sum),
    ``relayed_clients`` the client count it last reported.
    Up to ``MAX_COMMITTEE_REQUESTS`` committee requests are outstanding per connection
    (``committee_slots``); each answer resolves its own future in ``committee_waiters``
    (keyed by answer type, round and shard), and ``committee_idle`` is set once none is
    outstanding (even when nobody waits any more: a RoundStart may only follow once the
    member's session is back from DECRYPTING). ``last_error`` is the reason of the
    Error frame the client closed with, if any.
    """

    client_id: str
    conn: Connection
    credential: bytes = b""
    mask_public: bytes = b""
    share_index: int = 0
    key_challenge: bytes = b""
    key_proven: bool = False
    decrypt_excluded: bool = False
    relay: bool = False
    relayed_clients: int = 0
    send_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    committee_slots: asyncio.Semaphore = field(
        default_factory=lambda: asyncio.Semaphore(MAX_COMMITTEE_REQUESTS)
    )
    committee_waiters: dict[tuple[type, int, int], asyncio.Future[Any]] = field(
        default_factory=dict
    )
    committee_idle: asyncio.Event = field(default_factory=asyncio.Event)
    last_error: str = ""
    last_error_code: ErrorCode | None = None
    counted_in: int = 0
    counted_out: int = 0

    def __post_init__(self) -> None:
        self.committee_idle.set()  # no committee request outstanding

    def committee_answer(self, message: Any) -> None:
        """Hand a committee answer to the request waiting for it (if any still waits)."""
        key = (type(message), message.round_id, message.shard_id)
        waiter = self.committee_waiters.pop(key, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(message)
        if not self.committee_waiters:
            self.committee_idle.set()

    def committee_gone(self, why: str) -> None:
        """The connection ended: every outstanding committee request fails."""
        waiters, self.committee_waiters = self.committee_waiters, {}
        for waiter in waiters.values():
            if not waiter.done():
                waiter.set_exception(ConnectionError(why))
        self.committee_idle.set()

    @property
    def can_decrypt(self) -> bool:
        """A valid committee credential, a proven key, and no wrong answer so far."""
        return bool(self.credential) and self.key_proven and not self.decrypt_excluded

    async def send(self, message: Any) -> None:
        """Send one message, never interleaved with another task's frame."""
        async with self.send_lock:
            await self.conn.send(message)


async def send_quietly(handle: ClientHandle, message: Any) -> None:
    """Send; a client that has gone away is simply gone (its handler cleans up)."""
    try:
        await handle.send(message)
    except (ProtocolError, OSError, ConnectionError) as exc:
        log.info("could not send %s to %s: %s", type(message).__name__, handle.client_id, exc)


async def close_client(handle: ClientHandle, code: ErrorCode | None, reason: str) -> None:
    """Close a client's connection, with an Error frame carrying ``code`` when given."""
    error = None if code is None else Error(code=int(code), reason=reason[:1000])
    with contextlib.suppress(Exception):
        async with handle.send_lock:
            await asyncio.wait_for(handle.conn.close(reason=reason[:1000], error=error), 5)


def count_bytes(handle: ClientHandle, metrics: AggregatorMetrics) -> None:
    """Add the bytes moved on the handle's connection since the last call to metrics."""
    received = handle.conn.bytes_received
    sent = handle.conn.bytes_sent
    metrics.bytes_received_total.inc(max(0, received - handle.counted_in))
    metrics.bytes_sent_total.inc(max(0, sent - handle.counted_out))
    handle.counted_in, handle.counted_out = received, sent
