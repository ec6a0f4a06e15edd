"""Transport over real TLS on 127.0.0.1: limits, timeouts, heartbeats, backpressure,
shutdown, concurrency, and a server that survives thousands of malformed frames."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import socket
import ssl
import struct
import time
from collections.abc import Awaitable, Callable

import pytest

from protocol import (
    CLIENT_MAX_FRAME_SIZE,
    CLOSED,
    MAGIC,
    NEED_DATA,
    PROTOCOL_VERSION,
    SERVER_RECEIVE_BUFFER,
    Ack,
    Backoff,
    Bye,
    Connection,
    ConnectionClosed,
    Error,
    ErrorCode,
    ErrorReceived,
    FederationPKI,
    FrameDecoder,
    Heartbeat,
    Hello,
    IllegalTransition,
    Message,
    ProtocolError,
    ProtocolTimeout,
    RoundEnd,
    RoundStart,
    Server,
    TransportConfig,
    UpdateChunk,
    UpdateDone,
    UploadGrant,
    UploadRequest,
    Welcome,
    client_context,
    connect,
    connect_with_retry,
    encode_frame,
    install_uvloop,
    tune_allocator,
)

FAST = TransportConfig(
    handshake_timeout=10.0,
    first_message_timeout=5.0,
    idle_timeout=5.0,
    heartbeat_interval=1.0,
    close_timeout=1.0,
)
HELLO = Hello(version=PROTOCOL_VERSION)
DIGEST = bytes(32)


def round_start(round_id: int, weights: bytes = b"w") -> RoundStart:
    return RoundStart(round_id=round_id, weights=weights, clip=1.0, value_bits=16, deadline_s=60.0)


class AckApp:
    """A minimal aggregator: Welcome, then RoundStart / Ack forever. Records how handlers end."""

    def __init__(self) -> None:
        self.protocol_errors: list[ProtocolError] = []
        self.other_errors: list[BaseException] = []
        self.finished = 0
        self.identities: list[str] = []

    async def __call__(self, conn: Connection) -> None:
        try:
            hello = await conn.receive()
            assert isinstance(hello, Hello)
            self.identities.append(conn.peer_identity)
            await conn.send(
                Welcome(
                    version=PROTOCOL_VERSION,
                    client_id=conn.peer_identity,
                    federation=b"",
                    session_config={},
                )
            )
            round_id = 1
            await conn.send(round_start(round_id))
            async for msg in conn:
                if isinstance(msg, UploadRequest):
                    await conn.send(UploadGrant(round_id=msg.round_id))
                elif isinstance(msg, UpdateDone):
                    await conn.send(Ack(round_id=round_id, accepted=True))
                    round_id += 1
                    await conn.send(round_start(round_id))
            self.finished += 1
        except ProtocolError as exc:
            self.protocol_errors.append(exc)
            raise
        except BaseException as exc:
            self.other_errors.append(exc)
            raise


async def start_server(
    pki_ctx: ssl.SSLContext,
    handler: Callable[[Connection], Awaitable[None]],
    config: TransportConfig = FAST,
) -> Server:
    server = Server(handler, pki_ctx, config)
    await server.start("127.0.0.1", 0)
    return server


def ctx_for(pki: FederationPKI, i: int = 0) -> ssl.SSLContext:
    return client_context(pki.clients[i].cert, pki.clients[i].key, pki.ca.cert)


async def good_client(
    port: int, ctx: ssl.SSLContext, rounds: int, chunks: int, config: TransportConfig = FAST
) -> int:
    """Run ``rounds`` uploads through the AckApp; returns how many were acked."""
    conn = await connect("127.0.0.1", port, ctx, config=config)
    acked = 0
    try:
        await conn.send(HELLO)
        assert isinstance(await conn.receive(), Welcome)
        for _ in range(rounds):
            start = await conn.receive()
            assert isinstance(start, RoundStart)
            await conn.send(UploadRequest(round_id=start.round_id))
            assert isinstance(await conn.receive(), UploadGrant)
            for seq in range(chunks):
                await conn.send(UpdateChunk(round_id=start.round_id, seq=seq, payload=bytes(4096)))
            await conn.send(
                UpdateDone(
                    round_id=start.round_id,
                    chunk_count=chunks,
                    item_count=chunks,
                    digest=DIGEST,
                )
            )
            ack = await conn.receive()
            assert isinstance(ack, Ack) and ack.accepted
            acked += 1
    finally:
        await conn.close()
    return acked


async def raw_tls(
    port: int, ctx: ssl.SSLContext
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="127.0.0.1")


async def read_until_eof(reader: asyncio.StreamReader, timeout: float = 10.0) -> list[Message]:
    """Every non-heartbeat message the server sends until it closes."""
    decoder = FrameDecoder(max_frame_size=CLIENT_MAX_FRAME_SIZE)
    out: list[Message] = []
    async with asyncio.timeout(timeout):
        while True:
            try:
                data = await reader.read(65536)
            except (ConnectionError, ssl.SSLError):
                data = b""
            decoder.receive_data(data)
            while True:
                event = decoder.next_event()
                if event is CLOSED:
                    return out
                if event is NEED_DATA:
                    break
                if not isinstance(event, Heartbeat):
                    out.append(event)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- basics


async def test_uploads_round_trip_and_stats(pki: FederationPKI, server_ctx: ssl.SSLContext) -> None:
    app = AckApp()
    server = await start_server(server_ctx, app)
    try:
        assert await good_client(server.port, ctx_for(pki, 2), rounds=3, chunks=4) == 3
    finally:
        await server.shutdown(2.0)
    assert app.identities == ["client-2"]
    assert app.other_errors == []


@pytest.mark.parametrize("receive_buffer", [SERVER_RECEIVE_BUFFER, 8192, None])
async def test_accepted_connections_get_the_configured_receive_buffer(
    pki: FederationPKI, server_ctx: ssl.SSLContext, receive_buffer: int | None
) -> None:
    sizes: list[int] = []

    async def record(conn: Connection) -> None:
        sock = conn._writer.get_extra_info("socket")
        sizes.append(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))
        await AckApp()(conn)

    config = dataclasses.replace(FAST, receive_buffer=receive_buffer)
    server = await start_server(server_ctx, record, config)
    try:
        assert await good_client(server.port, ctx_for(pki, 2), rounds=1, chunks=40) == 1
    finally:
        await server.shutdown(2.0)
    if receive_buffer is None:  # left to the kernel: what a fresh socket starts with
        with socket.socket() as fresh:
            assert sizes == [fresh.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)]
    else:
        assert sizes == [2 * receive_buffer]  # Linux doubles SO_RCVBUF for bookkeeping


async def test_violation_is_answered_with_error_frame_then_close(
    pki: FederationPKI, server_ctx: ssl.SSLContext
) -> None:
    app = AckApp()
    server = await start_server(server_ctx, app)
    try:
        reader, writer = await raw_tls(server.port, ctx_for(pki))
        writer.write(encode_frame(UpdateChunk(round_id=1, seq=0, payload=b"x")))  # before Hello
        got = await read_until_eof(reader)
        writer.close()
    finally:
        await server.shutdown(2.0)
    assert len(got) == 1 and isinstance(got[0], Error)
    assert got[0].code is ErrorCode.PROTOCOL_VIOLATION
    assert [type(e) for e in app.protocol_errors] == [IllegalTransition]


async def test_oversized_frame_header_is_refused_without_reading_the_body(
    pki: FederationPKI, server_ctx: ssl.SSLContext
) -> None:
    seen: list[Connection] = []

    async def handler(conn: Connection) -> None:
        seen.append(conn)
        await conn.receive()

    server = await start_server(server_ctx, handler)
    try:
        reader, writer = await raw_tls(server.port, ctx_for(pki))
        # claim a 2 GiB body and send none of it: the answer must not wait for it
        writer.write(struct.pack(">2sBBI", MAGIC, PROTOCOL_VERSION, UpdateChunk.type_id, 2**31))
        got = await read_until_eof(reader, timeout=5.0)
        writer.close()
    finally:
        await server.shutdown(2.0)
    assert len(got) == 1 and isinstance(got[0], Error)
    assert got[0].code is ErrorCode.FRAME_TOO_LARGE
    assert seen[0].bytes_received < 64 * 1024


async def test_slowloris_partial_frame_is_dropped_after_idle_timeout(
    pki: FederationPKI, server_ctx: ssl.SSLContext
) -> None:
    config = TransportConfig(
        first_message_timeout=0.5, idle_timeout=0.5, heartbeat_interval=0.1, close_timeout=1.0
    )
    app = AckApp()
    server = await start_server(server_ctx, app, config)
    try:
        reader, writer = await raw_tls(server.port, ctx_for(pki))
        writer.write(encode_frame(HELLO))
        frame = encode_frame(UpdateChunk(round_id=1, seq=0, payload=bytes(1000)))
        writer.write(frame[: len(frame) // 2])  # half a frame, then silence
        started = time.monotonic()
        got = await read_until_eof(reader, timeout=10.0)
        elapsed = time.monotonic() - started
        writer.close()
    finally:
        await server.shutdown(2.0)
    assert isinstance(got[-1], Error) and got[-1].code is ErrorCode.TIMEOUT
    assert 0.4 <= elapsed < 8.0
    assert [type(e) for e in app.protocol_errors] == [ProtocolTimeout]


async def test_heartbeats_keep_an_idle_connection_open_past_idle_timeout(
    pki: FederationPKI, server_ctx: ssl.SSLContext
) -> None:
    # a heartbeat every 0.1 s against a 1 s idle timeout: slack for a loaded machine
    config = TransportConfig(
        idle_timeout=1.0, heartbeat_interval=0.1, max_heartbeat_rate=20.0, close_timeout=1.0
    )
    app = AckApp()
    server = await start_server(server_ctx, app, config)
    try:
        conn = await connect("127.0.0.1", server.port, ctx_for(pki), config=config)
        await conn.send(HELLO)
        assert isinstance(await conn.receive(), Welcome)
        start = await conn.receive()
        assert isinstance(start, RoundStart)
        await asyncio.sleep(2.5)  # "training": the client sends nothing itself
        await conn.send(UploadRequest(round_id=start.round_id))
        assert isinstance(await conn.receive(), UploadGrant)
        await conn.send(
            UpdateDone(round_id=start.round_id, chunk_count=0, item_count=0, digest=DIGEST)
        )
        assert isinstance(await conn.receive(), Ack)
        assert conn.bytes_received > 0 and conn.bytes_sent > 0
        await conn.close()
    finally:
        await server.shutdown(2.0)
    assert app.protocol_errors == []


async def test_silent_client_without_heartbeats_is_dropped_with_timeout(
    pki: FederationPKI, server_ctx: ssl.SSLContext
) -> None:
    server_config = TransportConfig(idle_timeout=0.5, heartbeat_interval=0.1, close_timeout=1.0)
    app = AckApp()
    server = await start_server(server_ctx, app, server_config)
    try:
        mute = TransportConfig(heartbeat_interval=0, max_heartbeat_rate=20.0, close_timeout=1.0)
        conn = await connect("127.0.0.1", server.port, ctx_for(pki), config=mute)
        await conn.send(HELLO)
        assert isinstance(await conn.receive(), Welcome)
        assert isinstance(await conn.receive(), RoundStart)
        with pytest.raises(ErrorReceived) as info:
            await conn.receive()
        assert info.value.code is ErrorCode.TIMEOUT
        assert conn.closed
    finally:
        await server.shutdown(2.0)


async def test_max_connections_refuses_the_extra_one(
    pki: FederationPKI, server_ctx: ssl.SSLContext
) -> None:
    config = TransportConfig(max_connections=2, close_timeout=1.0)
    app = AckApp()
    server = await start_server(server_ctx, app, config)
    try:
        conns = [
            await connect("127.0.0.1", server.port, ctx_for(pki, i), config=config)
            for i in range(2)
        ]
        for conn in conns:
            await conn.send(HELLO)
            assert isinstance(await conn.receive(), Welcome)
        extra = await connect("127.0.0.1", server.port, ctx_for(pki, 2), config=config)
        with pytest.raises(ErrorReceived) as info:
            await extra.receive()
        assert info.value.code is ErrorCode.TOO_MANY_CONNECTIONS
        assert server.rejected_connections == 1
        await conns[0].close()
        for _ in range(500):  # the slot frees once the handler has finished
            if len(server.connections) < 2:
                break
            await asyncio.sleep(0.02)
        again = await connect("127.0.0.1", server.port, ctx_for(pki, 2), config=config)
        await again.send(HELLO)
        assert isinstance(await again.receive(), Welcome)
        await again.close()
        await conns[1].close()
    finally:
        await server.shutdown(2.0)


async def test_send_times_out_when_the_peer_stops_reading(
    pki: FederationPKI, server_ctx: ssl.SSLContext
) -> None:
    config = TransportConfig(write_timeout=0.5, write_high_water=64 * 1024, close_timeout=0.5)
    outcome: list[BaseException] = []
    sent = [0]

    async def flood_round_ends(conn: Connection) -> None:
        await conn.receive()
        await conn.send(
            Welcome(version=PROTOCOL_VERSION, client_id="c", federation=b"", session_config={})
        )
        try:
            for i in range(200_000):  # bounded
                await conn.send(_big_round_end(i))
                sent[0] += 1
        except ProtocolError as exc:
            outcome.append(exc)

    server = await start_server(server_ctx, flood_round_ends, config)
    try:
        _, writer = await raw_tls(server.port, ctx_for(pki))
        writer.write(encode_frame(HELLO))
        for _ in range(200):  # the client never reads; wait for the server to give up
            if outcome:
                break
            await asyncio.sleep(0.05)
        writer.transport.abort()
    finally:
        await server.shutdown(2.0)
    assert outcome and isinstance(outcome[0], ProtocolTimeout), outcome
    assert sent[0] > 0


def _big_round_end(i: int) -> Message:
    return RoundEnd(round_id=i, status="closed", reason="x" * 1000)


async def test_graceful_shutdown_says_bye_and_lets_handlers_finish(
    pki: FederationPKI, server_ctx: ssl.SSLContext
) -> None:
    app = AckApp()
    server = await start_server(server_ctx, app)
    conn = await connect("127.0.0.1", server.port, ctx_for(pki), config=FAST)
    await conn.send(HELLO)
    assert isinstance(await conn.receive(), Welcome)
    assert isinstance(await conn.receive(), RoundStart)
    shutdown = asyncio.create_task(server.shutdown(5.0))
    with pytest.raises(ConnectionClosed) as info:
        await conn.receive()
    assert not isinstance(info.value, ErrorReceived)
    assert isinstance(info.value.peer_message, Bye)
    assert info.value.code is ErrorCode.SHUTTING_DOWN
    await shutdown
    assert app.finished == 1 and app.other_errors == []
    await server.serve_forever()  # returns at once: the server has stopped


async def test_shutdown_cancels_handlers_that_do_not_finish(
    pki: FederationPKI, server_ctx: ssl.SSLContext
) -> None:
    cancelled = asyncio.Event()

    async def stubborn(conn: Connection) -> None:
        await conn.receive()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    server = await start_server(server_ctx, stubborn)
    conn = await connect("127.0.0.1", server.port, ctx_for(pki), config=FAST)
    await conn.send(HELLO)
    await asyncio.sleep(0.1)
    started = time.monotonic()
    await server.shutdown(0.3)
    assert cancelled.is_set()
    assert time.monotonic() - started < 5.0
    await conn.close()


async def test_connect_with_retry_waits_for_a_late_server(
    pki: FederationPKI, server_ctx: ssl.SSLContext
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = AckApp()
    server = Server(app, server_ctx, FAST)

    async def late_start() -> None:
        await asyncio.sleep(0.4)
        await server.start("127.0.0.1", port)

    starter = asyncio.create_task(late_start())
    conn = await connect_with_retry(
        "127.0.0.1", port, ctx_for(pki), config=FAST, attempts=30, base_delay=0.05, max_delay=0.2
    )
    await starter
    await conn.send(HELLO)
    assert isinstance(await conn.receive(), Welcome)
    await conn.close()
    await server.shutdown(2.0)


async def test_connect_with_retry_gives_up(pki: FederationPKI) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(OSError):
        await connect_with_retry(
            "127.0.0.1", port, ctx_for(pki), attempts=3, base_delay=0.01, max_delay=0.02
        )


def test_backoff_is_exponential_with_full_jitter() -> None:
    backoff = Backoff(0.1, 1.0, rng=random.Random(1))
    caps = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    delays = [backoff.next_delay() for _ in caps]
    assert all(0 <= d <= cap for d, cap in zip(delays, caps, strict=True))
    assert len(set(delays)) == len(delays)
    backoff.reset()
    assert backoff.attempt == 0 and backoff.next_delay() <= 0.1
    with pytest.raises(ValueError, match="base_delay"):
        Backoff(0, 1)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"idle_timeout": 0}, "idle_timeout"),
        ({"write_timeout": float("inf")}, "write_timeout"),
        ({"heartbeat_interval": -1}, "heartbeat_interval"),
        ({"heartbeat_interval": 60, "idle_timeout": 30}, "heartbeat_interval"),
        ({"max_connections": 0}, "max_connections"),
        ({"max_frame_size": 0}, "max_frame_size"),
        ({"write_high_water": 10}, "write_high_water"),
        ({"receive_buffer": 100}, "receive_buffer"),
        ({"receive_buffer": 65536.0}, "receive_buffer"),
    ],
)
def test_transport_config_is_validated(kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        TransportConfig(**kwargs)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- scale


@pytest.mark.slow
def test_500_concurrent_connections_under_uvloop(
    pki: FederationPKI, server_ctx: ssl.SSLContext
) -> None:
    uvloop = pytest.importorskip("uvloop")
    count = 500
    config = TransportConfig(
        handshake_timeout=60.0,
        first_message_timeout=60.0,
        idle_timeout=60.0,
        max_connections_per_peer=0,  # every connection presents client-1's certificate
    )

    async def main() -> tuple[int, int]:
        all_in = asyncio.Event()
        peak = [0]

        async def handler(conn: Connection) -> None:
            await conn.receive()
            await conn.send(
                Welcome(
                    version=PROTOCOL_VERSION,
                    client_id=conn.peer_identity,
                    federation=b"",
                    session_config={},
                )
            )
            peak[0] = max(peak[0], len(server.connections))
            if len(server.connections) >= count:
                all_in.set()
            async for _ in conn:
                pass

        server = Server(handler, server_ctx, config)
        await server.start("127.0.0.1", 0)
        ctx = ctx_for(pki, 1)

        async def one() -> bool:
            conn = await connect("127.0.0.1", server.port, ctx, config=config)
            await conn.send(HELLO)
            welcome = await conn.receive()
            await all_in.wait()  # every connection is open at the same time
            await conn.close()
            return isinstance(welcome, Welcome)

        async with asyncio.timeout(180):
            results = await asyncio.gather(*(one() for _ in range(count)))
        await server.shutdown(5.0)
        assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
        return sum(results), peak[0]

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        served, peak = runner.run(main())
    assert served == count and peak == count


def test_install_uvloop_sets_the_policy() -> None:
    pytest.importorskip("uvloop")
    try:
        assert install_uvloop() is True
        loop = asyncio.new_event_loop()
        try:
            assert type(loop).__module__.startswith("uvloop")
        finally:
            loop.close()
    finally:
        asyncio.set_event_loop_policy(None)


# ---------------------------------------------------------------------------- fuzz over TLS

MALFORMED_FRAMES = 2000


def _malformed(rng: random.Random, seeds: list[bytes]) -> bytes:
    base = bytearray(rng.choice(seeds))
    kind = rng.randrange(5)
    if kind == 0:
        return rng.randbytes(rng.randrange(1, 64))
    if kind == 1:
        for _ in range(rng.randint(1, 4)):
            base[rng.randrange(len(base))] = rng.randrange(256)
    elif kind == 2:
        struct.pack_into(">I", base, 4, rng.choice([2**31, 2**32 - 1, rng.randrange(2**24)]))
    elif kind == 3:
        return bytes(base[: rng.randrange(1, len(base))])
    else:
        base += rng.randbytes(rng.randint(1, 16))
    return bytes(base)


@pytest.mark.slow
async def test_server_survives_malformed_frames_and_keeps_serving(
    pki: FederationPKI, server_ctx: ssl.SSLContext
) -> None:
    app = AckApp()
    config = TransportConfig(
        handshake_timeout=30.0,
        first_message_timeout=2.0,
        idle_timeout=2.0,
        heartbeat_interval=0.5,
        max_heartbeat_rate=4.0,
        close_timeout=0.5,
        max_connections_per_peer=0,  # eight attackers share client-1's certificate
    )
    server = await start_server(server_ctx, app, config)
    rng = random.Random(7)
    seeds = [
        encode_frame(HELLO),
        encode_frame(UploadRequest(round_id=1)),
        encode_frame(UpdateChunk(round_id=1, seq=0, payload=b"abcdef")),
        encode_frame(UpdateDone(round_id=1, chunk_count=1, item_count=1, digest=DIGEST)),
        encode_frame(Bye(reason="x")),
    ]
    cases = [(rng.random() < 0.5, _malformed(rng, seeds)) for _ in range(MALFORMED_FRAMES)]
    ctx = ctx_for(pki, 1)

    async def attacker(mine: list[tuple[bool, bytes]]) -> None:
        for after_hello, data in mine:
            _, writer = await raw_tls(server.port, ctx)
            writer.write((encode_frame(HELLO) if after_hello else b"") + data)
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await writer.drain()
            writer.transport.abort()

    try:
        async with asyncio.timeout(240):
            honest = asyncio.create_task(
                good_client(server.port, ctx_for(pki, 0), rounds=40, chunks=3, config=config)
            )
            await asyncio.gather(*(attacker(cases[i::8]) for i in range(8)))
            acked = await honest
        # the server is still up and serving after the storm
        assert (
            await good_client(server.port, ctx_for(pki, 2), rounds=2, chunks=1, config=config) == 2
        )
    finally:
        await server.shutdown(5.0)
    assert acked == 40
    assert app.other_errors == [], app.other_errors[:3]
    assert len(app.protocol_errors) > MALFORMED_FRAMES // 4


async def test_send_after_shutdown_bye_raises_connection_closed(
    pki: FederationPKI, server_ctx: ssl.SSLContext
) -> None:
    said_bye = asyncio.Event()
    outcome: list[BaseException] = []

    async def handler(conn: Connection) -> None:
        await conn.receive()
        await said_bye.wait()
        try:
            await conn.send(Ack(round_id=1, accepted=True))
        except ProtocolError as exc:
            outcome.append(exc)

    server = await start_server(server_ctx, handler)
    conn = await connect("127.0.0.1", server.port, ctx_for(pki), config=FAST)
    await conn.send(HELLO)
    await asyncio.sleep(0.1)
    shutdown = asyncio.create_task(server.shutdown(3.0))
    with pytest.raises(ConnectionClosed):
        await conn.receive()
    said_bye.set()
    await shutdown
    assert len(outcome) == 1 and type(outcome[0]) is ConnectionClosed


def test_tune_allocator_reports_whether_it_applied() -> None:
    import platform

    applied = tune_allocator()
    assert isinstance(applied, bool)
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert applied
