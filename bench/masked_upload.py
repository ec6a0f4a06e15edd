"""The scale benchmark's masking shortcut: Enc(q) once, masked per round without re-encrypting.

A 2-core machine cannot encrypt a seed-MLP update per simulated client, so the load
generator encrypts the packed update q once, up front (one random factor per
ciphertext), and masks it per round from those ciphertexts:
``Enc(q)·(1 + M·n) = Enc(q + M) mod n²`` for the masks M of the round's unmaskers
(X25519 + HKDF + AES-CTR, as `fedcore.crypto.masking` makes them for the model version
and unmaskers a RoundStart names). The masked ciphertexts reuse Enc(q)'s randomness,
which only a load generator may do. This module knows nothing of connections or of the
aggregator.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import gmpy2
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedcore.codec import EncryptedCodec
from fedcore.crypto import deserialize_ciphertexts
from fedcore.crypto.masking import client_masks, public_key_bytes

__all__ = ["EncryptedUpdate", "MaskedUpload"]


@dataclass(frozen=True, slots=True)
class MaskedUpload:
    """One masked update as it goes on the wire, and the key that masked it."""

    client_public: bytes
    payloads: list[bytes]
    digest: bytes


@dataclass(frozen=True, slots=True)
class EncryptedUpdate:
    """Enc(q) once, and each ciphertext mod n (what masking multiplies by)."""

    ciphertexts: list[Any]
    residues: list[Any]
    item_count: int

    @classmethod
    def from_ciphertexts(cls, ciphertexts: list[Any], codec: EncryptedCodec) -> EncryptedUpdate:
        """Keep the ciphertexts as gmpy2 integers and their residues mod n."""
        n = codec.public_key.n
        values = [gmpy2.mpz(c) for c in ciphertexts]
        return cls(values, [c % n for c in values], len(values))

    @classmethod
    def from_payloads(cls, payloads: list[bytes], codec: EncryptedCodec) -> EncryptedUpdate:
        """Parse the pre-encrypted chunk payloads (validated once, at start-up)."""
        joined = b"".join(payloads)
        return cls.from_ciphertexts(
            deserialize_ciphertexts(joined, codec.public_key, validate=True), codec
        )

    def masked(
        self,
        codec: EncryptedCodec,
        federation: bytes,
        model: bytes,
        unmaskers: tuple[bytes, ...],
    ) -> MaskedUpload:
        """Enc(q + M) for a fresh ephemeral key's masks M, reusing Enc(q)'s randomness.

        With ``g = n + 1``, ``(1 + M·n) = g^M mod n²``, so ``c·(1 + M·n) = Enc(q + M)``
        under ``c``'s random factor. ``(1 + M·n)·c ≡ c + n·(M·c mod n) (mod n²)``
        because ``n·x mod n² = n·(x mod n)``: one half-width multiplication per
        ciphertext (``c mod n`` is precomputed), and ``c + n·t < 2n²`` needs at most
        one subtraction. M is the client's sum over unmaskers, as `seal` adds it.
        """
        n, nsquare = codec.public_key.n, codec.public_key.nsquare
        ephemeral = X25519PrivateKey.generate()
        client_public = public_key_bytes(ephemeral)
        masks = client_masks(
            ephemeral,
            unmaskers,
            federation=federation,
            model_digest=model,
            modulus=n,
            count=self.item_count,
        )
        out = []
        for c, residue, mask in zip(self.ciphertexts, self.residues, masks, strict=True):
            masked = c + n * (mask * residue % n)
            out.append(masked - nsquare if masked >= nsquare else masked)
        payloads = list(codec.chunk_payloads(out))
        digest = hashlib.sha256()
        for payload in payloads:
            digest.update(payload)
        return MaskedUpload(client_public, payloads, digest.digest())
