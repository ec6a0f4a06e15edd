"""asyncio TLS transport for the protocol: connections, a server, a reconnecting client.

A thin I/O shell around ``Session``: it reads bytes into the session, writes the
bytes the session produces, and adds what only I/O can know about: timeouts
(handshake, first message, idle, write), heartbeats, backpressure (``drain`` after
every write, a write high-water mark), a connection cap, graceful shutdown and
reconnect backoff. It never interprets message contents beyond the session's rules
and knows nothing of Paillier, rounds or the runtime's policies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Final, NoReturn

from .errors import (
    ConnectionClosed,
    ErrorCode,
    ErrorReceived,
    LocalProtocolError,
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
    "ALLOCATOR_MMAP_THRESHOLD",
    "ALLOCATOR_TRIM_THRESHOLD",
    "CLIENT_WRITE_SLICE",
    "LISTEN_BACKLOG",
    "MIN_RECEIVE_RATE",
    "READ_SIZE",
    "SERVER_RECEIVE_BUFFER",
    "SERVER_WRITE_SLICE",
    "SHUTDOWN_REASON",
    "STREAM_LIMIT",
    "Backoff",
    "Connection",
    "Handler",
    "Server",
    "TransportConfig",
    "connect",
    "connect_with_retry",
    "install_uvloop",
    "tune_allocator",
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
LISTEN_BACKLOG: Final = 1024
SHUTDOWN_REASON: Final = "SHUTTING_DOWN"

Handler = Callable[["Connection"], Awaitable[None]]


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


@dataclass(frozen=True, kw_only=True, slots=True)
class TransportConfig:
    """Timeouts (seconds) and limits of the transport; validated when built."""

    handshake_timeout: float = 30.0  # 1,000 simultaneous handshakes take ~1.5 s
    first_message_timeout: float = 30.0
    idle_timeout: float = 60.0  # nothing received (not even a heartbeat) for this long
    write_timeout: float = 30.0  # the peer does not read what we send
    close_timeout: float = 5.0  # waiting for the TLS close to complete
    heartbeat_interval: float = 15.0  # 0 disables heartbeats
    max_connections: int = 2048
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
        if type(self.max_connections) is not int or self.max_connections < 1:
            raise ValueError(f"max_connections must be an int >= 1, got {self.max_connections!r}")
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


_IO_ERRORS = (ConnectionError, ssl.SSLError, OSError, EOFError)


class Connection:
    """One protocol connection over asyncio streams; drives a ``Session``."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        session: Session,
        config: TransportConfig,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self.session = session
        self.config = config
        self.bytes_sent = 0
        self.bytes_received = 0
        self._closed = False
        self._first_message = True
        self._frame_deadline: float | None = None
        self._last_send = time.monotonic()
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._loop = asyncio.get_running_loop()
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
        while True:
            if self._closed:
                raise ConnectionClosed("connection closed")
            try:
                event = self.session.next_event()
            except RemoteProtocolError as exc:
                await self._fail(exc)
            if isinstance(event, Sentinel):
                if event is CLOSED:
                    self._abort()
                    raise ConnectionClosed("peer closed the connection without Bye")
                await self._read_more()
                continue
            self._frame_deadline = None
            if isinstance(event, Heartbeat):
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

    async def _read_more(self) -> None:
        timeout = (
            self.config.first_message_timeout if self._first_message else self.config.idle_timeout
        )
        buffered = self.session.buffered
        if buffered:
            now = self._loop.time()
            if self._frame_deadline is None:
                frame_size = buffered + self.session.bytes_needed
                self._frame_deadline = now + timeout + frame_size / MIN_RECEIVE_RATE
            timeout = max(0.0, min(timeout, self._frame_deadline - now))
        try:
            async with asyncio.timeout(timeout):
                data = await self._reader.read(READ_SIZE)
        except TimeoutError:
            what = "partial frame" if buffered else "nothing"
            await self._fail(ProtocolTimeout(f"received {what} for {timeout:.3g} s"))
        except _IO_ERRORS as exc:
            self._abort()
            raise ConnectionClosed(f"connection lost while receiving: {exc!r}") from None
        self.bytes_received += len(data)
        try:
            self.session.receive_data(data)
        except RemoteProtocolError as exc:
            await self._fail(exc)

    async def _fail(self, exc: ProtocolError) -> NoReturn:
        """Answer a protocol violation with an Error frame, close, and raise it."""
        logger.info("%r: protocol error %s: %s", self, exc.code.name, exc)
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


