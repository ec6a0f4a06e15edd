"""The reconnect loop of everything that dials an aggregator: a client, and a relay upstream.

Connect, serve one session, and after a failure ask `fedcore.client.failures` whether
a retry can help:

- transient (the network, a busy or restarting aggregator): reconnect with jittered
  exponential backoff, logging at WARNING why (the first failure of an outage, then at
  most one line per `TRANSIENT_LOG_INTERVAL` saying how many were left out). The
  backoff starts again only once a connection got the aggregator's first message: a
  connection it drops before its Welcome counts as a failed attempt;
- permanent (a certificate one side refuses, a refusal that will not change): log one
  ERROR line saying what to check and raise `PermanentFailure`, or, with
  ``permanent_failure_retry`` set, try again after that many seconds.

It stops when the aggregator says the federation is complete (a Bye carrying
`FEDERATION_COMPLETE`), when the session raises a `FedcoreError` of its own (always
final: one ERROR line, the connection closed with the reason), or when more than
``reconnect_attempts`` attempts in a row fail. What a session does is the caller's;
sockets are `protocol.transport`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Final

from cryptography import x509

from fedcore.client.config import FEDERATION_COMPLETE
from fedcore.client.failures import FailureClassifier, PermanentFailure
from fedcore.errors import FedcoreError
from protocol.errors import ConnectionClosed, ProtocolError
from protocol.messages import Bye
from protocol.transport import Backoff, Connection

__all__ = ["TRANSIENT_LOG_INTERVAL", "serve_reconnecting"]

log = logging.getLogger(__name__)

#: Seconds between WARNING lines about transient failures (the rest go to DEBUG).
TRANSIENT_LOG_INTERVAL: Final = 60.0

_CONNECTION_ERRORS = (TimeoutError, OSError, ProtocolError)


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
    permanent_failure_retry: float | None = None,
    certificate: x509.Certificate | None = None,
    ca_certificates: Sequence[x509.Certificate] = (),
    clock: Callable[[], float] = time.monotonic,
) -> bool:
    """Serve sessions until done: True once the federation is complete, False if stopping.

    ``peer`` names the other end in messages ("the aggregator at host:port"), ``who``
    this end ("client", "relay"). Raises `PermanentFailure` on a permanent failure
    (unless ``permanent_failure_retry`` seconds are given: then it waits that long and
    tries again), `FedcoreError` when more than ``reconnect_attempts`` attempts in a row
    fail, and the session's own `FedcoreError` (the connection is closed with its reason
    first). ``certificate`` and ``ca_certificates`` (this side's certificate and CA) let
    it say why the aggregator refuses the certificate.
    """
    classifier = FailureClassifier(
        peer=peer, who=who, certificate=certificate, ca_certificates=ca_certificates
    )
    outage = _OutageLog(peer, clock=clock)
    failed_attempts = 0
    while not stopping():
        conn: Connection | None = None
        joined = False
        try:
            conn = await dial()
            await session(conn)
            error: BaseException | None = None
        except ConnectionClosed as exc:
            bye = exc.peer_message
            if isinstance(bye, Bye) and bye.reason == FEDERATION_COMPLETE:
                log.info("%s says the federation is complete", peer)
                return True
            error = exc
        except FedcoreError as exc:
            log.error("%s stops: %s", who, exc)
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close(reason=f"{who} stops: {exc}"[:1000])
            raise
        except _CONNECTION_ERRORS as exc:
            error = exc
        finally:
            if conn is not None:
                joined = conn.first_message_received
                with contextlib.suppress(Exception):
                    await conn.close()
        if stopping():
            break
        if joined:
            failed_attempts = 0
            backoff.reset()
            outage.recovered()
        if error is None:  # the session ended on its own: connect again
            delay = backoff.next_delay()
        else:
            failure = classifier.classify(error, joined=joined)
            if failure.permanent:
                if permanent_failure_retry is None:
                    log.error("%s; not retrying", failure.reason)
                    raise PermanentFailure(failure.reason) from error
                delay = permanent_failure_retry
                log.error("%s; retrying in %g s (permanent_failure_retry)", failure.reason, delay)
            else:
                if not joined:
                    failed_attempts += 1
                    if reconnect_attempts is not None and failed_attempts > reconnect_attempts:
                        what = (
                            f"cannot reach {peer}: {error}"
                            if conn is None
                            else f"giving up on {peer} after {failed_attempts} failed attempts: "
                            f"{failure.reason}"
                        )
                        log.error("%s; not retrying", what)
                        raise FedcoreError(what) from error
                delay = backoff.next_delay()
                outage.failed(failure.reason, delay)
        if conn is not None:
            on_reconnect()
        await sleep(delay)
    return False


class _OutageLog:
    """Logs transient failures at WARNING, at most one line per `TRANSIENT_LOG_INTERVAL`.

    The first failure after a quiet interval is logged at once; later ones go to DEBUG
    and are counted in the next WARNING line, so a long outage costs a line a minute.
    """

    def __init__(
        self,
        peer: str,
        *,
        interval: float = TRANSIENT_LOG_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._peer = peer
        self._interval = interval
        self._clock = clock
        self._last_logged: float | None = None
        self._left_out = 0
        self._failures = 0

    def failed(self, reason: str, delay: float) -> None:
        """One transient failure; ``delay``: seconds until the next attempt."""
        self._failures += 1
        now = self._clock()
        if self._last_logged is not None and now - self._last_logged < self._interval:
            self._left_out += 1
            log.debug("%s; retrying in %.1f s", reason, delay)
            return
        more = (
            f" ({self._left_out} more failures since the last such line)" if self._left_out else ""
        )
        self._last_logged, self._left_out = now, 0
        log.warning("%s; retrying in %.1f s%s", reason, delay, more)

    def recovered(self) -> None:
        """A connection got the peer's first message again."""
        if self._failures > 1:
            log.info("connected to %s again after %d failed attempts", self._peer, self._failures)
        self._failures = 0
