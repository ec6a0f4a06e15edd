"""Scale benchmark: one aggregator daemon, N simultaneous mutual-TLS clients, one round.

Workload (default): ``fedcore aggregator --config <toml>`` runs as a subprocess (uvloop
when installed); a load generator of 2 spawned processes (asyncio + uvloop) opens
N = 1,000 connections at once, each with its own client certificate (the aggregator
identifies a client by its certificate CN, so connections may not share one). Every
connection speaks the protocol as `fedcore.client` does (Hello, Welcome, RoundStart,
UploadRequest, UploadGrant, UpdateChunk..., UpdateDone, Ack) through
``protocol.transport.connect`` and uploads a
valid packed-Paillier update of the seed MLP (784-512-256-10, 535,818 values; 2048-bit
key, 16-bit values, headroom ceil(log2(2N)) bits, 256 ciphertexts per chunk). To fit a
2-core machine the update is encrypted once, up front, for the FedAvg weight the
aggregator assigns (equal sample counts give equal weights), and every connection
resends those same valid ciphertexts (not re-randomized). One connection per load
process holds the private key (Hello.can_decrypt) and answers DecryptRequests as the
real client does. The aggregator does all its real work: TLS, framing, validation,
buffering, folding, quorum, committee decryption, model update, checkpoint.

Measured per run (and for a curve of client counts, default 10, 100 and N):
updates folded and round time (from the checkpoint's phase_seconds: collect + decrypt
+ update, i.e. first RoundStart sent to global model updated), the aggregator's peak
RSS and CPU (os.wait4 rusage of the daemon; psutil samples for the process tree), bytes
received, fold seconds (``fedcore_fold_seconds_sum`` scraped from /metrics), time to
connect all clients, handshake failures, and whether the new global model equals the
seed model plus the uploaded update (to the quantization step). ``--profile PATH``
samples the daemon with py-spy during the headline run and reports its top frames.
``--idle-clients M`` also holds M idle connections open (no round starts) and reports
what that costs and what stops it. ``--quick`` runs 10 and 100 clients only.
Measures; never asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import multiprocessing
import os
import pickle
import random
import re
import resource
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from fedcore.client import decrypt_shard
from fedcore.codec import EncryptedCodec, codec_from_session_config
from fedcore.crypto import PrivateKey, PublicKey
from protocol.errors import ConnectionClosed, ErrorReceived, ProtocolError
from protocol.framing import CLIENT_MAX_FRAME_SIZE
from protocol.messages import (
    PROTOCOL_VERSION,
    Ack,
    DecryptRequest,
    Hello,
    RoundEnd,
    RoundStart,
    UpdateChunk,
    UpdateDone,
    UploadGrant,
    UploadRequest,
    Welcome,
)
from protocol.tls import client_context
from protocol.transport import Connection, TransportConfig, connect, install_uvloop

SAMPLES_PER_CLIENT = 100  # equal for every client, so FedAvg weights are equal
VALUE_BITS = 16
CLIP = 0.5
CHUNK_CIPHERTEXTS = 256
UPDATE_STD = 0.01  # the uploaded update: N(0, 0.01) values, well inside the clip
TARGET_ROUND_S = 60.0
TARGET_PEAK_RSS_MB = 1536.0
_SAMPLE_INTERVAL_S = 0.25
_SCRAPE_INTERVAL_S = 1.0
_LISTEN_RE = re.compile(r"aggregator listening on \S+:(\d+) \(.*metrics port (\w+)\)")
_STAMP_FORMAT = "%Y-%m-%d %H:%M:%S,%f"
# The load generator's side of the transport: waiting for an upload slot (TCP
# backpressure) can last the whole collect phase, so writes may wait that long.
_CLIENT_TRANSPORT = TransportConfig(
    handshake_timeout=120.0,
    first_message_timeout=120.0,
    idle_timeout=900.0,
    write_timeout=900.0,
    heartbeat_interval=15.0,
    max_frame_size=CLIENT_MAX_FRAME_SIZE,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Benchmark-specific flags (the runner adds --quick and --json)."""
    parser.add_argument("--clients", type=int, default=1000, help="clients of the headline run")
    parser.add_argument(
        "--curve",
        default="10,100",
        help="more client counts to run, comma-separated ('' = headline only); quick: <= 100",
    )
    parser.add_argument("--loadgen-procs", type=int, default=2, help="load-generator processes")
    parser.add_argument(
        "--max-inflight", type=int, default=16, help="aggregator max_inflight_uploads (default 16)"
    )
    parser.add_argument(
        "--committee-size", type=int, default=2, help="key holders (one per load process)"
    )
    parser.add_argument(
        "--decrypt-workers", type=int, default=1, help="processes per key holder's decryption"
    )
    parser.add_argument(
        "--fold-workers",
        type=int,
        default=os.cpu_count() or 1,
        help="aggregator fold_workers (default: this machine's cores; passed through when the "
        "aggregator has the setting)",
    )
    parser.add_argument(
        "--model-kwargs", default="{}", help='JSON keyword arguments of fedcore.model:mlp ("{}")'
    )
    parser.add_argument(
        "--timeout", type=float, default=1200.0, help="seconds one run may take before it is killed"
    )
    parser.add_argument(
        "--max-aggregator-gb", type=float, default=12.0, help="kill the daemon above this RSS"
    )
    parser.add_argument("--profile", type=Path, help="py-spy raw stacks of the headline run here")
    parser.add_argument("--idle-clients", type=int, default=0, help="also hold M idle clients")
    parser.add_argument("--idle-hold", type=float, default=30.0, help="seconds to hold them")
    parser.add_argument(
        "--idle-connect-concurrency", type=int, default=250, help="handshakes in flight per process"
    )
    parser.add_argument(
        "--client-sndbuf",
        type=int,
        default=0,
        help="SO_SNDBUF of each load-generator socket, bytes (default 0 = kernel autotuning)",
    )
    parser.add_argument("--workdir", type=Path, help="keep keys, certificates and logs here")
    # Smoke tests only: a tiny key makes the benchmark run in seconds but measures nothing.
    parser.add_argument("--key-bits", type=int, default=2048, help=argparse.SUPPRESS)


