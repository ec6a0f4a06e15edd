"""Why a server refused a connection, and the one place that counts and logs it.

A refusal is a connection the server drops before it is anybody's client: a failed TLS
handshake, a connection cap, or a protocol error before the peer's first message; and a
peer that sends heartbeats faster than allowed, at any time. Each reason is one
``Refusal`` member carrying its metric label (and, for protocol errors, its wire code).
``RefusalLog`` counts them by label, calls an optional callback (the runtime's metric)
and logs them at WARNING, at most one line per reason per ``REFUSAL_LOG_INTERVAL``
seconds, saying how many were left out: a flood of refusals costs no flood of log lines.
This module does no I/O and knows nothing of sessions or TLS contexts.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from typing import Final

from .errors import ErrorCode

__all__ = ["REFUSAL_LABELS", "REFUSAL_LOG_INTERVAL", "Refusal", "RefusalLog"]

logger = logging.getLogger(__name__)

REFUSAL_LOG_INTERVAL: Final = 10.0


class Refusal(enum.Enum):
    """Why the server refused a connection: metric label, and the wire code it stands for."""

    TLS_CERTIFICATE_VERIFY_FAILED = ("tls_certificate_verify_failed", None)
    TLS_NO_CERTIFICATE = ("tls_no_certificate", None)
    TLS_HANDSHAKE_TIMEOUT = ("tls_handshake_timeout", None)
    TLS_HANDSHAKE_OTHER = ("tls_handshake_other", None)
    TOO_MANY_HANDSHAKES = ("too_many_handshakes", None)
    TOO_MANY_CONNECTIONS = ("too_many_connections", ErrorCode.TOO_MANY_CONNECTIONS)
    PER_PEER_CAP = ("per_peer_cap", None)
    FIRST_MESSAGE_TIMEOUT = ("first_message_timeout", ErrorCode.TIMEOUT)
    FRAME_TOO_LARGE = ("frame_too_large", ErrorCode.FRAME_TOO_LARGE)
    MALFORMED_FRAME = ("malformed_frame", ErrorCode.MALFORMED_FRAME)
    UNSUPPORTED_VERSION = ("unsupported_version", ErrorCode.UNSUPPORTED_VERSION)
    UNKNOWN_MESSAGE = ("unknown_message", ErrorCode.UNKNOWN_MESSAGE)
    INVALID_MESSAGE = ("invalid_message", ErrorCode.INVALID_MESSAGE)
    PROTOCOL_VIOLATION = ("protocol_violation", ErrorCode.PROTOCOL_VIOLATION)
    RATE_LIMITED = ("rate_limited", ErrorCode.RATE_LIMITED)

    def __init__(self, label: str, code: ErrorCode | None) -> None:
        self.label = label
        self.code = code

    @classmethod
    def for_code(cls, code: ErrorCode) -> Refusal:
        """The refusal a protocol error before the first message stands for."""
        for refusal in cls:
            if refusal.code is code:
                return refusal
        return cls.PROTOCOL_VIOLATION


REFUSAL_LABELS: Final = tuple(refusal.label for refusal in Refusal)
"""Every refusal label, for metrics that show zeros rather than gaps."""


class RefusalLog:
    """Counts refusals by label, reports each to ``on_refusal`` and logs them rate-limited."""

    def __init__(
        self,
        on_refusal: Callable[[str], None] | None = None,
        *,
        interval: float = REFUSAL_LOG_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.counts: dict[str, int] = {}
        """Refusals so far, by label."""
        self._on_refusal = on_refusal
        self._interval = interval
        self._clock = clock
        self._last_logged: dict[Refusal, float] = {}
        self._suppressed: dict[Refusal, int] = {}

    def refuse(self, refusal: Refusal, peer: str, detail: str) -> None:
        """Count one refusal of ``peer`` (an address or identity) and maybe log it."""
        self.counts[refusal.label] = self.counts.get(refusal.label, 0) + 1
        if self._on_refusal is not None:
            try:
                self._on_refusal(refusal.label)
            except Exception:  # a broken metric must not break the server
                logger.exception("on_refusal callback failed")
        now = self._clock()
        last = self._last_logged.get(refusal)
        if last is not None and now - last < self._interval:
            self._suppressed[refusal] = self._suppressed.get(refusal, 0) + 1
            return
        self._last_logged[refusal] = now
        left_out = self._suppressed.pop(refusal, 0)
        more = f" (and {left_out} more since the last such line)" if left_out else ""
        logger.warning("refused %s: %s: %s%s", peer, refusal.label, detail, more)
