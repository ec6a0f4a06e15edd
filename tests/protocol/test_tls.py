"""TLS: the federation PKI on disk, TLS 1.3-only mutual-auth contexts, and a real
server on 127.0.0.1 refusing every client that is not a valid federation member."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import ssl
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from protocol import (
    PROTOCOL_VERSION,
    Connection,
    FederationPKI,
    Hello,
    ProtocolError,
    Server,
    TransportConfig,
    Welcome,
    client_context,
    connect,
    generate_ca,
    issue_certificate,
    load_certificate,
    write_certificate,
    write_federation_pki,
    write_private_key,
)

FAST = TransportConfig(handshake_timeout=5.0, first_message_timeout=5.0, close_timeout=1.0)


def test_pki_files_names_and_key_modes(pki: FederationPKI) -> None:
    names = sorted(p.name for p in pki.out_dir.iterdir())
    assert names == sorted(
        ["ca.pem", "ca.key", "aggregator.pem", "aggregator.key"]
        + [f"client-{i}.{ext}" for i in range(3) for ext in ("pem", "key")]
    )
    for path in pki.out_dir.glob("*.key"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_certificates_carry_the_expected_names(pki: FederationPKI) -> None:
    agg = load_certificate(pki.aggregator.cert)
    san = agg.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    client = load_certificate(pki.clients[2].cert)
    assert client.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "client-2"
    ca = load_certificate(pki.ca.cert)
    assert client.issuer == ca.subject


def test_relay_certificates_serve_and_connect(tmp_path: Path) -> None:
    """A relay's certificate is for server auth (its clients) and client auth (upstream)."""
    out = write_federation_pki(tmp_path, clients=1, relays=2, sans=("relay.example",))
    assert [p.cert.name for p in out.relays] == ["relay-0.pem", "relay-1.pem"]

    def usages(path: Path) -> set[Any]:
        cert = load_certificate(path)
        return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)

    assert usages(out.relays[1].cert) == {
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    }
    assert usages(out.clients[0].cert) == {ExtendedKeyUsageOID.CLIENT_AUTH}
    assert usages(out.aggregator.cert) == {ExtendedKeyUsageOID.SERVER_AUTH}
    with pytest.raises(ValueError, match="relays"):
        write_federation_pki(tmp_path, clients=1, relays=-1)


def test_rsa_option_and_argument_checks(tmp_path: Path) -> None:
    out = write_federation_pki(tmp_path, clients=1, key_type="rsa", sans=("fed.example",), days=2)
    cert = load_certificate(out.clients[0].cert)
    assert cert.public_key().key_size == 3072  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="clients"):
        write_federation_pki(tmp_path, clients=-1)
    with pytest.raises(ValueError, match="key_type"):
        generate_ca(key_type="dsa")  # type: ignore[arg-type]


