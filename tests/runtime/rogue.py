"""A misbehaving client for tests: real TLS, real masked ciphertexts and signed tokens, but
it writes whatever frames the test asks for, bypassing the client-side session checks."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedcore.client.pipeline import PreparedUpdate, TrainedUpdate, model_digest, seal
from fedcore.codec import EncryptedCodec, codec_for
from fedcore.contracts import FederationParams, SessionInfo, key_proof_context
from fedcore.credentials import (
    CertificateAuthority,
    CommitteeCredential,
    ContributorToken,
    Signer,
)
from fedcore.crypto import PrivateKey
from fedcore.crypto.masking import public_key_bytes
from protocol.framing import CLIENT_MAX_FRAME_SIZE, CLOSED, NEED_DATA, FrameDecoder, encode_frame
from protocol.messages import (
    PROTOCOL_VERSION,
    Error,
    Heartbeat,
    Hello,
    KeyProof,
    RoundStart,
    UpdateChunk,
    UpdateDone,
    UploadGrant,
    UploadRequest,
    Welcome,
)
from protocol.tls import client_context


class RogueClient:
    """Speaks the protocol by hand over a real mutual-TLS connection."""

    def __init__(self, pki: Path, index: int, *, identity: str | None = None) -> None:
        name = identity or f"client-{index}"  # e.g. "relay-0": a relay's certificate
        self.ctx = client_context(pki / f"{name}.pem", pki / f"{name}.key", pki / "ca.pem")
        self.signer = Signer.load(pki / f"{name}.pem", pki / f"{name}.key")
        self.ca = CertificateAuthority.load(pki / "ca.pem")
        self.decoder = FrameDecoder(max_frame_size=CLIENT_MAX_FRAME_SIZE)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.received: list[Any] = []
        self.codec: EncryptedCodec | None = None
        self.federation: FederationParams | None = None
        self.prepared: PreparedUpdate | None = None

    async def connect(
        self,
        port: int,
        *,
        committee: bytes = b"",
        relay: str = "",
        key: PrivateKey | None = None,
    ) -> Welcome:
        """Hello, Welcome, and with ``key`` the KeyProof that gets a key holder drafted."""
        self.reader, self.writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=self.ctx, server_hostname="localhost"
        )
        await self.send(Hello(version=PROTOCOL_VERSION, committee=committee, relay=relay))
        welcome = await self.expect(Welcome)
        self.federation = FederationParams.from_bytes(welcome.federation)
        if key is not None and welcome.key_challenge:
            context = key_proof_context(
                self.federation.digest(), welcome.client_id, welcome.key_challenge
            )
            await self.send(KeyProof(root=key.prove_key(context)))
        codec = codec_for(self.federation, SessionInfo.from_wire(welcome.session_config))
        assert isinstance(codec, EncryptedCodec)
        self.codec = codec
        return welcome

    def credential(self, federation: FederationParams) -> bytes:
        """A committee credential for a fresh mask key, signed with this client's key."""
        self.mask_key = X25519PrivateKey.generate()
        return CommitteeCredential.issue(
            self.signer,
            federation=federation.digest(),
            mask_public=public_key_bytes(self.mask_key),
        ).to_wire()

    async def send(self, message: Any) -> None:
        await self.send_raw(encode_frame(message))

    async def send_raw(self, data: bytes) -> None:
        assert self.writer is not None
        self.writer.write(data)
        await self.writer.drain()

    async def receive(self, timeout: float = 60.0) -> Any:
        """The next non-heartbeat message, or None at EOF / reset."""
        assert self.reader is not None
        while True:
            event = self.decoder.next_event()
            if event is CLOSED:
                return None
            if event is NEED_DATA:
                try:
                    data = await asyncio.wait_for(self.reader.read(65536), timeout)
                except (ConnectionError, OSError):
                    return None
                self.decoder.receive_data(data)
                continue
            if isinstance(event, Heartbeat):
                continue
            self.received.append(event)
            return event

    async def expect(self, kind: type, timeout: float = 60.0) -> Any:
        message = await self.receive(timeout)
        assert isinstance(message, kind), f"expected {kind.__name__}, got {message!r}"
        return message

    async def error_code(self, timeout: float = 60.0) -> int | None:
        """Read until an Error frame (its code) or EOF (None)."""
        while True:
            message = await self.receive(timeout)
            if message is None:
                return None
            if isinstance(message, Error):
                return message.code

    def payloads(
        self,
        start: RoundStart,
        *,
        value: float = 0.0,
        samples: int = 100,
        mask_for: tuple[bytes, ...] | None = None,
    ) -> list[bytes]:
        """A valid masked, encrypted update (every value = ``value``) as chunk payloads.

        ``mask_for`` masks it for other unmasker keys than the round's while the token
        still names the round's (a client that sabotages the sum).
        """
        assert self.codec is not None and self.federation is not None
        unmaskers = tuple(CommitteeCredential.from_wire(raw).mask_public for raw in start.committee)
        trained = TrainedUpdate(
            model_digest=model_digest(start.weights),
            update=np.full(self.codec.n_values, value, dtype=np.float32),
            samples=samples,
            report=None,
            timings={},
            iterations=1,
        )
        self.prepared = seal(trained, self.codec, self.federation, mask_for or unmaskers, None)
        if mask_for is not None:
            self.prepared.unmaskers = unmaskers
        return self.prepared.payloads

    def token(self, start: RoundStart, payloads: list[bytes]) -> bytes:
        """This client's signed contributor token for ``payloads`` (from `payloads`)."""
        assert self.prepared is not None and self.federation is not None
        return (
            ContributorToken(
                federation=self.federation.digest(),
                round_id=start.round_id,
                model_digest=self.prepared.model_digest,
                client_public=self.prepared.client_public,
                unmaskers=self.prepared.unmaskers,
                item_count=self.prepared.item_count,
                upload_digest=hashlib.sha256(b"".join(payloads)).digest(),
                certificate=self.signer.certificate_der,
            )
            .signed_by(self.signer)
            .to_wire()
        )

    async def request_upload(self, start: RoundStart) -> UploadGrant:
        """Ask for an upload slot and wait for the grant."""
        await self.send(UploadRequest(round_id=start.round_id))
        grant: UploadGrant = await self.expect(UploadGrant)
        assert grant.round_id == start.round_id
        return grant

    async def upload(
        self,
        start: RoundStart,
        payloads: list[bytes],
        *,
        first: int | None = None,
        last: int | None = None,
        done: bool = True,
        digest: bytes | None = None,
        token: bytes | None = None,
        contributors: bytes = b"",
    ) -> UploadGrant:
        """Request a slot, send chunks [first or the granted start, last), then UpdateDone.

        ``contributors`` (packed tokens) makes it a relay's UpdateDone, without a token.
        """
        grant = await self.request_upload(start)
        end = len(payloads) if last is None else last
        for seq in range(grant.start_seq if first is None else first, end):
            await self.send(UpdateChunk(round_id=start.round_id, seq=seq, payload=payloads[seq]))
        if done:
            await self.send(
                UpdateDone(
                    round_id=start.round_id,
                    chunk_count=len(payloads),
                    item_count=sum(len(p) for p in payloads)
                    // (self.codec.public_key.ciphertext_bytes if self.codec else 1),
                    digest=digest or hashlib.sha256(b"".join(payloads)).digest(),
                    token=b""
                    if contributors
                    else (self.token(start, payloads) if token is None else token),
                    contributors=contributors,
                )
            )
        return grant

    def abort(self) -> None:
        """Drop the connection the way a killed process does: no Bye, no close_notify."""
        if self.writer is not None:
            self.writer.transport.abort()

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.writer.wait_closed(), 5)
