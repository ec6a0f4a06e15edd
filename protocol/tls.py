"""TLS for the protocol: SSLContext builders and the federation's certificate tooling.

Contexts are TLS 1.3 only with mutual authentication against the federation CA; a
peer's identity is the common name of its certificate. ``write_federation_pki``
makes a CA, an aggregator certificate and one certificate per client with
``cryptography``. This module knows nothing of messages, sessions or the runtime.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeAlias

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "DEFAULT_CERT_DAYS",
    "RSA_KEY_BITS",
    "CertPaths",
    "FederationPKI",
    "KeyType",
    "PrivateKey",
    "client_context",
    "generate_ca",
    "generate_private_key",
    "issue_certificate",
    "load_certificate",
    "peer_identity",
    "peer_serves",
    "server_context",
    "write_certificate",
    "write_federation_pki",
    "write_private_key",
]

DEFAULT_CERT_DAYS = 365
RSA_KEY_BITS = 3072
KeyType: TypeAlias = Literal["ec", "rsa"]
PrivateKey: TypeAlias = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
StrPath: TypeAlias = str | os.PathLike[str]


# --------------------------------------------------------------------------- contexts


def _tls13_context(
    protocol: int, cert: StrPath | None, key: StrPath | None, ca: StrPath
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.options |= ssl.OP_NO_COMPRESSION
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=os.fspath(ca))
    if cert is not None:
        ctx.load_cert_chain(os.fspath(cert), None if key is None else os.fspath(key))
    return ctx


def server_context(cert: StrPath, key: StrPath, ca: StrPath) -> ssl.SSLContext:
    """Aggregator context: TLS 1.3 only, client certificates required and checked against ``ca``."""
    ctx = _tls13_context(ssl.PROTOCOL_TLS_SERVER, cert, key, ca)
    # clients never resume sessions; tickets would only cost a write per handshake
    ctx.num_tickets = 0
    return ctx


def client_context(cert: StrPath, key: StrPath, ca: StrPath) -> ssl.SSLContext:
    """Client context: TLS 1.3 only, presents ``cert``, checks the server (CA and hostname)."""
    ctx = _tls13_context(ssl.PROTOCOL_TLS_CLIENT, cert, key, ca)
    ctx.check_hostname = True
    return ctx


def peer_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> str:
    """The verified peer's identity: its certificate's CN, else its first SAN.

    Raises ``ValueError`` when there is no peer certificate.
    """
    if ssl_object is None:
        raise ValueError("ssl_object is None: not a TLS connection")
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        raise ValueError("the peer presented no certificate")
    cert = x509.load_der_x509_certificate(der)
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if names:
        value = names[0].value
        return value if isinstance(value, str) else value.decode()
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise ValueError("the peer certificate has neither a CN nor a SAN") from None
    for entry in san:
        return str(entry.value)
    raise ValueError("the peer certificate has an empty SAN")


def peer_serves(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> bool:
    """Whether the peer's certificate is also issued for TLS server auth (a relay's is)."""
    der = None if ssl_object is None else ssl_object.getpeercert(binary_form=True)
    if not der:
        return False
    cert = x509.load_der_x509_certificate(der)
    try:
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return False  # fedcore's certificates always name their purpose
    return ExtendedKeyUsageOID.SERVER_AUTH in usage


# --------------------------------------------------------------------------- certificates


def generate_private_key(key_type: KeyType = "ec") -> PrivateKey:
    """A new private key: EC P-256 (default) or RSA-``RSA_KEY_BITS``."""
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=RSA_KEY_BITS)
    raise ValueError(f"key_type must be 'ec' or 'rsa', got {key_type!r}")


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedcore federation"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def generate_ca(
    common_name: str = "fedcore CA", *, days: int = DEFAULT_CERT_DAYS, key_type: KeyType = "ec"
) -> tuple[PrivateKey, x509.Certificate]:
    """A new self-signed CA: ``(private key, certificate)``."""
    if days <= 0:
        raise ValueError(f"days must be > 0, got {days}")
    key = generate_private_key(key_type)
    now = _now()
    name = _name(common_name)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _san_entry(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def issue_certificate(
    ca_key: PrivateKey,
    ca_cert: x509.Certificate,
    common_name: str,
    *,
    sans: Sequence[str] = (),
    server: bool = False,
    client: bool | None = None,
    days: int = DEFAULT_CERT_DAYS,
    key_type: KeyType = "ec",
    not_valid_before: dt.datetime | None = None,
    not_valid_after: dt.datetime | None = None,
) -> tuple[PrivateKey, x509.Certificate]:
    """A new key and a certificate for ``common_name`` signed by the CA.

    ``server=True`` marks it for TLS server auth; ``client`` for client auth (default:
    when not a server). A relay's certificate has both: it serves its clients and is a
    client of its upstream. ``sans`` become DNS names or IP addresses.
    ``not_valid_before``/``not_valid_after`` override the validity window (tests use
    them for expired certificates).
    """
    if not common_name:
        raise ValueError("common_name must not be empty")
    if days <= 0:
        raise ValueError(f"days must be > 0, got {days}")
    key = generate_private_key(key_type)
    now = _now()
    start = not_valid_before or now - dt.timedelta(minutes=5)
    end = not_valid_after or now + dt.timedelta(days=days)
    if end <= start:
        raise ValueError("not_valid_after must be later than not_valid_before")
    if client is None:
        client = not server
    usage = [
        oid
        for oid, wanted in (
            (ExtendedKeyUsageOID.SERVER_AUTH, server),
            (ExtendedKeyUsageOID.CLIENT_AUTH, client),
        )
        if wanted
    ]
    if not usage:
        raise ValueError("a certificate must be for server auth, client auth or both")
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if sans:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_san_entry(s) for s in sans]), critical=False
        )
    return key, builder.sign(ca_key, hashes.SHA256())


def write_private_key(path: Path, key: PrivateKey) -> None:
    """Write an unencrypted PKCS#8 PEM key readable by the owner only (mode 0600)."""
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)  # an existing file keeps its old mode through O_CREAT


