"""Sans-IO framing: bytes in -> messages out, messages -> bytes; every size limit.

A frame is an 8-byte header followed by a msgpack body::

    magic b"FC" | version (1 byte) | message type (1 byte) | body length (4 bytes, big endian)

``FrameDecoder`` does no I/O: feed it with ``receive_data(bytes)`` (``b""`` means EOF)
and pull messages with ``next_event()``, which returns a message, ``NEED_DATA``, or
``CLOSED`` (EOF at a frame boundary). The header's length is checked before any byte
of the body is buffered, and whatever the input, the decoder raises nothing but the
``ProtocolError`` family. This module knows nothing of states, sockets or TLS.
"""

from __future__ import annotations

import struct
import threading
from typing import Final, NoReturn

import msgpack

from .errors import (
    ErrorCode,
    FrameTooLarge,
    InvalidMessage,
    LocalProtocolError,
    MalformedFrame,
    ProtocolError,
    UnknownMessageType,
    UnsupportedVersion,
)
from .messages import MESSAGE_TYPES, PROTOCOL_VERSION, Message, message_from_wire

__all__ = [
    "ABSOLUTE_MAX_FRAME_SIZE",
    "CLIENT_MAX_FRAME_SIZE",
    "CLOSED",
    "DEFAULT_MAX_FRAME_SIZE",
    "HEADER_SIZE",
    "MAGIC",
    "MAX_BUFFERED_BYTES",
    "MAX_RETAINED_ENCODE_BUFFER",
    "NEED_DATA",
    "FrameDecoder",
    "Sentinel",
    "encode_frame",
]

MAGIC: Final = b"FC"
_HEADER = struct.Struct(">2sBBI")
HEADER_SIZE: Final = _HEADER.size  # 8

# Body size limits. The aggregator only ever receives chunks and small messages;
# a client receives RoundStart, whose weights may be large.
DEFAULT_MAX_FRAME_SIZE: Final = 8 * 1024 * 1024
CLIENT_MAX_FRAME_SIZE: Final = 256 * 1024 * 1024
ABSOLUTE_MAX_FRAME_SIZE: Final = 2**32 - 1  # what the 4-byte length field can say
# How much undecoded input a decoder may hold: one maximal frame plus read slack.
BUFFER_SLACK: Final = 1024 * 1024
MAX_BUFFERED_BYTES: Final = DEFAULT_MAX_FRAME_SIZE + HEADER_SIZE + BUFFER_SLACK
# Per-body msgpack limits: no message has long strings, arrays, big maps or exts.
MAX_STR_BYTES: Final = 64 * 1024
MAX_CONTAINER_LEN: Final = 1024
# A thread keeps its encode buffer between frames unless a frame grew it past this;
# above it the buffer is dropped after use, so one 2 MiB model does not stay pinned.
MAX_RETAINED_ENCODE_BUFFER: Final = 256 * 1024
# Consumed bytes at the front of the buffer are dropped once they pass this.
_COMPACT_AT: Final = 256 * 1024


class Sentinel:
    """A named marker returned by ``next_event`` (``NEED_DATA``, ``CLOSED``)."""

    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


NEED_DATA: Final = Sentinel("NEED_DATA")
CLOSED: Final = Sentinel("CLOSED")


# One msgpack Packer per thread, shared by every connection served from that thread.
_packers = threading.local()


def encode_frame(msg: Message, *, max_frame_size: int = ABSOLUTE_MAX_FRAME_SIZE) -> bytes:
    """Serialize one message as header + msgpack body.

    Raises ``LocalProtocolError`` (code FRAME_TOO_LARGE) if the body exceeds
    ``max_frame_size``. A fresh msgpack Packer allocates a 1 MiB buffer; per 128 KiB
    frame that costs more than the packing itself, so each thread keeps one Packer and
    reuses it unless a frame grew it past ``MAX_RETAINED_ENCODE_BUFFER``. One per thread,
    not per connection: once heap pages have been touched, 1 MiB per connection is 1 GB
    of resident memory for an aggregator holding 1,000 clients. Encoding is synchronous,
    so two connections of one thread never use the buffer at the same time.
    """
    packer = getattr(_packers, "packer", None) or msgpack.Packer(use_bin_type=True, autoreset=False)
    _packers.packer = None  # not reused if packing raises half-way
    packer.pack(msg.to_wire())
    # join the header with a view of the packer's buffer: a single copy of the body
    with packer.getbuffer() as body:
        size = body.nbytes
        if size > min(max_frame_size, ABSOLUTE_MAX_FRAME_SIZE):
            raise LocalProtocolError(
                f"{type(msg).__name__} body is {size} bytes, limit {max_frame_size}",
                code=ErrorCode.FRAME_TOO_LARGE,
            )
        frame = b"".join((_HEADER.pack(MAGIC, PROTOCOL_VERSION, msg.type_id, size), body))
    if size <= MAX_RETAINED_ENCODE_BUFFER:
        packer.reset()
        _packers.packer = packer
    return frame