class Server:
    """Accepts TLS connections and runs ``handler(connection)`` for each, with limits."""

    def __init__(
        self,
        handler: Handler,
        ssl_context: ssl.SSLContext,
        config: TransportConfig | None = None,
    ) -> None:
        self._handler = handler
        self._ssl_context = ssl_context
        self.config = config or TransportConfig()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.connections: set[Connection] = set()
        """Connections whose handler is running."""
        self.rejected_connections = 0
        self._shutting_down = False
        self._stopped = asyncio.Event()

    @property
    def port(self) -> int:
        """The TCP port actually bound (useful with port=0)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("server is not started")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Bind and start accepting connections."""
        self._server = await asyncio.start_server(
            self._on_connect,
            host,
            port,
            ssl=self._ssl_context,
            ssl_handshake_timeout=self.config.handshake_timeout,
            limit=STREAM_LIMIT,
            backlog=LISTEN_BACKLOG,
        )
        if self.config.receive_buffer is not None:
            for sock in self._server.sockets:  # accepted sockets inherit it (Linux, BSD)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.config.receive_buffer)
        logger.info("listening on %s:%d", host, self.port)

    async def serve_forever(self) -> None:
        """Wait until ``shutdown()`` completes (start() first)."""
        if self._server is None:
            raise RuntimeError("call start() before serve_forever()")
        await self._stopped.wait()

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        session = Session(Role.AGGREGATOR, max_frame_size=self.config.max_frame_size)
        conn = Connection(reader, writer, session, self.config)
        if self._shutting_down:
            await conn.close(error=Error(code=ErrorCode.SHUTTING_DOWN, reason="shutting down"))
            return
        if len(self.connections) >= self.config.max_connections:
            self.rejected_connections += 1
            await conn.close(
                error=Error(
                    code=ErrorCode.TOO_MANY_CONNECTIONS,
                    reason=f"server is at max_connections={self.config.max_connections}",
                )
            )
            return
        self.connections.add(conn)
        conn.start_heartbeats()
        crash: Error | None = None
        try:
            await self._handler(conn)
        except ProtocolError as exc:
            logger.debug("%r: handler ended: %s", conn, exc)
        except asyncio.CancelledError:
            # shutdown() cancelled us: end quietly (Python 3.11's start_server callback
            # would log a cancelled connection task as an error)
            if not self._shutting_down:
                raise
        except Exception:
            logger.exception("%r: handler failed", conn)
            crash = Error(code=ErrorCode.INTERNAL, reason="internal error")
        finally:
            self.connections.discard(conn)
            await conn.close(error=crash)

    async def shutdown(self, timeout: float | None = None) -> None:
        """Stop accepting, say Bye(SHUTTING_DOWN), let handlers finish, cancel the rest."""
        timeout = self.config.shutdown_timeout if timeout is None else timeout
        self._shutting_down = True
        if self._server is not None:
            self._server.close()
        await asyncio.gather(*(c.say_bye(SHUTDOWN_REASON) for c in list(self.connections)))
        pending = {t for t in self._tasks if not t.done()}
        if pending:
            _, pending = await asyncio.wait(pending, timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=self.config.close_timeout)
        for conn in list(self.connections):
            conn._abort()
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.close_timeout):
                    await self._server.wait_closed()
        self._stopped.set()
        logger.info("server stopped")


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
