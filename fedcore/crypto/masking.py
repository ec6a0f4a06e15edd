"""One-time masks that bind a decryption to a named set of contributors.

Every client adds, inside each Paillier plaintext, a mask ``M_i[j] mod n`` that only
the round's unmasker (a committee member) can recompute. A decrypted product of
ciphertexts ``Π c_i^{a_i}`` is ``Σ a_i·(m_i + M_i) mod n``; the unmasker hands out
``Σ_{i∈S} M_i`` for one named contributor set ``S`` only, so subtracting it leaves
``Σ m_i`` exactly when every ``a_i`` is 1 on ``S`` and 0 elsewhere. Any other
combination (one upload alone, a running sum read early, scaled uploads, a second set)
keeps at least one term ``(a_i - 1)·M_i`` or ``a_i·M_i`` that is uniform mod n:
the result is noise.

Key agreement and expansion are standard primitives from ``cryptography``:

- X25519 (RFC 7748) between the client's per-model-version ephemeral key ``x_i`` and
  the unmasker's mask key ``y``: both sides compute the same shared secret.
- HKDF-SHA256 (RFC 5869) turns it into a 256-bit AES key, with the federation, the
  model version and both public keys in ``info`` (domain separation: a key never
  serves two federations, two model versions or two unmaskers).
- AES-256 in counter mode (NIST SP 800-38A) is the PRG: the mask of ciphertext ``j``
  is the ``W``-byte big-endian block at offset ``j·W`` of the keystream, ``W`` bytes
  being 128 bits more than the modulus, so ``block mod n`` is within 2^-128 of
  uniform (statistical distance of the reduction). Counter blocks start at
  ``j·W / 16``, so any range of positions is computed without the ones before it.

Sums of masks are taken over the raw blocks, in 32-bit limbs held in 64-bit numpy
accumulators (no carry until the end: 2^32 summands cannot overflow), and reduced
mod n once per position: ``Σ (B_i mod n) ≡ Σ B_i (mod n)``.

Knows integers, bytes and keys; nothing of packing, the wire or the runtime.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
    "MASK_KEY_BYTES",
    "STATISTICAL_BITS",
    "MaskSum",
    "SecureUniform",
    "add_masks",
    "client_masks",
    "derive_mask_key",
    "mask_block_bytes",
    "mask_values",
    "public_key_bytes",
    "remove_masks",
    "set_digest",
]

STATISTICAL_BITS = 128
"""Extra PRG bits per mask: ``block mod n`` is 2^-128-close to uniform mod n."""
MASK_KEY_BYTES = 32
_HKDF_SALT = b"fedcore mask v1"
_AES_BLOCK = 16
# Keystream made per numpy pass when summing: bounds the temporaries (~32 MiB).
_SUM_BLOCK_BYTES = 8 * 1024 * 1024


def mask_block_bytes(modulus_bits: int) -> int:
    """Bytes of keystream per mask: ``modulus_bits + 128`` rounded up to whole AES blocks."""
    if modulus_bits <= 0:
        raise ValueError(f"modulus_bits must be positive, got {modulus_bits}")
    bits = modulus_bits + STATISTICAL_BITS
    return _AES_BLOCK * -(-bits // (8 * _AES_BLOCK))


def public_key_bytes(key: X25519PrivateKey | X25519PublicKey) -> bytes:
    """The 32 raw bytes of an X25519 public key (of a private key's public half)."""
    public = key.public_key() if isinstance(key, X25519PrivateKey) else key
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return public.public_bytes(Encoding.Raw, PublicFormat.Raw)


def derive_mask_key(
    own: X25519PrivateKey,
    peer_public: bytes,
    *,
    client_public: bytes,
    unmasker_public: bytes,
    federation: bytes,
    model_digest: bytes,
) -> bytes:
    """The AES key of one (client, unmasker) pair for one model version.

    ``own`` is the client's ephemeral key (client side) or the unmasker's mask key
    (unmasker side); ``peer_public`` the other one's public key. Both sides pass the same
    ``client_public``/``unmasker_public`` so ``info`` is the same:
    ``federation ‖ model_digest ‖ client_public ‖ unmasker_public``.
    """
    for name, value, size in (
        ("peer_public", peer_public, 32),
        ("client_public", client_public, 32),
        ("unmasker_public", unmasker_public, 32),
        ("federation", federation, 32),
        ("model_digest", model_digest, 32),
    ):
        if not isinstance(value, bytes) or len(value) != size:
            raise ValueError(f"{name} must be {size} bytes")
    shared = own.exchange(X25519PublicKey.from_public_bytes(peer_public))
    info = federation + model_digest + client_public + unmasker_public
    return HKDF(
        algorithm=hashes.SHA256(), length=MASK_KEY_BYTES, salt=_HKDF_SALT, info=info
    ).derive(shared)


def client_masks(
    ephemeral: X25519PrivateKey,
    unmaskers: Sequence[bytes],
    *,
    federation: bytes,
    model_digest: bytes,
    modulus: Any,
    count: int,
) -> list[int]:
    """A client's total mask per position ``[0, count)``: one mask per unmasker, summed mod n.

    Each unmasker ``Y`` removes its own share: ``derive_mask_key(y, X, ...)`` on its side
    equals ``derive_mask_key(x, Y, ...)`` here (X25519 is symmetric).
    """
    n = int(modulus)
    client_public = public_key_bytes(ephemeral)
    total = [0] * count
    for unmasker in unmaskers:
        key = derive_mask_key(
            ephemeral,
            unmasker,
            client_public=client_public,
            unmasker_public=unmasker,
            federation=federation,
            model_digest=model_digest,
        )
        total = add_masks(total, mask_values(key, n, 0, count), n)
    return total


def _keystream(key: bytes, block_bytes: int, start: int, count: int) -> bytes:
    """AES-256-CTR keystream for mask positions ``[start, start + count)``."""
    if len(key) != MASK_KEY_BYTES:
        raise ValueError(f"mask key must be {MASK_KEY_BYTES} bytes")
    if start < 0 or count < 0:
        raise ValueError("start and count must be >= 0")
    counter = (start * block_bytes // _AES_BLOCK).to_bytes(_AES_BLOCK, "big")
    encryptor = Cipher(algorithms.AES(key), modes.CTR(counter)).encryptor()
    return encryptor.update(bytes(count * block_bytes))


def mask_values(key: bytes, modulus: Any, start: int, count: int) -> list[int]:
    """Masks ``M[j] = block_j mod n`` for ``j`` in ``[start, start + count)``."""
    n = int(modulus)
    width = mask_block_bytes(n.bit_length())
    stream = _keystream(key, width, start, count)
    from_bytes = int.from_bytes
    return [from_bytes(stream[i : i + width], "big") % n for i in range(0, len(stream), width)]


class MaskSum:
    """``Σ_i M_i[j] mod n`` over many mask keys, for positions ``[start, start + count)``.

    Each key's keystream is read as big-endian 32-bit limbs and added into a uint64
    accumulator per limb, so a key costs one AES pass and one vectorised add, with no
    Python integer per value. :meth:`result` propagates the carries once.
    """

    def __init__(self, modulus: Any, start: int, count: int) -> None:
        if start < 0 or count < 0:
            raise ValueError("start and count must be >= 0")
        self.n = int(modulus)
        self.start = start
        self.count = count
        self.width = mask_block_bytes(self.n.bit_length())
        self._limbs = self.width // 4
        self._acc: npt.NDArray[np.uint64] = np.zeros((count, self._limbs), dtype=np.uint64)
        self.keys = 0

    def add(self, key: bytes) -> None:
        """Add one contributor's masks (its AES key) to the sum."""
        rows_per_pass = max(1, _SUM_BLOCK_BYTES // self.width)
        for first in range(0, self.count, rows_per_pass):
            rows = min(rows_per_pass, self.count - first)
            stream = _keystream(key, self.width, self.start + first, rows)
            limbs = np.frombuffer(stream, dtype=">u4").reshape(rows, self._limbs)
            self._acc[first : first + rows] += limbs
        self.keys += 1
        if self.keys >= 1 << 32:  # pragma: no cover - 4 billion contributors
            raise OverflowError("too many mask keys for 64-bit limb accumulators")

    def add_all(self, keys: Iterable[bytes]) -> None:
        """Add several contributors' masks."""
        for key in keys:
            self.add(key)

    def result(self) -> list[int]:
        """The sums, reduced mod n (Python ints in ``[0, n)``)."""
        low = (self._acc & np.uint64(0xFFFFFFFF)).astype(">u4")
        high = (self._acc >> np.uint64(32)).astype(">u4")
        from_bytes = int.from_bytes
        n = self.n
        out: list[int] = []
        for lo_row, hi_row in zip(low, high, strict=True):
            # limb k of a row weighs 2^(32·(L-1-k)); a high half weighs 2^32 more
            out.append(
                (from_bytes(lo_row.tobytes(), "big") + (from_bytes(hi_row.tobytes(), "big") << 32))
                % n
            )
        return out


def add_masks(plaintexts: Sequence[int], masks: Sequence[int], modulus: Any) -> list[int]:
    """``(m + M) mod n`` position by position."""
    n = int(modulus)
    if len(plaintexts) != len(masks):
        raise ValueError(f"{len(plaintexts)} plaintexts but {len(masks)} masks")
    return [(int(m) + mask) % n for m, mask in zip(plaintexts, masks, strict=True)]


def remove_masks(values: Sequence[int], mask_sums: Sequence[int], modulus: Any) -> list[int]:
    """``(P - ΣM) mod n`` position by position: the unmasked sum."""
    n = int(modulus)
    if len(values) != len(mask_sums):
        raise ValueError(f"{len(values)} values but {len(mask_sums)} mask sums")
    return [(int(p) - mask) % n for p, mask in zip(values, mask_sums, strict=True)]


class SecureUniform:
    """Uniform floats in [0, 1) from AES-256-CTR under a fresh random key (a CSPRNG).

    Duck-types the one method of ``numpy.random.Generator`` that stochastic rounding
    uses, ``random(shape)``; each value takes 53 bits of keystream, like numpy's own
    ``(u64 >> 11) · 2^-53``. A new instance draws a new key from the OS (``os.urandom``
    via ``secrets``), so no two clients or rounds share a stream.
    """

    def __init__(self, key: bytes | None = None) -> None:
        import secrets

        self._encryptor = Cipher(
            algorithms.AES(key if key is not None else secrets.token_bytes(32)),
            modes.CTR(bytes(_AES_BLOCK)),
        ).encryptor()

    def random(self, shape: int | tuple[int, ...]) -> npt.NDArray[np.float64]:
        """An array of the given shape of uniform floats in [0, 1)."""
        size = int(np.prod(shape))
        words = np.frombuffer(self._encryptor.update(bytes(8 * size)), dtype="<u8")
        out: npt.NDArray[np.float64] = (words >> np.uint64(11)).astype(np.float64) * 2.0**-53
        return out.reshape(shape)


def set_digest(identities: Iterable[bytes]) -> bytes:
    """SHA-256 over sorted, length-prefixed byte strings: one name for a contributor set."""
    digest = hashlib.sha256(b"fedcore contributor set v1")
    for item in sorted(identities):
        digest.update(len(item).to_bytes(4, "big"))
        digest.update(item)
    return digest.digest()
