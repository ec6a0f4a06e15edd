"""Signed statements that clients and committee members check against the federation CA.

Two statements cross the aggregator, which relays them but cannot forge them:

- `CommitteeCredential`: "my mask key for this federation is Y", signed by a committee
  member's TLS certificate key. Clients mask their updates for the round's unmaskers
  only after checking their credentials.
- `ContributorToken`: "for this federation, model version and round I uploaded an
  update of this digest, masked with my ephemeral key X for these unmaskers", signed
  by the client's certificate key. The committee unmasks only sums of at least
  ``min_clients`` distinct, valid tokens: the aggregator cannot invent a contributor
  (it would need a CA-signed certificate and its key).

Signatures are ECDSA-SHA256 (EC keys), RSA-PSS-SHA256 (RSA keys) or Ed25519, over a
canonical msgpack array that starts with a domain string; certificates are verified
with ``cryptography``'s X.509 path validation against the CA (validity period, the
client-auth extended key usage). This assumes the CA is not run by the aggregator's
operator, or at least not used by it to mint identities; see docs/threat-model.md.
Knows nothing of Paillier, packing or sockets.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import msgpack
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509 import verification
from cryptography.x509.oid import NameOID

from fedcore.errors import FedcoreError

__all__ = [
    "MAX_CERTIFICATE_BYTES",
    "MAX_TOKEN_BYTES",
    "CertificateAuthority",
    "CommitteeCredential",
    "ContributorToken",
    "CredentialError",
    "Signer",
    "pack_tokens",
    "unpack_tokens",
]

MAX_CERTIFICATE_BYTES = 8 * 1024
MAX_TOKEN_BYTES = 16 * 1024
MAX_TOKENS = 1 << 20
_COMMITTEE_DOMAIN = b"fedcore committee credential v1"
_TOKEN_DOMAIN = b"fedcore contributor token v1"
_MAX_SHARE_INDEX = 64
_DIGEST = 32
_X25519 = 32


class CredentialError(FedcoreError):
    """A signature, certificate or statement does not check out."""


def _signature_args(public_key: Any) -> tuple[Any, ...]:
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return (ec.ECDSA(hashes.SHA256()),)
    if isinstance(public_key, rsa.RSAPublicKey):
        pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH)
        return (pss, hashes.SHA256())
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return ()
    raise CredentialError(f"unsupported certificate key type {type(public_key).__name__}")


class Signer:
    """A party's certificate and TLS private key, used to sign statements."""

    def __init__(self, certificate: x509.Certificate, private_key: Any) -> None:
        self.certificate = certificate
        self.certificate_der = certificate.public_bytes(serialization.Encoding.DER)
        self._key = private_key
        self._args = _signature_args(private_key.public_key())

    @classmethod
    def load(cls, cert: str | os.PathLike[str], key: str | os.PathLike[str]) -> Signer:
        """Read a PEM certificate and its unencrypted PEM private key."""
        try:
            with open(cert, "rb") as cert_file, open(key, "rb") as key_file:
                certificate = x509.load_pem_x509_certificate(cert_file.read())
                private_key = serialization.load_pem_private_key(key_file.read(), None)
        except (OSError, ValueError, TypeError) as exc:
            raise CredentialError(f"cannot load certificate {cert} / key {key}: {exc}") from None
        return cls(certificate, private_key)

    @property
    def public_key_der(self) -> bytes:
        """SubjectPublicKeyInfo DER of the certificate key (an identity for derivations)."""
        return self.certificate.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def sign(self, data: bytes) -> bytes:
        """A signature over ``data`` with the certificate's key."""
        return bytes(self._key.sign(data, *self._args))


