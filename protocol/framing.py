"""Sans-IO framing: bytes in -> messages out, messages -> bytes; every size limit.

A frame is an 8-byte header followed by a msgpack body::

    magic b"FC" | version (1 byte) | message type (1 byte) | body length (4 bytes, big endian)

``FrameDecoder`` does no I/O: feed it with ``receive_data(bytes)`` (``b""`` means EOF)
and pull messages with ``next_event()``, which returns a message, ``NEED_DATA``, or
``CLOSED`` (EOF at a frame boundary). Whatever the input, the decoder raises nothing but
the ``ProtocolError`` family, and what it spends on a hostile peer is bounded:

- the header's length is checked against ``max_frame_size`` before any byte of the body
  is buffered, and at most ``max_buffer_size`` of input is kept between calls (a
  caller's read is decoded in place; what is left of it is copied out when it is
  larger);
- before msgpack builds anything, a pure-Python pre-scan walks the body's headers
  (jumping over str/bin payloads) and refuses more than ``MAX_BODY_OBJECTS`` objects,
  nesting deeper than ``MAX_BODY_DEPTH`` and ext types: a 7 MB body of empty arrays
  costs a few kB to refuse, not 450 MB to build;
- a refused frame is released at once: the decoder drops its input and keeps (and
  raises) an error with no traceback or context that could pin the body.

The limits can be changed between frames (``set_limits``); the session uses that to
hold a peer to ``HELLO_MAX_FRAME_SIZE`` until its Hello. This module knows nothing of
states, sockets or TLS.
"""

from __future__ import annotations

