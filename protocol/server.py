"""The TLS server: accepts connections and runs a handler for each, within limits.

The server accepts plain TCP and runs each TLS handshake itself (``loop.start_tls``),
so it sees every failure; asyncio's ``start_server(ssl=...)`` would swallow them. It
enforces, besides each ``Connection``'s own limits and the session's (a peer that has
not said Hello may send no frame over ``HELLO_MAX_FRAME_SIZE``):

- the TLS handshake within ``handshake_timeout``, and at most ``max_connections``
  handshakes in progress;
- ``max_connections`` connections, and ``max_connections_per_peer`` per certificate
  identity (a relay's certificate, issued for server auth too and shared by the relay's
  replicas, is exempt);
- graceful shutdown: stop accepting, say Bye, let handlers finish, cancel the rest.

Every refusal (a failed handshake, a cap, a protocol error before the first message, a
heartbeat flood) is counted by reason in ``Server.refusals``, reported to
``on_refusal`` and logged at WARNING, rate-limited (`protocol.refusals`). It never
interprets messages and knows nothing of Paillier, rounds or the runtime's policies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import Final, cast

from .connection import SHUTDOWN_REASON, STREAM_LIMIT, Connection, TransportConfig
from .errors import ErrorCode, ProtocolError
from .messages import Error
from .refusals import Refusal, RefusalLog
from .session import Role, Session

__all__ = ["LISTEN_BACKLOG", "Handler", "Server"]

logger = logging.getLogger(__name__)

LISTEN_BACKLOG: Final = 1024

Handler = Callable[[Connection], Awaitable[None]]


# A ClientHello is a few hundred bytes; more than this before the handshake is not TLS.
_MAX_EARLY_BYTES: Final = 64 * 1024


class _Accepted(asyncio.Protocol):
    """A fresh TCP connection, until the server's TLS handshake takes it over."""

    def __init__(self, server: Server) -> None:
        self._server = server
        self._transport: asyncio.Transport | None = None
        self.early = bytearray()
        """What the peer sent before the handshake took over (handed to it, see
        ``Server._tls_handshake``)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports are not asyncio.Transport subclasses, but behave as one)
        self._transport = cast(asyncio.Transport, transport)
        self._server._accepted(self._transport, self)

    def data_received(self, data: bytes) -> None:
        # uvloop starts reading once connection_made returns, so the ClientHello may come
        # before the handshake task has run: keep it, and read no more until then
        if self._transport is None:
            return
        self.early += data
        if len(self.early) > _MAX_EARLY_BYTES:
            self._transport.abort()
        else:
            self._transport.pause_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None


def _hand_over(transport: asyncio.Transport, early: bytes) -> None:
    """Give the TLS protocol that ``start_tls`` installed the bytes that came before it.

    Scheduled just before ``start_tls`` is awaited: callbacks run in the order they were
    scheduled, so this runs after start_tls set its protocol (synchronously, before it
    first yields) and before that protocol's ``connection_made`` starts the handshake.
    """
    protocol = transport.get_protocol()
    if isinstance(protocol, _Accepted) or transport.is_closing():
        transport.abort()  # not where we expected: fail the handshake rather than stall it
        return
    view = memoryview(early)
    if not hasattr(protocol, "buffer_updated"):
        cast(asyncio.Protocol, protocol).data_received(early)
        return
    buffered = cast(asyncio.BufferedProtocol, protocol)
    while view:
        buffer = memoryview(buffered.get_buffer(len(view)))
        size = min(len(buffer), len(view))
        buffer[:size] = view[:size]
        buffered.buffer_updated(size)
        view = view[size:]


class Server:
    """Accepts TLS connections and runs ``handler(connection)`` for each, with limits.

    ``on_refusal(reason)`` is called with the label of every refusal (see `Refusal`),
    e.g. to count it in a metric; ``refusals`` holds the counts by label.
    """

    def __init__(
        self,
        handler: Handler,
        ssl_context: ssl.SSLContext,
        config: TransportConfig | None = None,
        *,
        on_refusal: Callable[[str], None] | None = None,
    ) -> None:
        self._handler = handler
        self._ssl_context = ssl_context
        self.config = config or TransportConfig()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._handshaking: set[asyncio.Transport] = set()
        self.connections: set[Connection] = set()
        """Connections whose handler is running."""
        self._per_peer: dict[str, int] = {}
        self.rejected_connections = 0
        """Connections refused by a connection cap (``max_connections``, per peer)."""
        self._refusal_log = RefusalLog(on_refusal)
        self._shutting_down = False
        self._stopped = asyncio.Event()

    @property
    def refusals(self) -> dict[str, int]:
        """Refused connections so far, by `Refusal` label."""
        return self._refusal_log.counts

    @property
    def port(self) -> int:
        """The TCP port actually bound (useful with port=0)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("server is not started")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Bind and start accepting connections."""
        loop = asyncio.get_running_loop()
        # plain TCP: the server runs each TLS handshake itself, to see and count failures
        self._server = await loop.create_server(
            lambda: _Accepted(self), host, port, backlog=LISTEN_BACKLOG
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

    def _accepted(self, transport: asyncio.Transport, accepted: _Accepted) -> None:
        if self._shutting_down:
            transport.abort()
            return
        if len(self._handshaking) >= self.config.max_connections:
            transport.abort()
            self._refuse(
                Refusal.TOO_MANY_HANDSHAKES,
                _address(transport.get_extra_info("peername")),
                f"{len(self._handshaking)} TLS handshakes in progress, "
                f"limit max_connections={self.config.max_connections}",
            )
            return
        self._handshaking.add(transport)
        task = asyncio.get_running_loop().create_task(self._serve(transport, accepted))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, transport: asyncio.Transport, accepted: _Accepted) -> None:
        try:
            try:
                streams = await self._tls_handshake(transport, accepted)
            finally:
                self._handshaking.discard(transport)
            if streams is not None:
                await self._run(*streams)
        except Exception:  # nobody awaits this task: say what went wrong here
            logger.exception(
                "connection from %s failed", _address(transport.get_extra_info("peername"))
            )
            transport.abort()

    async def _tls_handshake(
        self, transport: asyncio.Transport, accepted: _Accepted
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """The TLS streams of an accepted connection, or None (refused and counted)."""
        loop = asyncio.get_running_loop()
        peer = _address(transport.get_extra_info("peername"))
        reader = asyncio.StreamReader(limit=STREAM_LIMIT)
        protocol = asyncio.StreamReaderProtocol(reader)
        timeout = self.config.handshake_timeout
        try:
            if transport.is_closing():
                raise ConnectionResetError("closed before the TLS handshake")
            if accepted.early:
                loop.call_soon(_hand_over, transport, bytes(accepted.early))
                accepted.early.clear()
            async with asyncio.timeout(timeout):
                # ours fires first: its own timeout would look like any other failure
                tls = await loop.start_tls(
                    transport,
                    protocol,
                    self._ssl_context,
                    server_side=True,
                    ssl_handshake_timeout=2 * timeout,
                )
            if tls is None:
                raise ConnectionResetError("closed during the TLS handshake")
        except TimeoutError:
            refusal, detail = Refusal.TLS_HANDSHAKE_TIMEOUT, f"no TLS handshake within {timeout} s"
        except ssl.SSLCertVerificationError as exc:
            refusal = Refusal.TLS_CERTIFICATE_VERIFY_FAILED
            detail = f"client certificate refused: {exc.verify_message or exc.reason}"
        except ssl.SSLError as exc:
            refusal = (
                Refusal.TLS_NO_CERTIFICATE
                if exc.reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE"
                else Refusal.TLS_HANDSHAKE_OTHER
            )
            detail = f"TLS handshake failed: {exc.reason or exc}"
        except (OSError, EOFError) as exc:
            refusal, detail = Refusal.TLS_HANDSHAKE_OTHER, f"TLS handshake failed: {exc!r}"
        else:
            protocol.connection_made(tls)
            return reader, asyncio.StreamWriter(tls, protocol, reader, loop)
        transport.abort()
        if not self._shutting_down:
            self._refuse(refusal, peer, detail)
        return None

    async def _run(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = Session(Role.AGGREGATOR, max_frame_size=self.config.max_frame_size)
        conn = Connection(reader, writer, session, self.config, on_failure=self._connection_failed)
        if self._shutting_down:
            await conn.close(error=Error(code=ErrorCode.SHUTTING_DOWN, reason="shutting down"))
            return
        refusal = self._over_a_cap(conn)
        if refusal is not None:
            self.rejected_connections += 1
            await conn.close(error=Error(code=ErrorCode.TOO_MANY_CONNECTIONS, reason=refusal))
            return
        identity = conn.peer_identity
        self.connections.add(conn)
        self._per_peer[identity] = self._per_peer.get(identity, 0) + 1
        conn.start_heartbeats()
        crash: Error | None = None
        try:
            await self._handler(conn)
        except ProtocolError as exc:
            logger.debug("%r: handler ended: %s", conn, exc)
        except asyncio.CancelledError:
            # shutdown() cancelled us: end quietly
            if not self._shutting_down:
                raise
        except Exception:
            logger.exception("%r: handler failed", conn)
            crash = Error(code=ErrorCode.INTERNAL, reason="internal error")
        finally:
            self.connections.discard(conn)
            left = self._per_peer.pop(identity, 1) - 1
            if left > 0:
                self._per_peer[identity] = left
            await conn.close(error=crash)

    def _over_a_cap(self, conn: Connection) -> str | None:
        """Why ``conn`` is refused by a connection cap (counted), or None."""
        cfg = self.config
        peer = f"{conn.peer_identity!r} at {conn.peer_address}"
        if len(self.connections) >= cfg.max_connections:
            reason = f"server is at max_connections={cfg.max_connections}"
            self._refuse(Refusal.TOO_MANY_CONNECTIONS, peer, reason)
            return reason
        cap = cfg.max_connections_per_peer
        held = self._per_peer.get(conn.peer_identity, 0)
        if cap and held >= cap and not conn.peer_serves:
            reason = (
                f"certificate {conn.peer_identity!r} already has {held} connections, "
                f"max_connections_per_peer={cap}"
            )
            self._refuse(Refusal.PER_PEER_CAP, peer, reason)
            return reason
        return None

    def _connection_failed(self, conn: Connection, error: ProtocolError) -> None:
        """Count a protocol error before the first message, and any rate limit."""
        if error.code is ErrorCode.RATE_LIMITED:
            refusal = Refusal.RATE_LIMITED
        elif not conn.first_message_received:
            refusal = Refusal.for_code(error.code)
        else:
            return  # a joined peer's violation is the handler's to count
        self._refuse(refusal, f"{conn.peer_identity!r} at {conn.peer_address}", str(error))

    def _refuse(self, refusal: Refusal, peer: str, detail: str) -> None:
        self._refusal_log.refuse(refusal, peer, detail)

    async def shutdown(self, timeout: float | None = None) -> None:
        """Stop accepting, say Bye(SHUTTING_DOWN), let handlers finish, cancel the rest."""
        timeout = self.config.shutdown_timeout if timeout is None else timeout
        self._shutting_down = True
        if self._server is not None:
            self._server.close()
        for transport in list(self._handshaking):  # not anybody's connection yet
            transport.abort()
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


def _address(peername: object) -> str:
    """``host:port`` of a socket's peer name (``?`` when unknown)."""
    if isinstance(peername, tuple) and len(peername) >= 2:
        return f"{peername[0]}:{peername[1]}"
    return "?"
