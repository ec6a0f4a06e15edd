"""Paillier keys: generation (via phe), phe conversion, JSON bytes and key files.

Keys and primes always come from phe's ``generate_paillier_keypair``; this module never
searches for primes itself. Public keys travel as canonical JSON (integers as decimal
strings); private key files are written 0600 and refused when group/world readable.
Nothing here knows about packing or the wire protocol beyond ``to_bytes``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import operator
import os
import stat
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gmpy2
from gmpy2 import mpz
from phe import paillier

from fedcore.crypto.decrypt import CrtConstants, DecryptPool, parallel_crt_decrypt
from fedcore.crypto.encrypt import ShortExponentRandomizer, check_plaintexts, encrypt_with_factors
from fedcore.errors import KeyFileError

__all__ = [
    "MAX_KEY_BITS",
    "MIN_KEY_BITS",
    "MIN_SECURE_KEY_BITS",
    "PrivateKey",
    "PublicKey",
    "check_modulus",
    "generate_keypair",
]

MIN_KEY_BITS = 512
"""Smallest modulus the arithmetic accepts (512 and 1024 are for tests only)."""
MIN_SECURE_KEY_BITS = 2048
"""Smallest modulus a federation accepts unless a test explicitly allows less."""
# Trial division bound for check_modulus: every prime below it (one gcd with their product).
_SMALL_PRIME_BOUND = 1 << 16
_small_primes_product: Any = None
MAX_KEY_BITS = 16384
"""Largest modulus accepted from bytes or files: bounds the work a peer can ask of us."""
_MAX_KEY_DOCUMENT = 64 * 1024

_PUBLIC_TYPE = "fedcore-paillier-public-key"
_PRIVATE_TYPE = "fedcore-paillier-private-key"
_FORMAT_VERSION = 1


def _parse_int(document: dict[str, Any], field: str) -> mpz:
    """A positive integer stored as a decimal string (JSON numbers lose precision)."""
    text = document.get(field)
    if not isinstance(text, str) or not text.isdigit() or len(text) > MAX_KEY_BITS:
        raise ValueError(f"field {field!r} must be a decimal string")
    return mpz(text)


def check_modulus(n: int, *, min_bits: int = MIN_SECURE_KEY_BITS) -> None:
    """Raise ValueError unless ``n`` is a plausible Paillier modulus p·q.

    A product of two large primes is odd, at least ``min_bits`` long, not prime, not a
    perfect power, and has no prime factor below 2^16. These checks cost a few
    milliseconds and stop an aggregator from handing clients a modulus whose factors it
    knows trivially (3^323, 3·5·7·P, a prime). They cannot prove n = p·q with p, q
    large: a federation pins the key it was given by its key authority for that.
    """
    global _small_primes_product
    n_ = mpz(operator.index(n))
    bits = n_.bit_length()
    if bits < min_bits:
        raise ValueError(
            f"n has {bits} bits; at least {min_bits} are required "
            f"(2048 is the minimum for real use)"
        )
    if n_ % 2 == 0:
        raise ValueError("n is even; a Paillier modulus is a product of two odd primes")
    if gmpy2.is_prime(n_):
        raise ValueError("n is prime; a Paillier modulus is a product of two primes")
    if gmpy2.is_power(n_):
        raise ValueError("n is a perfect power; a Paillier modulus is p·q with p != q")
    if _small_primes_product is None:
        _small_primes_product = gmpy2.primorial(_SMALL_PRIME_BOUND)
    small = gmpy2.gcd(n_, _small_primes_product)
    if small != 1:
        raise ValueError(f"n has a small prime factor (gcd with primes below 2^16 is {small})")


def _parse_document(
    data: bytes, expected_type: str, *, limit: int = _MAX_KEY_DOCUMENT
) -> dict[str, Any]:
    if len(data) > limit:
        raise ValueError(f"key document is {len(data)} bytes, limit {limit}")
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"key document is not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise ValueError("key document must be a JSON object")
    if document.get("type") != expected_type:
        raise ValueError(
            f"key document type must be {expected_type!r}, got {document.get('type')!r}"
        )
    if document.get("version") != _FORMAT_VERSION:
        raise ValueError(f"key document version must be {_FORMAT_VERSION}")
    return document


def _dump_document(document: dict[str, Any]) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode() + b"\n"


def _write_private_file(path: Path, data: bytes) -> None:
    """Write atomically to a 0600 temp file in the same directory, then rename over path."""
    directory = path.parent
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=directory)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def _read_secret_file(path: Path, what: str, *, limit: int = _MAX_KEY_DOCUMENT) -> bytes:
    """A secret key file's bytes; KeyFileError if missing or readable by group or others."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise KeyFileError(f"cannot read {what} {path}: {exc.strerror}") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"{what} {path} is accessible by group or others "
            f"(mode {stat.S_IMODE(mode):04o}); run: chmod 600 {path}"
        )
    return _read_key_file(path, limit=limit)