class FrameDecoder:
    """Incremental frame decoder (sans-IO); one per connection direction."""

    def __init__(
        self,
        *,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        max_buffer_size: int | None = None,
    ) -> None:
        if type(max_frame_size) is not int or not 0 < max_frame_size <= ABSOLUTE_MAX_FRAME_SIZE:
            raise ValueError(
                f"max_frame_size must be an int in [1, {ABSOLUTE_MAX_FRAME_SIZE}], "
                f"got {max_frame_size!r}"
            )
        if max_buffer_size is None:
            max_buffer_size = max(MAX_BUFFERED_BYTES, max_frame_size + HEADER_SIZE + BUFFER_SLACK)
        if type(max_buffer_size) is not int or max_buffer_size < max_frame_size + HEADER_SIZE:
            raise ValueError(
                f"max_buffer_size must be an int >= max_frame_size + {HEADER_SIZE}, "
                f"got {max_buffer_size!r}"
            )
        self.max_frame_size = max_frame_size
        self.max_buffer_size = max_buffer_size
        # Unconsumed input is _src[_pos:]. _src is either our own bytearray or, when
        # input arrived on an empty buffer, the caller's immutable bytes (no copy).
        self._buf = bytearray()
        self._src: bytes | bytearray = self._buf
        self._pos = 0
        self._header: tuple[int, int] | None = None  # (type id, body length)
        self._eof = False
        self._error: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet consumed."""
        return len(self._src) - self._pos

    @property
    def bytes_needed(self) -> int:
        """Bytes still missing to complete the frame in progress (0: one is complete)."""
        available = len(self._src) - self._pos
        if self._header is None:
            return max(0, HEADER_SIZE - available)
        return max(0, self._header[1] - available)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Add received bytes; ``b""`` signals EOF."""
        if self._eof:
            raise LocalProtocolError("receive_data() called after EOF")
        if not data:
            self._eof = True
            return
        pending = len(self._src) - self._pos
        if pending + len(data) > self.max_buffer_size:
            self._fail(
                FrameTooLarge(f"{pending + len(data)} bytes buffered, limit {self.max_buffer_size}")
            )
        if pending == 0 and type(data) is bytes:
            self._buf.clear()
            self._src, self._pos = data, 0
            return
        if self._src is not self._buf:
            # leftover of a caller's bytes: copy it before appending
            self._buf[:] = memoryview(self._src)[self._pos :]
            self._src, self._pos = self._buf, 0
        elif self._pos and (self._pos >= _COMPACT_AT or pending == 0):
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def next_event(self) -> Message | Sentinel:
        """The next complete message, ``NEED_DATA``, or ``CLOSED`` after a clean EOF."""
        if self._error is not None:
            raise self._error
        src, pos = self._src, self._pos
        available = len(src) - pos
        if self._header is None:
            if available < HEADER_SIZE:
                # reject a wrong magic early rather than wait for a full header
                seen = bytes(src[pos : pos + min(available, len(MAGIC))])
                if not MAGIC.startswith(seen):
                    self._fail(MalformedFrame(f"bad frame magic {seen!r}"))
                if self._eof:
                    if available == 0:
                        return CLOSED
                    self._fail(MalformedFrame(f"EOF inside a frame header ({available} bytes)"))
                return NEED_DATA
            magic, version, type_id, length = _HEADER.unpack_from(src, pos)
            if magic != MAGIC:
                self._fail(MalformedFrame(f"bad frame magic {magic!r}"))
            if version != PROTOCOL_VERSION:
                self._fail(
                    UnsupportedVersion(f"frame version {version}, we speak {PROTOCOL_VERSION}")
                )
            if type_id not in MESSAGE_TYPES:
                self._fail(UnknownMessageType(f"unknown message type {type_id}"))
            if length > self.max_frame_size:
                self._fail(
                    FrameTooLarge(f"frame body of {length} bytes, limit {self.max_frame_size}")
                )
            self._header = (type_id, length)
            pos += HEADER_SIZE
            self._pos = pos
            available -= HEADER_SIZE
        type_id, length = self._header
        if available < length:
            if self._eof:
                self._fail(MalformedFrame(f"EOF inside a frame body ({available}/{length} bytes)"))
            return NEED_DATA
        self._header = None
        self._pos = pos + length
        if self._pos == len(src):
            # All consumed: keep neither the caller's (possibly large) read nor a grown
            # buffer alive while the connection idles (1,000 idle clients x 400 kB).
            if src is self._buf:
                self._buf = bytearray()
            self._src, self._pos = self._buf, 0
        with memoryview(src) as view, view[pos : pos + length] as body:
            try:
                wire = msgpack.unpackb(
                    body,
                    raw=False,
                    strict_map_key=True,
                    use_list=True,
                    max_bin_len=length,
                    max_str_len=min(length, MAX_STR_BYTES),
                    max_array_len=min(length, MAX_CONTAINER_LEN),
                    max_map_len=min(length, MAX_CONTAINER_LEN),
                    max_ext_len=0,
                )
            except msgpack.ExtraData:
                self._fail(MalformedFrame("trailing bytes after the msgpack body"))
            except Exception as exc:  # msgpack raises many types; all mean "not msgpack"
                self._fail(MalformedFrame(f"body is not valid msgpack: {type(exc).__name__}"))
        try:
            return message_from_wire(type_id, wire)
        except ProtocolError as exc:
            self._fail(exc)
        except Exception as exc:  # defensive: validation must only ever say "invalid"
            self._fail(InvalidMessage(f"invalid message body: {exc!r}"))

    def _fail(self, error: ProtocolError) -> NoReturn:
        self._error = error
        raise error
