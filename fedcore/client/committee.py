"""The committee role of a key-holding client: decrypt shards and unmask named sums.

A member holds the whole private key (shared mode: it decrypts) or one share of a
threshold key (threshold mode: it partially decrypts and proves its answer, and T
members' answers combine into the plaintexts). The rules are the same for both.

A member checks every request before it works on it, and refuses what an honest
aggregator never asks for:

- the request must name its contributors with signed tokens (`ContributorToken`): at
  least the federation's ``min_clients`` distinct CA-certified clients, all for this
  federation, this round, one model version, the model's ciphertext count, and the
  same unmaskers;
- decryption: ranges inside the model, each range once per round, round ids never
  going back;
- unmasking: only for sets whose tokens name this member's mask key, only when the
  unmasked values decode as a sum of honest contributions, and one contributor set
  per model version (a second, different set for the same model version is refused:
  that is what stops an aggregator from decrypting two overlapping sums, or rerunning
  a round with another client set). A request whose result does not decode releases
  nothing and does not bind the model version, so an honest aggregator can retry it
  with another set after a client sent a broken update.

The cryptographic part is the mask: a decryption of anything but the product of the
named uploads stays masked by terms only the unmasker can remove, and it removes them
for one set only (see `fedcore.crypto.masking`). The declarative checks above make an
attempt visible and cheap to refuse.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedcore.codec import EncryptedCodec
from fedcore.contracts import FederationParams, decryption_context, key_proof_context
from fedcore.credentials import (
    CertificateAuthority,
    CommitteeCredential,
    ContributorToken,
    CredentialError,
    Signer,
    unpack_tokens,
)
from fedcore.crypto import (
    DecryptPool,
    KeyShare,
    PrivateKey,
    deserialize_ciphertexts,
    deserialize_plaintexts,
    serialize_ciphertexts,
    serialize_plaintexts,
)
from fedcore.crypto.masking import (
    MaskSum,
    derive_mask_key,
    public_key_bytes,
    remove_masks,
    set_digest,
)
from fedcore.errors import FedcoreError, InvalidCiphertextError, PackingError
from fedcore.packing import check_sum_range
from protocol.errors import ErrorCode
from protocol.messages import (
    DecryptRequest,
    DecryptResult,
    PartialDecryptRequest,
    PartialDecryptResult,
    UnmaskRequest,
    UnmaskResult,
)

__all__ = ["CommitteeMember", "CommitteeRefusal", "VerifiedSet", "derive_member_mask_key"]

log = logging.getLogger(__name__)

_MASK_KEY_SALT = b"fedcore committee mask key v1"
# Model versions whose unmasked set a member remembers (64 bytes each). A deviating
# aggregator can only push an entry out by completing this many other unmaskings.
_REMEMBERED_MODELS = 1 << 16
_VERIFIED_CACHE = 4


class CommitteeRefusal(FedcoreError):
    """A committee member refused a request; the message says which rule it broke."""

    def __init__(self, message: str, *, code: ErrorCode = ErrorCode.REQUEST_REFUSED) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class VerifiedSet:
    """A checked list of contributor tokens: who, for which model version and unmaskers."""

    round_id: int
    model_digest: bytes
    unmaskers: tuple[bytes, ...]
    names: tuple[str, ...]
    tokens: tuple[ContributorToken, ...]
    digest: bytes


def derive_member_mask_key(
    secret: PrivateKey | KeyShare, signer: Signer, federation: bytes
) -> X25519PrivateKey:
    """A member's X25519 mask key: HKDF-SHA256 of its Paillier secret, bound to its identity.

    ``ikm = p ‖ q`` for a private key, ``ikm = index ‖ s_i`` for a threshold key share;
    ``info = federation ‖ SPKI`` of the member's certificate key: the same member in the
    same federation gets the same key after a restart (so clients that masked for it can
    still be unmasked), another member or federation another key.
    """
    if isinstance(secret, KeyShare):
        width = secret.public_key.public_key.ciphertext_bytes + 16
        ikm = secret.index.to_bytes(4, "big") + int(secret.secret).to_bytes(width, "big")
    else:
        width = secret.public_key.plaintext_bytes
        ikm = int(secret.p).to_bytes(width, "big") + int(secret.q).to_bytes(width, "big")
    seed = HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=_MASK_KEY_SALT,
        info=federation + signer.public_key_der,
    ).derive(ikm)
    return X25519PrivateKey.from_private_bytes(seed)


class CommitteeMember:
    """One key holder's committee role for one federation (all checks, then the work)."""

    def __init__(
        self,
        private_key: PrivateKey | KeyShare,
        signer: Signer,
        ca: CertificateAuthority,
        federation: FederationParams,
        *,
        workers: int = 1,
        constant_time: bool = True,
    ) -> None:
        self.private_key = private_key
        self.ca = ca
        self.federation = federation
        self._federation_digest = federation.digest()
        self.workers = workers
        self.constant_time = constant_time
        self._mask_key = derive_member_mask_key(private_key, signer, self._federation_digest)
        self.mask_public = public_key_bytes(self._mask_key)
        self.credential = CommitteeCredential.issue(
            signer,
            federation=self._federation_digest,
            mask_public=self.mask_public,
            share_index=private_key.index if isinstance(private_key, KeyShare) else 0,
        )
        self._unmasked: OrderedDict[bytes, bytes] = OrderedDict()  # model digest -> set digest
        self._decrypt_round = -1
        self._decrypt_ranges: list[tuple[int, int]] = []
        self._verified: OrderedDict[bytes, VerifiedSet] = OrderedDict()
        # from the rerun check to the record: one unmasking at a time
        self._unmask_lock = asyncio.Lock()
        # One shard's exponentiations at a time, on this member's `workers`: the next
        # request is received and checked while the current one is worked on, so it
        # starts the moment the core is free (the aggregator keeps two in flight).
        self._work_lock = asyncio.Lock()
        self._pool = DecryptPool(workers)

    def close(self) -> None:
        """Stop the decryption workers (kept from shard to shard and round to round)."""
        self._pool.close()

    def prove_key(self, client_id: str, nonce: bytes) -> bytes | None:
        """The KeyProof root for a Welcome's ``key_challenge`` (None for a key share).

        CPU-bound (one exponentiation modulo each prime): call it in a thread.
        """
        if not isinstance(self.private_key, PrivateKey):
            return None
        context = key_proof_context(self._federation_digest, client_id, nonce)
        return self.private_key.prove_key(context)

    # ------------------------------------------------------------------ checks
    def verify_contributors(
        self, round_id: int, contributors: bytes, codec: EncryptedCodec
    ) -> VerifiedSet:
        """Check a request's contributor tokens (CPU-bound: call in a thread)."""
        key = hashlib.sha256(round_id.to_bytes(8, "big") + contributors).digest()
        cached = self._verified.get(key)
        if cached is not None:
            return cached
        try:
            raw = unpack_tokens(contributors)
            tokens = tuple(ContributorToken.from_wire(item) for item in raw)
            names = tuple(token.verify(self.ca) for token in tokens)
        except CredentialError as exc:
            raise CommitteeRefusal(f"a contributor token does not verify: {exc}") from None
        if len(set(names)) != len(names):
            raise CommitteeRefusal("the contributor set names a client twice")
        quorum = self.federation.min_clients
        if len(names) < quorum:
            raise CommitteeRefusal(f"{len(names)} contributors named; the quorum is {quorum}")
        first = tokens[0]
        for token, name in zip(tokens, names, strict=True):
            if token.federation != self._federation_digest:
                raise CommitteeRefusal(f"{name}'s token is for another federation")
            if token.round_id != round_id:
                raise CommitteeRefusal(
                    f"{name}'s token is for round {token.round_id}, not {round_id}"
                )
            if token.model_digest != first.model_digest:
                raise CommitteeRefusal("the contributors uploaded for different model versions")
            if token.unmaskers != first.unmaskers:
                raise CommitteeRefusal("the contributors masked for different unmaskers")
            if token.item_count != codec.item_count:
                raise CommitteeRefusal(
                    f"{name}'s token counts {token.item_count} ciphertexts; the model has "
                    f"{codec.item_count}"
                )
        verified = VerifiedSet(
            round_id=round_id,
            model_digest=first.model_digest,
            unmaskers=first.unmaskers,
            names=names,
            tokens=tokens,
            # who, and exactly which upload: the same names with other uploads for the
            # same model version are another set
            digest=set_digest(
                name.encode() + token.client_public + token.upload_digest
                for name, token in zip(names, tokens, strict=True)
            ),
        )
        self._verified[key] = verified
        while len(self._verified) > _VERIFIED_CACHE:
            self._verified.popitem(last=False)
        return verified

    @staticmethod
    def _check_range(start: int, count: int, codec: EncryptedCodec) -> None:
        if count < 1 or start + count > codec.item_count:
            raise CommitteeRefusal(
                f"range [{start}, {start + count}) is outside the model's {codec.item_count} "
                "ciphertexts"
            )

    def _claim_decrypt_range(self, round_id: int, start: int, count: int) -> None:
        if round_id < self._decrypt_round:
            raise CommitteeRefusal(
                f"round {round_id} is older than round {self._decrypt_round}, already served"
            )
        if round_id > self._decrypt_round:
            self._decrypt_round, self._decrypt_ranges = round_id, []
        end = start + count
        for lo, hi in self._decrypt_ranges:
            if start < hi and lo < end:
                raise CommitteeRefusal(
                    f"ciphertexts [{max(lo, start)}, {min(hi, end)}) of round {round_id} "
                    "were already decrypted"
                )
        self._decrypt_ranges.append((start, end))

    def _check_unmask(self, verified: VerifiedSet) -> None:
        if self.mask_public not in verified.unmaskers:
            raise CommitteeRefusal("the contributors did not mask for this member")
        served = self._unmasked.get(verified.model_digest)
        if served is not None and served != verified.digest:
            raise CommitteeRefusal(
                "a different contributor set was already unmasked for this model version "
                "(rerun protection)"
            )

    def _record_unmask(self, verified: VerifiedSet) -> None:
        self._unmasked[verified.model_digest] = verified.digest
        self._unmasked.move_to_end(verified.model_digest)
        while len(self._unmasked) > _REMEMBERED_MODELS:
            self._unmasked.popitem(last=False)

    # ------------------------------------------------------------------ work
    async def _admit_decrypt(
        self, request: DecryptRequest | PartialDecryptRequest, codec: EncryptedCodec
    ) -> None:
        """Every rule a (partial) decryption request must pass before any work is done."""
        await asyncio.to_thread(
            self.verify_contributors, request.round_id, request.contributors, codec
        )
        self._check_range(request.start, request.item_count, codec)
        width = codec.public_key.ciphertext_bytes
        if len(request.payload) != request.item_count * width:
            raise CommitteeRefusal(
                f"payload holds {len(request.payload) // width} ciphertexts, the request "
                f"says {request.item_count}"
            )
        self._claim_decrypt_range(request.round_id, request.start, request.item_count)

    async def decrypt(self, request: DecryptRequest, codec: EncryptedCodec) -> DecryptResult:
        """Check and answer one DecryptRequest (CommitteeRefusal when a rule is broken)."""
        t0 = time.perf_counter()
        if not isinstance(self.private_key, PrivateKey):
            raise CommitteeRefusal("this member holds a key share: it only partially decrypts")
        await self._admit_decrypt(request, codec)
        checks_s = time.perf_counter() - t0
        async with self._work_lock:
            t1 = time.perf_counter()
            payload, randomness, count = await asyncio.to_thread(
                codec.decrypt_payload,
                request.payload,
                self.private_key,
                pool=self._pool,
                constant_time=self.constant_time,
            )
            work_s = time.perf_counter() - t1
        return DecryptResult(
            round_id=request.round_id,
            shard_id=request.shard_id,
            item_count=count,
            payload=payload,
            seconds=checks_s + work_s,  # not the wait for the previous shard
            randomness=randomness,
        )

    async def partial_decrypt(
        self, request: PartialDecryptRequest, codec: EncryptedCodec
    ) -> PartialDecryptResult:
        """Check and answer one PartialDecryptRequest: this share's partials and their proof.

        The same rules as :meth:`decrypt` (named quorum, each range once per round); the
        proof is bound to the federation, round, range and contributor set.
        """
        t0 = time.perf_counter()
        share = self.private_key
        if not isinstance(share, KeyShare):
            raise CommitteeRefusal("this member holds the whole private key, not a key share")
        await self._admit_decrypt(request, codec)
        context = decryption_context(
            self._federation_digest,
            request.round_id,
            request.start,
            request.item_count,
            request.contributors,
        )

        def work() -> tuple[bytes, bytes]:
            ciphertexts = deserialize_ciphertexts(request.payload, codec.public_key)
            partial = share.partial_decrypt(ciphertexts, context=context, workers=self.workers)
            return serialize_ciphertexts(partial.values, codec.public_key), partial.proof.to_bytes()

        checks_s = time.perf_counter() - t0
        try:
            async with self._work_lock:
                t1 = time.perf_counter()
                payload, proof = await asyncio.to_thread(work)
                work_s = time.perf_counter() - t1
        except InvalidCiphertextError as exc:
            raise CommitteeRefusal(f"the summed ciphertexts are invalid: {exc}") from None
        return PartialDecryptResult(
            round_id=request.round_id,
            shard_id=request.shard_id,
            item_count=request.item_count,
            payload=payload,
            seconds=checks_s + work_s,  # not the wait for the previous shard
            share_index=share.index,
            proof=proof,
        )

    async def unmask(self, request: UnmaskRequest, codec: EncryptedCodec) -> UnmaskResult:
        """Check and answer one UnmaskRequest: the range's sums without the named masks.

        When this member is the last unmasker of the set, the result must decode (see
        `check_sum_range`), or nothing is released and the model version stays free.
        """
        t0 = time.perf_counter()
        verified = await asyncio.to_thread(
            self.verify_contributors, request.round_id, request.contributors, codec
        )
        self._check_range(request.start, request.item_count, codec)
        try:
            masked = deserialize_plaintexts(request.payload, codec.public_key)
        except ValueError as exc:
            raise CommitteeRefusal(f"the decrypted sums are malformed: {exc}") from None
        if len(masked) != request.item_count:
            raise CommitteeRefusal(
                f"{len(masked)} decrypted sums sent for a range of {request.item_count}"
            )
        async with self._unmask_lock:
            self._check_unmask(verified)
            unmasked = await asyncio.to_thread(
                self._unmask_range, verified, masked, request.start, codec
            )
            self._record_unmask(verified)
        payload = serialize_plaintexts(unmasked, codec.public_key)
        return UnmaskResult(
            round_id=request.round_id,
            shard_id=request.shard_id,
            item_count=request.item_count,
            payload=payload,
            seconds=time.perf_counter() - t0,
        )

    def _unmask_range(
        self, verified: VerifiedSet, masked: list[int], start: int, codec: EncryptedCodec
    ) -> list[int]:
        values = remove_masks(
            masked, self._mask_sums(verified, start, len(masked), codec), codec.public_key.n
        )
        if verified.unmaskers[-1] == self.mask_public:  # no other masks left: it must decode
            try:
                check_sum_range(values, codec.spec, first=start, slot_count=codec.slot_count)
            except PackingError as exc:
                raise CommitteeRefusal(
                    f"the unmasked sum does not decode: {exc}", code=ErrorCode.SUM_NOT_DECODABLE
                ) from None
        return values

    def _mask_sums(
        self, verified: VerifiedSet, start: int, count: int, codec: EncryptedCodec
    ) -> list[int]:
        total = MaskSum(codec.public_key.n, start, count)
        for token in verified.tokens:
            total.add(
                derive_mask_key(
                    self._mask_key,
                    token.client_public,
                    client_public=token.client_public,
                    unmasker_public=self.mask_public,
                    federation=self._federation_digest,
                    model_digest=token.model_digest,
                )
            )
        return total.result()
