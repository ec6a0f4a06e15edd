"""Threshold Paillier: T of N key shares decrypt, fewer learn nothing (Damgård–Jurik 2001).

Same ciphertexts as :class:`~fedcore.crypto.keys.PublicKey` (``g = n + 1``, phe's n):
only decryption changes. The scheme is Damgård and Jurik's generalisation of Shoup's
threshold RSA ("A Generalisation, a Simplification and Some Applications of Paillier's
Probabilistic Public-Key System", PKC 2001, §4 with s = 1):

- **Dealing** (a trusted dealer, once): safe primes ``p = 2p'+1``, ``q = 2q'+1``,
  ``m = p'q'``; the secret exponent ``d`` with ``d ≡ 0 (mod m)`` and ``d ≡ 1 (mod n)``;
  a random polynomial ``f`` of degree ``T - 1`` over Z_{nm} with ``f(0) = d``; share
  ``s_i = f(i)``; a random square ``v`` and verification keys ``v_i = v^(Δ·s_i)`` with
  ``Δ = N!``. The dealer then forgets p, q, m, d and f.
- **Partial decryption** by member i: ``c_i = c^(2Δ·s_i) mod n²``, with one batched
  proof per shard (:mod:`fedcore.crypto.threshold_proof`).
- **Combination** of any T distinct partials: with the integer Lagrange coefficients
  ``μ_i = Δ·Π_{j≠i} j/(j - i)`` (Δ = N! makes them integers),
  ``Π c_i^(2μ_i) = c^(4Δ²·d)``. Since ``λ(n) = 2m`` divides ``4Δ²·d``, the randomness
  ``r^n`` vanishes, and ``(1+n)^(x·4Δ²·d) = 1 + x·4Δ²·n (mod n²)`` because
  ``d ≡ 1 (mod n)``, so ``x = L(Π c_i^(2μ_i)) · (4Δ²)^-1 mod n``.

With fewer than T shares, ``f(0)`` is information-theoretically hidden (Shamir over
the field-like ring Z_{nm}; T - 1 points leave every ``d`` possible), and the partials
and verification keys are simulatable from the public key (Damgård–Jurik, Theorem 2,
under DCR in the random-oracle model).

Files: the public key (n, T, N, v, v_1…v_N, SHA-256 over all of them) is public; each
share file holds one ``s_i`` and is written 0600. Knows nothing of packing, messages
or the federation.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import operator
import os
import secrets
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gmpy2
from gmpy2 import mpz

from fedcore.crypto import keys as _keys
from fedcore.crypto.keys import PublicKey
from fedcore.crypto.modexp import FixedExponent
from fedcore.crypto.safeprime import random_safe_prime
from fedcore.crypto.threshold_proof import EqualityProof, batch_bases, check_proof, prove
from fedcore.crypto.vector import validate_ciphertexts
from fedcore.errors import InvalidCiphertextError, KeyFileError

__all__ = [
    "MAX_PARTIES",
    "THRESHOLD_KEY_TYPE",
    "DealProgress",
    "KeyShare",
    "PartialDecryption",
    "ThresholdPublicKey",
    "combine",
    "deal",
    "key_file_paths",
    "save_key_files",
    "verify",
]

MAX_PARTIES = 64
"""Most shares a key may have (Δ = N! grows every exponent by log2(N!) bits)."""

THRESHOLD_KEY_TYPE = "fedcore-threshold-public-key"
"""The ``type`` field of a threshold public key document."""
_PUBLIC_TYPE = THRESHOLD_KEY_TYPE
_SHARE_TYPE = "fedcore-threshold-key-share"
_FORMAT_VERSION = 1
_MAX_DOCUMENT = 1 << 20  # 64 verification keys of 4096 bits in decimal fit easily

DealProgress = Callable[[str, int, int], None]
"""Called as ``progress(step, done, total)`` while dealing: each step's progress."""


