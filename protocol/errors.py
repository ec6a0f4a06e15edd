"""Protocol exceptions and the wire error codes.

Every failure the protocol package reports is a ``ProtocolError`` carrying an
``ErrorCode`` that can be sent to the peer in an ``Error`` frame. ``LocalProtocolError``
means we tried to break the rules; ``RemoteProtocolError`` means the peer did.
``ErrorCode`` also holds the runtime's codes (stale round, replay, ...) so that both
sides agree on one numbering; this module knows nothing else about the runtime.
"""

from __future__ import annotations

from enum import IntEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .messages import Bye, Error

__all__ = [
    "ConnectionClosed",
    "ErrorCode",
    "ErrorReceived",
    "FrameTooLarge",
    "IllegalTransition",
    "InvalidMessage",
    "LocalProtocolError",
    "MalformedFrame",
    "ProtocolError",
    "ProtocolTimeout",
    "RemoteProtocolError",
    "TruncatedFrame",
    "UnknownMessageType",
    "UnsupportedVersion",
]


class ErrorCode(IntEnum):
    """Every error code that may travel in an ``Error`` frame (values are wire-stable)."""

    # protocol layer
    PROTOCOL_VIOLATION = 1
    FRAME_TOO_LARGE = 2
    MALFORMED_FRAME = 3
    UNSUPPORTED_VERSION = 4
    UNKNOWN_MESSAGE = 5
    INVALID_MESSAGE = 6
    BAD_SEQUENCE = 7
    TIMEOUT = 8
    TOO_MANY_CONNECTIONS = 9
    SHUTTING_DOWN = 10
    # runtime layer (checked by fedcore, carried by the protocol)
    STALE_ROUND = 20
    REPLAY = 21
    UNKNOWN_CLIENT = 22
    NOT_SELECTED = 23
    WRONG_CHUNK_COUNT = 24
    INVALID_CIPHERTEXT = 25
    DIGEST_MISMATCH = 26
    BAD_DECRYPT_RESULT = 27
    BAD_TOKEN = 28  # a contributor token or committee credential does not verify
    REQUEST_REFUSED = 29  # a committee member refused a decrypt/unmask request
    SUM_NOT_DECODABLE = 30  # the unmasked sum is not a sum of honest contributions
    OVER_CAPACITY = 31  # more contributors than the sum's slot headroom holds
    UPLOAD_STALLED = 32  # a granted upload did not progress at the minimum rate
    RATE_LIMITED = 33  # a peer sent (e.g. heartbeats) faster than allowed
    BAD_KEY_PROOF = 34  # a client claiming the private key could not prove it holds it
    INTERNAL = 99


class ProtocolError(Exception):
    """Root of every protocol error; ``code`` is what to put in the ``Error`` frame."""

    default_code: ErrorCode = ErrorCode.PROTOCOL_VIOLATION

    def __init__(self, message: str, *, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        self.code: ErrorCode = self.default_code if code is None else ErrorCode(code)


class LocalProtocolError(ProtocolError):
    """We tried to do something the protocol forbids (a bug on this side)."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol; answer with an ``Error`` frame and close."""


class FrameTooLarge(RemoteProtocolError):
    """A frame header announced a body longer than this side accepts."""

    default_code = ErrorCode.FRAME_TOO_LARGE


class MalformedFrame(RemoteProtocolError):
    """Bad magic, a truncated frame at EOF, or a body that is not one msgpack map."""

    default_code = ErrorCode.MALFORMED_FRAME


class TruncatedFrame(MalformedFrame):
    """The connection ended inside a frame: a peer killed or cut off mid-message."""


class UnsupportedVersion(RemoteProtocolError):
    """The frame or ``Hello`` carries a protocol version this side does not speak."""

    default_code = ErrorCode.UNSUPPORTED_VERSION


class UnknownMessageType(RemoteProtocolError):
    """The frame's message type byte names no known message."""

    default_code = ErrorCode.UNKNOWN_MESSAGE


class InvalidMessage(RemoteProtocolError):
    """The body decoded but a field is missing, of the wrong type or out of range."""

    default_code = ErrorCode.INVALID_MESSAGE


class IllegalTransition(RemoteProtocolError):
    """The peer sent a message its state does not allow (order, sequence, count)."""

    default_code = ErrorCode.BAD_SEQUENCE


class ProtocolTimeout(RemoteProtocolError):
    """The peer did not send (or read) within the configured timeout."""

    default_code = ErrorCode.TIMEOUT


class ConnectionClosed(ProtocolError):
    """The connection is over: the peer said Bye, hung up, or we closed it.

    ``peer_message`` holds the peer's ``Bye`` or ``Error`` message when there was one.
    """

    def __init__(
        self,
        message: str,
        *,
        code: ErrorCode | None = None,
        peer_message: Bye | Error | None = None,
    ) -> None:
        super().__init__(message, code=code)
        self.peer_message = peer_message


class ErrorReceived(ConnectionClosed):
    """The peer sent an ``Error`` frame; ``code`` is the peer's code."""
