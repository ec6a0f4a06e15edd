"""A hostile peer's tools: a hand-driven mutual-TLS protocol connection and the frames it sends.

`Peer` holds one real certificate of the federation (``fedcore certs``) and writes
whatever frames an attack asks for, in any order, bypassing every client-side rule;
it reads the aggregator's answers with the protocol's own sans-IO decoder. The frame
builders make the byte strings of issue #17's attacks: a msgpack bomb (millions of
empty arrays inside one frame under the size limit), a frame cut one byte short, a
Heartbeat. `seal_update` makes a valid masked, encrypted update and its signed token,
as an honest client would, for the attacks that need one (the victim of an upload
takeover). Plain asyncio + ssl; this module knows nothing of daemons or measurements.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import math
import ssl
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedcore.client.committee import CommitteeMember
from fedcore.client.pipeline import TrainedUpdate, model_digest, seal
from fedcore.codec import EncryptedCodec, codec_for
from fedcore.contracts import FederationParams, SessionInfo
from fedcore.credentials import CommitteeCredential, ContributorToken, Signer
from fedcore.crypto.masking import public_key_bytes
from protocol.errors import ErrorCode
from protocol.framing import (
    CLIENT_MAX_FRAME_SIZE,
    CLOSED,
    DEFAULT_MAX_FRAME_SIZE,
    MAGIC,
    MAX_CONTAINER_LEN,
    NEED_DATA,
    FrameDecoder,
    encode_frame,
)
from protocol.messages import (
    PROTOCOL_VERSION,
    Bye,
    Error,
    Heartbeat,
    Hello,
    KeyProof,
    Message,
    RoundStart,
    Welcome,
)
from protocol.tls import client_context

__all__ = [
    "CONNECT_TIMEOUT_S",
    "Peer",
    "SealedUpdate",
    "bomb_frame",
    "describe",
    "frame",
    "heartbeat_frame",
    "keyless_credential",
    "partial_frame",
    "random_ciphertexts",
    "seal_update",
]

CONNECT_TIMEOUT_S = 30.0
_HEADER = struct.Struct(">2sBBI")
_READ_SIZE = 256 * 1024
# msgpack: an empty array is one byte (0x90); an array of 16..65535 elements has a
# 3-byte header (0xdc + big-endian length).
_EMPTY_ARRAY = b"\x90"
_ARRAY16 = b"\xdc"


# ---------------------------------------------------------------------------- frames
def frame(type_id: int, body: bytes, *, length: int | None = None) -> bytes:
    """A frame header announcing ``length`` (default: the body's) body bytes, then ``body``."""
    announced = len(body) if length is None else length
    return _HEADER.pack(MAGIC, PROTOCOL_VERSION, type_id, announced) + body


def bomb_frame(type_id: int, *, limit: int = DEFAULT_MAX_FRAME_SIZE) -> tuple[bytes, int]:
    """A frame whose body is valid msgpack of millions of empty arrays, under ``limit``.

    The body is the map ``{"committee": [A, A, ...]}`` where each ``A`` holds 1,024
    arrays of 1,024 empty arrays: every container is within the decoder's per-container
    limit (``MAX_CONTAINER_LEN``), each empty array costs one byte on the wire and a
    Python list (~60-80 bytes) once unpacked. Returns the frame and how many empty
    arrays it holds (7,340,032 at the 8 MiB limit).
    """
    width = MAX_CONTAINER_LEN
    inner = _ARRAY16 + width.to_bytes(2, "big") + _EMPTY_ARRAY * width
    middle = _ARRAY16 + width.to_bytes(2, "big") + inner * width
    prefix = b"\x81" + msgpack.packb("committee")
    count = min(15, (limit - len(prefix) - 1) // len(middle))  # a fixarray holds 15
    if count < 1:
        raise ValueError(f"limit must leave room for one block of {len(middle)} bytes")
    body = prefix + bytes([0x90 | count]) + middle * count
    return frame(type_id, body), count * width * width


def partial_frame(type_id: int, *, size: int = DEFAULT_MAX_FRAME_SIZE) -> bytes:
    """A header announcing a ``size``-byte body followed by all of it but the last byte."""
    return frame(type_id, bytes(size - 1), length=size)


def heartbeat_frame() -> bytes:
    """One valid Heartbeat frame."""
    return encode_frame(Heartbeat(sent_at=time.time()))


# ---------------------------------------------------------------------------- a connection
@functools.lru_cache(maxsize=64)
def _tls_context(pki: Path, identity: str) -> ssl.SSLContext:
    """One client context per certificate, shared by all its connections."""
    return client_context(pki / f"{identity}.pem", pki / f"{identity}.key", pki / "ca.pem")


class Peer:
    """One mutual-TLS connection with a federation certificate, driven frame by frame."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, identity: str
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.identity = identity
        self.decoder = FrameDecoder(max_frame_size=CLIENT_MAX_FRAME_SIZE)
        self.welcome: Welcome | None = None
        self.bytes_sent = 0

    @classmethod
    async def open(
        cls, pki: Path, identity: str, port: int, *, timeout: float = CONNECT_TIMEOUT_S
    ) -> Peer:
        """A TLS connection to 127.0.0.1:``port`` with ``identity``'s certificate (no Hello)."""
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1",
                port,
                ssl=_tls_context(pki, identity),
                server_hostname="localhost",
                ssl_handshake_timeout=timeout,
                limit=_READ_SIZE,
            )
        return cls(reader, writer, identity)

    async def hello(
        self, *, committee: bytes = b"", member: CommitteeMember | None = None
    ) -> Welcome:
        """Hello, Welcome; with ``member``, its credential and the KeyProof it asks for."""
        if member is not None:
            committee = member.credential.to_wire()
        await self.send(Hello(version=PROTOCOL_VERSION, committee=committee))
        welcome = await self.receive(CONNECT_TIMEOUT_S)
        if not isinstance(welcome, Welcome):
            raise ConnectionError(f"{self.identity}: expected Welcome, got {welcome!r}")
        self.welcome = welcome
        if member is not None and welcome.key_challenge:
            root = await asyncio.to_thread(
                member.prove_key, welcome.client_id, welcome.key_challenge
            )
            if root is not None:
                await self.send(KeyProof(root=root))
        return welcome

    def codec(self, federation: FederationParams) -> EncryptedCodec:
        """The update codec the Welcome's session settings give for ``federation``."""
        assert self.welcome is not None, "hello() first"
        codec = codec_for(federation, SessionInfo.from_wire(self.welcome.session_config))
        assert isinstance(codec, EncryptedCodec)
        return codec

    async def send(self, message: Message) -> None:
        """Encode and send one message."""
        await self.send_raw(encode_frame(message))

    async def send_raw(self, data: bytes) -> None:
        """Write bytes as they are and wait until the kernel took them."""
        self.writer.write(data)
        await self.writer.drain()
        self.bytes_sent += len(data)

    async def receive(self, timeout: float) -> Message | None:
        """The next message other than a Heartbeat, or None at EOF or reset.

        Raises ``TimeoutError`` when nothing arrives within ``timeout``.
        """
        while True:
            event = self.decoder.next_event()
            if event is CLOSED:
                return None
            if event is NEED_DATA:
                try:
                    async with asyncio.timeout(timeout):
                        data = await self.reader.read(_READ_SIZE)
                except TimeoutError:
                    raise  # an OSError too: not an end of the stream
                except (ConnectionError, OSError, ssl.SSLError):
                    return None
                self.decoder.receive_data(data)
                continue
            if isinstance(event, Heartbeat):
                continue
            return event  # type: ignore[return-value]

    async def outcome(self, timeout: float) -> str:
        """How the aggregator ends this connection: its Error code's name, ``bye`` (a
        Bye), ``closed`` (EOF or reset without either), or ``open`` after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                message = await self.receive(max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                return "open"
            except Exception:  # our decoder refusing its bytes: the stream is over for us
                return "closed"
            if message is None:
                return "closed"
            if isinstance(message, Error):
                return ErrorCode(message.code).name
            if isinstance(message, Bye):
                return "bye"

    def abort(self) -> None:
        """Drop the connection the way a killed process does: no Bye, no close_notify."""
        self.writer.transport.abort()

    async def close(self) -> None:
        """Close the TLS stream (best effort, bounded)."""
        self.writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), 5)


def keyless_credential(pki: Path, identity: str, federation: FederationParams) -> bytes:
    """A valid committee credential (signed by ``identity``) from a client holding no key."""
    signer = Signer.load(pki / f"{identity}.pem", pki / f"{identity}.key")
    mask_public = public_key_bytes(X25519PrivateKey.generate())
    return CommitteeCredential.issue(
        signer, federation=federation.digest(), mask_public=mask_public
    ).to_wire()


# ---------------------------------------------------------------------------- an honest update
@dataclass(slots=True)
class SealedUpdate:
    """A masked, encrypted update as chunk payloads, with the signed token that names it."""

    payloads: list[bytes]
    token: bytes
    item_count: int

    @property
    def digest(self) -> bytes:
        """SHA-256 of every payload byte, as UpdateDone carries it."""
        return hashlib.sha256(b"".join(self.payloads)).digest()


def seal_update(
    start: RoundStart,
    codec: EncryptedCodec,
    federation: FederationParams,
    signer: Signer,
    *,
    value: float = 0.0,
    samples: int = 100,
) -> SealedUpdate:
    """What an honest client uploads for ``start`` when its update is ``value`` everywhere.

    CPU-bound (one encryption per ciphertext): call it in a thread.
    """
    unmaskers = tuple(CommitteeCredential.from_wire(raw).mask_public for raw in start.committee)
    trained = TrainedUpdate(
        model_digest=model_digest(start.weights),
        update=np.full(codec.n_values, value, dtype=np.float32),
        samples=samples,
        report=None,
        timings={},
        iterations=1,
    )
    prepared = seal(trained, codec, federation, unmaskers, None)
    payloads = list(prepared.payloads)
    token = ContributorToken(
        federation=federation.digest(),
        round_id=start.round_id,
        model_digest=prepared.model_digest,
        client_public=prepared.client_public,
        unmaskers=prepared.unmaskers,
        item_count=prepared.item_count,
        upload_digest=hashlib.sha256(b"".join(payloads)).digest(),
        certificate=signer.certificate_der,
    ).signed_by(signer)
    return SealedUpdate(payloads=payloads, token=token.to_wire(), item_count=prepared.item_count)


def random_ciphertexts(codec: EncryptedCodec, count: int, seed: int) -> bytes:
    """``count`` valid ciphertexts of unknown plaintexts (random units mod n²), serialized."""
    rng = np.random.default_rng(seed)
    n = int(codec.public_key.n)
    width = codec.public_key.ciphertext_bytes
    values: list[int] = []
    while len(values) < count:
        candidate = int.from_bytes(rng.bytes(width), "big") % (n * n)
        if math.gcd(candidate, n) == 1:
            values.append(candidate)
    return b"".join(v.to_bytes(width, "big") for v in values)


def describe(obj: Any) -> str:
    """A short name for a received message (or None) in attack reports."""
    return "EOF" if obj is None else type(obj).__name__
