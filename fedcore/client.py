"""The embeddable federated-learning client.

An edge app builds `Client(model, train_fn, evaluate_fn, config)` and awaits
`client.run("host:port")` (or calls the blocking `client.run_forever(...)`). Each round
the client loads the global weights, trains locally, encrypts its update (packed
Paillier, or float32 in a plaintext comparison run) and streams it in chunks; a client
that holds the private key also serves decryption shards of round sums. After a network
loss it reconnects with backoff and resumes the round if it is still open, reusing the
update it already encrypted. Sockets are `protocol.transport`'s business; arithmetic is
`fedcore.codec`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedcore.codec import EncryptedCodec, UpdateCodec, codec_from_session_config
from fedcore.crypto import PrivateKey, PublicKey
from fedcore.errors import ConfigError, FedcoreError
from fedcore.model import ModelLayout, flatten_state_dict, load_flat_into
from protocol.errors import ConnectionClosed, ErrorCode, ErrorReceived, ProtocolError
from protocol.messages import (
    PROTOCOL_VERSION,
    Ack,
    Bye,
    DecryptRequest,
    DecryptResult,
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
from protocol.transport import (
    Backoff,
    Connection,
    TransportConfig,
    connect,
    install_uvloop,
    tune_allocator,
)

__all__ = [
    "FEDERATION_COMPLETE",
    "Client",
    "ClientConfig",
    "ClientResult",
    "EvaluateFn",
    "TrainFn",
    "decrypt_shard",
    "parse_server",
]

log = logging.getLogger(__name__)

#: The ``Bye`` reason with which the aggregator ends a finished federation; any other
#: goodbye (a restart, a shutdown) makes the client reconnect.
FEDERATION_COMPLETE = "federation complete"

TrainFn = Callable[[torch.nn.Module, dict[str, Any]], int]
EvaluateFn = Callable[[torch.nn.Module], dict[str, float]]

# Errors after which reconnecting cannot help: the federation does not want this client.
_FATAL_CODES = {ErrorCode.UNSUPPORTED_VERSION, ErrorCode.UNKNOWN_CLIENT}


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientConfig:
    """Where the client's credentials are and how it behaves on the network."""

    cert: Path
    key: Path
    ca: Path
    private_key: Path | None = None
    server_hostname: str | None = None
    sample_count: int = 1
    reconnect_attempts: int | None = 20
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    decrypt_workers: int = 1
    # Constant-time modular exponentiation with the secret CRT exponents: OpenSSL's
    # (faster than GMP's variable-time powmod, which phe uses) or, without a usable
    # libcrypto, GMP's powm_sec (~1.3x slower). False = GMP's variable-time powmod; only
    # where nobody who should not learn the key can observe decryption timing.
    constant_time_decrypt: bool = True
    seed: int = 0
    idle_timeout: float = 300.0
    heartbeat_interval: float = 15.0
    write_timeout: float = 600.0

    def __post_init__(self) -> None:
        if self.sample_count < 1:
            raise ConfigError(f"sample_count must be >= 1; got {self.sample_count}")
        if self.reconnect_attempts is not None and self.reconnect_attempts < 0:
            raise ConfigError(
                f"reconnect_attempts must be >= 0 or None; got {self.reconnect_attempts}"
            )
        if not 0 < self.backoff_base <= self.backoff_max:
            raise ConfigError("backoff_base must be > 0 and <= backoff_max")
        if self.decrypt_workers < 1:
            raise ConfigError(f"decrypt_workers must be >= 1; got {self.decrypt_workers}")


@dataclass(slots=True)
class ClientResult:
    """What a client did by the time the federation ended."""

    rounds_contributed: int = 0
    shards_decrypted: int = 0
    reconnects: int = 0
    bytes_uploaded: int = 0
    last_metrics: dict[str, float] = field(default_factory=dict)


@dataclass(slots=True)
class _PreparedUpdate:
    round_id: int
    payloads: list[bytes]
    item_count: int
    digest: bytes
    sample_count: int
    timings: dict[str, float]
    metrics: dict[str, float]