def _progress(message: str) -> None:
    print(f"[scale] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- set-up
@dataclass(slots=True, kw_only=True)
class _Setup:
    """Keys, certificates, the model and the pre-encrypted uploads shared by every run."""

    workdir: Path
    key_bits: int
    model_kwargs: dict[str, Any]
    params: int
    headroom_bits: int
    update: np.ndarray
    seed_weights: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)
    uploads: dict[int, Path] = field(default_factory=dict)  # weight -> pickled payloads

    @property
    def pki(self) -> Path:
        """The federation PKI directory (CA, aggregator, client-<i> certificates)."""
        return self.workdir / "pki"

    @property
    def keys(self) -> Path:
        """Where the Paillier keypair is."""
        return self.workdir / "keys"


def _make_setup(workdir: Path, args: argparse.Namespace, certs: int, headroom: int) -> _Setup:
    from fedcore.aggregator import build_model
    from fedcore.crypto import generate_keypair
    from fedcore.model import flatten_state_dict
    from protocol.tls import write_federation_pki

    kwargs = json.loads(args.model_kwargs)
    seed_weights = flatten_state_dict(build_model("fedcore.model:mlp", kwargs, seed=0).state_dict())
    setup = _Setup(
        workdir=workdir,
        key_bits=args.key_bits,
        model_kwargs=kwargs,
        params=int(seed_weights.size),
        headroom_bits=headroom,
        update=np.random.default_rng(7).normal(0, UPDATE_STD, seed_weights.size).astype(np.float32),
        seed_weights=seed_weights,
    )
    t0 = time.perf_counter()
    public_key, private_key = generate_keypair(args.key_bits)
    setup.keys.mkdir(parents=True, exist_ok=True)
    public_key.save(setup.keys / "public_key.json")
    private_key.save(setup.keys / "private_key.json")
    setup.timings["keygen_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    write_federation_pki(setup.pki, clients=certs, sans=["localhost", "127.0.0.1"])
    setup.timings["pki_s"] = time.perf_counter() - t0
    setup.timings["pki_certs"] = certs
    return setup


def _codec(setup: _Setup) -> EncryptedCodec:
    from fedcore.packing import PackingSpec

    public_key = PublicKey.load(setup.keys / "public_key.json")
    spec = PackingSpec(
        key_bits=public_key.bits,
        value_bits=VALUE_BITS,
        headroom_bits=setup.headroom_bits,
        clip=CLIP,
    )
    return EncryptedCodec(
        public_key=public_key, spec=spec, n_values=setup.params, chunk_items=CHUNK_CIPHERTEXTS
    )


def _expected_weight(setup: _Setup, clients: int) -> int:
    """The weight assign_weights gives each of ``clients`` equal clients at this headroom."""
    from fedcore.aggregator.rounds import assign_weights

    counts = {f"client-{i}": SAMPLES_PER_CLIENT for i in range(clients)}
    return assign_weights(counts, _codec(setup).spec.max_total_weight)["client-0"]


def _upload_file(setup: _Setup, weight: int) -> Path:
    """Encrypt the update once for ``weight``; every connection resends these ciphertexts."""
    if weight in setup.uploads:
        return setup.uploads[weight]
    codec = _codec(setup)
    t0 = time.perf_counter()
    plaintexts = codec.encode(setup.update, weight=weight, rng=np.random.default_rng(1))
    ciphertexts = codec.public_key.encrypt_vector(plaintexts)
    payloads = list(codec.chunk_payloads(ciphertexts))
    setup.timings[f"encrypt_weight_{weight}_s"] = time.perf_counter() - t0
    digest = hashlib.sha256()
    for payload in payloads:
        digest.update(payload)
    path = setup.workdir / f"upload-w{weight}.pickle"
    record = {"payloads": payloads, "item_count": len(ciphertexts), "digest": digest.digest()}
    path.write_bytes(pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL))
    setup.uploads[weight] = path
    return path


# ---------------------------------------------------------------------------- load generator
@dataclass(frozen=True, slots=True, kw_only=True)
class LoadSpec:
    """What one load-generator process does (plain values: it is pickled to the process)."""

    indices: tuple[int, ...]
    key_holders: tuple[int, ...]
    port: int
    pki: str
    private_key: str
    upload_file: str | None  # None: idle mode, hold the connection until released
    weight: int
    decrypt_workers: int
    connect_concurrency: int
    connect_attempts: int
    send_buffer: int
    timeout_s: float
    result_file: str


@dataclass(slots=True)
class _LoadStats:
    clients: int = 0
    connected: int = 0
    handshake_failures: int = 0
    connect_failures: int = 0
    failure_kinds: Counter[str] = field(default_factory=Counter)
    connect_started: float = 0.0
    last_welcome: float = 0.0
    first_round_start: float = 0.0
    last_round_start: float = 0.0
    weight_mismatches: int = 0
    uploads_sent: int = 0
    acked: int = 0
    last_ack: float = 0.0
    shards_decrypted: int = 0
    decrypt_s: float = 0.0
    errors: Counter[str] = field(default_factory=Counter)
    byes: Counter[str] = field(default_factory=Counter)
    bytes_sent: int = 0
    bytes_received: int = 0
    timed_out: bool = False
    context_s: float = 0.0
    cpu_s: float = 0.0
    peak_rss_mb: float = 0.0


@dataclass(slots=True)
class _Upload:
    payloads: list[bytes]
    item_count: int
    digest: bytes


