"""The scale benchmark's load generator: many simulated fedcore clients per process.

Each spawned process runs N connections in one asyncio (uvloop) event loop, each with
its own client certificate (the aggregator identifies a client by its certificate CN,
so connections may not share one). Every connection speaks protocol 3 as
`fedcore.client` does: Hello, Welcome (the federation document checked against the one
the process pinned, the codec built from it), RoundStart (the unmaskers' signed
credentials verified against the CA), UploadRequest, UploadGrant, UpdateChunk...,
UpdateDone with a contributor token signed by that connection's certificate key, Ack;
all through ``protocol.transport.connect``. Updates are masked with the shortcut of
`bench.masked_upload`: by default one ephemeral mask key per process and round, shared
by its connections (``per_client_masks``: one per connection). One connection per key
process holds the private key, sends its signed committee credential in Hello, and
answers DecryptRequest and UnmaskRequest through `fedcore.client.committee.CommitteeMember`
with every check a real member makes. Idle mode (no upload) holds connections until
released.

The figures are the load generator's own: it times its masking and signing and counts
what it sent; the committee seconds are the ones `CommitteeMember` reports in each
result. `bench.load_processes` spawns these processes and merges what they write. This
module knows nothing of how the aggregator is run or measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import pickle
import random
import resource
import socket
import ssl
import time
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from bench.masked_upload import EncryptedUpdate, MaskedUpload
from fedcore.client.committee import CommitteeMember, CommitteeRefusal
from fedcore.client.pipeline import model_digest
from fedcore.codec import EncryptedCodec, codec_for
from fedcore.contracts import FederationParams, SessionInfo
from fedcore.credentials import (
    CertificateAuthority,
    CommitteeCredential,
    ContributorToken,
    CredentialError,
    Signer,
)
from fedcore.crypto import PrivateKey
from protocol.errors import ConnectionClosed, ErrorCode, ErrorReceived, ProtocolError
from protocol.framing import CLIENT_MAX_FRAME_SIZE
from protocol.messages import (
    PROTOCOL_VERSION,
    Ack,
    DecryptRequest,
    Error,
    Hello,
    KeyProof,
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
from protocol.transport import Connection, TransportConfig, connect, install_uvloop

__all__ = ["REFUSALS_KEPT", "LoadSpec", "load_process"]

REFUSALS_KEPT = 5
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


# ---------------------------------------------------------------------------- one process
@dataclass(frozen=True, slots=True, kw_only=True)
class LoadSpec:
    """What one load-generator process does (plain values: it is pickled to the process)."""

    indices: tuple[int, ...]
    key_holders: tuple[int, ...]
    port: int
    pki: str
    private_key: str
    federation: bytes  # the federation document this process pins (b"": idle, unchecked)
    upload_file: str | None  # None: idle mode, hold the connection until released
    per_client_masks: bool
    decrypt_workers: int
    connect_concurrency: int
    connect_attempts: int
    send_buffer: int
    timeout_s: float
    result_file: str
    ports: tuple[int, ...] = ()
    """Each index's port (a relay's, in relay runs), in ``indices`` order; () = ``port``."""


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
    federation_mismatches: int = 0
    credential_failures: int = 0
    uploads_sent: int = 0
    acked: int = 0
    last_ack: float = 0.0
    masked_uploads: int = 0
    mask_s: float = 0.0
    tokens_signed: int = 0
    sign_s: float = 0.0
    token_bytes: int = 0
    shards_decrypted: int = 0
    decrypt_s: float = 0.0
    shards_unmasked: int = 0
    unmask_s: float = 0.0
    requests_refused: int = 0
    refusals: list[str] = field(default_factory=list)
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
    """Enc(q) and what it was made for, as the parent prepared it."""

    payloads: list[bytes]
    item_count: int
    weight: int


@dataclass(frozen=True, slots=True)
class _Identity:
    """One connection's certificate: its TLS context and the signer of its tokens."""

    context: ssl.SSLContext
    signer: Signer