class CertificateAuthority:
    """Verifies client certificates against the federation CA (cached per certificate)."""

    _CACHE = 65536

    def __init__(self, ca_certificates: list[x509.Certificate]) -> None:
        if not ca_certificates:
            raise CredentialError("at least one CA certificate is needed")
        self._store = verification.Store(ca_certificates)
        self._lock = threading.Lock()
        self._cache: OrderedDict[bytes, tuple[str, dt.datetime, Any]] = OrderedDict()

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CertificateAuthority:
        """Read the CA certificate(s) from a PEM file."""
        try:
            with open(path, "rb") as handle:
                return cls(x509.load_pem_x509_certificates(handle.read()))
        except (OSError, ValueError) as exc:
            raise CredentialError(f"cannot load CA certificate {path}: {exc}") from None

    def _verifier(self) -> verification.ClientVerifier:
        # Our client certificates carry no SAN: accept one, do not require it.
        ee = verification.ExtensionPolicy.webpki_defaults_ee().may_be_present(
            x509.SubjectAlternativeName, verification.Criticality.AGNOSTIC, None
        )
        return (
            verification.PolicyBuilder()
            .store(self._store)
            .time(dt.datetime.now(dt.UTC))
            .extension_policies(
                ca_policy=verification.ExtensionPolicy.webpki_defaults_ca(), ee_policy=ee
            )
            .build_client_verifier()
        )

    def verify(self, certificate_der: bytes) -> tuple[str, Any]:
        """(common name, public key) of a valid client certificate; CredentialError else."""
        if len(certificate_der) > MAX_CERTIFICATE_BYTES:
            raise CredentialError("certificate too large")
        now = dt.datetime.now(dt.UTC)
        with self._lock:
            hit = self._cache.get(certificate_der)
        if hit is not None and hit[1] > now:
            return hit[0], hit[2]
        try:
            certificate = x509.load_der_x509_certificate(certificate_der)
            self._verifier().verify(certificate, [])
        except (ValueError, verification.VerificationError) as exc:
            raise CredentialError(f"certificate refused: {exc}") from None
        names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if not names:
            raise CredentialError("certificate has no common name")
        value = names[0].value
        common_name = value if isinstance(value, str) else value.decode()
        entry = (common_name, certificate.not_valid_after_utc, certificate.public_key())
        with self._lock:
            self._cache[certificate_der] = entry
            while len(self._cache) > self._CACHE:
                self._cache.popitem(last=False)
        return entry[0], entry[2]

    def check_signature(self, certificate_der: bytes, signature: bytes, data: bytes) -> str:
        """The signer's common name if ``signature`` over ``data`` verifies under its
        valid certificate; CredentialError otherwise."""
        common_name, public_key = self.verify(certificate_der)
        try:
            public_key.verify(signature, data, *_signature_args(public_key))
        except InvalidSignature:
            raise CredentialError(f"bad signature by {common_name}") from None
        return common_name