def parse_server(server: str) -> tuple[str, int]:
    """'host:port' (or '[v6]:port') -> (host, port), with a clear error otherwise."""
    host, sep, port = server.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"server must be HOST:PORT, got {server!r}")
    return host.strip("[]"), int(port)


class Client:
    """A federated-learning participant: train locally, send encrypted updates."""

    def __init__(
        self,
        model: torch.nn.Module,
        train_fn: TrainFn,
        evaluate_fn: EvaluateFn | None,
        config: ClientConfig,
    ) -> None:
        self.model = model
        self.train_fn = train_fn
        self.evaluate_fn = evaluate_fn
        self.config = config
        self.layout = ModelLayout.of(model.state_dict())
        self.private_key: PrivateKey | None = (
            PrivateKey.load(config.private_key) if config.private_key is not None else None
        )
        self.result = ClientResult()
        self._prepared: _PreparedUpdate | None = None
        # A cancelled round's thread runs on until it finishes; the next round must not
        # train the same model at the same time.
        self._model_lock = threading.Lock()
        self._ssl = client_context(config.cert, config.key, config.ca)

    # ------------------------------------------------------------------ entry points
    def run_forever(self, server: str) -> ClientResult:
        """Blocking form of `run` (uvloop when installed, glibc tuned for frame buffers)."""
        tune_allocator()
        install_uvloop()
        return asyncio.run(self.run(server))

    async def run(self, server: str) -> ClientResult:
        """Take part until the aggregator says the federation is complete."""
        host, port = parse_server(server)
        backoff = Backoff(self.config.backoff_base, self.config.backoff_max)
        failures = 0
        while True:
            try:
                conn = await connect(
                    host,
                    port,
                    self._ssl,
                    server_hostname=self.config.server_hostname or host,
                    config=self._transport_config(),
                )
            except (TimeoutError, OSError, ProtocolError) as exc:
                failures += 1
                if self.config.reconnect_attempts is not None and (
                    failures > self.config.reconnect_attempts
                ):
                    raise FedcoreError(f"cannot reach the aggregator at {server}: {exc}") from exc
                delay = backoff.next_delay()
                log.info("connect to %s failed (%s); retrying in %.1f s", server, exc, delay)
                await asyncio.sleep(delay)
                continue
            failures = 0
            backoff.reset()
            try:
                await self._session(conn)
            except ErrorReceived as exc:
                log.warning("aggregator refused us: %s", exc)
                if exc.code in _FATAL_CODES:
                    raise FedcoreError(f"aggregator refused this client: {exc}") from exc
            except ConnectionClosed as exc:
                bye = exc.peer_message
                if isinstance(bye, Bye) and bye.reason == FEDERATION_COMPLETE:
                    log.info("the aggregator says the federation is complete")
                    return self.result
                log.info("connection closed: %s", exc)
            except (ProtocolError, OSError, ConnectionError) as exc:
                log.info("connection lost: %s", exc)
            finally:
                with contextlib.suppress(Exception):
                    await conn.close()
            self.result.reconnects += 1
            await asyncio.sleep(backoff.next_delay())

    def _transport_config(self) -> TransportConfig:
        from protocol.framing import CLIENT_MAX_FRAME_SIZE

        return TransportConfig(
            idle_timeout=self.config.idle_timeout,
            heartbeat_interval=self.config.heartbeat_interval,
            write_timeout=self.config.write_timeout,
            max_frame_size=CLIENT_MAX_FRAME_SIZE,
        )

    # ------------------------------------------------------------------ one connection
    async def _session(self, conn: Connection) -> None:
        """Serve one connection until it closes (`run` reads the goodbye)."""
        await conn.send(
            Hello(
                version=PROTOCOL_VERSION,
                sample_count=self.config.sample_count,
                can_decrypt=self.private_key is not None,
            )
        )
        welcome = await conn.receive()
        if not isinstance(welcome, Welcome):
            raise ProtocolError(f"expected Welcome, got {type(welcome).__name__}")
        codec = self._codec_for(welcome)
        log.info(
            "joined the federation as %s (%s)",
            welcome.client_id,
            "encrypted" if codec.encrypted else "plaintext",
        )
        send_lock = asyncio.Lock()
        round_task: asyncio.Task[None] | None = None
        grant: asyncio.Future[UploadGrant] | None = None
        side_tasks: set[asyncio.Task[None]] = set()
        try:
            while True:
                message = await conn.receive()
                if isinstance(message, RoundStart):
                    if round_task is not None:
                        round_task.cancel()
                    grant = asyncio.get_running_loop().create_future()
                    round_task = asyncio.create_task(
                        self._do_round(conn, send_lock, codec, message, grant)
                    )
                elif isinstance(message, UploadGrant):
                    if grant is not None and not grant.done():
                        grant.set_result(message)
                elif isinstance(message, RoundEnd):
                    if round_task is not None and not round_task.done():
                        log.info(
                            "round %d ended before our update: %s",
                            message.round_id,
                            message.reason or message.status,
                        )
                        round_task.cancel()
                elif isinstance(message, Ack):
                    if message.accepted:
                        self.result.rounds_contributed += 1
                        log.info("round %d: update accepted", message.round_id)
                elif isinstance(message, DecryptRequest):
                    task = asyncio.create_task(self._decrypt(conn, send_lock, codec, message))
                    side_tasks.add(task)
                    task.add_done_callback(side_tasks.discard)
        finally:
            if round_task is not None:
                round_task.cancel()
            for task in side_tasks:
                task.cancel()

    def _codec_for(self, welcome: Welcome) -> UpdateCodec:
        config = dict(welcome.session_config)
        layout = ModelLayout.from_json(str(config.get("model_layout", "[]")))
        if layout != self.layout:
            raise ConfigError(
                "the aggregator's model layout differs from this client's model; "
                "both must build the same architecture"
            )
        public_key = PublicKey.from_bytes(welcome.public_key) if welcome.public_key else None
        if (
            public_key is not None
            and self.private_key is not None
            and public_key != self.private_key.public_key
        ):
            raise ConfigError("the aggregator's public key does not match our private key")
        return codec_from_session_config(config, public_key)

    # ------------------------------------------------------------------ a round
    async def _do_round(
        self,
        conn: Connection,
        send_lock: asyncio.Lock,
        codec: UpdateCodec,
        start: RoundStart,
        grant: asyncio.Future[UploadGrant],
    ) -> None:
        """Train and encrypt (once per round), ask for an upload slot, stream when granted."""
        try:
            prepared = self._prepared
            if prepared is None or prepared.round_id != start.round_id:
                prepared = await asyncio.to_thread(self._prepare_update, codec, start)
                self._prepared = prepared
            else:
                log.info(
                    "round %d: resuming upload at chunk %d", start.round_id, start.chunks_received
                )
            t_wait = time.perf_counter()
            async with send_lock:
                await conn.send(UploadRequest(round_id=start.round_id))
            granted = await grant
            if granted.start_seq > len(prepared.payloads):
                raise ProtocolError("aggregator claims more chunks than the update has")
            t_upload = time.perf_counter()
            for seq in range(granted.start_seq, len(prepared.payloads)):
                async with send_lock:
                    await conn.send(
                        UpdateChunk(
                            round_id=start.round_id, seq=seq, payload=prepared.payloads[seq]
                        )
                    )
                self.result.bytes_uploaded += len(prepared.payloads[seq])
            async with send_lock:
                await conn.send(
                    UpdateDone(
                        round_id=start.round_id,
                        chunk_count=len(prepared.payloads),
                        item_count=prepared.item_count,
                        digest=prepared.digest,
                        sample_count=prepared.sample_count,
                        timings={
                            **prepared.timings,
                            "grant_wait_s": t_upload - t_wait,
                            "upload_s": time.perf_counter() - t_upload,
                        },
                        metrics=prepared.metrics,
                    )
                )
            self.result.last_metrics = dict(prepared.metrics)
        except asyncio.CancelledError:
            raise
        except (ProtocolError, OSError, ConnectionError) as exc:
            log.info("round %d upload interrupted: %s", start.round_id, exc)
        except Exception:
            log.exception("round %d failed on this client", start.round_id)
            with contextlib.suppress(Exception):
                await conn.close(reason="client error")

    def _prepare_update(self, codec: UpdateCodec, start: RoundStart) -> _PreparedUpdate:
        """Evaluate the global model, train, and encode the update (runs in a thread)."""
        with self._model_lock:
            return self._prepare_update_locked(codec, start)

    def _prepare_update_locked(self, codec: UpdateCodec, start: RoundStart) -> _PreparedUpdate:
        global_weights = np.frombuffer(start.weights, dtype=np.float32)
        if global_weights.shape[0] != self.layout.numel:
            raise ConfigError(
                f"RoundStart carries {global_weights.shape[0]} weights; model has "
                f"{self.layout.numel}"
            )
        load_flat_into(self.model, global_weights)
        metrics: dict[str, float] = {}
        timings: dict[str, float] = {}
        if self.evaluate_fn is not None:
            t0 = time.perf_counter()
            metrics = {k: float(v) for k, v in self.evaluate_fn(self.model).items()}
            timings["evaluate_s"] = time.perf_counter() - t0
        round_config = dict(start.config)
        t0 = time.perf_counter()
        samples = int(self.train_fn(self.model, round_config))
        timings["train_s"] = time.perf_counter() - t0
        metrics["iterations"] = float(round_config.get("epochs", 1))
        update = flatten_state_dict(self.model.state_dict()) - global_weights
        weight = int(round_config.get("weight", 1))
        rng = np.random.default_rng([self.config.seed, start.round_id])
        t0 = time.perf_counter()
        encoded = codec.encode(update, weight=weight, rng=rng)
        t1 = time.perf_counter()
        if isinstance(codec, EncryptedCodec):
            items: Any = codec.public_key.encrypt_vector(list(encoded))
        else:
            items = encoded
        t2 = time.perf_counter()
        payloads = list(codec.chunk_payloads(items))
        timings["encode_s"] = t1 - t0
        timings["encrypt_s"] = t2 - t1
        timings["serialize_s"] = time.perf_counter() - t2
        digest = hashlib.sha256()
        for payload in payloads:
            digest.update(payload)
        return _PreparedUpdate(
            round_id=start.round_id,
            payloads=payloads,
            item_count=len(items),
            digest=digest.digest(),
            sample_count=max(1, samples),
            timings=timings,
            metrics=metrics,
        )

    # ------------------------------------------------------------------ committee work
    async def _decrypt(
        self,
        conn: Connection,
        send_lock: asyncio.Lock,
        codec: UpdateCodec,
        request: DecryptRequest,
    ) -> None:
        if self.private_key is None or not isinstance(codec, EncryptedCodec):
            raise ProtocolError("asked to decrypt without a private key")
        result = await decrypt_shard(
            codec,
            self.private_key,
            request,
            workers=self.config.decrypt_workers,
            constant_time=self.config.constant_time_decrypt,
        )
        async with send_lock:
            await conn.send(result)
        self.result.shards_decrypted += 1


async def decrypt_shard(
    codec: EncryptedCodec,
    private_key: PrivateKey,
    request: DecryptRequest,
    *,
    workers: int = 1,
    constant_time: bool = True,
) -> DecryptResult:
    """A committee member's answer to one DecryptRequest (decrypts in a worker thread)."""
    t0 = time.perf_counter()
    payload, count = await asyncio.to_thread(
        codec.decrypt_payload,
        request.payload,
        private_key,
        workers=workers,
        constant_time=constant_time,
    )
    return DecryptResult(
        round_id=request.round_id,
        shard_id=request.shard_id,
        item_count=count,
        payload=payload,
        seconds=time.perf_counter() - t0,
    )