def write_certificate(path: Path, cert: x509.Certificate) -> None:
    """Write a certificate as PEM."""
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def load_certificate(path: StrPath) -> x509.Certificate:
    """Read a PEM certificate."""
    return x509.load_pem_x509_certificate(Path(path).read_bytes())


@dataclass(frozen=True, slots=True)
class CertPaths:
    """Where one party's certificate and private key were written."""

    cert: Path
    key: Path


@dataclass(frozen=True, slots=True)
class FederationPKI:
    """The files written by ``write_federation_pki``."""

    out_dir: Path
    ca: CertPaths  # ca.key is for the operator only; the aggregator never needs it
    aggregator: CertPaths
    clients: tuple[CertPaths, ...]
    relays: tuple[CertPaths, ...] = ()

    @property
    def ca_cert(self) -> Path:
        """The CA certificate every party verifies its peer against."""
        return self.ca.cert


def write_federation_pki(
    out_dir: Path,
    *,
    clients: int,
    relays: int = 0,
    sans: Sequence[str] = ("localhost", "127.0.0.1"),
    days: int = DEFAULT_CERT_DAYS,
    key_type: KeyType = "ec",
) -> FederationPKI:
    """Make a federation's CA, aggregator, relay and client certificates under ``out_dir``.

    Writes ca.pem, ca.key, aggregator.pem, aggregator.key, relay-<i>.pem/.key,
    client-<i>.pem and client-<i>.key (keys mode 0600). The aggregator's and the
    relays' SAN lists ``sans`` (relays also serve clients, and are clients of their
    upstream); client i's CN is ``client-<i>``, relay i's ``relay-<i>``.
    """
    for name, count in (("clients", clients), ("relays", relays)):
        if type(count) is not int or count < 0:
            raise ValueError(f"{name} must be an int >= 0, got {count!r}")
    if not sans:
        raise ValueError("sans must name at least one host the aggregator is reached by")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = generate_ca(days=days, key_type=key_type)
    ca = CertPaths(out_dir / "ca.pem", out_dir / "ca.key")
    write_certificate(ca.cert, ca_cert)
    write_private_key(ca.key, ca_key)

    def issue(name: str, server: bool, client: bool | None = None) -> CertPaths:
        key, cert = issue_certificate(
            ca_key,
            ca_cert,
            name,
            sans=sans if server else (),
            server=server,
            client=client,
            days=days,
            key_type=key_type,
        )
        paths = CertPaths(out_dir / f"{name}.pem", out_dir / f"{name}.key")
        write_certificate(paths.cert, cert)
        write_private_key(paths.key, key)
        return paths

    aggregator = issue("aggregator", True)
    relay_paths = tuple(issue(f"relay-{i}", True, True) for i in range(relays))
    client_paths = tuple(issue(f"client-{i}", False) for i in range(clients))
    return FederationPKI(
        out_dir=out_dir, ca=ca, aggregator=aggregator, clients=client_paths, relays=relay_paths
    )