def _unpack(data: bytes, what: str, limit: int) -> list[Any]:
    if not isinstance(data, bytes) or len(data) > limit:
        raise CredentialError(f"{what} must be bytes of at most {limit}")
    try:
        value = msgpack.unpackb(
            data,
            raw=False,
            max_bin_len=limit,
            max_str_len=256,
            max_array_len=32,
            max_map_len=0,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises several unrelated types
        raise CredentialError(f"{what} is not valid msgpack: {exc}") from None
    if not isinstance(value, list):
        raise CredentialError(f"{what} must be a msgpack array")
    return value


def _bytes_field(value: object, what: str, size: int | None = None) -> bytes:
    if not isinstance(value, bytes) or (size is not None and len(value) != size):
        raise CredentialError(f"{what} must be {size or 'some'} bytes")
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class CommitteeCredential:
    """A committee member's signed mask key (and key share index) for one federation.

    ``share_index`` is 0 for a holder of the whole private key (shared mode) and
    ``i`` for the holder of share ``i`` of a threshold key.
    """

    federation: bytes
    mask_public: bytes
    certificate: bytes
    signature: bytes = b""
    share_index: int = 0

    def signed_bytes(self) -> bytes:
        """The canonical bytes the signature covers."""
        return msgpack.packb(
            [_COMMITTEE_DOMAIN, self.federation, self.mask_public, self.share_index]
        )

    @classmethod
    def issue(
        cls, signer: Signer, *, federation: bytes, mask_public: bytes, share_index: int = 0
    ) -> CommitteeCredential:
        """Sign ``mask_public`` (and the share index) for ``federation`` with the member's key."""
        unsigned = cls(
            federation=federation,
            mask_public=mask_public,
            certificate=signer.certificate_der,
            share_index=share_index,
        )
        return cls(
            federation=federation,
            mask_public=mask_public,
            certificate=signer.certificate_der,
            signature=signer.sign(unsigned.signed_bytes()),
            share_index=share_index,
        )

    def to_wire(self) -> bytes:
        """msgpack ``[federation, mask_public, certificate, signature, share_index]``."""
        return msgpack.packb(
            [self.federation, self.mask_public, self.certificate, self.signature, self.share_index]
        )

    @classmethod
    def from_wire(cls, data: bytes) -> CommitteeCredential:
        """Parse :meth:`to_wire` output (CredentialError when malformed)."""
        items = _unpack(data, "committee credential", MAX_TOKEN_BYTES)
        if len(items) != 5:
            raise CredentialError("committee credential must have 5 fields")
        index = items[4]
        if type(index) is not int or not 0 <= index <= _MAX_SHARE_INDEX:
            raise CredentialError(f"committee credential share index must be 0..{_MAX_SHARE_INDEX}")
        return cls(
            federation=_bytes_field(items[0], "federation", _DIGEST),
            mask_public=_bytes_field(items[1], "mask_public", _X25519),
            certificate=_bytes_field(items[2], "certificate"),
            signature=_bytes_field(items[3], "signature"),
            share_index=index,
        )

    def verify(self, ca: CertificateAuthority, *, federation: bytes) -> str:
        """The member's common name if the credential is valid for ``federation``."""
        if self.federation != federation:
            raise CredentialError("committee credential is for another federation")
        return ca.check_signature(self.certificate, self.signature, self.signed_bytes())


@dataclass(frozen=True, slots=True, kw_only=True)
class ContributorToken:
    """A client's signed statement about the update it uploaded for one round."""

    federation: bytes
    round_id: int
    model_digest: bytes
    client_public: bytes
    unmaskers: tuple[bytes, ...]
    item_count: int
    upload_digest: bytes
    certificate: bytes
    signature: bytes = b""

    def _statement(self) -> list[Any]:
        """The signed fields, in wire order."""
        return [
            self.federation,
            self.round_id,
            self.model_digest,
            self.client_public,
            list(self.unmaskers),
            self.item_count,
            self.upload_digest,
        ]

    def signed_bytes(self) -> bytes:
        """The canonical bytes the signature covers."""
        return msgpack.packb([_TOKEN_DOMAIN, *self._statement()])

    def signed_by(self, signer: Signer) -> ContributorToken:
        """A copy carrying ``signer``'s certificate and signature."""
        unsigned = dataclasses.replace(self, certificate=signer.certificate_der, signature=b"")
        return dataclasses.replace(unsigned, signature=signer.sign(unsigned.signed_bytes()))

    def to_wire(self) -> bytes:
        """msgpack array of the fields, then certificate and signature."""
        return msgpack.packb([*self._statement(), self.certificate, self.signature])

    @classmethod
    def from_wire(cls, data: bytes) -> ContributorToken:
        """Parse :meth:`to_wire` output (CredentialError when malformed)."""
        items = _unpack(data, "contributor token", MAX_TOKEN_BYTES)
        if len(items) != 9:
            raise CredentialError("contributor token must have 9 fields")
        round_id, item_count, unmaskers = items[1], items[5], items[4]
        if (
            type(round_id) is not int
            or round_id < 0
            or type(item_count) is not int
            or item_count < 0
        ):
            raise CredentialError("contributor token round_id/item_count must be ints >= 0")
        if not isinstance(unmaskers, list) or not 1 <= len(unmaskers) <= 16:
            raise CredentialError("contributor token must name 1..16 unmaskers")
        return cls(
            federation=_bytes_field(items[0], "federation", _DIGEST),
            round_id=round_id,
            model_digest=_bytes_field(items[2], "model_digest", _DIGEST),
            client_public=_bytes_field(items[3], "client_public", _X25519),
            unmaskers=tuple(_bytes_field(u, "unmasker", _X25519) for u in unmaskers),
            item_count=item_count,
            upload_digest=_bytes_field(items[6], "upload_digest", _DIGEST),
            certificate=_bytes_field(items[7], "certificate"),
            signature=_bytes_field(items[8], "signature"),
        )

    def verify(self, ca: CertificateAuthority) -> str:
        """The contributor's common name if signature and certificate are valid."""
        return ca.check_signature(self.certificate, self.signature, self.signed_bytes())


def pack_tokens(tokens: list[bytes]) -> bytes:
    """Many serialized tokens as one msgpack array (the protocol carries it as bytes)."""
    return msgpack.packb(tokens)


def unpack_tokens(data: bytes) -> list[bytes]:
    """Inverse of :func:`pack_tokens`, with size limits; CredentialError when malformed."""
    if not isinstance(data, bytes):
        raise CredentialError("contributor list must be bytes")
    try:
        value = msgpack.unpackb(
            data,
            raw=False,
            max_bin_len=MAX_TOKEN_BYTES,
            max_str_len=0,
            max_array_len=MAX_TOKENS,
            max_map_len=0,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises several unrelated types
        raise CredentialError(f"contributor list is not valid msgpack: {exc}") from None
    if not isinstance(value, list) or not all(isinstance(t, bytes) for t in value):
        raise CredentialError("contributor list must be an array of byte strings")
    return value


def digest_of(data: bytes) -> bytes:
    """SHA-256 (32 bytes)."""
    return hashlib.sha256(data).digest()
