"""Who gets in, and what they may claim: Hello checks, committee credentials, upload tokens.

The aggregator verifies what clients and committee members will verify again: a key
holder's committee credential must be signed by its own CA-certified certificate, and
an upload's contributor token must be signed by its sender and name this federation,
round, model version, unmaskers, ciphertext count and upload digest. A relay's upload
carries its clients' tokens instead: each must be signed by a distinct client and name
the same federation, round, model version, unmaskers and ciphertext count (the relay
checked each upload digest; the masks make a sum of anything else noise). Checking here
keeps garbage out of RoundStarts and decryption requests and names the culprit early;
the clients' checks are the ones privacy rests on. A shared-mode key holder is drafted
only after it proves it holds the key (a KeyProof for its Welcome's fresh nonce), and a
key holder once caught answering wrongly stays excluded. Knows nothing of folding or
rounds' timing.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Sequence
from pathlib import Path

from fedcore.aggregator.registry import ClientHandle
from fedcore.aggregator.rounds import RejectedUpdate, RoundState
from fedcore.contracts import FederationParams, RejectReason, SessionInfo, key_proof_context
from fedcore.credentials import (
    CertificateAuthority,
    CommitteeCredential,
    ContributorToken,
    CredentialError,
    unpack_tokens,
)
from fedcore.crypto.decrypt_proof import verify_key_proof
from fedcore.errors import ConfigError
from fedcore.metrics import AggregatorMetrics
from protocol.errors import ErrorCode, ProtocolError
from protocol.messages import PROTOCOL_VERSION, Error, Hello, KeyProof, UpdateDone, Welcome
from protocol.transport import Connection

__all__ = ["Gatekeeper"]

log = logging.getLogger(__name__)


class Gatekeeper:
    """Admits connections (Hello -> Welcome) and checks contributor tokens."""

    def __init__(
        self,
        *,
        ca: Path,
        allowed_clients: Sequence[str] | None,
        federation: FederationParams,
        session: SessionInfo,
        item_count: int,
        metrics: AggregatorMetrics,
        accept_key_holders: bool = True,
        excluded_decryptors: list[str] | None = None,
    ) -> None:
        self.metrics = metrics
        self._allowed = None if allowed_clients is None else frozenset(allowed_clients)
        self._accept_key_holders = accept_key_holders
        self._encrypted = federation.encrypted
        # shared mode: holders of the whole key say share 0; threshold: shares 1..N
        self._share_indices = (
            range(1, federation.threshold_key.parties + 1)
            if federation.threshold_key is not None
            else range(0, 1)
        )
        self._threshold = federation.threshold_key
        self._public_key = federation.public_key
        self.excluded_decryptors = [] if excluded_decryptors is None else excluded_decryptors
        """Key holders caught answering wrongly, for the federation's life (the list is
        the checkpoint's, which the committee appends to)."""
        self._federation_bytes = federation.to_bytes()
        self._federation_digest = federation.digest()
        self._session = session.to_wire()
        self._item_count = item_count
        self.token_check_seconds = 0.0
        """Seconds spent checking contributor tokens since the last reset (per round)."""
        try:
            self._ca = CertificateAuthority.load(ca)
        except CredentialError as exc:
            raise ConfigError(str(exc)) from None

    def welcome(self, handle: ClientHandle) -> Welcome:
        """The federation to compare with the pinned one, and a key holder's challenge.

        A shared-mode key holder gets a fresh nonce: it is drafted to decrypt or unmask
        only once its KeyProof for this nonce verifies (`check_key_proof`).
        """
        if handle.credential and self._threshold is None and not handle.decrypt_excluded:
            handle.key_challenge = secrets.token_bytes(32)
        return Welcome(
            version=PROTOCOL_VERSION,
            client_id=handle.client_id,
            federation=self._federation_bytes,
            session_config=self._session,
            key_challenge=handle.key_challenge,
        )

    def check_key_proof(self, handle: ClientHandle, proof: KeyProof) -> str:
        """Why ``proof`` does not prove ``handle`` holds the key ("" when it does; CPU-bound)."""
        if not handle.key_challenge or self._public_key is None:
            return "it sent a KeyProof it was not asked for"
        if handle.key_proven:
            return "it sent a second KeyProof"
        context = key_proof_context(self._federation_digest, handle.client_id, handle.key_challenge)
        if not verify_key_proof(self._public_key, context, proof.root):
            return "its KeyProof is not the n-th root of its challenge: it does not hold the key"
        return ""

    async def _refuse(self, conn: Connection, reason: RejectReason, message: str) -> None:
        self.metrics.updates_rejected_total.labels(reason=reason.label).inc()
        await conn.close(error=Error(code=int(reason.code), reason=message[:1000]))

    async def admit(self, conn: Connection) -> ClientHandle | None:
        """Read the Hello and check it; a handle for the client, or None (refused, closed)."""
        client_id = conn.peer_identity
        try:
            hello = await conn.receive()
        except ProtocolError:
            return None
        if not isinstance(hello, Hello):  # the session allows nothing else first
            return None
        allowed = self._allowed
        if allowed is not None and client_id not in allowed:
            log.warning("refused %r: not in allowed_clients", client_id)
            await self._refuse(
                conn,
                RejectReason.UNKNOWN_CLIENT,
                "this certificate is not a member of the federation",
            )
            return None
        if hello.version != PROTOCOL_VERSION:
            await conn.close(
                error=Error(
                    code=int(ErrorCode.UNSUPPORTED_VERSION),
                    reason=f"aggregator speaks version {PROTOCOL_VERSION}",
                )
            )
            return None
        if hello.relay and not self._encrypted:
            await self._refuse(
                conn, RejectReason.UNKNOWN_CLIENT, "relays need an encrypted federation"
            )
            return None
        if hello.relay and not conn.peer_serves:
            # a relay serves clients, so its certificate is issued for server auth too;
            # a client's is not, and may not claim other clients' counts or tokens
            log.warning("refused %r: a relay Hello from a client certificate", client_id)
            await self._refuse(
                conn,
                RejectReason.UNKNOWN_CLIENT,
                "this certificate is not a relay's (issue one with fedcore certs --relays)",
            )
            return None
        if hello.committee and not self._accept_key_holders:
            await self._refuse(
                conn,
                RejectReason.BAD_TOKEN,
                "committee credential refused: this is a relay; key holders connect to the "
                "root aggregator",
            )
            return None
        credential, mask_public = b"", b""
        if hello.committee and self._encrypted:
            try:
                parsed = CommitteeCredential.from_wire(hello.committee)
                signer = parsed.verify(self._ca, federation=self._federation_digest)
                if signer != client_id:
                    raise CredentialError(f"it is signed by {signer!r}")
                if parsed.share_index not in self._share_indices:
                    raise CredentialError(
                        f"it names key share {parsed.share_index}; this federation's key "
                        f"has shares {self._share_indices.start}..{self._share_indices.stop - 1}"
                    )
            except CredentialError as exc:
                log.warning("refused %r: committee credential does not verify: %s", client_id, exc)
                await self._refuse(
                    conn, RejectReason.BAD_TOKEN, f"committee credential refused: {exc}"
                )
                return None
            credential, mask_public = hello.committee, parsed.mask_public
            share_index = parsed.share_index
        else:
            share_index = 0
        if hello.relay:
            # replicas of one relay deployment share a certificate: the name tells them apart
            client_id = f"{client_id}/{hello.relay}"
        return ClientHandle(
            client_id=client_id,
            conn=conn,
            credential=credential,
            mask_public=mask_public,
            share_index=share_index,
            # a threshold share holder proves every partial decryption instead
            key_proven=bool(credential) and self._threshold is not None,
            decrypt_excluded=client_id in self.excluded_decryptors,
            relay=bool(hello.relay),
        )

    def check_token(self, client_id: str, state: RoundState, done: UpdateDone) -> bytes:
        """The client's contributor token, checked (RejectedUpdate BAD_TOKEN otherwise)."""
        if not self._encrypted:
            return b""
        started = time.perf_counter()
        try:
            return self._check_token(client_id, state, done)
        finally:
            self.token_check_seconds += time.perf_counter() - started

    def _check_token(self, client_id: str, state: RoundState, done: UpdateDone) -> bytes:
        if done.contributors:
            raise RejectedUpdate(
                RejectReason.BAD_TOKEN, "only a relay may upload other clients' tokens"
            )
        signer = self._token_problems(done.token, state, f"from {client_id}", done.digest)
        if signer != client_id:
            raise RejectedUpdate(
                RejectReason.BAD_TOKEN, f"contributor token is signed by {signer!r}"
            )
        return done.token

    def check_relay_tokens(self, state: RoundState, done: UpdateDone) -> dict[str, bytes]:
        """A relay's contributors (client id -> token), each token checked, each client once."""
        started = time.perf_counter()
        try:
            if done.token or not done.contributors:
                raise RejectedUpdate(
                    RejectReason.BAD_TOKEN, "a relay's upload must carry its clients' tokens"
                )
            try:
                tokens = unpack_tokens(done.contributors)
            except CredentialError as exc:
                raise RejectedUpdate(RejectReason.BAD_TOKEN, f"relay tokens: {exc}") from None
            contributors: dict[str, bytes] = {}
            for i, raw in enumerate(tokens):
                signer = self._token_problems(raw, state, f"#{i} of the relay's", None)
                if signer in contributors:
                    raise RejectedUpdate(
                        RejectReason.REPLAY, f"the relay names {signer!r} twice in one sum"
                    )
                contributors[signer] = raw
            return contributors
        finally:
            self.token_check_seconds += time.perf_counter() - started

    def _token_problems(
        self, raw: bytes, state: RoundState, which: str, upload_digest: bytes | None
    ) -> str:
        """The signer of a valid token for this round (RejectedUpdate BAD_TOKEN otherwise)."""
        try:
            token = ContributorToken.from_wire(raw)
            signer = token.verify(self._ca)
        except CredentialError as exc:
            raise RejectedUpdate(
                RejectReason.BAD_TOKEN, f"contributor token {which}: {exc}"
            ) from None
        problems = [
            what
            for what, ok in (
                ("for another federation", token.federation == self._federation_digest),
                (f"for round {token.round_id}", token.round_id == state.round_id),
                ("for another model version", token.model_digest == state.model_digest),
                ("masked for other unmaskers", token.unmaskers == state.unmasker_keys),
                (f"counting {token.item_count} ciphertexts", token.item_count == self._item_count),
                ("for other bytes", upload_digest is None or token.upload_digest == upload_digest),
            )
            if not ok
        ]
        if problems:
            raise RejectedUpdate(
                RejectReason.BAD_TOKEN,
                f"contributor token {which} ({signer}) is " + ", ".join(problems),
            )
        return signer