class _LoadGenerator:
    """Many simulated clients in one event loop, speaking the protocol like fedcore.Client."""

    def __init__(
        self,
        spec: LoadSpec,
        contexts: dict[int, ssl.SSLContext],
        upload: _Upload | None,
        private_key: PrivateKey | None,
        release: Any,
        connected: Any,
    ) -> None:
        self.spec = spec
        self.contexts = contexts
        self.upload = upload
        self.private_key = private_key
        self.release = release  # multiprocessing Event: idle clients close when it is set
        self.connected_counter = connected  # multiprocessing Value shared with the parent
        self.stats = _LoadStats(clients=len(spec.indices))
        self._released = asyncio.Event()
        self._gate = asyncio.Semaphore(spec.connect_concurrency or len(spec.indices) or 1)

    async def run(self) -> _LoadStats:
        """Run every client until the aggregator says goodbye (bounded by the spec's timeout)."""
        self.stats.connect_started = time.time()
        watcher = asyncio.create_task(self._watch_release())
        tasks = [asyncio.create_task(self._client(i)) for i in self.spec.indices]
        try:
            async with asyncio.timeout(self.spec.timeout_s):
                await asyncio.gather(*tasks)
        except TimeoutError:
            self.stats.timed_out = True
        finally:
            for task in [*tasks, watcher]:
                task.cancel()
            await asyncio.gather(*tasks, watcher, return_exceptions=True)
        return self.stats

    async def _watch_release(self) -> None:
        while not self.release.is_set():
            await asyncio.sleep(0.2)
        self._released.set()

    async def _open(self, index: int) -> tuple[Connection, Welcome] | None:
        """Connect, Hello, Welcome; retried with backoff, every failed attempt counted."""
        for attempt in range(self.spec.connect_attempts):
            conn: Connection | None = None
            try:
                async with self._gate:
                    conn = await connect(
                        "127.0.0.1",
                        self.spec.port,
                        self.contexts[index],
                        server_hostname="localhost",
                        config=_CLIENT_TRANSPORT,
                    )
                    await conn.send(
                        Hello(
                            version=PROTOCOL_VERSION,
                            sample_count=SAMPLES_PER_CLIENT,
                            can_decrypt=index in self.spec.key_holders,
                        )
                    )
                    welcome = await conn.receive()
                if not isinstance(welcome, Welcome):
                    raise ProtocolError(f"expected Welcome, got {type(welcome).__name__}")
                _cap_send_buffer(conn, self.spec.send_buffer)
                return conn, welcome
            except (OSError, ProtocolError) as exc:  # ssl.SSLError is an OSError
                self.stats.handshake_failures += 1
                self.stats.failure_kinds[type(exc).__name__] += 1
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close()
                await asyncio.sleep(random.uniform(0, min(5.0, 0.25 * 2**attempt)))
        self.stats.connect_failures += 1
        return None

    async def _client(self, index: int) -> None:
        opened = await self._open(index)
        if opened is None:
            return
        conn, welcome = opened
        self.stats.connected += 1
        self.stats.last_welcome = time.time()
        with self.connected_counter.get_lock():
            self.connected_counter.value += 1
        try:
            if self.upload is None:
                await self._released.wait()
                await conn.close(reason="bench: idle client released")
            else:
                await self._serve(conn, welcome)
        except ErrorReceived as exc:  # before ConnectionClosed: it is one
            self.stats.errors[exc.code.name] += 1
        except ConnectionClosed as exc:
            bye = exc.peer_message
            self.stats.byes[getattr(bye, "reason", None) or str(exc)[:60]] += 1
        except (ProtocolError, OSError) as exc:
            self.stats.errors[type(exc).__name__] += 1
        finally:
            self.stats.bytes_sent += conn.bytes_sent
            self.stats.bytes_received += conn.bytes_received
            with contextlib.suppress(Exception):
                await conn.close()

    async def _serve(self, conn: Connection, welcome: Welcome) -> None:
        """Answer RoundStart with the upload, DecryptRequest with a shard, until Bye."""
        public_key = PublicKey.from_bytes(welcome.public_key)
        codec = codec_from_session_config(dict(welcome.session_config), public_key)
        assert isinstance(codec, EncryptedCodec) and self.upload is not None
        if codec.item_count != self.upload.item_count:
            raise ProtocolError(
                f"aggregator expects {codec.item_count} ciphertexts; the prepared update "
                f"has {self.upload.item_count} (model or packing differ)"
            )
        lock = asyncio.Lock()
        tasks: set[asyncio.Task[None]] = set()
        try:
            while True:
                message: Any = await conn.receive()
                if isinstance(message, RoundStart):
                    now = time.time()
                    self.stats.first_round_start = self.stats.first_round_start or now
                    self.stats.last_round_start = now
                    round_id, weight = message.round_id, message.config.get("weight")
                    message = None  # drop the 2 MB of global weights now
                    if weight != self.spec.weight:
                        self.stats.weight_mismatches += 1
                        await conn.close(reason="bench: unexpected weight")
                        return
                    async with lock:  # the update is ready at once: ask for a slot
                        await conn.send(UploadRequest(round_id=round_id))
                    continue
                elif isinstance(message, UploadGrant):
                    task = asyncio.create_task(
                        self._send_update(conn, lock, message.round_id, message.start_seq)
                    )
                elif isinstance(message, DecryptRequest):
                    task = asyncio.create_task(self._decrypt(conn, lock, codec, message))
                elif isinstance(message, Ack):
                    self.stats.acked += int(message.accepted)
                    self.stats.last_ack = time.time()
                    continue
                elif isinstance(message, RoundEnd):
                    self.stats.errors[f"round_end:{message.status}"] += 1
                    continue
                else:
                    continue
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        finally:
            for task in list(tasks):
                task.cancel()

    async def _send_update(
        self, conn: Connection, lock: asyncio.Lock, round_id: int, start_seq: int
    ) -> None:
        upload = self.upload
        assert upload is not None
        try:
            for seq in range(start_seq, len(upload.payloads)):
                payload = upload.payloads[seq]
                async with lock:
                    await conn.send(UpdateChunk(round_id=round_id, seq=seq, payload=payload))
            async with lock:
                await conn.send(
                    UpdateDone(
                        round_id=round_id,
                        chunk_count=len(upload.payloads),
                        item_count=upload.item_count,
                        digest=upload.digest,
                        sample_count=SAMPLES_PER_CLIENT,
                    )
                )
            self.stats.uploads_sent += 1
        except (ProtocolError, OSError) as exc:
            self.stats.errors[f"upload:{type(exc).__name__}"] += 1

    async def _decrypt(
        self, conn: Connection, lock: asyncio.Lock, codec: EncryptedCodec, request: DecryptRequest
    ) -> None:
        assert self.private_key is not None
        try:
            result = await decrypt_shard(
                codec, self.private_key, request, workers=self.spec.decrypt_workers
            )
            async with lock:
                await conn.send(result)
        except (ProtocolError, OSError, ValueError) as exc:
            self.stats.errors[f"decrypt:{type(exc).__name__}"] += 1
            return
        self.stats.shards_decrypted += 1
        self.stats.decrypt_s += result.seconds