class _LoadGenerator:
    """Many simulated clients in one event loop, speaking protocol 3 like fedcore.Client."""

    def __init__(
        self,
        spec: LoadSpec,
        identities: dict[int, _Identity],
        upload: _Upload | None,
        private_key: PrivateKey | None,
        release: Any,
        connected: Any,
    ) -> None:
        self.spec = spec
        self.identities = identities
        self.upload = upload
        self.private_key = private_key
        self.release = release  # multiprocessing Event: idle clients close when it is set
        self.connected_counter = connected  # multiprocessing Value shared with the parent
        self.stats = _LoadStats(clients=len(spec.indices))
        self._released = asyncio.Event()
        self._gate = asyncio.Semaphore(spec.connect_concurrency or len(spec.indices) or 1)
        self._ports = dict(zip(spec.indices, spec.ports, strict=True)) if spec.ports else {}
        self.ca = CertificateAuthority.load(Path(spec.pki) / "ca.pem")
        self.federation = FederationParams.from_bytes(spec.federation) if spec.federation else None
        self.member: CommitteeMember | None = None
        if self.federation is not None and private_key is not None and spec.key_holders:
            self.member = CommitteeMember(
                private_key,
                identities[spec.key_holders[0]].signer,
                self.ca,
                self.federation,
                workers=spec.decrypt_workers,
            )
        self._codec: EncryptedCodec | None = None
        self._encrypted: EncryptedUpdate | None = None
        self._unmaskers: dict[tuple[bytes, ...], tuple[bytes, ...]] = {}
        self._shared: dict[tuple[bytes, tuple[bytes, ...]], asyncio.Task[MaskedUpload]] = {}

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
        credential = b""
        if self.member is not None and index in self.spec.key_holders:
            credential = self.member.credential.to_wire()
        for attempt in range(self.spec.connect_attempts):
            conn: Connection | None = None
            try:
                async with self._gate:
                    conn = await connect(
                        "127.0.0.1",
                        self._ports.get(index, self.spec.port),
                        self.identities[index].context,
                        server_hostname="localhost",
                        config=_CLIENT_TRANSPORT,
                    )
                    await conn.send(Hello(version=PROTOCOL_VERSION, committee=credential))
                    welcome = await conn.receive()
                if not isinstance(welcome, Welcome):
                    raise ProtocolError(f"expected Welcome, got {type(welcome).__name__}")
                if credential and welcome.key_challenge and self.member is not None:
                    # drafted to decrypt and unmask only once it proves it holds the key
                    proof = self.member.prove_key(welcome.client_id, welcome.key_challenge)
                    if proof is not None:
                        await conn.send(KeyProof(root=proof))
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
                await self._serve(conn, welcome, index)
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

    def _codec_for(self, welcome: Welcome) -> EncryptedCodec | None:
        """The codec of a Welcome that offers the pinned federation (None otherwise)."""
        if self.federation is None or welcome.federation != self.spec.federation:
            self.stats.federation_mismatches += 1
            return None
        if self._codec is None:
            codec = codec_for(self.federation, SessionInfo.from_wire(welcome.session_config))
            if not isinstance(codec, EncryptedCodec):
                return None
            assert self.upload is not None
            if codec.item_count != self.upload.item_count:
                raise ProtocolError(
                    f"aggregator expects {codec.item_count} ciphertexts; the prepared update "
                    f"has {self.upload.item_count} (model or packing differ)"
                )
            self._encrypted = EncryptedUpdate.from_payloads(self.upload.payloads, codec)
            self._codec = codec
        return self._codec

    def _unmasker_keys(self, committee: tuple[bytes, ...]) -> tuple[bytes, ...]:
        """The verified mask keys of a RoundStart's unmaskers (cached per credential set)."""
        keys = self._unmaskers.get(committee)
        if keys is None:
            assert self.federation is not None
            if len(committee) != self.federation.unmaskers:
                raise CredentialError(f"the round names {len(committee)} unmaskers")
            fed = self.federation.digest()
            parsed = [CommitteeCredential.from_wire(raw) for raw in committee]
            for credential in parsed:
                credential.verify(self.ca, federation=fed)
            keys = tuple(credential.mask_public for credential in parsed)
            self._unmaskers[committee] = keys
        return keys

    async def _masked(self, model: bytes, unmaskers: tuple[bytes, ...]) -> MaskedUpload:
        """This connection's masked update: its own, or the process's shared one."""
        if self.spec.per_client_masks:
            return await self._mask(model, unmaskers)
        key = (model, unmaskers)
        task = self._shared.get(key)
        if task is None:
            task = asyncio.create_task(self._mask(model, unmaskers))
            self._shared[key] = task
        return await task

    async def _mask(self, model: bytes, unmaskers: tuple[bytes, ...]) -> MaskedUpload:
        assert self._encrypted is not None and self._codec is not None
        assert self.federation is not None
        encrypted, codec, fed = self._encrypted, self._codec, self.federation.digest()

        def mask() -> tuple[MaskedUpload, float]:
            started = time.thread_time()  # this thread's CPU: the masking alone
            masked = encrypted.masked(codec, fed, model, unmaskers)
            return masked, time.thread_time() - started

        masked, seconds = await asyncio.to_thread(mask)
        self.stats.masked_uploads += 1
        self.stats.mask_s += seconds
        return masked

    def _token(
        self, index: int, round_id: int, model: bytes, upload: MaskedUpload, unmaskers: Any
    ) -> bytes:
        """This connection's signed contributor token, as `fedcore.client` builds it."""
        assert self.federation is not None and self._encrypted is not None
        signer = self.identities[index].signer
        started = time.perf_counter()
        token = (
            ContributorToken(
                federation=self.federation.digest(),
                round_id=round_id,
                model_digest=model,
                client_public=upload.client_public,
                unmaskers=unmaskers,
                item_count=self._encrypted.item_count,
                upload_digest=upload.digest,
                certificate=signer.certificate_der,
            )
            .signed_by(signer)
            .to_wire()
        )
        self.stats.tokens_signed += 1
        self.stats.sign_s += time.perf_counter() - started
        self.stats.token_bytes = max(self.stats.token_bytes, len(token))
        return token

    async def _serve(self, conn: Connection, welcome: Welcome, index: int) -> None:
        """Answer RoundStart with the upload and committee requests with results, until Bye."""
        codec = self._codec_for(welcome)
        if codec is None:
            await conn.close(reason="bench: the federation differs from the pinned one")
            return
        lock = asyncio.Lock()
        tasks: set[asyncio.Task[None]] = set()
        prepared: dict[int, tuple[MaskedUpload, bytes]] = {}  # round id -> upload, token
        try:
            while True:
                message: Any = await conn.receive()
                if isinstance(message, RoundStart):
                    now = time.time()
                    self.stats.first_round_start = self.stats.first_round_start or now
                    self.stats.last_round_start = now
                    round_id, model = message.round_id, model_digest(message.weights)
                    committee = message.committee
                    message = None  # drop the 2 MB of global weights now
                    task = asyncio.create_task(
                        self._prepare(conn, lock, index, round_id, model, committee, prepared)
                    )
                elif isinstance(message, UploadGrant):
                    ready = prepared.get(message.round_id)
                    if ready is None:
                        self.stats.errors["grant_without_request"] += 1
                        continue
                    task = asyncio.create_task(
                        self._send_update(conn, lock, message.round_id, message.start_seq, *ready)
                    )
                elif isinstance(message, DecryptRequest | UnmaskRequest):
                    task = asyncio.create_task(self._committee(conn, lock, codec, message))
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

    async def _prepare(
        self,
        conn: Connection,
        lock: asyncio.Lock,
        index: int,
        round_id: int,
        model: bytes,
        committee: tuple[bytes, ...],
        prepared: dict[int, tuple[MaskedUpload, bytes]],
    ) -> None:
        """Check the unmaskers, mask and sign the update, then ask for an upload slot."""
        try:
            unmaskers = self._unmasker_keys(committee)
        except CredentialError as exc:
            self.stats.credential_failures += 1
            if len(self.stats.refusals) < REFUSALS_KEPT:
                self.stats.refusals.append(f"unmasker credential: {exc}")
            return  # a real client does not contribute to such a round either
        try:
            masked = await self._masked(model, unmaskers)
            prepared[round_id] = (masked, self._token(index, round_id, model, masked, unmaskers))
            async with lock:
                await conn.send(UploadRequest(round_id=round_id))
        except (ProtocolError, OSError) as exc:
            self.stats.errors[f"prepare:{type(exc).__name__}"] += 1

    async def _send_update(
        self,
        conn: Connection,
        lock: asyncio.Lock,
        round_id: int,
        start_seq: int,
        upload: MaskedUpload,
        token: bytes,
    ) -> None:
        assert self._encrypted is not None
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
                        item_count=self._encrypted.item_count,
                        digest=upload.digest,
                        token=token,
                    )
                )
            self.stats.uploads_sent += 1
        except (ProtocolError, OSError) as exc:
            self.stats.errors[f"upload:{type(exc).__name__}"] += 1

    async def _committee(
        self,
        conn: Connection,
        lock: asyncio.Lock,
        codec: EncryptedCodec,
        request: DecryptRequest | UnmaskRequest,
    ) -> None:
        """Serve one committee request through `CommitteeMember`, every check included."""
        kind = "decrypt" if isinstance(request, DecryptRequest) else "unmask"
        try:
            if self.member is None:
                raise CommitteeRefusal("this connection holds no private key")
            if isinstance(request, DecryptRequest):
                result: Any = await self.member.decrypt(request, codec)
            else:
                result = await self.member.unmask(request, codec)
            async with lock:
                await conn.send(result)
        except CommitteeRefusal as exc:
            self.stats.requests_refused += 1
            if len(self.stats.refusals) < REFUSALS_KEPT:
                self.stats.refusals.append(f"{kind}: {exc}")
            with contextlib.suppress(Exception):
                await conn.close(
                    reason="committee request refused",
                    error=Error(
                        code=int(getattr(exc, "code", ErrorCode.REQUEST_REFUSED)),
                        reason=str(exc)[:1000],
                    ),
                )
            return
        except (ProtocolError, OSError, ValueError) as exc:
            self.stats.errors[f"{kind}:{type(exc).__name__}"] += 1
            return
        if kind == "decrypt":
            self.stats.shards_decrypted += 1
            self.stats.decrypt_s += result.seconds
        else:
            self.stats.shards_unmasked += 1
            self.stats.unmask_s += result.seconds


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


