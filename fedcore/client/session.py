"""The client's session driver: connect, join, run rounds, serve the committee, reconnect.

An edge app builds `Client(model, train_fn, evaluate_fn, config)` and awaits
`client.run("host:port")` (or calls the blocking `client.run_forever(...)`). Each round
the pipeline (`fedcore.client.pipeline`) loads the global weights, trains locally and
encrypts the update; this module streams it in chunks; a client that holds the private
key also serves decryption shards of round sums (`fedcore.client.committee`). After a
network loss it reconnects with backoff and resumes the round if it is still open,
reusing the update it already encrypted. Sockets are `protocol.transport`'s business.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import torch

from fedcore.client.committee import decrypt_shard
from fedcore.client.config import (
    FATAL_CODES,
    FEDERATION_COMPLETE,
    ClientConfig,
    ClientResult,
    EvaluateFn,
    TrainFn,
    parse_server,
)
from fedcore.client.pipeline import PreparedUpdate, UpdatePipeline
from fedcore.codec import EncryptedCodec, UpdateCodec, codec_from_session_config
from fedcore.crypto import PrivateKey, PublicKey
from fedcore.errors import ConfigError, FedcoreError
from fedcore.model import ModelLayout
from protocol.errors import ConnectionClosed, ErrorReceived, ProtocolError
from protocol.messages import (
    PROTOCOL_VERSION,
    Ack,
    Bye,
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
from protocol.transport import (
    Backoff,
    Connection,
    TransportConfig,
    connect,
    install_uvloop,
    tune_allocator,
)

__all__ = ["Client"]

log = logging.getLogger(__name__)


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
        self.config = config
        self.pipeline = UpdatePipeline(model, train_fn, evaluate_fn, config)
        self.layout = self.pipeline.layout
        self.private_key: PrivateKey | None = (
            PrivateKey.load(config.private_key) if config.private_key is not None else None
        )
        self.result = ClientResult()
        self._prepared: PreparedUpdate | None = None
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
                if exc.code in FATAL_CODES:
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
                prepared = await asyncio.to_thread(self.pipeline.prepare, codec, start)
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
