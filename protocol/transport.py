"""asyncio TLS transport for the protocol: connections, a server, a reconnecting client.

A thin I/O shell around ``Session``. It is split by job: `protocol.connection` (one
connection: timeouts, heartbeats and their rate limit, backpressure), `protocol.server`
(accepting: the TLS handshake, connection caps, refusals counted by reason) and this
module (connecting with backoff, and process-wide tuning); everything is importable
from here. It never interprets message contents beyond the session's rules and knows
nothing of Paillier, rounds or the runtime's policies.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from typing import Final

from .connection import (
    CLIENT_WRITE_SLICE,
    DEFAULT_MAX_CONNECTIONS_PER_PEER,
    HEARTBEAT_BURST,
    MAX_HEARTBEAT_RATE,
    MIN_RECEIVE_RATE,
    READ_SIZE,
    SERVER_RECEIVE_BUFFER,
    SERVER_WRITE_SLICE,
    SHUTDOWN_REASON,
    STREAM_LIMIT,
    Connection,
    TransportConfig,
)
from .errors import LocalProtocolError, ProtocolTimeout
from .refusals import REFUSAL_LABELS, Refusal
from .server import LISTEN_BACKLOG, Handler, Server
from .session import Role, Session

__all__ = [
    "ALLOCATOR_MMAP_THRESHOLD",
    "ALLOCATOR_TRIM_THRESHOLD",
    "CLIENT_WRITE_SLICE",
    "DEFAULT_MAX_CONNECTIONS_PER_PEER",
    "HEARTBEAT_BURST",
    "LISTEN_BACKLOG",
    "MAX_HEARTBEAT_RATE",
    "MIN_RECEIVE_RATE",
    "READ_SIZE",
    "REFUSAL_LABELS",
    "SERVER_RECEIVE_BUFFER",
    "SERVER_WRITE_SLICE",
    "SHUTDOWN_REASON",
    "STREAM_LIMIT",
    "Backoff",
    "Connection",
    "Handler",
    "Refusal",
    "Server",
    "TransportConfig",
    "connect",
    "connect_with_retry",
    "install_uvloop",
    "tune_allocator",
]

logger = logging.getLogger(__name__)

# glibc serves allocations above M_MMAP_THRESHOLD with fresh mmap()ed pages and trims
# the heap above M_TRIM_THRESHOLD; with 128 KiB+ frames that means page faults on every
# read. Raising both keeps payload-sized buffers in the heap for reuse.
ALLOCATOR_MMAP_THRESHOLD: Final = 64 * 1024 * 1024
ALLOCATOR_TRIM_THRESHOLD: Final = 256 * 1024 * 1024
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h


def tune_allocator(
    mmap_threshold: int = ALLOCATOR_MMAP_THRESHOLD, trim_threshold: int = ALLOCATOR_TRIM_THRESHOLD
) -> bool:
    """Process-wide: make glibc reuse large buffers instead of mmap/munmap per frame.

    Halves the CPU cost of moving 128 KiB frames. Call once at process start (the
    daemon, a client app, a benchmark); returns False where glibc is absent.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok_mmap = mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)) == 1
    ok_trim = mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)) == 1
    return ok_mmap and ok_trim


def install_uvloop() -> bool:
    """Make new event loops uvloop loops when uvloop is importable; True if it is."""
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


async def connect(
    host: str,
    port: int,
    ssl_context: ssl.SSLContext,
    *,
    server_hostname: str | None = None,
    config: TransportConfig | None = None,
) -> Connection:
    """Open a TLS connection to an aggregator (the caller then sends Hello).

    Raises ``OSError``/``ssl.SSLError`` when the connection or handshake fails and
    ``ProtocolTimeout`` after ``handshake_timeout``.
    """
    cfg = config or TransportConfig()
    try:
        async with asyncio.timeout(cfg.handshake_timeout):
            reader, writer = await asyncio.open_connection(
                host,
                port,
                ssl=ssl_context,
                server_hostname=server_hostname or host,
                ssl_handshake_timeout=cfg.handshake_timeout,
                limit=STREAM_LIMIT,
            )
    except TimeoutError:
        raise ProtocolTimeout(
            f"no TLS connection to {host}:{port} within {cfg.handshake_timeout} s"
        ) from None
    conn = Connection(reader, writer, Session(Role.CLIENT, max_frame_size=cfg.max_frame_size), cfg)
    conn.start_heartbeats()
    return conn


class Backoff:
    """Exponential backoff with full jitter: attempt k waits uniform(0, min(max, base*2**k))."""

    def __init__(
        self, base_delay: float = 0.5, max_delay: float = 30.0, *, rng: random.Random | None = None
    ) -> None:
        if not base_delay > 0:
            raise ValueError(f"base_delay must be > 0, got {base_delay}")
        if not max_delay >= base_delay:
            raise ValueError(f"max_delay must be >= base_delay, got {max_delay}")
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.attempt = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        """The delay before the next attempt (and count the attempt)."""
        cap = min(self.max_delay, self.base_delay * 2 ** min(self.attempt, 62))
        self.attempt += 1
        return self._rng.uniform(0.0, cap)

    async def sleep(self) -> None:
        """Sleep for ``next_delay()`` seconds."""
        await asyncio.sleep(self.next_delay())

    def reset(self) -> None:
        """Start again from ``base_delay`` (after a successful connection)."""
        self.attempt = 0


async def connect_with_retry(
    host: str,
    port: int,
    ssl_context: ssl.SSLContext,
    *,
    server_hostname: str | None = None,
    config: TransportConfig | None = None,
    attempts: int = 5,
    base_delay: float = 0.5,
    max_delay: float = 30.0,
) -> Connection:
    """``connect`` with up to ``attempts`` tries and jittered exponential backoff.

    Certificate verification failures are not retried: they will not go away.
    """
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    backoff = Backoff(base_delay, max_delay)
    for attempt in range(1, attempts + 1):
        try:
            return await connect(
                host, port, ssl_context, server_hostname=server_hostname, config=config
            )
        except ssl.SSLCertVerificationError:
            raise
        except (OSError, ProtocolTimeout) as exc:
            if attempt == attempts:
                raise
            delay = backoff.next_delay()
            logger.info(
                "connect to %s:%d failed (%s), retry %d/%d in %.2f s",
                host,
                port,
                exc,
                attempt,
                attempts - 1,
                delay,
            )
            await asyncio.sleep(delay)
    raise LocalProtocolError("unreachable")  # pragma: no cover