def _check_counts(threshold: int, parties: int) -> None:
    for name, value in (("threshold", threshold), ("parties", parties)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not 2 <= parties <= MAX_PARTIES:
        raise ValueError(f"parties must be in 2..{MAX_PARTIES}, got {parties}")
    if not 1 <= threshold <= parties:
        raise ValueError(f"threshold must be in 1..parties ({parties}), got {threshold}")


class ThresholdPublicKey:
    """The public half of a threshold key: n (a phe-compatible key), T, N and v, v_1…v_N."""

    __slots__ = (
        "delta",
        "parties",
        "public_key",
        "threshold",
        "verification_base",
        "verification_keys",
    )

    def __init__(
        self,
        public_key: PublicKey,
        threshold: int,
        parties: int,
        verification_base: int,
        verification_keys: Sequence[int],
    ) -> None:
        _check_counts(threshold, parties)
        nsquare = public_key.nsquare
        values = [mpz(operator.index(verification_base))]
        values += [mpz(operator.index(v)) for v in verification_keys]
        if len(values) != parties + 1:
            raise ValueError(f"{len(values) - 1} verification keys for {parties} parties")
        for position, value in enumerate(values):
            what = "verification base" if position == 0 else f"verification key {position}"
            if not 1 < value < nsquare or gmpy2.gcd(value, public_key.n) != 1:
                raise ValueError(f"{what} is not in Z*_n² (or is 1)")
        self.public_key = public_key
        self.threshold = threshold
        self.parties = parties
        self.delta = mpz(math.factorial(parties))
        self.verification_base = values[0]
        self.verification_keys = tuple(values[1:])

    def sha256(self) -> str:
        """SHA-256 over the canonical document's fields: what clients and members pin."""
        hasher = hashlib.sha256(b"fedcore threshold public key v1")
        width = self.public_key.ciphertext_bytes
        hasher.update(self.public_key.n.to_bytes(self.public_key.plaintext_bytes, "big"))
        hasher.update(self.threshold.to_bytes(4, "big") + self.parties.to_bytes(4, "big"))
        for value in (self.verification_base, *self.verification_keys):
            hasher.update(value.to_bytes(width, "big"))
        return hasher.hexdigest()

    def fingerprint(self) -> str:
        """The first 16 hex digits of :meth:`sha256`, for logs."""
        return self.sha256()[:16]

    def check(self, *, min_bits: int = _keys.MIN_SECURE_KEY_BITS) -> None:
        """Raise ValueError unless n is a plausible modulus (see ``check_modulus``)."""
        self.public_key.check(min_bits=min_bits)

    def to_document(self) -> dict[str, Any]:
        """The JSON object of the public key file (integers as decimal strings)."""
        return {
            "type": _PUBLIC_TYPE,
            "version": _FORMAT_VERSION,
            "n": str(self.public_key.n),
            "threshold": self.threshold,
            "parties": self.parties,
            "verification_base": str(self.verification_base),
            "verification_keys": [str(v) for v in self.verification_keys],
            "sha256": self.sha256(),
        }

    @classmethod
    def from_document(cls, document: Any) -> ThresholdPublicKey:
        """Parse :meth:`to_document`; ValueError names the bad field."""
        if not isinstance(document, dict) or document.get("type") != _PUBLIC_TYPE:
            raise ValueError(f"key document type must be {_PUBLIC_TYPE!r}")
        if document.get("version") != _FORMAT_VERSION:
            raise ValueError(f"key document version must be {_FORMAT_VERSION}")
        vks = document.get("verification_keys")
        if not isinstance(vks, list) or len(vks) > MAX_PARTIES:
            raise ValueError(f"verification_keys must be a list of at most {MAX_PARTIES}")
        for name in ("threshold", "parties"):
            if not isinstance(document.get(name), int) or isinstance(document.get(name), bool):
                raise ValueError(f"field {name!r} must be an integer")
        key = cls(
            PublicKey(_keys._parse_int(document, "n")),
            document["threshold"],
            document["parties"],
            _keys._parse_int(document, "verification_base"),
            [_keys._parse_int({"v": v}, "v") for v in vks],
        )
        if document.get("sha256") != key.sha256():
            raise ValueError("field 'sha256' does not match the key's fields (edited or mixed up)")
        return key

    def to_bytes(self) -> bytes:
        """Canonical JSON of :meth:`to_document`."""
        return _keys._dump_document(self.to_document())

    @classmethod
    def from_bytes(cls, data: bytes) -> ThresholdPublicKey:
        """Parse :meth:`to_bytes`; ValueError names what is wrong."""
        return cls.from_document(_keys._parse_document(data, _PUBLIC_TYPE, limit=_MAX_DOCUMENT))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the public key file (public: world readable is fine)."""
        Path(path).write_bytes(self.to_bytes())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ThresholdPublicKey:
        """Read a threshold public key file; KeyFileError if missing or malformed."""
        data = _keys._read_key_file(Path(path), limit=_MAX_DOCUMENT)
        try:
            return cls.from_bytes(data)
        except ValueError as exc:
            raise KeyFileError(f"malformed threshold public key file {path}: {exc}") from None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ThresholdPublicKey):
            return NotImplemented
        return self.sha256() == other.sha256()

    def __hash__(self) -> int:
        return hash(("ThresholdPublicKey", self.sha256()))

    def __repr__(self) -> str:
        return (
            f"ThresholdPublicKey({self.threshold}-of-{self.parties}, bits={self.public_key.bits}, "
            f"fingerprint={self.fingerprint()})"
        )


@dataclass(frozen=True, slots=True)
class PartialDecryption:
    """Member ``index``'s partials ``c_j^(2Δ·s_index)`` for one list of ciphertexts."""

    index: int
    values: tuple[Any, ...]
    proof: EqualityProof


class KeyShare:
    """One member's share ``s_i`` of the decryption exponent, with the public key."""

    __slots__ = ("_exponent", "_lock", "index", "public_key", "secret")

    def __init__(self, public_key: ThresholdPublicKey, index: int, secret: int) -> None:
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(f"index must be an int, got {type(index).__name__}")
        if not 1 <= index <= public_key.parties:
            raise ValueError(f"share index must be in 1..{public_key.parties}, got {index}")
        secret_ = mpz(operator.index(secret))
        if secret_ <= 0:
            raise ValueError("share must be a positive integer")
        expected = public_key.verification_keys[index - 1]
        nsquare = public_key.public_key.nsquare
        if gmpy2.powmod(public_key.verification_base, public_key.delta * secret_, nsquare) != (
            expected
        ):
            raise ValueError(
                f"share {index} does not match verification key {index} of the public key "
                "(a share of another key?)"
            )
        self.public_key = public_key
        self.index = index
        self.secret = secret_
        self._exponent: FixedExponent | None = None
        self._lock = threading.Lock()

    def _exponentiation(self) -> FixedExponent:
        with self._lock:
            if self._exponent is None:
                self._exponent = FixedExponent(
                    2 * self.public_key.delta * self.secret, self.public_key.public_key.nsquare
                )
            return self._exponent

    def partial_decrypt(
        self, ciphertexts: Sequence[int], *, context: bytes = b"", workers: int = 1
    ) -> PartialDecryption:
        """``c^(2Δ·s_i) mod n²`` for each ciphertext, with one proof for all of them.

        ``context`` is bound into the proof (the caller's round and range), so a proof
        cannot be replayed for another request. The exponentiation is constant-time
        (see :mod:`fedcore.crypto.modexp`); ``workers`` threads share the list (OpenSSL
        runs without the GIL). Raises InvalidCiphertextError outside Z*_{n²}.
        """
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        values = [mpz(operator.index(c)) for c in ciphertexts]
        validate_ciphertexts(values, self.public_key.public_key)
        exponentiation = self._exponentiation()
        if workers > 1 and len(values) >= 2 * workers:
            bounds = [len(values) * i // workers for i in range(workers + 1)]
            with ThreadPoolExecutor(max_workers=workers) as pool:
                parts = pool.map(
                    exponentiation.powmod,
                    [values[lo:hi] for lo, hi in itertools.pairwise(bounds)],
                )
                partials = [value for part in parts for value in part]
        else:
            partials = exponentiation.powmod(values)
        big_c, big_d = batch_bases(self.public_key, self.index, context, values, partials)
        proof = prove(
            self.public_key, self.index, self.public_key.delta * self.secret, big_c, big_d
        )
        return PartialDecryption(self.index, tuple(partials), proof)

    def to_bytes(self) -> bytes:
        """JSON with the public key, the index and the share. Secret: handle with care."""
        return _keys._dump_document(
            {
                "type": _SHARE_TYPE,
                "version": _FORMAT_VERSION,
                "public_key": self.public_key.to_document(),
                "index": self.index,
                "share": str(self.secret),
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> KeyShare:
        """Parse :meth:`to_bytes` output; ValueError names what is wrong."""
        document = _keys._parse_document(data, _SHARE_TYPE, limit=_MAX_DOCUMENT)
        index = document.get("index")
        if not isinstance(index, int) or isinstance(index, bool):
            raise ValueError("field 'index' must be an integer")
        public_key = ThresholdPublicKey.from_document(document.get("public_key"))
        return cls(public_key, index, _keys._parse_int(document, "share"))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the share file with mode 0600 (atomically replacing any old file)."""
        _keys._write_private_file(Path(path), self.to_bytes())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> KeyShare:
        """Read a share file; KeyFileError if group/world readable or malformed."""
        data = _keys._read_secret_file(Path(path), "key share file", limit=_MAX_DOCUMENT)
        try:
            return cls.from_bytes(data)
        except ValueError as exc:
            raise KeyFileError(f"malformed key share file {path}: {exc}") from None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, KeyShare):
            return NotImplemented
        return self.index == other.index and self.secret == other.secret

    def __hash__(self) -> int:
        return hash(("KeyShare", self.index, int(self.secret)))

    def __repr__(self) -> str:
        return f"KeyShare(index={self.index}, public_key={self.public_key!r})"


def deal(
    bits: int = 2048,
    threshold: int = 3,
    parties: int = 5,
    *,
    progress: DealProgress | None = None,
) -> tuple[ThresholdPublicKey, list[KeyShare]]:
    """A fresh threshold key: the public key and N shares, any T of which decrypt.

    Run by a trusted dealer; p, q, m, d and the polynomial exist only inside this call
    (Python cannot wipe integers: run it in a process that exits afterwards, as
    ``fedcore keygen`` does). ``bits`` must be a multiple of 16 in 512..16384 (512 and
    1024 are for tests).
    """
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"bits must be an int, got {type(bits).__name__}")
    if not _keys.MIN_KEY_BITS <= bits <= _keys.MAX_KEY_BITS or bits % 16:
        raise ValueError(
            f"bits must be a multiple of 16 in {_keys.MIN_KEY_BITS}..{_keys.MAX_KEY_BITS}, "
            f"got {bits}"
        )
    _check_counts(threshold, parties)

    def report(step: str, done: int, total: int) -> None:
        if progress is not None:
            progress(step, done, total)

    while True:
        p = random_safe_prime(bits // 2, lambda tried: report("safe prime p", tried, 0))
        report("safe prime p", 1, 1)
        q = random_safe_prime(bits // 2, lambda tried: report("safe prime q", tried, 0))
        report("safe prime q", 1, 1)
        n = p * q
        if p != q and n.bit_length() == bits and gmpy2.gcd(n, (p - 1) * (q - 1)) == 1:
            break
    m = (p - 1) // 2 * ((q - 1) // 2)
    nm = n * m
    d = m * gmpy2.invert(m, n)  # ≡ 0 mod m, ≡ 1 mod n
    coefficients = [d] + [mpz(secrets.randbelow(int(nm))) for _ in range(threshold - 1)]
    secrets_ = []
    for i in range(1, parties + 1):
        value = mpz(0)
        for coefficient in reversed(coefficients):
            value = (value * i + coefficient) % nm
        secrets_.append(value)
    nsquare = n * n
    while True:
        root = mpz(secrets.randbelow(int(nsquare)))
        if gmpy2.gcd(root, n) == 1:
            break
    v = root * root % nsquare
    delta = mpz(math.factorial(parties))
    vks = []
    for i, s in enumerate(secrets_, start=1):
        vks.append(gmpy2.powmod(v, delta * s, nsquare))
        report("verification keys", i, parties)
    public = ThresholdPublicKey(PublicKey(int(n)), threshold, parties, int(v), vks)
    shares = [KeyShare(public, i, int(s)) for i, s in enumerate(secrets_, start=1)]
    del p, q, m, nm, d, coefficients, secrets_
    return public, shares


def key_file_paths(directory: str | os.PathLike[str], parties: int) -> tuple[Path, list[Path]]:
    """Where a dealt key's files go: ``public_key.json`` and ``share-1.json`` … ``share-N.json``."""
    directory = Path(directory)
    return directory / "public_key.json", [
        directory / f"share-{i}.json" for i in range(1, parties + 1)
    ]


def save_key_files(
    public_key: ThresholdPublicKey, shares: Sequence[KeyShare], directory: str | os.PathLike[str]
) -> tuple[Path, list[Path]]:
    """Write the public key and every share (0600) at :func:`key_file_paths`; their paths."""
    public_path, share_paths = key_file_paths(directory, public_key.parties)
    public_key.save(public_path)
    for share in shares:
        share.save(share_paths[share.index - 1])
    return public_path, [share_paths[share.index - 1] for share in shares]


def _lagrange(indices: Sequence[int], delta: mpz) -> list[mpz]:
    """``μ_i = Δ·Π_{j≠i} j / (j - i)`` for each i (exact integers since Δ = N!)."""
    out = []
    for i in indices:
        numerator, denominator = delta, mpz(1)
        for j in indices:
            if j != i:
                numerator *= j
                denominator *= j - i
        if numerator % denominator:
            raise ArithmeticError("Lagrange coefficient is not an integer (index above N?)")
        out.append(numerator // denominator)
    return out


def combine(key: ThresholdPublicKey, partials: Sequence[PartialDecryption]) -> list[int]:
    """The plaintexts from T partial decryptions by distinct members.

    ``x = L(Π c_i^(2μ_i) mod n²) · (4Δ²)^-1 mod n`` (see the module docstring). Uses the
    first T partials given; they must come from distinct indices and cover the same
    ciphertexts. Verify each with :func:`verify` first: combining an unverified partial
    gives a wrong plaintext, not an error. Fewer than T raise ValueError.
    """
    chosen = list(partials)[: key.threshold]
    if len(chosen) < key.threshold:
        raise ValueError(
            f"{len(chosen)} partial decryptions given; this {key.threshold}-of-{key.parties} "
            "key needs at least the threshold"
        )
    indices = [partial.index for partial in chosen]
    if len(set(indices)) != len(indices):
        raise ValueError(f"partial decryptions must come from distinct members, got {indices}")
    if any(not 1 <= i <= key.parties for i in indices):
        raise ValueError(f"share indices must be in 1..{key.parties}, got {indices}")
    lengths = {len(partial.values) for partial in chosen}
    if len(lengths) != 1:
        raise ValueError(f"partial decryptions differ in length: {sorted(lengths)}")
    n, nsquare = key.public_key.n, key.public_key.nsquare
    coefficients = [2 * mu for mu in _lagrange(indices, key.delta)]
    scale = gmpy2.invert(4 * key.delta * key.delta, n)
    powmod = gmpy2.powmod
    out: list[int] = []
    for column in zip(*(partial.values for partial in chosen), strict=True):
        product = mpz(1)
        for value, exponent in zip(column, coefficients, strict=True):
            product = product * powmod(value, exponent, nsquare) % nsquare
        out.append(int(gmpy2.divexact(product - 1, n) * scale % n))
    return out


def verify(
    key: ThresholdPublicKey,
    ciphertexts: Sequence[int],
    partial: PartialDecryption,
    *,
    context: bytes = b"",
) -> bool:
    """True iff ``partial`` is member ``partial.index``'s correct answer to ``ciphertexts``.

    Checks the index, the length, that every partial is in Z*_{n²}, and the batched
    proof over ``context`` (see :mod:`fedcore.crypto.threshold_proof`).
    """
    if not 1 <= partial.index <= key.parties or len(partial.values) != len(ciphertexts):
        return False
    try:
        values = [mpz(operator.index(c)) for c in partial.values]
        validate_ciphertexts(values, key.public_key)
        ciphertexts = [mpz(operator.index(c)) for c in ciphertexts]
        validate_ciphertexts(ciphertexts, key.public_key)
    except (InvalidCiphertextError, TypeError):
        return False
    big_c, big_d = batch_bases(key, partial.index, context, ciphertexts, values)
    return check_proof(key, partial.index, big_c, big_d, partial.proof)