def _cap_send_buffer(conn: Connection, size: int) -> None:
    """Cap the kernel send queue of a load-generator socket (``--client-sndbuf``).

    Before upload grants, a thousand clients streaming at once each queued up to
    tcp_wmem's max (4 MiB) on this one host and pushed tcp_mem into memory pressure, so
    the load generator capped it. Clients now stream only once granted, so the default
    leaves the kernel's autotuning, as on a real client's own machine; a cap costs the
    load generator CPU (more, smaller writes).
    """
    if size <= 0:
        return
    sock = conn._writer.get_extra_info("socket")  # Connection has no public accessor
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)


def _tcp_counters() -> dict[str, int]:
    """Machine-wide TcpExt counters that show kernel TCP memory pressure."""
    wanted = ("TCPMemoryPressures", "TCPRcvQDrop", "TCPTimeouts", "PruneCalled", "TCPAbortOnMemory")
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return {}
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            return {k: int(table[k]) for k in wanted if k in table}
    return {}


def _tcp_mem_mb() -> float:
    """Memory in every TCP socket buffer of this host now (/proc/net/sockstat), MB."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/net/sockstat").read_text().splitlines():
            if line.startswith("TCP:"):
                fields_ = line.split()
                pages = int(fields_[fields_.index("mem") + 1])
                return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    return 0.0


def _loadgen_process(spec: LoadSpec, barrier: Any, release: Any, connected: Any) -> None:
    """Entry point of a spawned load-generator process; writes its stats as JSON."""
    install_uvloop()
    pki = Path(spec.pki)
    t0 = time.perf_counter()
    contexts = {
        i: client_context(pki / f"client-{i}.pem", pki / f"client-{i}.key", pki / "ca.pem")
        for i in spec.indices
    }
    context_s = time.perf_counter() - t0
    upload = None
    if spec.upload_file is not None:
        record = pickle.loads(Path(spec.upload_file).read_bytes())
        upload = _Upload(record["payloads"], record["item_count"], record["digest"])
    private_key = PrivateKey.load(spec.private_key) if spec.key_holders else None
    barrier.wait(timeout=900)
    generator = _LoadGenerator(spec, contexts, upload, private_key, release, connected)
    stats = asyncio.run(generator.run())
    usage = resource.getrusage(resource.RUSAGE_SELF)
    stats.context_s = context_s
    stats.cpu_s = usage.ru_utime + usage.ru_stime
    stats.peak_rss_mb = usage.ru_maxrss / 1024
    record = {f.name: getattr(stats, f.name) for f in fields(stats)}
    Path(spec.result_file).write_text(json.dumps(record))  # Counters serialize as objects


# ---------------------------------------------------------------------------- the daemon
def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {value!r} as TOML")


def _fold_engine() -> str:
    """Which engine the aggregator folds with (it inherits this environment)."""
    try:
        from fedcore.crypto.folding import native_available
    except ImportError:  # an aggregator from before the native engine
        return "gmpy2"
    return "native" if native_available() else "gmpy2"


def _fold_workers_supported() -> bool:
    from fedcore.aggregator import AggregatorConfig

    return any(f.name == "fold_workers" for f in fields(AggregatorConfig))


def _write_config(setup: _Setup, name: str, settings: dict[str, Any]) -> Path:
    values: dict[str, Any] = {
        "public_key": setup.keys / "public_key.json",
        "cert": setup.pki / "aggregator.pem",
        "key": setup.pki / "aggregator.key",
        "ca": setup.pki / "ca.pem",
        "state_dir": setup.workdir / f"state-{name}",
        "host": "127.0.0.1",
        "port": 0,
        "metrics_port": 0,
        "model": "fedcore.model:mlp",
        "model_kwargs": setup.model_kwargs,
        "rounds": 1,
        "value_bits": VALUE_BITS,
        "clip": CLIP,
        "chunk_ciphertexts": CHUNK_CIPHERTEXTS,
        "handshake_timeout": 120.0,
        "wait_for_clients_timeout": 600.0,
        "round_timeout": 900.0,
        "decrypt_shard_timeout": 900.0,
        "seed": 0,
        **settings,
    }
    path = setup.workdir / f"aggregator-{name}.toml"
    lines = ["[aggregator]"] + [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


class _Daemon:
    """`fedcore aggregator --config` as a subprocess, sampled until it exits."""

    def __init__(self, config: Path, log: Path) -> None:
        import psutil

        script = Path(sys.executable).parent / "fedcore"
        command = [str(script)] if script.exists() else [sys.executable, "-m", "fedcore.cli"]
        self.log = log
        self._log_file = log.open("ab")
        self.popen = subprocess.Popen(
            [*command, "aggregator", "--config", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )
        self.process = psutil.Process(self.popen.pid)
        self.port = 0
        self.metrics_port = 0
        self.rusage: Any = None
        self.samples: list[tuple[float, float, float]] = []  # (time, tree RSS MB, CPU s)
        self.metrics: dict[str, float] = {}
        self.tcp_mem_peak_mb = 0.0

    def wait_listening(self, timeout: float = 180.0) -> None:
        """Read the bound ports from the daemon's log line."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = _LISTEN_RE.search(self.log.read_text(errors="replace"))
            if match:
                self.port, self.metrics_port = int(match[1]), int(match[2])
                return
            if self.poll_exit():  # not popen.poll(): it would reap the pid before wait4
                break
            time.sleep(0.1)
        raise RuntimeError(
            f"aggregator did not start (exit code {self.popen.returncode}): {self.tail()}"
        )

    def tail(self, chars: int = 3000) -> str:
        """The end of the daemon's log."""
        return self.log.read_text(errors="replace")[-chars:]

    def sample(self) -> tuple[float, float]:
        """Tree RSS (MB) and CPU seconds of the daemon and its children, now."""
        import psutil

        rss = cpu = 0.0
        with contextlib.suppress(psutil.Error):
            for proc in [self.process, *self.process.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    rss += proc.memory_info().rss
                    times = proc.cpu_times()
                    cpu += times.user + times.system
        self.samples.append((time.time(), rss / 2**20, cpu))
        self.tcp_mem_peak_mb = max(self.tcp_mem_peak_mb, _tcp_mem_mb())
        return rss / 2**20, cpu

    def scrape(self, path: str = "/metrics") -> str | None:
        """GET an endpoint of the metrics server (no proxy), or None if it does not answer."""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(f"http://127.0.0.1:{self.metrics_port}{path}", timeout=5) as reply:
                text: str = reply.read().decode()
                return text
        except (OSError, ValueError):
            return None

    def scrape_metrics(self) -> None:
        """Keep the latest /metrics values (the daemon exits right after its last round)."""
        text = self.scrape()
        if text is None:
            return
        values: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                with contextlib.suppress(ValueError):
                    values[name] = float(value)
        self.metrics = values

    def poll_exit(self) -> bool:
        """Reap the daemon if it has exited, keeping its rusage (peak RSS, CPU)."""
        if self.rusage is not None:
            return True
        pid, status, usage = os.wait4(self.popen.pid, os.WNOHANG)
        if pid == 0:
            return False
        self.rusage = usage
        self.popen.returncode = os.waitstatus_to_exitcode(status)
        self._log_file.close()
        return True

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM (graceful), then SIGKILL after ``timeout``; always reaped."""
        if not self.poll_exit():
            self.popen.terminate()
            deadline = time.monotonic() + timeout
            while not self.poll_exit() and time.monotonic() < deadline:
                time.sleep(0.1)
        if not self.poll_exit():
            self.popen.kill()
            while not self.poll_exit():
                time.sleep(0.1)


def _start_loadgens(
    setup: _Setup, daemon: _Daemon, clients: int, args: argparse.Namespace, **spec: Any
) -> tuple[list[Any], list[Path], Any, Any]:
    """Spawn the load processes; they build their TLS contexts, then wait at a barrier."""
    ctx = multiprocessing.get_context("spawn")
    procs = max(1, min(args.loadgen_procs, clients))
    barrier, release, connected = ctx.Barrier(procs + 1), ctx.Event(), ctx.Value("i", 0)
    bounds = np.linspace(0, clients, procs + 1).astype(int)
    processes, results = [], []
    for j in range(procs):
        indices = tuple(range(bounds[j], bounds[j + 1]))
        holds_key = j < args.committee_size and spec["upload_file"] is not None
        result = setup.workdir / f"loadgen-{j}-{time.monotonic_ns()}.json"
        load = LoadSpec(
            indices=indices,
            key_holders=indices[:1] if holds_key else (),
            port=daemon.port,
            pki=str(setup.pki),
            private_key=str(setup.keys / "private_key.json"),
            decrypt_workers=args.decrypt_workers,
            connect_attempts=5,
            send_buffer=args.client_sndbuf,
            timeout_s=args.timeout,
            result_file=str(result),
            **spec,
        )
        process = ctx.Process(
            target=_loadgen_process, args=(load, barrier, release, connected), daemon=True
        )
        process.start()
        processes.append(process)
        results.append(result)
    return processes, results, barrier, (release, connected)


def _finish_loadgens(processes: list[Any], results: list[Path], timeout: float) -> list[dict]:
    deadline = time.monotonic() + timeout
    for process in processes:
        process.join(max(0.1, deadline - time.monotonic()))
        if process.is_alive():
            process.terminate()
            process.join(10)
    out = []
    for path in results:
        with contextlib.suppress(OSError, ValueError):
            out.append(json.loads(path.read_text()))
    return out


def _merge_loadgen(stats: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum counters over the load processes; connect time from the first start to last Welcome."""
    merged: dict[str, Any] = {"processes": len(stats)}
    for key in (
        "clients",
        "connected",
        "handshake_failures",
        "connect_failures",
        "weight_mismatches",
        "uploads_sent",
        "acked",
        "shards_decrypted",
        "decrypt_s",
        "bytes_sent",
        "bytes_received",
        "cpu_s",
    ):
        merged[key] = sum(s.get(key, 0) for s in stats)
    for key in ("failure_kinds", "errors", "byes"):
        total: Counter[str] = Counter()
        for s in stats:
            total.update(s.get(key, {}))
        merged[key] = dict(total)
    merged["peak_rss_mb_max"] = max((s.get("peak_rss_mb", 0.0) for s in stats), default=0.0)
    merged["context_s_max"] = max((s.get("context_s", 0.0) for s in stats), default=0.0)
    merged["timed_out"] = any(s.get("timed_out") for s in stats)
    starts = [s["connect_started"] for s in stats if s.get("connect_started")]
    welcomes = [s["last_welcome"] for s in stats if s.get("last_welcome")]
    merged["connect_seconds"] = max(welcomes) - min(starts) if starts and welcomes else None
    firsts = [s["first_round_start"] for s in stats if s.get("first_round_start")]
    lasts = [s["last_round_start"] for s in stats if s.get("last_round_start")]
    merged["round_start_spread_s"] = max(lasts) - min(firsts) if firsts else None
    acks = [s["last_ack"] for s in stats if s.get("last_ack")]
    merged["first_round_start_to_last_ack_s"] = max(acks) - min(firsts) if acks and firsts else None
    return merged


# ---------------------------------------------------------------------------- one round
def _log_times(log: Path) -> dict[str, float]:
    """Seconds between the daemon's round log lines (select -> collected -> complete)."""
    stamps: dict[str, float] = {}
    marks = {"selected": "round 1: selected", "collected": "updates in", "complete": "complete ("}
    for line in log.read_text(errors="replace").splitlines():
        for name, text in marks.items():
            if text in line and name not in stamps:
                with contextlib.suppress(ValueError):
                    stamps[name] = datetime.strptime(line[:23], _STAMP_FORMAT).timestamp()
    out: dict[str, float] = {}
    if "selected" in stamps and "complete" in stamps:
        out["round_seconds_log"] = stamps["complete"] - stamps["selected"]
    if "selected" in stamps and "collected" in stamps:
        out["collect_seconds_log"] = stamps["collected"] - stamps["selected"]
    return out


def _model_check(setup: _Setup, state: Path, record: dict[str, Any]) -> dict[str, Any]:
    """Does the new global model equal seed + the uploaded update (within one step)?"""
    try:
        weights = np.load(state / record["model_file"], allow_pickle=False)
    except (OSError, KeyError, ValueError):
        return {"model_update_ok": False}
    error = float(np.max(np.abs((weights - setup.seed_weights) - setup.update)))
    step = _codec(setup).spec.step
    return {"model_update_max_abs_error": error, "model_update_ok": error <= 1.001 * step}


def _start_profiler(pid: int, path: Path) -> subprocess.Popen[bytes] | None:
    py_spy = shutil.which("py-spy")
    if py_spy is None:
        _progress("py-spy is not installed (pip install py-spy): no profile")
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    command = [py_spy, "record", "--format", "raw", "--rate", "50", "--nonblocking"]
    command += ["--nolineno", "--subprocesses", "--pid", str(pid), "-o", str(path)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def top_frames(raw: Path, limit: int = 15) -> dict[str, Any]:
    """Self and inclusive sample shares per function from py-spy's raw (collapsed) stacks."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [
            re.sub(r"\(.*?([^/]+/[^/]+\.py)\)", r"(\1)", f)
            for f in stack.split(";")
            if not f.startswith("process ")  # --subprocesses adds one root frame per pid
        ]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    share = {"samples": total}
    if total:
        share["self"] = [[f, round(100 * n / total, 1)] for f, n in own.most_common(limit)]
        share["inclusive"] = [
            [f, round(100 * n / total, 1)] for f, n in inclusive.most_common(limit)
        ]
    return share


def _run_round(setup: _Setup, clients: int, args: argparse.Namespace, profile: Path | None) -> dict:
    """One aggregator, ``clients`` simultaneous clients, one round; its figures."""
    weight = _expected_weight(setup, clients)
    upload = _upload_file(setup, weight)
    settings: dict[str, Any] = {
        "min_clients": clients,
        "clients_per_round": clients,
        "headroom_bits": setup.headroom_bits,
        "max_inflight_uploads": args.max_inflight,
        "max_connections": max(2048, clients + 64),
        "committee_size": max(1, min(args.committee_size, args.loadgen_procs, clients)),
    }
    if args.fold_workers is not None and _fold_workers_supported():
        settings["fold_workers"] = args.fold_workers
    name = f"{clients}-{time.monotonic_ns()}"
    config = _write_config(setup, name, settings)
    state = setup.workdir / f"state-{name}"
    daemon = _Daemon(config, setup.workdir / f"aggregator-{name}.log")
    processes: list[Any] = []
    results: list[Path] = []
    profiler = None
    notes: list[str] = []
    peak_rss = 0.0
    tcp_before = _tcp_counters()
    try:
        daemon.wait_listening()
        baseline_rss, _ = daemon.sample()
        processes, results, barrier, _ = _start_loadgens(
            setup,
            daemon,
            clients,
            args,
            upload_file=str(upload),
            weight=weight,
            connect_concurrency=0,
        )
        if profile is not None:
            profiler = _start_profiler(daemon.popen.pid, profile)
        barrier.wait(timeout=600)
        _progress(f"{clients} clients: connecting")
        deadline = time.monotonic() + args.timeout
        next_scrape = 0.0
        peak_rss = baseline_rss
        while not daemon.poll_exit():
            rss, _ = daemon.sample()
            peak_rss = max(peak_rss, rss)
            if time.monotonic() >= next_scrape:
                daemon.scrape_metrics()
                next_scrape = time.monotonic() + _SCRAPE_INTERVAL_S
            if rss > args.max_aggregator_gb * 1024:
                notes.append(f"killed: aggregator RSS {rss:.0f} MB > --max-aggregator-gb")
                daemon.stop(5)
            elif time.monotonic() > deadline:
                notes.append(f"killed: run exceeded --timeout {args.timeout} s")
                daemon.stop(5)
            time.sleep(_SAMPLE_INTERVAL_S)
    finally:
        daemon.stop()
        loadgen = _merge_loadgen(_finish_loadgens(processes, results, 120))
        if profiler is not None:
            try:
                profiler.wait(60)
            except subprocess.TimeoutExpired:
                profiler.kill()
    result = _round_result(setup, clients, weight, daemon, state, loadgen, peak_rss, notes, profile)
    result["kernel_tcp"] = _kernel_tcp(daemon, tcp_before)
    return result


def _kernel_tcp(daemon: _Daemon, before: dict[str, int]) -> dict[str, Any]:
    """Kernel TCP memory during the run (machine-wide: other users' sockets count too)."""
    after = _tcp_counters()
    out: dict[str, Any] = {"mem_peak_mb": round(daemon.tcp_mem_peak_mb, 1)}
    out.update({k: after[k] - before.get(k, 0) for k in after})
    with contextlib.suppress(OSError):
        out["tcp_mem_sysctl_pages"] = Path("/proc/sys/net/ipv4/tcp_mem").read_text().split()
    return out


def _round_result(
    setup: _Setup,
    clients: int,
    weight: int,
    daemon: _Daemon,
    state: Path,
    loadgen: dict[str, Any],
    peak_tree_rss: float,
    notes: list[str],
    profile: Path | None,
) -> dict[str, Any]:
    codec = _codec(setup)
    record: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        record = json.loads((state / "checkpoint.json").read_text())
    completed = [h for h in record.get("history", []) if h.get("phase") == "completed"]
    failed = [h.get("failure") for h in record.get("history", []) if h.get("failure")]
    phases = completed[-1]["phase_seconds"] if completed else {}
    folded = len(completed[-1]["contributors"]) if completed else 0
    usage = daemon.rusage
    metrics = daemon.metrics
    fold_count = metrics.get("fedcore_fold_seconds_count", 0.0)
    rejected = {
        k.split('"')[1]: v
        for k, v in metrics.items()
        if k.startswith("fedcore_updates_rejected_total{") and v
    }
    out: dict[str, Any] = {
        "clients": clients,
        "params": setup.params,
        "weight": weight,
        "ciphertexts_per_update": codec.item_count,
        "bytes_per_update": codec.item_count * codec.public_key.ciphertext_bytes,
        "updates_folded": folded,
        "round_seconds": sum(phases.get(k, 0.0) for k in ("collect", "decrypt", "update"))
        if completed
        else None,
        "phase_seconds": phases,
        **_log_times(daemon.log),
        "aggregator_peak_rss_mb": usage.ru_maxrss / 1024 if usage is not None else None,
        "aggregator_tree_peak_rss_mb": peak_tree_rss,
        "aggregator_cpu_s": usage.ru_utime + usage.ru_stime if usage is not None else None,
        "aggregator_exit_code": daemon.popen.returncode,
        "bytes_received": record.get("metrics", {}).get("fedcore_bytes_received_total"),
        "bytes_sent": record.get("metrics", {}).get("fedcore_bytes_sent_total"),
        "fold_seconds": metrics.get("fedcore_fold_seconds_sum"),
        "fold_count_scraped": fold_count,
        "fold_seconds_complete": bool(folded) and fold_count >= folded,
        "rejected": rejected,
        "connect_seconds": loadgen.get("connect_seconds"),
        "handshake_failures": loadgen.get("handshake_failures"),
        "loadgen": loadgen,
        "failures": failed,
        "notes": notes,
        "rss_timeline": _timeline(daemon.samples),
    }
    if completed:
        out.update(_model_check(setup, state, record))
    if profile is not None and profile.exists():
        out["profile"] = {"raw": str(profile), **top_frames(profile)}
    if not completed:
        out["aggregator_log_tail"] = daemon.tail()
    return out


def _timeline(samples: list[tuple[float, float, float]], points: int = 120) -> list[list[float]]:
    """Down-sampled [seconds since start, tree RSS MB, CPU s] of the daemon."""
    if not samples:
        return []
    step = max(1, len(samples) // points)
    t0 = samples[0][0]
    return [[round(t - t0, 2), round(r, 1), round(c, 2)] for t, r, c in samples[::step]]


# ---------------------------------------------------------------------------- idle clients
def _limits() -> dict[str, Any]:
    """The host limits that bound how many connections can be held."""
    import psutil

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    out: dict[str, Any] = {"nofile_soft": soft, "nofile_hard": hard}
    for name, path in (
        ("ip_local_port_range", "/proc/sys/net/ipv4/ip_local_port_range"),
        ("somaxconn", "/proc/sys/net/core/somaxconn"),
        ("tcp_max_syn_backlog", "/proc/sys/net/ipv4/tcp_max_syn_backlog"),
    ):
        with contextlib.suppress(OSError):
            out[name] = Path(path).read_text().strip()
    out["memory_available_gb"] = round(psutil.virtual_memory().available / 2**30, 1)
    return out


def _run_idle(setup: _Setup, clients: int, args: argparse.Namespace) -> dict[str, Any]:
    """Hold ``clients`` idle connections (no round can start); what they cost the daemon."""
    settings = {
        "min_clients": clients + 1,  # never reached: no round, no 2 MB RoundStart each
        "clients_per_round": clients + 1,
        "headroom_bits": math.ceil(math.log2(2 * (clients + 1))),
        "max_connections": clients + 64,
        "idle_timeout": 300.0,
    }
    name = f"idle{clients}-{time.monotonic_ns()}"
    daemon = _Daemon(_write_config(setup, name, settings), setup.workdir / f"aggregator-{name}.log")
    processes: list[Any] = []
    results: list[Path] = []
    out: dict[str, Any] = {"clients": clients, "limits": _limits()}
    try:
        daemon.wait_listening()
        baseline_rss, _ = daemon.sample()
        processes, results, barrier, (release, connected) = _start_loadgens(
            setup,
            daemon,
            clients,
            args,
            upload_file=None,
            weight=0,
            connect_concurrency=args.idle_connect_concurrency,
        )
        barrier.wait(timeout=900)
        _progress(f"{clients} idle clients: connecting")
        t0 = time.monotonic()
        last, last_change = 0, t0
        while connected.value < clients and time.monotonic() - last_change < 60:
            if daemon.poll_exit() or time.monotonic() - t0 > args.timeout:
                break
            if connected.value != last:
                last, last_change = connected.value, time.monotonic()
            daemon.sample()
            time.sleep(0.5)
        out["connect_seconds"] = time.monotonic() - t0
        out["connected_loadgen_view"] = connected.value
        _, cpu_before = daemon.sample()
        hold_end = time.monotonic() + args.idle_hold
        while time.monotonic() < hold_end and not daemon.poll_exit():
            daemon.sample()
            time.sleep(0.5)
        rss, cpu_after = daemon.sample()
        health = daemon.scrape("/healthz")
        out["connected_aggregator_view"] = (
            json.loads(health).get("connected_clients") if health else None
        )
        # At the fd limit the metrics server cannot accept either: count the log's joins.
        out["joined_in_log"] = daemon.tail(10**9).count(" joined (")
        out["aggregator_rss_baseline_mb"] = baseline_rss
        out["aggregator_rss_held_mb"] = rss
        held = out["connected_aggregator_view"] or connected.value
        out["aggregator_kb_per_connection"] = (rss - baseline_rss) * 1024 / held if held else None
        out["aggregator_cpu_s_per_s_held"] = (cpu_after - cpu_before) / max(args.idle_hold, 1e-9)
        release.set()
    finally:
        loadgen = _merge_loadgen(_finish_loadgens(processes, results, 120))
        daemon.stop()
    usage = daemon.rusage
    out.update(
        {
            "aggregator_peak_rss_mb": usage.ru_maxrss / 1024 if usage is not None else None,
            "aggregator_cpu_s": usage.ru_utime + usage.ru_stime if usage is not None else None,
            "handshake_failures": loadgen["handshake_failures"],
            "connect_failures": loadgen["connect_failures"],
            "loadgen": loadgen,
            "aggregator_log_errors": [
                line[:200]
                for line in daemon.tail(200_000).splitlines()
                if " ERROR " in line or " WARNING " in line
            ][:20],
        }
    )
    return out


# ---------------------------------------------------------------------------- entry point
def _git_state() -> dict[str, Any]:
    """Which code was measured: HEAD and whether the runtime's files had local edits."""
    root = Path(__file__).resolve().parent.parent

    def git(*argv: str) -> str:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            done = subprocess.run(
                ["git", *argv], cwd=root, capture_output=True, text=True, timeout=10
            )
            return done.stdout.strip()
        return ""

    dirty = git("status", "--porcelain", "--", "fedcore", "protocol").splitlines()
    return {"head": git("rev-parse", "--short", "HEAD"), "dirty_runtime_files": dirty}


def _client_counts(args: argparse.Namespace) -> tuple[int, list[int]]:
    """(headline client count, every count to run); ``--clients 0 --curve ''`` runs none."""
    curve = [int(c) for c in args.curve.split(",") if c.strip()]
    if min([*curve, args.clients, args.idle_clients]) < 0:
        raise SystemExit("client counts must be >= 0")
    if args.quick:
        curve = [c for c in curve if 0 < c <= 100] or [10, 100]
        return max(curve), sorted(set(curve))
    return args.clients, sorted(c for c in {*curve, args.clients} if c > 0)


def _targets(main: dict[str, Any], clients: int) -> dict[str, bool]:
    """The issue's targets for the headline run (reported, never asserted)."""
    round_s, peak = main.get("round_seconds"), main.get("aggregator_peak_rss_mb")
    return {
        "all_folded": main.get("updates_folded") == clients,
        "round_le_60s": round_s is not None and round_s <= TARGET_ROUND_S,
        "peak_rss_le_1_5gb": peak is not None and peak <= TARGET_PEAK_RSS_MB,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the curve (smallest first), the headline last; optionally the idle test."""
    headline, counts = _client_counts(args)
    headroom = math.ceil(math.log2(2 * max([*counts, 1])))
    certs = max([*counts, args.idle_clients])
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fedcore-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    fold_supported = _fold_workers_supported()
    if args.fold_workers is not None and not fold_supported:
        _progress("this aggregator has no fold_workers setting: --fold-workers ignored")
    try:
        _progress(f"set-up: {args.key_bits}-bit key, {certs} client certificates in {workdir}")
        setup = _make_setup(workdir, args, certs, headroom)
        curve = []
        for clients in counts:
            _progress(f"run: {clients} clients")
            profile = args.profile if clients == headline else None
            try:
                point = _run_round(setup, clients, args, profile)
            except Exception as exc:  # one broken run must not lose the others
                _progress(f"{clients} clients: run failed: {exc!r}")
                point = {"clients": clients, "updates_folded": 0, "error": repr(exc)}
                point.update(round_seconds=None, aggregator_peak_rss_mb=None)
            _progress(
                f"{clients} clients: folded {point['updates_folded']}, round "
                f"{point['round_seconds']} s, peak RSS {point['aggregator_peak_rss_mb']} MB"
            )
            curve.append(point)
        idle = _run_idle(setup, args.idle_clients, args) if args.idle_clients > 0 else None
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)  # keys and certificates never stay
    main = next((p for p in curve if p["clients"] == headline), {"clients": headline})
    summary = {k: v for k, v in main.items() if k not in ("rss_timeline", "loadgen", "profile")}
    return {
        **summary,
        "targets": _targets(main, headline) if curve else None,
        "workload": {
            "key_bits": args.key_bits,
            "headroom_bits": headroom,
            "value_bits": VALUE_BITS,
            "chunk_ciphertexts": CHUNK_CIPHERTEXTS,
            "max_inflight_uploads": args.max_inflight,
            "committee_size": args.committee_size,
            "loadgen_procs": args.loadgen_procs,
            "decrypt_workers": args.decrypt_workers,
            "fold_workers": args.fold_workers if fold_supported else None,
            "fold_workers_supported": fold_supported,
            "fold_engine": _fold_engine(),
            "model_kwargs": setup.model_kwargs,
            "re_randomized": False,
            "round_seconds_is": "checkpoint phase_seconds collect + decrypt + update",
            "fold_seconds_is": "fedcore_fold_seconds_sum: per-update fold waits; with "
            "fold_workers > 0 they overlap, so the sum can exceed the wall time",
        },
        "setup_seconds": setup.timings,
        "curve": [
            {
                k: p.get(k)
                for k in (
                    "clients",
                    "updates_folded",
                    "round_seconds",
                    "round_seconds_log",
                    "aggregator_peak_rss_mb",
                    "aggregator_tree_peak_rss_mb",
                    "aggregator_cpu_s",
                    "fold_seconds",
                    "connect_seconds",
                    "handshake_failures",
                    "phase_seconds",
                )
            }
            for p in curve
        ],
        "runs": curve,
        "idle": idle,
        "git": _git_state(),
    }
