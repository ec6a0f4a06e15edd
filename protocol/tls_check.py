"""Preflight of a party's TLS files: what a handshake would find wrong, found at start.

An aggregator, relay or client that starts with a certificate its peers will refuse
(expired, issued for the wrong purpose, not from the federation CA, not matching its
key) fails only later, on every connection, with an alert that names none of this.
`check_credentials` reads the three files once and raises `CredentialError` with one
line naming the file and what to do. It uses pyca/cryptography for X.509 parsing and
signature checks and ``ssl`` for the final load, so what passes here also loads in the
transport's `SSLContext`.
"""

from __future__ import annotations

import datetime as dt
import os
import ssl
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

__all__ = ["CredentialError", "Purpose", "check_credentials"]

Purpose = Literal["server", "client", "relay"]

_NEEDS: dict[str, tuple[tuple[x509.ObjectIdentifier, str], ...]] = {
    "server": ((ExtendedKeyUsageOID.SERVER_AUTH, "serverAuth"),),
    "client": ((ExtendedKeyUsageOID.CLIENT_AUTH, "clientAuth"),),
    "relay": (
        (ExtendedKeyUsageOID.SERVER_AUTH, "serverAuth"),
        (ExtendedKeyUsageOID.CLIENT_AUTH, "clientAuth"),
    ),
}
_MAKE_HINT = "make one with `fedcore certs`"


class CredentialError(ValueError):
    """A certificate, private key or CA file cannot serve for this party; says which."""


def _read(path: Path, what: str, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise CredentialError(f"{what} {path} does not exist (check {flag})") from None
    except IsADirectoryError:
        raise CredentialError(f"{what} {path} is a directory, not a PEM file ({flag})") from None
    except OSError as exc:
        raise CredentialError(f"cannot read {what} {path}: {exc.strerror} ({flag})") from None


def _load_cert(path: Path, what: str, flag: str) -> x509.Certificate:
    data = _read(path, what, flag)
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise CredentialError(
            f"{what} {path} is not a PEM certificate ({flag}; {_MAKE_HINT})"
        ) from None


def _check_dates(cert: x509.Certificate, what: str, path: Path, now: dt.datetime) -> None:
    if now < cert.not_valid_before_utc:
        raise CredentialError(
            f"{what} {path} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC "
            "(check this machine's clock)"
        )
    if now > cert.not_valid_after_utc:
        raise CredentialError(
            f"{what} {path} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC "
            f"(issue a new one: {_MAKE_HINT})"
        )


def check_credentials(
    cert: str | os.PathLike[str],
    key: str | os.PathLike[str],
    ca: str | os.PathLike[str],
    *,
    purpose: Purpose,
    now: dt.datetime | None = None,
) -> x509.Certificate:
    """Check ``cert``/``key``/``ca`` for ``purpose``; return the certificate.

    Refused, each with its own message: a missing or unreadable file; a CA that is
    not a CA certificate or is outside its validity; a certificate outside its
    validity, not issued by ``ca`` (signature checked), or whose extended key usage
    lacks what ``purpose`` needs (serverAuth for the aggregator, clientAuth for a
    client, both for a relay); a key that is not a PEM private key or does not match
    the certificate's public key.
    """
    cert_path, key_path, ca_path = Path(cert), Path(key), Path(ca)
    flags = {"server": "--cert", "client": "--cert", "relay": "--cert"}
    moment = now or dt.datetime.now(dt.UTC)
    authority = _load_cert(ca_path, "CA certificate", "--ca")
    try:
        is_ca = authority.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise CredentialError(
            f"CA certificate {ca_path} is not a CA (no BasicConstraints CA:TRUE): "
            "--ca takes the federation's ca.pem"
        )
    _check_dates(authority, "CA certificate", ca_path, moment)
    certificate = _load_cert(cert_path, "certificate", flags[purpose])
    _check_dates(certificate, "certificate", cert_path, moment)
    try:
        certificate.verify_directly_issued_by(authority)
    except (ValueError, TypeError, InvalidSignature):
        raise CredentialError(
            f"certificate {cert_path} was not issued by the CA {ca_path}: "
            "use the federation's ca.pem and a certificate it issued"
        ) from None
    try:
        usage = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usage = None  # no EKU extension: TLS allows any purpose
    if usage is not None:
        missing = [name for oid, name in _NEEDS[purpose] if oid not in usage]
        if missing:
            raise CredentialError(
                f"certificate {cert_path} is not issued for {' and '.join(missing)}: a "
                f"{purpose} needs a {purpose} certificate ({_MAKE_HINT})"
            )
    key_data = _read(key_path, "private key", "--key")
    try:
        private_key = serialization.load_pem_private_key(key_data, password=None)
    except (ValueError, TypeError):
        raise CredentialError(
            f"private key {key_path} is not an unencrypted PEM private key (--key)"
        ) from None
    pem = serialization.Encoding.PEM
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if private_key.public_key().public_bytes(pem, spki) != certificate.public_key().public_bytes(
        pem, spki
    ):
        raise CredentialError(
            f"private key {key_path} does not match certificate {cert_path}: "
            "give the .key written next to that .pem"
        )
    context = ssl.SSLContext(
        ssl.PROTOCOL_TLS_SERVER if purpose != "client" else ssl.PROTOCOL_TLS_CLIENT
    )
    try:
        context.load_verify_locations(cafile=os.fspath(ca_path))
        context.load_cert_chain(os.fspath(cert_path), os.fspath(key_path))
    except ssl.SSLError as exc:
        raise CredentialError(
            f"TLS cannot use {cert_path} with {key_path}: {exc.reason or exc}"
        ) from None
    return certificate