def test_contexts_are_tls13_only_mutual_and_uncompressed(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    for ctx in (server_ctx, client_ctx):
        assert ctx.minimum_version is ssl.TLSVersion.TLSv1_3
        assert ctx.maximum_version is ssl.TLSVersion.TLSv1_3
        assert ctx.verify_mode is ssl.CERT_REQUIRED
        assert ctx.options & ssl.OP_NO_COMPRESSION
    assert client_ctx.check_hostname


# ---------------------------------------------------------------------------- live server


async def _serve(server_ctx: ssl.SSLContext, seen: list[str]) -> Server:
    async def handler(conn: Connection) -> None:
        hello = await conn.receive()
        seen.append(conn.peer_identity)
        assert isinstance(hello, Hello)
        await conn.send(
            Welcome(
                version=PROTOCOL_VERSION,
                client_id=conn.peer_identity,
                federation=b"",
                session_config={},
            )
        )
        async for _ in conn:
            pass

    server = Server(handler, server_ctx, FAST)
    await server.start("127.0.0.1", 0)
    return server


async def test_valid_client_is_served_and_identified_by_cn(
    pki: FederationPKI, server_ctx: ssl.SSLContext
) -> None:
    seen: list[str] = []
    server = await _serve(server_ctx, seen)
    try:
        ctx = client_context(pki.clients[1].cert, pki.clients[1].key, pki.ca.cert)
        conn = await connect("127.0.0.1", server.port, ctx, config=FAST)
        assert conn.peer_identity == "aggregator"
        await conn.send(Hello(version=PROTOCOL_VERSION))
        welcome = await conn.receive()
        assert isinstance(welcome, Welcome) and welcome.client_id == "client-1"
        await conn.close()
        assert seen == ["client-1"]
        # the aggregator's SAN also lists "localhost"
        conn = await connect(
            "127.0.0.1", server.port, ctx, server_hostname="localhost", config=FAST
        )
        await conn.close()
    finally:
        await server.shutdown(2.0)


async def _assert_refused(port: int, ctx: ssl.SSLContext, seen: list[str]) -> None:
    """The handshake fails, or (TLS 1.3 checks the client's certificate after the
    client's side completed) the first exchange does; the handler never runs."""
    try:
        conn = await connect("127.0.0.1", port, ctx, config=FAST)
    except (ssl.SSLError, OSError, ProtocolError):
        pass
    else:
        with pytest.raises(ProtocolError):
            await conn.send(Hello(version=PROTOCOL_VERSION))
            await conn.receive()
        await conn.close()
    assert seen == []


def _bare_client_context(pki: FederationPKI) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(pki.ca.cert)
    return ctx


def _issued_client_context(
    pki: FederationPKI, tmp_path: Path, *, other_ca: bool = False, expired: bool = False
) -> ssl.SSLContext:
    if other_ca:
        ca_key, ca_cert = generate_ca("rogue CA")
    else:
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        ca_key = load_pem_private_key(pki.ca.key.read_bytes(), None)  # type: ignore[assignment]
        ca_cert = load_certificate(pki.ca.cert)
    now = dt.datetime.now(dt.UTC)
    key, cert = issue_certificate(
        ca_key,
        ca_cert,
        "client-0",
        not_valid_before=now - dt.timedelta(days=10) if expired else None,
        not_valid_after=now - dt.timedelta(days=1) if expired else None,
    )
    write_certificate(tmp_path / "c.pem", cert)
    write_private_key(tmp_path / "c.key", key)
    return client_context(tmp_path / "c.pem", tmp_path / "c.key", pki.ca.cert)


@pytest.mark.parametrize("case", ["tls12", "no_cert", "other_ca", "expired"])
async def test_invalid_clients_are_refused(
    case: str, pki: FederationPKI, server_ctx: ssl.SSLContext, tmp_path: Path
) -> None:
    seen: list[str] = []
    server = await _serve(server_ctx, seen)
    try:
        if case == "tls12":
            ctx = client_context(pki.clients[0].cert, pki.clients[0].key, pki.ca.cert)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        elif case == "no_cert":
            ctx = _bare_client_context(pki)
        else:
            ctx = _issued_client_context(
                pki, tmp_path, other_ca=case == "other_ca", expired=case == "expired"
            )
        await _assert_refused(server.port, ctx, seen)
        # the server is still fine for a valid client
        good = await connect(
            "127.0.0.1",
            server.port,
            client_context(pki.clients[0].cert, pki.clients[0].key, pki.ca.cert),
            config=FAST,
        )
        await good.send(Hello(version=PROTOCOL_VERSION))
        assert isinstance(await good.receive(), Welcome)
        await good.close()
    finally:
        await server.shutdown(2.0)


async def test_client_refuses_a_server_from_another_ca(
    pki: FederationPKI, client_ctx: ssl.SSLContext, tmp_path: Path
) -> None:
    rogue = write_federation_pki(tmp_path, clients=0)
    from protocol import server_context

    rogue_ctx = server_context(rogue.aggregator.cert, rogue.aggregator.key, pki.ca.cert)
    seen: list[str] = []
    server = await _serve(rogue_ctx, seen)
    try:
        with pytest.raises(ssl.SSLCertVerificationError):
            await connect("127.0.0.1", server.port, client_ctx, config=FAST)
    finally:
        await server.shutdown(2.0)
    await asyncio.sleep(0)