def _own_peak_rss_mb() -> float:
    """This process's VmHWM in MB (ru_maxrss would keep the spawning parent's across exec)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def load_process(spec: LoadSpec, barrier: Any, release: Any, connected: Any) -> None:
    """Entry point of a spawned load-generator process; writes its stats as JSON."""
    install_uvloop()
    pki = Path(spec.pki)
    t0 = time.perf_counter()
    identities = {
        i: _Identity(
            client_context(pki / f"client-{i}.pem", pki / f"client-{i}.key", pki / "ca.pem"),
            Signer.load(pki / f"client-{i}.pem", pki / f"client-{i}.key"),
        )
        for i in spec.indices
    }
    context_s = time.perf_counter() - t0
    upload = None
    if spec.upload_file is not None:
        record = pickle.loads(Path(spec.upload_file).read_bytes())
        upload = _Upload(record["payloads"], record["item_count"], record["weight"])
    private_key = PrivateKey.load(spec.private_key) if spec.key_holders else None
    barrier.wait(timeout=900)
    generator = _LoadGenerator(spec, identities, upload, private_key, release, connected)
    stats = asyncio.run(generator.run())
    usage = resource.getrusage(resource.RUSAGE_SELF)
    stats.context_s = context_s
    stats.cpu_s = usage.ru_utime + usage.ru_stime
    stats.peak_rss_mb = _own_peak_rss_mb() or usage.ru_maxrss / 1024
    out = {f.name: getattr(stats, f.name) for f in fields(stats)}
    Path(spec.result_file).write_text(json.dumps(out))  # Counters serialize as objects
