"""Protocol throughput: msgpack codec, our TLS transport, and bare asyncio TLS for scale.

Three figures for 128 KiB ``UpdateChunk`` payloads: ``codec_mb_per_s`` (encode + decode
in memory), ``transport_mb_per_s`` (Server/connect over TLS 1.3 on 127.0.0.1, client and
aggregator in separate processes, from the first chunk to the Ack) and
``raw_tls_mb_per_s`` (the same frame bytes through a bare asyncio TLS stream, same
process layout). ``transport_vs_raw`` is their ratio. Each network figure is the best
of ``--repeats`` alternating runs, since the machine is shared; CPU seconds per GiB
of each side are reported too, being steadier than wall time under load.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import queue
import ssl
import tempfile
import time
from pathlib import Path
from typing import Any

from protocol import (
    PROTOCOL_VERSION,
    Ack,
    Connection,
    FrameDecoder,
    Hello,
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
    encode_frame,
    install_uvloop,
    server_context,
    tune_allocator,
    write_federation_pki,
)

MIB = 1024 * 1024
# Every wait on a child process is bounded.
CHILD_TIMEOUT_S = 120.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Benchmark-specific flags."""
    parser.add_argument("--chunk-kib", type=int, default=128, help="UpdateChunk payload size")
    parser.add_argument(
        "--megabytes", type=int, default=512, help="payload MiB per network run (quick: 128)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="network runs per variant")
    parser.add_argument("--no-uvloop", action="store_true", help="use the default event loop")
    parser.add_argument(
        "--no-malloc-tuning",
        action="store_true",
        help="leave glibc's mmap/trim thresholds alone (see protocol.tune_allocator)",
    )


# ---------------------------------------------------------------------------- codec


def codec_mb_per_s(chunk: int, total: int) -> float:
    """Encode and decode ``total`` bytes of UpdateChunks in memory."""
    payload = os.urandom(chunk)
    count = max(1, total // chunk)
    decoder = FrameDecoder()
    started = time.perf_counter()
    for seq in range(count):
        decoder.receive_data(encode_frame(UpdateChunk(round_id=1, seq=seq, payload=payload)))
        msg = decoder.next_event()
        assert isinstance(msg, UpdateChunk)
    return count * chunk / MIB / (time.perf_counter() - started)


# ---------------------------------------------------------------------------- children


def _pki_paths(pki_dir: str) -> dict[str, Path]:
    d = Path(pki_dir)
    return {
        "ca": d / "ca.pem",
        "agg_cert": d / "aggregator.pem",
        "agg_key": d / "aggregator.key",
        "cli_cert": d / "client-0.pem",
        "cli_key": d / "client-0.key",
    }


def _run(coro: Any, use_uvloop: bool, tune_malloc: bool) -> Any:
    if tune_malloc:
        tune_allocator()
    if use_uvloop:
        install_uvloop()
    return asyncio.run(coro)


async def _transport_server(pki_dir: str, ports: Any, results: Any) -> None:
    p = _pki_paths(pki_dir)
    done = asyncio.Event()

    async def handler(conn: Connection) -> None:
        cpu = time.process_time()
        await conn.receive()
        await conn.send(
            Welcome(version=PROTOCOL_VERSION, client_id="c", federation=b"", session_config={})
        )
        await conn.send(
            RoundStart(round_id=1, weights=b"", clip=1.0, value_bits=16, deadline_s=600.0)
        )
        try:
            async for msg in conn:
                if isinstance(msg, UploadRequest):
                    await conn.send(UploadGrant(round_id=msg.round_id))
                elif isinstance(msg, UpdateDone):
                    await conn.send(Ack(round_id=1, accepted=True))
                    results.put(("server_cpu", time.process_time() - cpu))
        finally:
            done.set()

    server = Server(handler, server_context(p["agg_cert"], p["agg_key"], p["ca"]))
    await server.start("127.0.0.1", 0)
    ports.put(server.port)
    async with asyncio.timeout(CHILD_TIMEOUT_S):
        await done.wait()
    await server.shutdown(5.0)


async def _transport_client(pki_dir: str, port: int, chunk: int, count: int, results: Any) -> None:
    p = _pki_paths(pki_dir)
    payload = os.urandom(chunk)
    ctx = client_context(p["cli_cert"], p["cli_key"], p["ca"])
    async with asyncio.timeout(CHILD_TIMEOUT_S):
        cpu = time.process_time()
        conn = await connect("127.0.0.1", port, ctx, config=TransportConfig())
        await conn.send(Hello(version=PROTOCOL_VERSION))
        await conn.receive()
        await conn.receive()
        await conn.send(UploadRequest(round_id=1))
        await conn.receive()
        started = time.perf_counter()
        for seq in range(count):
            await conn.send(UpdateChunk(round_id=1, seq=seq, payload=payload))
        await conn.send(
            UpdateDone(round_id=1, chunk_count=count, item_count=count, digest=bytes(32))
        )
        ack = await conn.receive()
        elapsed = time.perf_counter() - started
        assert isinstance(ack, Ack)
        await conn.close()
    results.put(("client_cpu", time.process_time() - cpu))
    results.put(("elapsed", elapsed))


async def _raw_server(pki_dir: str, ports: Any, results: Any, expected: int) -> None:
    p = _pki_paths(pki_dir)
    ctx = server_context(p["agg_cert"], p["agg_key"], p["ca"])
    done = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        cpu = time.process_time()
        received = 0
        while received < expected:
            data = await reader.read(256 * 1024)
            if not data:
                break
            received += len(data)
        writer.write(b"k")
        await writer.drain()
        results.put(("server_cpu", time.process_time() - cpu))
        writer.close()
        done.set()

    server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=ctx, limit=256 * 1024)
    ports.put(server.sockets[0].getsockname()[1])
    async with asyncio.timeout(CHILD_TIMEOUT_S):
        await done.wait()
    server.close()


async def _raw_client(pki_dir: str, port: int, chunk: int, count: int, results: Any) -> None:
    p = _pki_paths(pki_dir)
    ctx: ssl.SSLContext = client_context(p["cli_cert"], p["cli_key"], p["ca"])
    frame = encode_frame(UpdateChunk(round_id=1, seq=0, payload=os.urandom(chunk)))
    async with asyncio.timeout(CHILD_TIMEOUT_S):
        cpu = time.process_time()
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname="127.0.0.1"
        )
        started = time.perf_counter()
        for _ in range(count):
            writer.write(frame)
            await writer.drain()
        await reader.readexactly(1)
        elapsed = time.perf_counter() - started
        writer.close()
    results.put(("client_cpu", time.process_time() - cpu))
    results.put(("elapsed", elapsed))


