"""One protocol connection over asyncio streams, and the transport's settings.

``Connection`` is a thin I/O shell around a ``Session``: it reads bytes into the
session, writes the bytes the session produces (in slices, with ``drain`` after each
write and a write high-water mark), and adds what only I/O can know about: timeouts
(first message, idle, partial frame, write), heartbeats, and a limit on the heartbeats
it receives. Against a hostile peer it enforces:

- the first message within ``first_message_timeout`` of the TLS handshake: an absolute
  deadline that heartbeats and partial frames before it do not extend;
- a partly received frame completed within ``idle_timeout`` plus its size at
  ``MIN_RECEIVE_RATE``;
- received heartbeats at most ``heartbeat_burst`` at once and ``max_heartbeat_rate`` a
  second on average, plus what the peer may have sent while the caller was not
  receiving (``RATE_LIMITED`` otherwise).

A violation is answered with an Error frame and the connection closed; the error it
raises carries no traceback into the session's frames (which hold the peer's input).
This module knows nothing of listening sockets, certificates' meaning or the runtime.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Final, NoReturn

from .errors import (
    ConnectionClosed,
    ErrorCode,
    ErrorReceived,
    ProtocolError,
    ProtocolTimeout,
    RemoteProtocolError,
)
from .framing import CLOSED, Sentinel
from .messages import MAX_REASON_LEN, Bye, Error, Heartbeat, Message
from .session import Role, Session, State
from .tls import peer_identity as _peer_identity
from .tls import peer_serves as _peer_serves

__all__ = [
    "CLIENT_WRITE_SLICE",
    "DEFAULT_MAX_CONNECTIONS_PER_PEER",
    "HEARTBEAT_BURST",
    "MAX_HEARTBEAT_RATE",
    "MIN_RECEIVE_RATE",
    "READ_SIZE",
    "SERVER_RECEIVE_BUFFER",
    "SERVER_WRITE_SLICE",
    "SHUTDOWN_REASON",
    "STREAM_LIMIT",
    "Connection",
    "TransportConfig",
]

logger = logging.getLogger(__name__)

# Bytes asked of the stream per read. Frames wholly inside a read are parsed in place;
# only a frame split across reads is copied. Larger reads measured worse: glibc then
# serves each read's buffer with fresh mmap()ed pages unless tune_allocator() ran.
READ_SIZE: Final = 256 * 1024
# The StreamReader stops reading the socket above twice this (per-connection memory).
STREAM_LIMIT: Final = 256 * 1024
# A partly received frame must keep arriving at least this fast (bytes/s) on top of
# idle_timeout, so a trickling peer cannot hold a connection forever.
MIN_RECEIVE_RATE: Final = 64 * 1024
SHUTDOWN_REASON: Final = "SHUTTING_DOWN"
# A client reconnecting after a network failure may briefly overlap its old connection.
DEFAULT_MAX_CONNECTIONS_PER_PEER: Final = 2
# A peer sends a Heartbeat only after heartbeat_interval (15 s) of sending nothing; a few
# may bunch up after a stall. Faster than this is a flood (issue #17: 188,000 a second).
HEARTBEAT_BURST: Final = 10
MAX_HEARTBEAT_RATE: Final = 1.0  # per second, on average after the burst


# OpenSSL's memory BIOs keep, for the life of a connection, a buffer as large as the
# largest single write into them. The aggregator, with a connection per client, writes
# to TLS in slices of one record (a 2 MB RoundStart in 256 KiB slices pinned ~340 kB
# per connection); a client has one connection and favours throughput.
SERVER_WRITE_SLICE: Final = 16 * 1024
CLIENT_WRITE_SLICE: Final = 256 * 1024
# The same holds for the incoming BIO, which gets each socket read whole; capping an
# accepted socket's kernel receive buffer keeps those reads small. SO_RCVBUF value
# (Linux doubles it); None leaves the kernel's autotuning. See TransportConfig.
SERVER_RECEIVE_BUFFER: Final = 128 * 1024


@dataclass(frozen=True, kw_only=True, slots=True)
class TransportConfig:
    """Timeouts (seconds) and limits of the transport; validated when built."""

    handshake_timeout: float = 30.0  # 1,000 simultaneous handshakes take ~1.5 s
    # From the end of the TLS handshake to the first message (Hello on a server): an
    # absolute deadline that heartbeats or partial frames sent before it do not extend.
    first_message_timeout: float = 30.0
    idle_timeout: float = 60.0  # nothing received (not even a heartbeat) for this long
    write_timeout: float = 30.0  # the peer does not read what we send
    close_timeout: float = 5.0  # waiting for the TLS close to complete
    heartbeat_interval: float = 15.0  # 0 disables heartbeats
    # Received heartbeats: a token bucket of heartbeat_burst, refilled at
    # max_heartbeat_rate a second (0 = no limit); faster is refused RATE_LIMITED.
    max_heartbeat_rate: float = MAX_HEARTBEAT_RATE
    heartbeat_burst: int = HEARTBEAT_BURST
    max_connections: int = 2048
    # Server only: connections at once per certificate identity (0 = no cap). Relay
    # certificates (issued for server auth too) are exempt: a relay's replicas share one.
    max_connections_per_peer: int = DEFAULT_MAX_CONNECTIONS_PER_PEER
    max_frame_size: int | None = None  # None: the role's default (see framing)
    write_high_water: int = 1024 * 1024  # bytes buffered before send() waits for drain
    shutdown_timeout: float = 10.0
    # Server only: SO_RCVBUF of each accepted connection (the kernel doubles it). Smaller
    # keeps less memory per connection after an upload but costs CPU per byte received;
    # None = the kernel's autotuning.
    receive_buffer: int | None = SERVER_RECEIVE_BUFFER
    # Bytes per write into TLS; None = the role's default (SERVER_/CLIENT_WRITE_SLICE).
    write_slice: int | None = None

    def __post_init__(self) -> None:
        for name in (
            "handshake_timeout",
            "first_message_timeout",
            "idle_timeout",
            "write_timeout",
            "close_timeout",
            "shutdown_timeout",
        ):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        hb = self.heartbeat_interval
        if not isinstance(hb, int | float) or not math.isfinite(hb) or hb < 0:
            raise ValueError(f"heartbeat_interval must be >= 0 (0 disables), got {hb!r}")
        if hb and hb >= self.idle_timeout:
            raise ValueError(
                f"heartbeat_interval ({hb}) must be below idle_timeout ({self.idle_timeout})"
            )
        rate = self.max_heartbeat_rate
        if not isinstance(rate, int | float) or not math.isfinite(rate) or rate < 0:
            raise ValueError(f"max_heartbeat_rate must be >= 0 (0: no limit), got {rate!r}")
        if type(self.heartbeat_burst) is not int or self.heartbeat_burst < 1:
            raise ValueError(f"heartbeat_burst must be an int >= 1, got {self.heartbeat_burst!r}")
        if type(self.max_connections) is not int or self.max_connections < 1:
            raise ValueError(f"max_connections must be an int >= 1, got {self.max_connections!r}")
        per_peer = self.max_connections_per_peer
        if type(per_peer) is not int or per_peer < 0:
            raise ValueError(
                f"max_connections_per_peer must be an int >= 0 (0: no cap), got {per_peer!r}"
            )
        if self.max_frame_size is not None and (
            type(self.max_frame_size) is not int or self.max_frame_size < 1
        ):
            raise ValueError(
                f"max_frame_size must be None or an int >= 1, got {self.max_frame_size!r}"
            )
        if type(self.write_high_water) is not int or self.write_high_water < 1024:
            raise ValueError(
                f"write_high_water must be an int >= 1024, got {self.write_high_water!r}"
            )
        if self.write_slice is not None and (
            type(self.write_slice) is not int or self.write_slice < 1024
        ):
            raise ValueError(
                f"write_slice must be None or an int >= 1024, got {self.write_slice!r}"
            )
        if self.receive_buffer is not None and (
            type(self.receive_buffer) is not int or self.receive_buffer < 4096
        ):
            raise ValueError(
                f"receive_buffer must be None or an int >= 4096, got {self.receive_buffer!r}"
            )


def _detached(error: ProtocolError) -> ProtocolError:
    """``error`` without the traceback it got in the session: the frames that raised it
    hold the peer's input (a read, a refused body), and the session keeps the error."""
    error.__traceback__ = None
    return error


