"""A deviating aggregator for attack tests, built from the protocol package.

It speaks the real protocol over real mutual TLS to real `fedcore.client.Client`s and
real committee members, but the test decides every message it sends: which federation
its Welcome offers, what its RoundStarts say, which ciphertexts it multiplies together,
and which decryptions and unmaskings it asks for. It holds only what a malicious
operator of the aggregator holds: the public key, the uploads, the tokens and whatever
the committee answers. `raw_estimate` is the attacker's best reading of a decrypted
vector: the slot values, ignoring every consistency check an honest decoder makes.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gmpy2
import numpy as np

from fedcore.codec import EncryptedCodec, codec_for
from fedcore.contracts import FederationParams, RoundPlan, SessionInfo
from fedcore.credentials import CommitteeCredential, pack_tokens
from fedcore.crypto import (
    PublicKey,
    deserialize_plaintexts,
    serialize_ciphertexts,
    serialize_plaintexts,
)
from fedcore.crypto.masking import remove_masks
from fedcore.packing import PackingSpec
from protocol.errors import ProtocolError
from protocol.messages import (
    PROTOCOL_VERSION,
    Ack,
    DecryptRequest,
    DecryptResult,
    Error,
    Hello,
    RoundEnd,
    RoundStart,
    UnmaskRequest,
    UnmaskResult,
    UpdateChunk,
    UpdateDone,
    UploadGrant,
    UploadRequest,
    Welcome,
)
from protocol.tls import server_context
from protocol.transport import Connection, Server, TransportConfig

_CLOSED = object()


@dataclass(eq=False)
class Peer:
    """One connected client as the malicious aggregator sees it."""

    name: str
    conn: Connection
    credential: bytes
    inbox: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)

    @property
    def mask_public(self) -> bytes:
        return CommitteeCredential.from_wire(self.credential).mask_public


@dataclass
class Upload:
    """One client's complete upload: its ciphertexts (bytes) and its signed token."""

    ciphertexts: bytes
    token: bytes


class Refused(Exception):
    """The client or committee member refused (its Error frame, or it hung up)."""


