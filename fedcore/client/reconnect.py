"""The reconnect loop of everything that dials an aggregator: a client, and a relay upstream.

Connect, serve one session, and on a network loss reconnect with jittered backoff until
the aggregator says the federation is complete (a Bye carrying `FEDERATION_COMPLETE`),
a refusal is fatal (`FATAL_CODES`), the session raises a `FedcoreError` of its own, or
too many connects in a row fail. What a session does is the caller's; sockets are
`protocol.transport`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from fedcore.client.config import FATAL_CODES, FEDERATION_COMPLETE
from fedcore.errors import FedcoreError
from protocol.errors import ConnectionClosed, ErrorReceived, ProtocolError
from protocol.messages import Bye
from protocol.transport import Backoff, Connection

__all__ = ["serve_reconnecting"]

log = logging.getLogger(__name__)


async def serve_reconnecting(
    *,
    peer: str,
    who: str,
    dial: Callable[[], Awaitable[Connection]],
    session: Callable[[Connection], Awaitable[None]],
    backoff: Backoff,
    reconnect_attempts: int | None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    stopping: Callable[[], bool] = lambda: False,
    on_reconnect: Callable[[], None] = lambda: None,
) -> bool:
    """Serve sessions until done: True once the federation is complete, False if stopping.

    ``peer`` names the other end in messages ("the aggregator at host:port"), ``who``
    this end ("client", "relay"). Raises `FedcoreError` when ``reconnect_attempts``
    connects in a row fail, when the peer refuses us with a fatal code, or when the
    session raises one (the connection is closed with its reason first).
    """
    failures = 0
    while not stopping():
        try:
            conn = await dial()
        except (TimeoutError, OSError, ProtocolError) as exc:
            failures += 1
            if reconnect_attempts is not None and failures > reconnect_attempts:
                raise FedcoreError(f"cannot reach {peer}: {exc}") from exc
            delay = backoff.next_delay()
            log.info("connect to %s failed (%s); retrying in %.1f s", peer, exc, delay)
            await sleep(delay)
            continue
        failures = 0
        backoff.reset()
        try:
            await session(conn)
        except ErrorReceived as exc:
            log.warning("%s refused this %s: %s", peer, who, exc)
            if exc.code in FATAL_CODES:
                raise FedcoreError(f"{peer} refused this {who}: {exc}") from exc
        except ConnectionClosed as exc:
            bye = exc.peer_message
            if isinstance(bye, Bye) and bye.reason == FEDERATION_COMPLETE:
                log.info("%s says the federation is complete", peer)
                return True
            if not stopping():
                log.info("connection closed: %s", exc)
        except (ProtocolError, OSError, ConnectionError) as exc:
            log.info("connection lost: %s", exc)
        except FedcoreError as exc:
            with contextlib.suppress(Exception):
                await conn.close(reason=f"{who} stops: {exc}"[:1000])
            raise
        finally:
            with contextlib.suppress(Exception):
                await conn.close()
        on_reconnect()
        await sleep(backoff.next_delay())
    return False