import copy
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
    TruncatedFrame,
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
    "HELLO_MAX_BUFFERED_BYTES",
    "HELLO_MAX_FRAME_SIZE",
    "MAGIC",
    "MAX_BODY_DEPTH",
    "MAX_BODY_OBJECTS",
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
# Before its Hello, a peer may send nothing larger than a Hello: a 16 KiB committee
# credential (MAX_STATEMENT_LEN), a 64-byte relay name and three keys fit in 17 KiB.
# Until then it may have at most this much undecoded input (a Hello and what followed
# it in the same read), so a connection that never says Hello holds kilobytes, not MiB.
HELLO_MAX_FRAME_SIZE: Final = 32 * 1024
HELLO_MAX_BUFFERED_BYTES: Final = 2 * HELLO_MAX_FRAME_SIZE
# Per-body msgpack limits: no message has long strings, arrays, big maps or exts.
MAX_STR_BYTES: Final = 64 * 1024
MAX_CONTAINER_LEN: Final = 1024
# Objects (every key, value and container counts one) and container nesting in a body.
# The largest legitimate body is an UpdateDone with 256-entry timings and metrics maps:
# 1 + 2 x 8 + 2 x 2 x 256 = 1,041 objects; RoundStart (256-entry config, 16 committee
# entries) has 546 and Welcome 523. No message nests deeper than 2 (a map in the map).
MAX_BODY_OBJECTS: Final = 4096
MAX_BODY_DEPTH: Final = 4
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
        limit_note: str = "",
    ) -> None:
        self.max_frame_size = DEFAULT_MAX_FRAME_SIZE
        self.max_buffer_size = MAX_BUFFERED_BYTES
        self._limit_note = ""
        self.set_limits(
            max_frame_size=max_frame_size, max_buffer_size=max_buffer_size, limit_note=limit_note
        )
        # Unconsumed input is _src[_pos:]. _src is either our own bytearray or, when
        # input arrived on an empty buffer, the caller's immutable bytes (no copy).
        self._buf = bytearray()
        self._src: bytes | bytearray = self._buf
        self._pos = 0
        self._header: tuple[int, int] | None = None  # (type id, body length)
        self._eof = False
        self._error: ProtocolError | None = None

    def set_limits(
        self, *, max_frame_size: int, max_buffer_size: int | None = None, limit_note: str = ""
    ) -> None:
        """Change the size limits for the frames still to come.

        ``max_buffer_size`` defaults to one maximal frame plus read slack; ``limit_note``
        is appended to the limits' error messages (e.g. ``" before Hello"``).
        """
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
        self._limit_note = limit_note

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
        if pending == 0 and type(data) is bytes:
            # Nothing is copied: the caller's bytes are already in memory. What is left of
            # them undecoded is at most one frame (its header was checked), and next_event
            # copies that out rather than keep a read larger than max_buffer_size alive.
            self._buf.clear()
            self._src, self._pos = data, 0
            return
        if pending + len(data) > self.max_buffer_size:
            error = FrameTooLarge(
                f"{pending + len(data)} bytes buffered, limit {self.max_buffer_size}"
                f"{self._limit_note}"
            )
            del data  # not pinned by the traceback
            self._fail(error)
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
            raise copy.copy(self._error)
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
                    self._fail(TruncatedFrame(f"EOF inside a frame header ({available} bytes)"))
                return self._need_data()
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
                    FrameTooLarge(
                        f"frame body of {length} bytes, limit {self.max_frame_size}"
                        f"{self._limit_note}"
                    )
                )
            self._header = (type_id, length)
            pos += HEADER_SIZE
            self._pos = pos
            available -= HEADER_SIZE
        type_id, length = self._header
        if available < length:
            if self._eof:
                self._fail(TruncatedFrame(f"EOF inside a frame body ({available}/{length} bytes)"))
            return self._need_data()
        self._header = None
        self._pos = pos + length
        if self._pos == len(src):
            # All consumed: keep neither the caller's (possibly large) read nor a grown
            # buffer alive while the connection idles (1,000 idle clients x 400 kB).
            if src is self._buf:
                self._buf = bytearray()
            self._src, self._pos = self._buf, 0
        with memoryview(src) as view, view[pos : pos + length] as body:
            decoded = _decode_body(type_id, body)
        # No frame of the traceback that a refusal raises may still reference the input.
        del src
        if isinstance(decoded, ProtocolError):
            self._fail(decoded)
        return decoded

    def _need_data(self) -> Sentinel:
        """NEED_DATA, keeping no more than ``max_buffer_size`` of a caller's read alive."""
        src = self._src
        if src is not self._buf and len(src) > self.max_buffer_size:
            self._buf = bytearray(memoryview(src)[self._pos :])
            self._src, self._pos = self._buf, 0
        return NEED_DATA

    def _fail(self, error: ProtocolError) -> NoReturn:
        """Fail for good: drop the input and raise ``error`` (a copy on every later call).

        The kept error is never raised itself, so it holds no traceback: the decoder
        is in no reference cycle with the frames that raised it.
        """
        self._error = error
        self._header = None
        self._buf = bytearray()
        self._src, self._pos = self._buf, 0
        raise copy.copy(error)


def _decode_body(type_id: int, body: memoryview) -> Message | ProtocolError:
    """One frame body as a message, or the error refusing it (returned, never raised).

    The error carries no traceback nor context: those would hold the frames that
    reference the body (and what msgpack built from it) for as long as it is kept.
    """
    refusal = _body_shape_refusal(body)
    if refusal is not None:
        return MalformedFrame(refusal)
    length = len(body)
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
        return MalformedFrame("trailing bytes after the msgpack body")
    except Exception as exc:  # msgpack raises many types; all mean "not msgpack"
        return MalformedFrame(f"body is not valid msgpack: {type(exc).__name__}")
    try:
        return message_from_wire(type_id, wire)
    except ProtocolError as exc:
        exc.__traceback__ = exc.__context__ = exc.__cause__ = None
        return exc
    except Exception as exc:  # defensive: validation must only ever say "invalid"
        return InvalidMessage(f"invalid message body: {exc!r}")