class MaliciousAggregator:
    """A scriptable aggregator: the test drives every round and committee request."""

    def __init__(self, pki: Path, federation: FederationParams, session: SessionInfo) -> None:
        self.federation = federation
        self.session = session
        self.welcome_federation = federation.to_bytes()  # what the Welcome offers
        codec = codec_for(federation, session)
        assert isinstance(codec, EncryptedCodec)
        self.codec: EncryptedCodec = codec
        self.public_key: PublicKey = codec.public_key
        self.peers: dict[str, Peer] = {}
        self.joined = asyncio.Event()
        self.messages_seen: list[tuple[str, Any]] = []
        self._server = Server(
            self._handle,
            server_context(pki / "aggregator.pem", pki / "aggregator.key", pki / "ca.pem"),
            TransportConfig(idle_timeout=120.0, heartbeat_interval=5.0),
        )

    # ------------------------------------------------------------------ connections
    async def start(self) -> int:
        await self._server.start("127.0.0.1", 0)
        return self._server.port

    async def stop(self) -> None:
        await self._server.shutdown(5.0)

    async def _handle(self, conn: Connection) -> None:
        hello = await conn.receive()
        assert isinstance(hello, Hello)
        await conn.send(
            Welcome(
                version=PROTOCOL_VERSION,
                client_id=conn.peer_identity,
                federation=self.welcome_federation,
                session_config=self.session.to_wire(),
            )
        )
        peer = Peer(conn.peer_identity, conn, hello.committee)
        self.peers[peer.name] = peer
        self.joined.set()
        try:
            while True:
                message = await conn.receive()
                self.messages_seen.append((peer.name, message))
                await peer.inbox.put(message)
        except ProtocolError as exc:
            await peer.inbox.put(exc)
        finally:
            await peer.inbox.put(_CLOSED)

    async def wait_for(self, names: list[str], timeout: float = 60.0) -> None:
        """Until every named client is connected (with a live connection)."""
        async with asyncio.timeout(timeout):
            while not all(n in self.peers and not self.peers[n].conn.closed for n in names):
                self.joined.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.joined.wait(), 0.2)

    async def _next(self, peer: Peer, kind: type, timeout: float) -> Any:
        async with asyncio.timeout(timeout):
            while True:
                message = await peer.inbox.get()
                if message is _CLOSED or isinstance(message, Exception):
                    raise Refused(f"{peer.name} hung up: {message!r}")
                if isinstance(message, Error):
                    raise Refused(f"{peer.name}: {message.reason}")
                if isinstance(message, kind):
                    return message

    # ------------------------------------------------------------------ a round
    def committee_of(self, names: list[str]) -> tuple[bytes, ...]:
        return tuple(self.peers[n].credential for n in names)

    async def run_round(
        self,
        round_id: int,
        weights: bytes,
        clients: list[str],
        committee: tuple[bytes, ...],
        *,
        clip: float | None = None,
        value_bits: int | None = None,
        config: dict[str, Any] | None = None,
        timeout: float = 60.0,
    ) -> dict[str, Upload | Refused]:
        """Send RoundStart to ``clients`` and collect what each uploads (or why not)."""
        plan = RoundPlan(epochs=2, learning_rate=0.05, seed=round_id).config()
        start = RoundStart(
            round_id=round_id,
            weights=weights,
            clip=self.federation.clip if clip is None else clip,
            value_bits=self.federation.value_bits if value_bits is None else value_bits,
            deadline_s=timeout,
            config={**plan, **(config or {})},
            committee=committee,
        )
        outcomes = await asyncio.gather(
            *(self._collect(self.peers[name], start, timeout) for name in clients),
            return_exceptions=True,
        )
        result: dict[str, Upload | Refused] = {}
        for name, outcome in zip(clients, outcomes, strict=True):
            if isinstance(outcome, Upload):
                result[name] = outcome
            else:
                result[name] = Refused(repr(outcome))
                # as an aggregator must: end the round for a client that did not upload
                with contextlib.suppress(ProtocolError, OSError):
                    await self.peers[name].conn.send(
                        RoundEnd(round_id=round_id, status="closed", reason="round closed")
                    )
        return result

    async def _collect(self, peer: Peer, start: RoundStart, timeout: float) -> Upload:
        await peer.conn.send(start)
        request = await self._next(peer, UploadRequest, timeout)
        await peer.conn.send(UploadGrant(round_id=request.round_id))
        chunks: list[bytes] = []
        async with asyncio.timeout(timeout):
            while True:
                message = await peer.inbox.get()
                if message is _CLOSED or isinstance(message, Exception | Error):
                    raise Refused(f"{peer.name} stopped uploading: {message!r}")
                if isinstance(message, UpdateChunk):
                    chunks.append(message.payload)
                elif isinstance(message, UpdateDone):
                    await peer.conn.send(Ack(round_id=start.round_id, accepted=True))
                    return Upload(ciphertexts=b"".join(chunks), token=message.token)

    # ------------------------------------------------------------------ committee
    async def unmask(
        self,
        member: str,
        round_id: int,
        tokens: list[bytes],
        masked: list[int],
        *,
        timeout: float = 60.0,
    ) -> list[int]:
        """``masked`` without the masks of ``tokens``, as the member releases it (or Refused)."""
        peer = self.peers[member]
        await peer.conn.send(
            UnmaskRequest(
                round_id=round_id,
                shard_id=0,
                start=0,
                item_count=len(masked),
                contributors=pack_tokens(tokens),
                payload=serialize_plaintexts(masked, self.public_key),
            )
        )
        result = await self._next(peer, UnmaskResult, timeout)
        return deserialize_plaintexts(result.payload, self.public_key)

    async def decrypt(
        self,
        member: str,
        round_id: int,
        ciphertexts: list[Any],
        tokens: list[bytes],
        *,
        shard_id: int = 0,
        timeout: float = 60.0,
    ) -> list[int]:
        """The member's decryption of ``ciphertexts`` (Refused if it will not)."""
        peer = self.peers[member]
        await peer.conn.send(
            DecryptRequest(
                round_id=round_id,
                shard_id=shard_id,
                start=0,
                item_count=len(ciphertexts),
                payload=serialize_ciphertexts(ciphertexts, self.public_key),
                contributors=pack_tokens(tokens),
            )
        )
        result = await self._next(peer, DecryptResult, timeout)
        return deserialize_plaintexts(result.payload, self.public_key)

    # ------------------------------------------------------------------ arithmetic
    def ciphertexts(self, upload: Upload) -> list[Any]:
        width = self.public_key.ciphertext_bytes
        data = upload.ciphertexts
        return [
            gmpy2.mpz.from_bytes(data[i : i + width], "big") for i in range(0, len(data), width)
        ]

    def combine(self, uploads: list[Upload], exponents: list[int] | None = None) -> list[Any]:
        """``Π c_i^{a_i} mod n²`` position by position (a_i = 1 by default)."""
        nsquare = self.public_key.nsquare
        vectors = [self.ciphertexts(u) for u in uploads]
        exponents = exponents or [1] * len(uploads)
        out = []
        for column in zip(*vectors, strict=True):
            product = gmpy2.mpz(1)
            for c, a in zip(column, exponents, strict=True):
                product = product * gmpy2.powmod(c, a, nsquare) % nsquare
            out.append(product)
        return out

    def unmasked(self, plaintexts: list[int], mask_sums: list[int]) -> list[int]:
        return remove_masks(plaintexts, mask_sums, self.public_key.n)

    def masks_of(self, masked: list[int], released: list[int]) -> list[int]:
        """The mask sums an unmasker's answer gives away: masked - released (mod n)."""
        return remove_masks(masked, released, self.public_key.n)


def raw_estimate(plaintexts: list[int], spec: PackingSpec, n_values: int) -> np.ndarray:
    """The model slots of a decrypted vector as floats, with no consistency check at all.

    Slot j of plaintext i is bits [j·s, (j+1)·s); its value times the quantization
    step, minus the clip, is what an honest decoder would read for weight 1. An
    attacker applies no check (overflow, padding, weight) and keeps whatever comes out.
    """
    s, k = spec.slot_bits, spec.slots_per_ciphertext
    mask = (1 << s) - 1
    values = np.empty(len(plaintexts) * k, dtype=np.float64)
    for i, p in enumerate(plaintexts):
        p = int(p)
        for j in range(k):
            values[i * k + j] = (p >> (j * s)) & mask
    return values[:n_values] * spec.step - spec.clip


def correlation(estimate: np.ndarray, truth: np.ndarray) -> float:
    """Pearson correlation of an attacker's estimate with the true vector."""
    if np.std(estimate) == 0 or np.std(truth) == 0:
        return 0.0
    return float(np.corrcoef(estimate, truth)[0, 1])
