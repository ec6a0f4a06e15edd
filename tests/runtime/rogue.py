"""A misbehaving client for tests: real TLS and real ciphertexts, but it writes whatever
frames the test asks for, bypassing the client-side session checks."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from fedcore.codec import EncryptedCodec, codec_from_session_config
from fedcore.crypto import PublicKey
from protocol.framing import CLIENT_MAX_FRAME_SIZE, CLOSED, NEED_DATA, FrameDecoder, encode_frame
from protocol.messages import (
    PROTOCOL_VERSION,
    Error,
    Heartbeat,
    Hello,
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

    def __init__(self, pki: Path, index: int) -> None:
        self.ctx = client_context(
            pki / f"client-{index}.pem", pki / f"client-{index}.key", pki / "ca.pem"
        )
        self.decoder = FrameDecoder(max_frame_size=CLIENT_MAX_FRAME_SIZE)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.received: list[Any] = []
        self.codec: EncryptedCodec | None = None

    async def connect(
        self, port: int, *, sample_count: int = 100, can_decrypt: bool = False
    ) -> Welcome:
        self.reader, self.writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=self.ctx, server_hostname="localhost"
        )
        await self.send(
            Hello(version=PROTOCOL_VERSION, sample_count=sample_count, can_decrypt=can_decrypt)
        )
        welcome = await self.expect(Welcome)
        public_key = PublicKey.from_bytes(welcome.public_key)
        codec = codec_from_session_config(dict(welcome.session_config), public_key)
        assert isinstance(codec, EncryptedCodec)
        self.codec = codec
        return welcome

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

    def payloads(self, start: RoundStart, *, value: float = 0.0) -> list[bytes]:
        """A valid encrypted update (every value = ``value``) as chunk payloads."""
        assert self.codec is not None
        update = np.full(self.codec.n_values, value, dtype=np.float32)
        weight = int(start.config.get("weight", 1))
        plaintexts = self.codec.encode(update, weight=weight, rng=np.random.default_rng(0))
        ciphertexts = self.codec.public_key.encrypt_vector(plaintexts)
        return list(self.codec.chunk_payloads(ciphertexts))

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
    ) -> UploadGrant:
        """Request a slot, send chunks [first or the granted start, last), then UpdateDone."""
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
                    sample_count=100,
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