def _read_key_file(path: Path, *, limit: int = _MAX_KEY_DOCUMENT) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read(limit + 1)
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror}") from exc


class PublicKey:
    """A Paillier public key ``n`` with ``g = n + 1``; encrypts whole vectors fast.

    Immutable apart from a lazily built, per-instance random-factor table (see
    :class:`fedcore.crypto.encrypt.ShortExponentRandomizer`); two instances of the same
    key are equal but never share that table or its secret base.
    """

    __slots__ = ("__weakref__", "_lock", "_n", "_nsquare", "_randomizer_cache")

    def __init__(self, n: int) -> None:
        n_ = mpz(operator.index(n))
        bits = n_.bit_length()
        if not MIN_KEY_BITS <= bits <= MAX_KEY_BITS:
            raise ValueError(f"n must have {MIN_KEY_BITS}..{MAX_KEY_BITS} bits, got {bits}")
        if n_ % 2 == 0:
            raise ValueError("n must be odd (a product of two odd primes)")
        self._n = n_
        self._nsquare = n_ * n_
        self._randomizer_cache: ShortExponentRandomizer | None = None
        self._lock = threading.Lock()

    @property
    def n(self) -> mpz:
        """The modulus n = p·q."""
        return self._n

    @property
    def nsquare(self) -> mpz:
        """n², the ciphertext modulus."""
        return self._nsquare

    @property
    def bits(self) -> int:
        """Key size: the bit length of n."""
        return int(self._n.bit_length())

    @property
    def plaintext_bytes(self) -> int:
        """Width of one serialized plaintext: ceil(bits / 8)."""
        return (self.bits + 7) // 8

    @property
    def ciphertext_bytes(self) -> int:
        """Width of one serialized ciphertext: 2 · ceil(bits / 8) (n² fits)."""
        return 2 * self.plaintext_bytes

    def sha256(self) -> str:
        """SHA-256 over n's big-endian bytes (``plaintext_bytes`` long), 64 hex digits.

        This is the federation's key identity: clients pin it, and the key file and
        the federation file carry it.
        """
        return hashlib.sha256(self._n.to_bytes(self.plaintext_bytes, "big")).hexdigest()

    def fingerprint(self) -> str:
        """The first 16 hex digits of :meth:`sha256`, for logs (never for pinning)."""
        return self.sha256()[:16]

    def check(self, *, min_bits: int = MIN_SECURE_KEY_BITS) -> None:
        """Raise ValueError unless n is a plausible modulus (see :func:`check_modulus`)."""
        check_modulus(self._n, min_bits=min_bits)

    # --- conversion -------------------------------------------------------------

    @classmethod
    def from_phe(cls, public_key: paillier.PaillierPublicKey) -> PublicKey:
        """Wrap a phe public key (same n, so ciphertexts interoperate)."""
        return cls(int(public_key.n))

    def to_phe(self) -> paillier.PaillierPublicKey:
        """The equivalent phe public key."""
        return paillier.PaillierPublicKey(int(self._n))

    def to_bytes(self) -> bytes:
        """Canonical JSON: ``{"n": "<decimal>", "sha256": ..., "type": ..., "version": 1}``."""
        return _dump_document(
            {
                "type": _PUBLIC_TYPE,
                "version": _FORMAT_VERSION,
                "n": str(self._n),
                "sha256": self.sha256(),
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> PublicKey:
        """Parse :meth:`to_bytes` output; ValueError names what is wrong.

        A document that carries ``sha256`` must match its ``n`` (a file edited by hand,
        or two keys mixed up, is refused).
        """
        document = _parse_document(data, _PUBLIC_TYPE)
        key = cls(_parse_int(document, "n"))
        stated = document.get("sha256")
        if stated is not None and stated != key.sha256():
            raise ValueError(
                f"field 'sha256' says {str(stated)[:16]}..., but n hashes to {key.fingerprint()}..."
            )
        return key

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the public key file (world readable is fine: it is public)."""
        Path(path).write_bytes(self.to_bytes())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PublicKey:
        """Read a public key file; KeyFileError if missing or malformed."""
        data = _read_key_file(Path(path))
        try:
            return cls.from_bytes(data)
        except ValueError as exc:
            raise KeyFileError(f"malformed public key file {path}: {exc}") from None

    # --- encryption -------------------------------------------------------------

    def _randomizer(self) -> ShortExponentRandomizer:
        """The per-instance random-factor maker, built on first use (≈ 7,000 mulmods)."""
        randomizer = self._randomizer_cache
        if randomizer is None:
            with self._lock:
                randomizer = self._randomizer_cache
                if randomizer is None:
                    randomizer = ShortExponentRandomizer(self._n)
                    self._randomizer_cache = randomizer
        return randomizer

    def encrypt_vector(self, plaintexts: Sequence[int]) -> list[mpz]:
        """Encrypt each ``0 <= m < n`` with fresh randomness: ``c = (1 + m·n) · hs^a mod n²``.

        ``g^m = (1 + n)^m = 1 + m·n mod n²`` needs no exponentiation, and the random
        factor ``hs^a`` (fresh secrets-random short exponent ``a`` per ciphertext) costs
        ≈ 128 table multiplications at 2048 bits instead of a 2048-bit ``powmod``; see
        :mod:`fedcore.crypto.encrypt` for the security argument. Raises ValueError
        naming the first plaintext out of range.
        """
        check_plaintexts(plaintexts, self._n)
        factors = self._randomizer().factors(len(plaintexts))
        return encrypt_with_factors(plaintexts, factors, self._n, self._nsquare)

    # --- comparison -------------------------------------------------------------

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PublicKey):
            return NotImplemented
        return bool(self._n == other._n)

    def __hash__(self) -> int:
        return hash(("PublicKey", int(self._n)))

    def __reduce__(self) -> tuple[type[PublicKey], tuple[int]]:
        # Pickle n only (for worker processes): the random-factor table is per instance.
        return (PublicKey, (int(self._n),))

    def __repr__(self) -> str:
        return f"PublicKey(bits={self.bits}, fingerprint={self.fingerprint()})"


class PrivateKey:
    """A Paillier private key (primes p < q) with precomputed CRT constants."""

    __slots__ = ("_crt", "public_key")

    def __init__(self, public_key: PublicKey, p: int, q: int) -> None:
        p_, q_ = mpz(operator.index(p)), mpz(operator.index(q))
        if p_ == q_:
            raise ValueError("p and q must be different primes")
        if p_ < 3 or q_ < 3 or p_ * q_ != public_key.n:
            raise ValueError("p and q must be odd primes with p·q = n of the public key")
        if not (gmpy2.is_prime(p_) and gmpy2.is_prime(q_)):
            raise ValueError("p and q must be primes")
        self.public_key = public_key
        self._crt = CrtConstants(p_, q_)

    @property
    def p(self) -> mpz:
        """The smaller prime factor of n."""
        return self._crt.p

    @property
    def q(self) -> mpz:
        """The larger prime factor of n."""
        return self._crt.q

    # --- conversion -------------------------------------------------------------

    @classmethod
    def from_phe(cls, private_key: paillier.PaillierPrivateKey) -> PrivateKey:
        """Wrap a phe private key."""
        public_key = PublicKey.from_phe(private_key.public_key)
        return cls(public_key, int(private_key.p), int(private_key.q))

    def to_phe(self) -> paillier.PaillierPrivateKey:
        """The equivalent phe private key (with its phe public key)."""
        return paillier.PaillierPrivateKey(self.public_key.to_phe(), int(self.p), int(self.q))

    def to_bytes(self) -> bytes:
        """JSON with n, p and q as decimal strings. This is the secret: handle with care."""
        return _dump_document(
            {
                "type": _PRIVATE_TYPE,
                "version": _FORMAT_VERSION,
                "n": str(self.public_key.n),
                "p": str(self.p),
                "q": str(self.q),
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> PrivateKey:
        """Parse :meth:`to_bytes` output; ValueError names what is wrong."""
        document = _parse_document(data, _PRIVATE_TYPE)
        public_key = PublicKey(_parse_int(document, "n"))
        return cls(public_key, _parse_int(document, "p"), _parse_int(document, "q"))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the private key file with mode 0600 (atomically replacing any old file)."""
        _write_private_file(Path(path), self.to_bytes())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PrivateKey:
        """Read a private key file; KeyFileError if group/world readable or malformed."""
        data = _read_secret_file(Path(path), "private key file")
        try:
            return cls.from_bytes(data)
        except ValueError as exc:
            raise KeyFileError(f"malformed private key file {path}: {exc}") from None

    # --- decryption -------------------------------------------------------------

    def decrypt_vector(
        self, ciphertexts: Sequence[int], workers: int = 1, *, constant_time: bool = True
    ) -> list[int]:
        """Decrypt with the CRT (see :func:`fedcore.crypto.decrypt.crt_decrypt`).

        ``workers > 1`` splits the vector into contiguous ranges over that many
        processes (this one included). The default exponentiation is constant-time
        (OpenSSL's when libcrypto is usable, else GMP's ``powm_sec``: see
        :func:`fedcore.crypto.modexp.constant_time_backend`); ``constant_time=False``
        uses GMP's variable-time ``powm``, as phe does.
        Raises InvalidCiphertextError for a value outside Z*_{n²} (``0 < c < n²`` and
        ``gcd(c, n) = 1``, checked with one batched gcd, see ``validate_ciphertexts``):
        a "ciphertext" such as n, 2n or p is refused, never decrypted.
        """
        from fedcore.crypto.vector import validate_ciphertexts

        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        values = [mpz(operator.index(c)) for c in ciphertexts]
        validate_ciphertexts(values, self.public_key)
        return parallel_crt_decrypt(values, self._crt, workers, constant_time=constant_time)

    def open_vector(
        self,
        ciphertexts: Sequence[int],
        workers: int = 1,
        *,
        constant_time: bool = True,
        pool: DecryptPool | None = None,
    ) -> tuple[list[int], list[int]]:
        """Decrypt like :meth:`decrypt_vector`, and also recover each ciphertext's randomness.

        ``(plaintexts, randomness)``: with them anyone re-encrypts the ciphertexts, which
        is how an aggregator checks a key holder's answer (`fedcore.crypto.decrypt_proof`).
        ``pool`` (a `DecryptPool`, kept by a committee member) replaces ``workers``.
        """
        from fedcore.crypto.decrypt_proof import open_ciphertexts
        from fedcore.crypto.vector import validate_ciphertexts

        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        values = [mpz(operator.index(c)) for c in ciphertexts]
        validate_ciphertexts(values, self.public_key)
        return open_ciphertexts(
            values, self._crt, workers=workers, constant_time=constant_time, pool=pool
        )

    def prove_key(self, context: bytes) -> bytes:
        """The proof that this key is held, for a verifier's ``context`` (see decrypt_proof)."""
        from fedcore.crypto.decrypt_proof import prove_key

        return prove_key(self._crt, context, self.public_key)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PrivateKey):
            return NotImplemented
        return bool(self.p == other.p and self.q == other.q)

    def __hash__(self) -> int:
        return hash(("PrivateKey", int(self.p), int(self.q)))

    def __reduce__(self) -> tuple[type[PrivateKey], tuple[PublicKey, int, int]]:
        return (PrivateKey, (self.public_key, int(self.p), int(self.q)))

    def __repr__(self) -> str:
        return f"PrivateKey(public_key={self.public_key!r})"


def generate_keypair(bits: int = 2048) -> tuple[PublicKey, PrivateKey]:
    """A fresh keypair from phe's ``generate_paillier_keypair(n_length=bits)``.

    ``bits`` must be a multiple of 8 and at least 512 (512 and 1024 are for tests;
    2048 is the minimum for real use, 3072 for protection beyond 2030).
    """
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"bits must be an int, got {type(bits).__name__}")
    if bits < MIN_KEY_BITS or bits > MAX_KEY_BITS or bits % 8:
        raise ValueError(
            f"bits must be a multiple of 8 in {MIN_KEY_BITS}..{MAX_KEY_BITS}, got {bits}"
        )
    phe_public, phe_private = paillier.generate_paillier_keypair(n_length=bits)
    public_key = PublicKey.from_phe(phe_public)
    return public_key, PrivateKey(public_key, int(phe_private.p), int(phe_private.q))
