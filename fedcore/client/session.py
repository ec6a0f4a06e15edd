"""The client's session driver: connect, check the federation, run rounds, serve the committee.

An edge app builds `Client(model, train_fn, evaluate_fn, config)` and awaits
`client.run("host:port")` (or calls the blocking `client.run_forever(...)`). The client
enforces its own privacy, whatever the aggregator does:

- the Welcome must offer exactly the pinned federation (public key, value bits,
  headroom, clip, quorum, weight bound); otherwise the client stops with an error
  naming each differing field and uploads nothing;
- a RoundStart must keep the pinned clip and value bits and name unmaskers whose
  credentials verify against the federation CA;
- the client weighs its update itself, masks it for the round's unmaskers, and makes
  one update per global model version: asked again for the same model (a rerun under a
  new round id) it resends the same bytes, and it refuses to re-mask that model
  version for other unmaskers.

The pipeline (`fedcore.client.pipeline`) trains and seals updates; a key holder also
serves the committee (`fedcore.client.committee`). After a network loss the client
reconnects with backoff and resumes an open round; a failure no retry can fix (a
certificate either side refuses, a refusal that will not change, an app callback that
raises or returns the wrong type) stops it with one ERROR line (`fedcore.client.failures`
decides which is which). Sockets are `protocol.transport`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import OrderedDict
from pathlib import Path

import torch
from cryptography import x509

from fedcore.client.committee import CommitteeMember, CommitteeRefusal
from fedcore.client.config import (
    ClientConfig,
    ClientResult,
    EvaluateFn,
    TrainFn,
    parse_server,
)
from fedcore.client.failures import (
    CallbackError,
    checked_evaluate_fn,
    checked_train_fn,
    describe,
)
from fedcore.client.pipeline import (
    PreparedUpdate,
    TrainedUpdate,
    UpdatePipeline,
    model_digest,
    seal,
)
from fedcore.client.reconnect import serve_reconnecting
from fedcore.codec import EncryptedCodec, UpdateCodec, codec_for
from fedcore.contracts import (
    ClientReport,
    FederationMismatch,
    FederationParams,
    RoundPlan,
    SessionInfo,
)
from fedcore.credentials import (
    CertificateAuthority,
    CommitteeCredential,
    ContributorToken,
    CredentialError,
    Signer,
)
from fedcore.crypto import EncryptionPool, KeyShare, PrivateKey
from fedcore.errors import ConfigError, FedcoreError
from fedcore.model import ModelLayout
from protocol.errors import ProtocolError
from protocol.messages import (
    PROTOCOL_VERSION,
    Ack,
    DecryptRequest,
    Error,
    Hello,
    KeyProof,
    PartialDecryptRequest,
    RoundEnd,
    RoundStart,
    UnmaskRequest,
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

POOL_WARM_UP_SECONDS = 30.0
"""How long a client waits, before it joins, for its encryption pool to fill."""

# Model versions whose unmaskers the client remembers (rerun protection), and how many
# prepared updates it keeps to resend (each is a whole encrypted update).
_REMEMBERED_MODELS = 1 << 16
_KEPT_UPDATES = 2


class Client:
    """A federated-learning participant: train locally, send masked, encrypted updates."""

    def __init__(
        self,
        model: torch.nn.Module,
        train_fn: TrainFn,
        evaluate_fn: EvaluateFn | None,
        config: ClientConfig,
    ) -> None:
        self.model = model
        self.config = config
        self.federation: FederationParams = config.load_federation()
        # What the app's callbacks raise becomes CallbackError: it stops the client
        # instead of costing a reconnect a round. (What is not callable, the pipeline
        # refuses as it is.)
        self.pipeline = UpdatePipeline(
            model,
            checked_train_fn(train_fn) if callable(train_fn) else train_fn,
            checked_evaluate_fn(evaluate_fn) if callable(evaluate_fn) else evaluate_fn,
        )
        self.layout = self.pipeline.layout
        self.private_key: PrivateKey | KeyShare | None = self._load_key_secret(config)
        try:
            self.signer = Signer.load(config.cert, config.key)
            self.ca = CertificateAuthority.load(config.ca)
            # kept to say why the aggregator refuses our certificate, should it
            self._ca_certificates = x509.load_pem_x509_certificates(Path(config.ca).read_bytes())
        except CredentialError as exc:
            raise ConfigError(str(exc)) from None
        self.committee: CommitteeMember | None = None
        if self.private_key is not None:
            self.committee = CommitteeMember(
                self.private_key,
                self.signer,
                self.ca,
                self.federation,
                workers=config.decrypt_workers,
                constant_time=config.constant_time_decrypt,
            )
        self.result = ClientResult()
        self._prepared: OrderedDict[bytes, PreparedUpdate] = OrderedDict()
        # model digest -> the unmaskers its one update was masked for
        self._masked_for: OrderedDict[bytes, tuple[bytes, ...]] = OrderedDict()
        self._pool: EncryptionPool | None = None
        # (round id, the token of its grant): shown after a reconnect to resume the upload
        self._resume: tuple[int, bytes] | None = None
        self._seal_lock = threading.Lock()
        try:
            self._ssl = client_context(config.cert, config.key, config.ca)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise ConfigError(
                f"cannot use certificate {config.cert} with key {config.key} "
                f"and CA {config.ca}: {exc}"
            ) from None

    # ------------------------------------------------------------------ entry points
    def run_forever(self, server: str) -> ClientResult:
        """Blocking form of `run` (uvloop when installed, glibc tuned for frame buffers)."""
        tune_allocator()
        install_uvloop()
        return asyncio.run(self.run(server))

    async def run(self, server: str) -> ClientResult:
        """Take part until the aggregator says the federation is complete."""
        host, port = parse_server(server)
        config = self.config

        def count_reconnect() -> None:
            self.result.reconnects += 1

        try:
            await self._warm_up()
            await serve_reconnecting(
                peer=f"the aggregator at {server}",
                who="client",
                dial=lambda: connect(
                    host,
                    port,
                    self._ssl,
                    server_hostname=config.server_hostname or host,
                    config=self._transport_config(),
                ),
                session=self._session,
                backoff=Backoff(config.backoff_base, config.backoff_max),
                reconnect_attempts=config.reconnect_attempts,
                on_reconnect=count_reconnect,
                permanent_failure_retry=config.permanent_failure_retry,
                certificate=self.signer.certificate,
                ca_certificates=self._ca_certificates,
            )
            return self.result
        finally:
            if self._pool is not None:
                self._pool.close()
                self._pool = None
            if self.committee is not None:
                self.committee.close()

    async def _warm_up(self) -> None:
        """Before joining: fill the random-factor pool, warm the model up.

        The pinned federation gives the ciphertext count of an update, so the pool's
        background worker makes the first round's random factors now; the client joins
        once they are ready (or after `POOL_WARM_UP_SECONDS`). The model's one-time
        costs (torch's lazy imports on the first optimizer step) and the fixed-base
        table of the public key are paid here too, in a thread, not in round 1.
        """
        if self.federation.encrypted and self.config.encryption_pool and self._pool is None:
            # the codec the Welcome will give (same pinned federation, same model layout);
            # only its ciphertext count matters here
            session = SessionInfo(
                num_values=self.layout.numel,
                chunk_items=1,
                model_layout=self.layout.to_json(),
                rounds=1,
            )
            codec = codec_for(self.federation, session)
            assert isinstance(codec, EncryptedCodec)
            self._pool = EncryptionPool(codec.public_key, codec.item_count)
        t0 = time.perf_counter()
        await asyncio.to_thread(self._warm_up_work)
        pool = self._pool
        if pool is not None:
            # join with the first round's factors ready (bounded: a slow machine joins
            # anyway and makes the rest on the spot)
            deadline = t0 + POOL_WARM_UP_SECONDS
            while pool.available < pool.size and time.perf_counter() < deadline:
                await asyncio.sleep(0.1)
            log.info(
                "warmed up in %.1f s: %d of %d random factors ready",
                time.perf_counter() - t0,
                pool.available,
                pool.size,
            )

    def _warm_up_work(self) -> None:
        if self.federation.public_key is not None:
            self.federation.public_key._randomizer()  # the fixed-base table, built once
        self.pipeline.model.warm_up()

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
        credential = b"" if self.committee is None else self.committee.credential.to_wire()
        await conn.send(Hello(version=PROTOCOL_VERSION, committee=credential))
        welcome = await conn.receive()
        if not isinstance(welcome, Welcome):
            raise ProtocolError(f"expected Welcome, got {type(welcome).__name__}")
        codec = self._codec_for(welcome)
        log.info(
            "joined the federation as %s (%s, federation %s)",
            welcome.client_id,
            "encrypted" if codec.encrypted else "plaintext",
            self.federation.digest().hex()[:16],
        )
        if welcome.key_challenge and self.committee is not None:
            # drafted to decrypt only once this proves we hold the key (see decrypt_proof)
            proof = await asyncio.to_thread(
                self.committee.prove_key, welcome.client_id, welcome.key_challenge
            )
            if proof is not None:
                await conn.send(KeyProof(root=proof))
        send_lock = asyncio.Lock()
        round_task: asyncio.Task[None] | None = None
        grant: asyncio.Future[UploadGrant] | None = None
        side_tasks: set[asyncio.Task[None]] = set()
        fatal: list[BaseException] = []
        try:
            while True:
                message = await self._receive(conn, fatal)
                if isinstance(message, RoundStart):
                    if round_task is not None:
                        round_task.cancel()
                    grant = asyncio.get_running_loop().create_future()
                    round_task = asyncio.create_task(
                        self._do_round(conn, send_lock, codec, message, grant, fatal)
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
                elif isinstance(message, DecryptRequest | PartialDecryptRequest | UnmaskRequest):
                    task = asyncio.create_task(
                        self._serve_committee(conn, send_lock, codec, message)
                    )
                    side_tasks.add(task)
                    task.add_done_callback(side_tasks.discard)
        finally:
            if round_task is not None:
                round_task.cancel()
            for task in side_tasks:
                task.cancel()

    async def _receive(self, conn: Connection, fatal: list[BaseException]) -> object:
        """The next message; a fatal error found by a round task ends the session with it."""
        try:
            return await conn.receive()
        except (ProtocolError, OSError, ConnectionError):
            if fatal:
                raise fatal[0] from None
            raise

    def _codec_for(self, welcome: Welcome) -> UpdateCodec:
        try:
            offered = FederationParams.from_bytes(welcome.federation)
            session = SessionInfo.from_wire(welcome.session_config)
        except ValueError as exc:
            raise FederationMismatch(f"the aggregator's Welcome is malformed: {exc}") from None
        self.federation.require_same(offered, source="the pinned federation file")
        try:
            layout = ModelLayout.from_json(session.model_layout)
        except ValueError as exc:
            raise FederationMismatch(f"the aggregator's model layout is malformed: {exc}") from None
        if layout != self.layout:
            raise ConfigError(
                f"the aggregator's model layout differs from this client's: "
                f"{self.layout.difference(layout)} (aggregator: {layout.numel:,} values in "
                f"{len(layout.tensors)} tensors, this client: {self.layout.numel:,} in "
                f"{len(self.layout.tensors)}); start the aggregator with --model "
                "module:factory (and --model-kwargs) building this client's architecture"
            )
        return codec_for(self.federation, session)

    # ------------------------------------------------------------------ a round
    def _check_round_start(self, start: RoundStart) -> RoundPlan:
        """The round's plan, after checking it against what this client pinned."""
        pinned = self.federation
        if start.clip != pinned.clip:
            raise FederationMismatch(
                f"RoundStart clip {start.clip} differs from the pinned {pinned.clip}"
            )
        if start.value_bits != pinned.value_bits:
            raise FederationMismatch(
                f"RoundStart value_bits {start.value_bits} differs from the pinned "
                f"{pinned.value_bits}"
            )
        return RoundPlan.from_round_start(start.config, start.committee)

    def _unmaskers_of(self, plan: RoundPlan) -> tuple[bytes, ...]:
        """The verified mask keys of the round's unmaskers (CredentialError if any is bad)."""
        needed = self.federation.unmaskers
        if len(plan.committee) != needed:
            raise CredentialError(
                f"the round names {len(plan.committee)} unmaskers; the federation needs {needed}"
            )
        keys = []
        fed = self.federation.digest()
        for raw in plan.committee:
            credential = CommitteeCredential.from_wire(raw)
            credential.verify(self.ca, federation=fed)
            keys.append(credential.mask_public)
        if len(set(keys)) != len(keys):
            raise CredentialError("the round names the same unmasker twice")
        return tuple(keys)

    async def _do_round(
        self,
        conn: Connection,
        send_lock: asyncio.Lock,
        codec: UpdateCodec,
        start: RoundStart,
        grant: asyncio.Future[UploadGrant],
        fatal: list[BaseException],
    ) -> None:
        """Train and seal (once per model version), ask for an upload slot, stream when granted."""
        try:
            plan = self._check_round_start(start)
            unmaskers: tuple[bytes, ...] = ()
            if isinstance(codec, EncryptedCodec):
                unmaskers = self._unmaskers_of(plan)
            digest = model_digest(start.weights)
            prepared = self._prepared_update(start.round_id, digest, unmaskers)
            if prepared is None and digest in self._masked_for:
                return  # refused: see _prepared_update
            if prepared is None:
                names = tuple(name for name, _ in self.federation.report_metrics)
                try:
                    trained = await asyncio.to_thread(
                        self.pipeline.train, start.weights, plan.config(), names
                    )
                except FedcoreError:
                    raise
                except Exception as exc:
                    # the app's model code failed (an ArrayModel's train or evaluate):
                    # it would fail the same way every round, so it stops the client
                    raise CallbackError(f"local training failed: {describe(exc)}") from exc
                prepared = await asyncio.to_thread(self._seal, trained, codec, unmaskers)
                self._keep(prepared)
            token = b""
            if isinstance(codec, EncryptedCodec):
                token = (
                    ContributorToken(
                        federation=self.federation.digest(),
                        round_id=start.round_id,
                        model_digest=digest,
                        client_public=prepared.client_public,
                        unmaskers=unmaskers,
                        item_count=prepared.item_count,
                        upload_digest=prepared.digest,
                        certificate=self.signer.certificate_der,
                    )
                    .signed_by(self.signer)
                    .to_wire()
                )
            await self._upload(conn, send_lock, start.round_id, prepared, token, grant)
        except asyncio.CancelledError:
            raise
        except CredentialError as exc:
            self.result.rounds_refused += 1
            log.warning("round %d: not contributing: %s", start.round_id, exc)
        except FedcoreError as exc:
            # final: the session raises it and the reconnect loop logs it, once
            fatal.append(exc)
            log.debug("round %d: %s", start.round_id, exc, exc_info=True)
            with contextlib.suppress(Exception):
                await conn.close(reason=f"client stops: {exc}"[:1000])
        except (ProtocolError, OSError, ConnectionError) as exc:
            log.info("round %d upload interrupted: %s", start.round_id, exc)
        except Exception:
            log.exception("round %d failed on this client", start.round_id)
            with contextlib.suppress(Exception):
                await conn.close(reason="client error")

    def _prepared_update(
        self, round_id: int, digest: bytes, unmaskers: tuple[bytes, ...]
    ) -> PreparedUpdate | None:
        """The update already made for this model version, if it may be sent again.

        None with ``digest`` not yet remembered: make one. None with it remembered: the
        round is refused. A client makes one update per model version, masked for one
        set of unmaskers: a rerun gets the same bytes, never a re-trained or re-masked
        update whose sum the aggregator could subtract from the first one's.
        """
        earlier = self._masked_for.get(digest)
        if earlier is None:
            return None
        prepared = self._prepared.get(digest)
        why = ""
        if earlier != unmaskers:
            why = "our update for this model version was masked for other unmaskers"
        elif prepared is None:
            why = "our update for this model version is no longer kept; we make only one"
        if why:
            self.result.rounds_refused += 1
            log.warning("round %d: refusing to contribute: %s (rerun protection)", round_id, why)
            return None
        log.info("round %d: sending the update already made for this model version", round_id)
        return prepared

    def _seal(
        self, trained: TrainedUpdate, codec: UpdateCodec, unmaskers: tuple[bytes, ...]
    ) -> PreparedUpdate:
        # A cancelled round's thread may still be sealing: the pool serves one at a time.
        with self._seal_lock:
            return seal(trained, codec, self.federation, unmaskers, self._pool)

    def _keep(self, prepared: PreparedUpdate) -> None:
        """Remember an update (the last few) and whom its model version was masked for."""
        self._prepared[prepared.model_digest] = prepared
        while len(self._prepared) > _KEPT_UPDATES:
            self._prepared.popitem(last=False)
        self._masked_for[prepared.model_digest] = prepared.unmaskers
        while len(self._masked_for) > _REMEMBERED_MODELS:
            self._masked_for.popitem(last=False)

    async def _upload(
        self,
        conn: Connection,
        send_lock: asyncio.Lock,
        round_id: int,
        prepared: PreparedUpdate,
        token: bytes,
        grant: asyncio.Future[UploadGrant],
    ) -> None:
        t_wait = time.perf_counter()
        resume = self._resume
        resume_token = resume[1] if resume is not None and resume[0] == round_id else b""
        async with send_lock:
            await conn.send(UploadRequest(round_id=round_id, resume_token=resume_token))
        granted = await grant
        if granted.start_seq > len(prepared.payloads):
            raise ProtocolError("aggregator claims more chunks than the update has")
        self._resume = (round_id, granted.resume_token)
        t_upload = time.perf_counter()
        for seq in range(granted.start_seq, len(prepared.payloads)):
            async with send_lock:
                await conn.send(
                    UpdateChunk(round_id=round_id, seq=seq, payload=prepared.payloads[seq])
                )
            self.result.bytes_uploaded += len(prepared.payloads[seq])
        report = ClientReport(
            timings={
                **prepared.timings,
                "grant_wait_s": t_upload - t_wait,
                "upload_s": time.perf_counter() - t_upload,
            },
            iterations=prepared.iterations,
        )
        timings, metrics = report.to_wire()
        async with send_lock:
            await conn.send(
                UpdateDone(
                    round_id=round_id,
                    chunk_count=len(prepared.payloads),
                    item_count=prepared.item_count,
                    digest=prepared.digest,
                    token=token,
                    timings=timings,
                    metrics=metrics,
                )
            )

    def _load_key_secret(self, config: ClientConfig) -> PrivateKey | KeyShare | None:
        """The private key or key share this client decrypts with, checked against the pin."""
        federation = self.federation
        if config.private_key is not None and config.key_share is not None:
            raise ConfigError("give a private key or a key share, not both")
        if config.key_share is not None:
            if federation.threshold_key is None:
                raise ConfigError(
                    f"{config.key_share} is a threshold key share, but the federation's key "
                    f"mode is {federation.mode!r}; use the private key (--private-key)"
                )
            share = KeyShare.load(config.key_share)
            if share.public_key != federation.threshold_key:
                raise ConfigError(
                    f"key share {config.key_share} belongs to threshold key "
                    f"{share.public_key.fingerprint()}..., not the federation's "
                    f"{federation.threshold_key.fingerprint()}..."
                )
            return share
        if config.private_key is None or not federation.encrypted:
            return None
        if federation.mode == "threshold":
            raise ConfigError(
                "a threshold federation has no whole private key; give this member its "
                "key share (--key-share share-<i>.json)"
            )
        private_key = PrivateKey.load(config.private_key)
        if private_key.public_key != federation.public_key:
            raise ConfigError(
                f"private key {config.private_key} does not belong to the federation's public key"
            )
        return private_key

    # ------------------------------------------------------------------ committee work
    async def _serve_committee(
        self,
        conn: Connection,
        send_lock: asyncio.Lock,
        codec: UpdateCodec,
        request: DecryptRequest | PartialDecryptRequest | UnmaskRequest,
    ) -> None:
        member = self.committee
        try:
            if member is None or not isinstance(codec, EncryptedCodec):
                raise CommitteeRefusal("this client holds no private key")
            if isinstance(request, DecryptRequest):
                result: object = await member.decrypt(request, codec)
                self.result.shards_decrypted += 1
            elif isinstance(request, PartialDecryptRequest):
                result = await member.partial_decrypt(request, codec)
                self.result.shards_decrypted += 1
            else:
                result = await member.unmask(request, codec)
                self.result.shards_unmasked += 1
        except CommitteeRefusal as exc:
            self.result.requests_refused += 1
            log.warning(
                "refused the aggregator's %s for round %d: %s",
                type(request).__name__,
                request.round_id,
                exc,
            )
            with contextlib.suppress(Exception):
                await conn.close(
                    reason="committee request refused",
                    error=Error(code=int(exc.code), reason=str(exc)[:1000]),
                )
            return
        async with send_lock:
            await conn.send(result)  # type: ignore[arg-type]