_IO_ERRORS = (ConnectionError, ssl.SSLError, OSError, EOFError)


class Connection:
    """One protocol connection over asyncio streams; drives a ``Session``.

    ``on_failure(connection, error)`` is called when the connection answers a protocol
    violation of the peer's (or a timeout, a rate limit) with an Error frame.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        session: Session,
        config: TransportConfig,
        *,
        on_failure: Callable[[Connection, ProtocolError], None] | None = None,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self.session = session
        self.config = config
        self.bytes_sent = 0
        self.bytes_received = 0
        self.failure: ProtocolError | None = None
        """The peer's violation this connection was failed for, if any."""
        self._on_failure = on_failure
        self._closed = False
        self._first_message = True
        self._loop = asyncio.get_running_loop()
        self._first_message_deadline = self._loop.time() + config.first_message_timeout
        self._frame_deadline: float | None = None
        self._heartbeat_tokens = float(config.heartbeat_burst)
        self._heartbeat_cap = float(config.heartbeat_burst)
        self._heartbeat_refilled = self._receive_returned = self._loop.time()
        self._last_send = time.monotonic()
        self._heartbeat_task: asyncio.Task[None] | None = None
        writer.transport.set_write_buffer_limits(high=config.write_high_water)
        self._write_slice = config.write_slice or (
            SERVER_WRITE_SLICE if session.role is Role.AGGREGATOR else CLIENT_WRITE_SLICE
        )
        try:
            self.peer_identity: str = _peer_identity(writer.get_extra_info("ssl_object"))
        except ValueError:
            self.peer_identity = ""
        peer = writer.get_extra_info("peername")
        self.peer_address: str = f"{peer[0]}:{peer[1]}" if peer else "?"

    @property
    def peer_serves(self) -> bool:
        """Whether the peer's certificate is also issued for server auth (a relay's is)."""
        return _peer_serves(self._writer.get_extra_info("ssl_object"))

    def __repr__(self) -> str:
        return (
            f"<Connection {self.session.role.value} peer={self.peer_identity!r} "
            f"{self.peer_address} state={self.session.state.name}>"
        )

    @property
    def closed(self) -> bool:
        """True once the connection was closed by either side."""
        return self._closed

    @property
    def state(self) -> State:
        """The session's protocol state."""
        return self.session.state

    @property
    def first_message_received(self) -> bool:
        """Whether the peer's first message (other than heartbeats) has arrived."""
        return not self._first_message

    # ------------------------------------------------------------------ sending

    async def send(self, msg: Message) -> None:
        """Send one message; waits for drain (backpressure) up to ``write_timeout``."""
        if self._closed or self.session.state is State.CLOSED:
            # after a Bye either way (e.g. server shutdown) the connection is over
            raise ConnectionClosed(f"cannot send {type(msg).__name__}: connection closed")
        data = self.session.send(msg)
        if data:
            await self._write(data)

    async def _write(self, data: bytes) -> None:
        try:
            # OpenSSL keeps a buffer as large as the largest single write for the life of
            # the connection; slicing keeps a 2 MiB RoundStart from pinning 2.4 MiB each
            # (see SERVER_WRITE_SLICE).
            view, step = memoryview(data), self._write_slice
            for start in range(0, len(view), step):
                self._writer.write(view[start : start + step])
            self.bytes_sent += len(data)
            self._last_send = time.monotonic()
            async with asyncio.timeout(self.config.write_timeout):
                await self._writer.drain()
        except TimeoutError:
            self._abort()
            raise ProtocolTimeout(
                f"peer read nothing for {self.config.write_timeout} s (write timeout)"
            ) from None
        except _IO_ERRORS as exc:
            self._abort()
            raise ConnectionClosed(f"connection lost while sending: {exc!r}") from None

    # ------------------------------------------------------------------ receiving

    async def receive(self) -> Message:
        """The next message from the peer (heartbeats are handled here, never returned).

        Raises ``ConnectionClosed`` on Bye or EOF, ``ErrorReceived`` on a peer Error,
        ``ProtocolTimeout`` after the idle (or first-message) timeout, and any
        ``RemoteProtocolError`` after answering it with an Error frame and closing.
        """
        # Heartbeats that arrived while the caller was not receiving are read now, in a
        # batch: the bucket may hold what the peer could send at the rate meanwhile.
        away = self._loop.time() - self._receive_returned
        self._heartbeat_cap = self.config.heartbeat_burst + away * self.config.max_heartbeat_rate
        try:
            return await self._receive()
        finally:
            self._receive_returned = self._loop.time()

    async def _receive(self) -> Message:
        while True:
            if self._closed:
                raise ConnectionClosed("connection closed")
            try:
                event = self.session.next_event()
            except RemoteProtocolError as exc:
                await self._fail(_detached(exc))
            if isinstance(event, Sentinel):
                if event is CLOSED:
                    self._abort()
                    raise ConnectionClosed("peer closed the connection without Bye")
                await self._read_more()
                continue
            self._frame_deadline = None
            if isinstance(event, Heartbeat):
                if not self._take_heartbeat_token():
                    cfg = self.config
                    await self._fail(
                        RemoteProtocolError(
                            f"heartbeats faster than {cfg.max_heartbeat_rate:g} a second "
                            f"(after a burst of {cfg.heartbeat_burst})",
                            code=ErrorCode.RATE_LIMITED,
                        )
                    )
                continue
            if isinstance(event, Bye):
                await self.close()
                code = ErrorCode.SHUTTING_DOWN if event.reason == SHUTDOWN_REASON else None
                raise ConnectionClosed(
                    f"peer said Bye: {event.reason}", code=code, peer_message=event
                )
            if isinstance(event, Error):
                await self.close()
                raise ErrorReceived(
                    f"peer sent Error {ErrorCode(event.code).name}: {event.reason}",
                    code=ErrorCode(event.code),
                    peer_message=event,
                )
            self._first_message = False
            return event

    def _take_heartbeat_token(self) -> bool:
        """Token bucket for received heartbeats; False when the peer sends too many."""
        rate = self.config.max_heartbeat_rate
        if not rate:
            return True
        now = self._loop.time()
        self._heartbeat_tokens = min(
            self._heartbeat_cap, self._heartbeat_tokens + (now - self._heartbeat_refilled) * rate
        )
        self._heartbeat_refilled = now
        if self._heartbeat_tokens < 1.0:
            return False
        self._heartbeat_tokens -= 1.0
        return True

    async def _read_more(self) -> None:
        cfg = self.config
        now = self._loop.time()
        # before the first message, nothing the peer sends moves its deadline
        deadline = self._first_message_deadline if self._first_message else now + cfg.idle_timeout
        buffered = self.session.buffered
        if buffered:
            if self._frame_deadline is None:
                frame_size = buffered + self.session.bytes_needed
                self._frame_deadline = now + cfg.idle_timeout + frame_size / MIN_RECEIVE_RATE
            deadline = min(deadline, self._frame_deadline)
        timeout = max(0.0, deadline - now)
        try:
            async with asyncio.timeout(timeout):
                data = await self._reader.read(READ_SIZE)
        except TimeoutError:
            if self._first_message and deadline == self._first_message_deadline:
                reason = (
                    f"no first message within {cfg.first_message_timeout:.3g} s "
                    "of the TLS handshake"
                )
            elif buffered:
                frame_size = buffered + self.session.bytes_needed
                reason = (
                    f"partial frame of {frame_size} bytes not completed within "
                    f"{cfg.idle_timeout:.3g} s + {MIN_RECEIVE_RATE} bytes/s"
                )
            else:
                reason = f"received nothing for {cfg.idle_timeout:.3g} s"
            await self._fail(ProtocolTimeout(reason))
        except _IO_ERRORS as exc:
            self._abort()
            raise ConnectionClosed(f"connection lost while receiving: {exc!r}") from None
        self.bytes_received += len(data)
        try:
            self.session.receive_data(data)
        except RemoteProtocolError as exc:
            error = _detached(exc)
        else:
            return
        del data  # not pinned by the error's traceback
        await self._fail(error)

    async def _fail(self, exc: ProtocolError) -> NoReturn:
        """Answer a protocol violation with an Error frame, close, and raise it."""
        # A server counts and logs (rate-limited) what it refuses before the first message.
        before_first = self._first_message and self._on_failure is not None
        logger.log(
            logging.DEBUG if before_first else logging.INFO,
            "%r: protocol error %s: %s",
            self,
            exc.code.name,
            exc,
        )
        if self.failure is None:
            self.failure = exc
            if self._on_failure is not None:
                self._on_failure(self, exc)
        await self.close(error=Error(code=exc.code, reason=str(exc)[:MAX_REASON_LEN]))
        raise exc

    def __aiter__(self) -> AsyncIterator[Message]:
        return self

    async def __anext__(self) -> Message:
        try:
            return await self.receive()
        except ErrorReceived:
            raise
        except ConnectionClosed:
            raise StopAsyncIteration from None

    # ------------------------------------------------------------------ closing

    async def say_bye(self, reason: str = "") -> None:
        """Send Bye without closing, so the peer closes first (best effort)."""
        if self._closed or self.session.state in (State.CLOSED, State.ERROR):
            return
        with contextlib.suppress(ProtocolError):
            await self._write(self.session.send(Bye(reason=reason[:MAX_REASON_LEN])))

    async def close(self, reason: str = "", error: Error | None = None) -> None:
        """Send Bye (or ``error``) best effort, then close the TLS stream."""
        if self._closed:
            return
        self._closed = True
        self._stop_heartbeats()
        final: Message = error if error is not None else Bye(reason=reason[:MAX_REASON_LEN])
        try:
            data = self.session.send(final)
            self._writer.write(data)
            self.bytes_sent += len(data)
            async with asyncio.timeout(min(self.config.write_timeout, self.config.close_timeout)):
                await self._writer.drain()
        except (ProtocolError, TimeoutError, *_IO_ERRORS):
            pass  # the peer is gone or stuck; closing is all that is left
        self._writer.close()
        try:
            async with asyncio.timeout(self.config.close_timeout):
                await self._writer.wait_closed()
        except (TimeoutError, *_IO_ERRORS):
            self._writer.transport.abort()

    def _abort(self) -> None:
        """Drop the connection now, without a goodbye."""
        self._closed = True
        self._stop_heartbeats()
        self._writer.transport.abort()

    # ------------------------------------------------------------------ heartbeats

    def start_heartbeats(self) -> None:
        """Send a Heartbeat whenever nothing was sent for ``heartbeat_interval``."""
        if self.config.heartbeat_interval > 0 and self._heartbeat_task is None:
            self._heartbeat_task = asyncio.create_task(self._heartbeat_loop())

    def _stop_heartbeats(self) -> None:
        task, self._heartbeat_task = self._heartbeat_task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    async def _heartbeat_loop(self) -> None:
        interval = self.config.heartbeat_interval
        while not self._closed:
            wait = self._last_send + interval - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            if self.session.state in (State.CLOSED, State.ERROR):
                return
            try:
                await self.send(Heartbeat(sent_at=time.time()))
            except ProtocolError as exc:
                logger.debug("%r: heartbeat failed: %s", self, exc)
                return