def _server_main(
    kind: str, pki_dir: str, ports: Any, results: Any, expected: int, flags: tuple[bool, bool]
) -> None:
    if kind == "transport":
        _run(_transport_server(pki_dir, ports, results), *flags)
    else:
        _run(_raw_server(pki_dir, ports, results, expected), *flags)


def _client_main(
    kind: str,
    pki_dir: str,
    port: int,
    chunk: int,
    count: int,
    results: Any,
    flags: tuple[bool, bool],
) -> None:
    if kind == "transport":
        _run(_transport_client(pki_dir, port, chunk, count, results), *flags)
    else:
        _run(_raw_client(pki_dir, port, chunk, count, results), *flags)


def network_run(
    kind: str, pki_dir: str, chunk: int, count: int, flags: tuple[bool, bool]
) -> dict[str, float]:
    """One run, server and client in two fresh processes: payload MiB/s and CPU s/GiB."""
    ctx = mp.get_context("spawn")
    ports = ctx.Queue()
    results = ctx.Queue()
    frame_len = len(encode_frame(UpdateChunk(round_id=1, seq=0, payload=bytes(chunk))))
    server = ctx.Process(
        target=_server_main, args=(kind, pki_dir, ports, results, frame_len * count, flags)
    )
    server.start()
    client = None
    got: dict[str, float] = {}
    try:
        port = ports.get(timeout=CHILD_TIMEOUT_S)
        client = ctx.Process(
            target=_client_main, args=(kind, pki_dir, port, chunk, count, results, flags)
        )
        client.start()
        while len(got) < 3:
            key, value = results.get(timeout=CHILD_TIMEOUT_S)
            got[key] = value
    except queue.Empty:
        raise RuntimeError(f"{kind} benchmark child did not report in time") from None
    finally:
        for proc in (client, server):
            if proc is not None:
                proc.join(timeout=10)
                if proc.is_alive():
                    proc.terminate()
                    proc.join(timeout=5)
    gib = count * chunk / (1024 * MIB)
    return {
        "mb_per_s": count * chunk / MIB / got["elapsed"],
        "server_cpu_s_per_gib": got["server_cpu"] / gib,
        "client_cpu_s_per_gib": got["client_cpu"] / gib,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure codec, transport and raw TLS throughput."""
    chunk = args.chunk_kib * 1024
    total = (128 if args.quick else args.megabytes) * MIB
    count = max(1, total // chunk)
    use_uvloop = not args.no_uvloop
    if use_uvloop:
        use_uvloop = install_uvloop()
    tune_malloc = not args.no_malloc_tuning and tune_allocator()
    flags = (use_uvloop, tune_malloc)
    codec = max(codec_mb_per_s(chunk, min(total, 256 * MIB)) for _ in range(3))
    transport: list[dict[str, float]] = []
    raw: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="fedcore-bench-pki-") as pki_dir:
        write_federation_pki(Path(pki_dir), clients=1)
        for _ in range(max(1, args.repeats)):
            raw.append(network_run("raw", pki_dir, chunk, count, flags))
            transport.append(network_run("transport", pki_dir, chunk, count, flags))

    def best(runs: list[dict[str, float]], key: str, pick: Any = max) -> float:
        return float(pick(r[key] for r in runs))

    best_transport, best_raw = best(transport, "mb_per_s"), best(raw, "mb_per_s")
    result: dict[str, Any] = {
        "chunk_kib": args.chunk_kib,
        "payload_mib_per_run": count * chunk / MIB,
        "uvloop": use_uvloop,
        "malloc_tuned": tune_malloc,
        "codec_mb_per_s": codec,
        "transport_mb_per_s": best_transport,
        "raw_tls_mb_per_s": best_raw,
        "transport_vs_raw": best_transport / best_raw,
    }
    # CPU seconds per GiB are steadier than wall time on a shared machine
    for side in ("server", "client"):
        key = f"{side}_cpu_s_per_gib"
        result[f"transport_{key}"] = best(transport, key, min)
        result[f"raw_tls_{key}"] = best(raw, key, min)
    result["transport_runs"] = transport
    result["raw_tls_runs"] = raw
    return result