# The msgpack formats by first byte, for the pre-scan: (kind, n).
_SKIP = 0  # a scalar followed by n payload bytes (nil, bool, int, float, fixstr)
_SIZED = 1  # str/bin: an n-byte big-endian length, then that many bytes
_ARRAY = 2  # an array of n items (fixarray), or of a count in -n bytes
_MAP = 3  # a map of n pairs (fixmap), or of a count in -n bytes
_REFUSED = 4  # ext types and the never-used 0xc1


def _format_table() -> tuple[tuple[int, int], ...]:
    table: list[tuple[int, int]] = []
    for byte in range(256):
        if byte <= 0x7F or byte >= 0xE0:
            table.append((_SKIP, 0))  # positive and negative fixint
        elif byte <= 0x8F:
            table.append((_MAP, byte & 0x0F))
        elif byte <= 0x9F:
            table.append((_ARRAY, byte & 0x0F))
        elif byte <= 0xBF:
            table.append((_SKIP, byte & 0x1F))  # fixstr
        else:
            table.append(_FIXED_FORMATS.get(byte, (_REFUSED, 0)))
    return tuple(table)


_FIXED_FORMATS: Final = {
    0xC0: (_SKIP, 0),  # nil
    0xC2: (_SKIP, 0),  # false
    0xC3: (_SKIP, 0),  # true
    0xC4: (_SIZED, 1),  # bin 8/16/32
    0xC5: (_SIZED, 2),
    0xC6: (_SIZED, 4),
    0xCA: (_SKIP, 4),  # float 32/64
    0xCB: (_SKIP, 8),
    0xCC: (_SKIP, 1),  # uint 8/16/32/64
    0xCD: (_SKIP, 2),
    0xCE: (_SKIP, 4),
    0xCF: (_SKIP, 8),
    0xD0: (_SKIP, 1),  # int 8/16/32/64
    0xD1: (_SKIP, 2),
    0xD2: (_SKIP, 4),
    0xD3: (_SKIP, 8),
    0xD9: (_SIZED, 1),  # str 8/16/32
    0xDA: (_SIZED, 2),
    0xDB: (_SIZED, 4),
    0xDC: (_ARRAY, -2),  # array 16/32
    0xDD: (_ARRAY, -4),
    0xDE: (_MAP, -2),  # map 16/32
    0xDF: (_MAP, -4),
}
_FORMATS: Final = _format_table()


def _body_shape_refusal(body: memoryview) -> str | None:
    """Why ``body`` is refused before msgpack builds it (too many objects, too deep, an
    ext), or None to let msgpack decode (and judge) it.

    Walks the headers only: a str/bin payload is jumped over in O(1), and the walk stops
    at the first container that would take the count past ``MAX_BODY_OBJECTS``, so it
    costs at most that many steps (an UpdateChunk takes 7). Truncation and trailing
    bytes are left to msgpack, which reports them.
    """
    end = len(body)
    formats = _FORMATS
    pos = 0
    objects = 1  # the top-level object
    pending = [1]  # objects still to read in each open container; [0] is the top level
    while pending:
        if not pending[-1]:
            pending.pop()
            continue
        pending[-1] -= 1
        if pos >= end:
            return None
        byte = body[pos]
        kind, n = formats[byte]
        pos += 1
        if kind == _SKIP:
            pos += n
        elif kind == _SIZED:
            pos += n + int.from_bytes(body[pos : pos + n], "big")
        elif kind == _REFUSED:
            return f"msgpack type byte 0x{byte:02x} (an ext or reserved type) is not allowed"
        else:
            if n < 0:
                count = int.from_bytes(body[pos : pos - n], "big")
                pos -= n
            else:
                count = n
            if kind == _MAP:
                count *= 2
            if len(pending) > MAX_BODY_DEPTH:
                return f"msgpack body nests deeper than {MAX_BODY_DEPTH} containers"
            objects += count
            if objects > MAX_BODY_OBJECTS:
                return f"msgpack body holds more than {MAX_BODY_OBJECTS} objects"
            if count:
                pending.append(count)
    return None
