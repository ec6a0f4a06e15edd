"""Signed committee credentials and contributor tokens against the CA (fedcore.credentials)."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
from pathlib import Path
from typing import Any

import msgpack
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcore.credentials import (
    MAX_CERTIFICATE_BYTES,
    MAX_TOKEN_BYTES,
    MAX_TOKENS,
    CertificateAuthority,
    CommitteeCredential,
    ContributorToken,
    CredentialError,
    Signer,
    pack_tokens,
    unpack_tokens,
)
from fedcore.errors import FedcoreError
from protocol.tls import FederationPKI, generate_ca, issue_certificate, write_federation_pki

FEDERATION = bytes(range(32))
OTHER_FEDERATION = bytes(range(1, 33))
MASK_PUBLIC = bytes(range(64, 96))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> FederationPKI:
    return write_federation_pki(Path(tmp_path_factory.mktemp("pki")), clients=3)


@pytest.fixture(scope="module")
def rsa_pki(tmp_path_factory: pytest.TempPathFactory) -> FederationPKI:
    return write_federation_pki(Path(tmp_path_factory.mktemp("rsa")), clients=1, key_type="rsa")


@pytest.fixture(scope="module")
def ca(pki: FederationPKI) -> CertificateAuthority:
    return CertificateAuthority.load(pki.ca_cert)


@pytest.fixture(scope="module")
def signer(pki: FederationPKI) -> Signer:
    return Signer.load(pki.clients[0].cert, pki.clients[0].key)


def _ca_key(pki: FederationPKI) -> Any:
    return serialization.load_pem_private_key(pki.ca.key.read_bytes(), None)


def _load_ca_cert(pki: FederationPKI) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pki.ca.cert.read_bytes())


def _token(**changes: Any) -> ContributorToken:
    """An unsigned token with plausible values (``changes`` override fields)."""
    values: dict[str, Any] = {
        "federation": FEDERATION,
        "round_id": 7,
        "model_digest": bytes(range(100, 132)),
        "client_public": bytes(range(132, 164)),
        "unmaskers": (MASK_PUBLIC,),
        "item_count": 12,
        "upload_digest": bytes(range(164, 196)),
        "certificate": b"",
    }
    values.update(changes)
    return ContributorToken(**values)


# --- round trips ------------------------------------------------------------------------


@pytest.mark.parametrize("key_type", ["ec", "rsa"])
def test_token_sign_wire_verify_round_trip(
    key_type: str, pki: FederationPKI, rsa_pki: FederationPKI
) -> None:
    chosen = pki if key_type == "ec" else rsa_pki
    authority = CertificateAuthority.load(chosen.ca_cert)
    client = Signer.load(chosen.clients[0].cert, chosen.clients[0].key)
    token = _token(unmaskers=(MASK_PUBLIC, bytes(32))).signed_by(client)
    assert token.certificate == client.certificate_der
    parsed = ContributorToken.from_wire(token.to_wire())
    assert parsed == token
    assert parsed.verify(authority) == "client-0"


@pytest.mark.parametrize("key_type", ["ec", "rsa"])
def test_committee_credential_round_trip(
    key_type: str, pki: FederationPKI, rsa_pki: FederationPKI
) -> None:
    chosen = pki if key_type == "ec" else rsa_pki
    authority = CertificateAuthority.load(chosen.ca_cert)
    member = Signer.load(chosen.clients[0].cert, chosen.clients[0].key)
    credential = CommitteeCredential.issue(member, federation=FEDERATION, mask_public=MASK_PUBLIC)
    parsed = CommitteeCredential.from_wire(credential.to_wire())
    assert parsed == credential
    assert parsed.verify(authority, federation=FEDERATION) == "client-0"


def test_each_client_is_named_by_its_own_certificate(
    pki: FederationPKI, ca: CertificateAuthority
) -> None:
    for index, paths in enumerate(pki.clients):
        token = _token().signed_by(Signer.load(paths.cert, paths.key))
        assert token.verify(ca) == f"client-{index}"


def test_verification_is_repeatable(signer: Signer, ca: CertificateAuthority) -> None:
    """The per-certificate cache answers the same as the first, full verification."""
    token = _token().signed_by(signer)
    assert [token.verify(ca) for _ in range(3)] == ["client-0"] * 3
    with pytest.raises(CredentialError, match="bad signature"):
        dataclasses.replace(token, round_id=8).verify(ca)  # cached certificate, new statement


# --- tampering --------------------------------------------------------------------------


_TAMPERED_TOKEN_FIELDS: dict[str, Any] = {
    "federation": OTHER_FEDERATION,
    "round_id": 8,
    "model_digest": bytes(32),
    "client_public": bytes(32),
    "unmaskers": (MASK_PUBLIC, bytes(32)),
    "item_count": 13,
    "upload_digest": bytes(32),
}


@pytest.mark.parametrize(("field", "value"), list(_TAMPERED_TOKEN_FIELDS.items()))
def test_tampered_token_field_fails_verify(
    field: str, value: Any, signer: Signer, ca: CertificateAuthority
) -> None:
    token = _token().signed_by(signer)
    tampered = ContributorToken.from_wire(dataclasses.replace(token, **{field: value}).to_wire())
    with pytest.raises(CredentialError, match="bad signature by client-0"):
        tampered.verify(ca)


def test_every_signed_token_field_is_covered_by_the_table() -> None:
    signed = {f.name for f in dataclasses.fields(ContributorToken)} - {"certificate", "signature"}
    assert set(_TAMPERED_TOKEN_FIELDS) == signed


def test_token_with_flipped_signature_bit_fails(signer: Signer, ca: CertificateAuthority) -> None:
    token = _token().signed_by(signer)
    for position in (0, len(token.signature) // 2, len(token.signature) - 1):
        flipped = bytearray(token.signature)
        flipped[position] ^= 0x01
        with pytest.raises(CredentialError):
            dataclasses.replace(token, signature=bytes(flipped)).verify(ca)
    with pytest.raises(CredentialError):
        dataclasses.replace(token, signature=b"").verify(ca)


def test_token_with_another_clients_certificate_fails(
    pki: FederationPKI, signer: Signer, ca: CertificateAuthority
) -> None:
    """A signature by client-0 presented with client-1's certificate names nobody."""
    other = Signer.load(pki.clients[1].cert, pki.clients[1].key)
    token = dataclasses.replace(_token().signed_by(signer), certificate=other.certificate_der)
    with pytest.raises(CredentialError, match="bad signature by client-1"):
        token.verify(ca)


@pytest.mark.parametrize(
    ("field", "value"), [("federation", OTHER_FEDERATION), ("mask_public", bytes(32))]
)
def test_tampered_credential_fails(
    field: str, value: bytes, signer: Signer, ca: CertificateAuthority
) -> None:
    credential = CommitteeCredential.issue(signer, federation=FEDERATION, mask_public=MASK_PUBLIC)
    tampered = dataclasses.replace(credential, **{field: value})
    with pytest.raises(CredentialError):
        tampered.verify(ca, federation=tampered.federation)


def test_credential_for_another_federation_fails(signer: Signer, ca: CertificateAuthority) -> None:
    credential = CommitteeCredential.issue(signer, federation=FEDERATION, mask_public=MASK_PUBLIC)
    with pytest.raises(CredentialError, match="another federation"):
        credential.verify(ca, federation=OTHER_FEDERATION)


def test_token_and_credential_signatures_are_not_interchangeable(
    signer: Signer, ca: CertificateAuthority
) -> None:
    """Domain strings: a credential's signature never verifies as a token's, and back."""
    credential = CommitteeCredential.issue(signer, federation=FEDERATION, mask_public=MASK_PUBLIC)
    token = _token().signed_by(signer)
    with pytest.raises(CredentialError, match="bad signature"):
        dataclasses.replace(token, signature=credential.signature).verify(ca)
    with pytest.raises(CredentialError, match="bad signature"):
        dataclasses.replace(credential, signature=token.signature).verify(ca, federation=FEDERATION)


# --- certificates -----------------------------------------------------------------------


def test_certificate_of_another_ca_fails(ca: CertificateAuthority) -> None:
    other_key, other_cert = generate_ca("other CA")
    key, cert = issue_certificate(other_key, other_cert, "client-0")
    token = _token().signed_by(Signer(cert, key))
    with pytest.raises(CredentialError, match="certificate refused"):
        token.verify(ca)
    credential = CommitteeCredential.issue(
        Signer(cert, key), federation=FEDERATION, mask_public=MASK_PUBLIC
    )
    with pytest.raises(CredentialError, match="certificate refused"):
        credential.verify(ca, federation=FEDERATION)


@pytest.mark.parametrize(
    ("before_days", "after_days"),
    [(-30, -1), (1, 30)],  # expired; not yet valid
    ids=["expired", "not-yet-valid"],
)
def test_certificate_outside_its_validity_fails(
    pki: FederationPKI, ca: CertificateAuthority, before_days: int, after_days: int
) -> None:
    now = dt.datetime.now(dt.UTC)
    key, cert = issue_certificate(
        _ca_key(pki),
        _load_ca_cert(pki),
        "client-9",
        not_valid_before=now + dt.timedelta(days=before_days),
        not_valid_after=now + dt.timedelta(days=after_days),
    )
    with pytest.raises(CredentialError, match="certificate refused"):
        _token().signed_by(Signer(cert, key)).verify(ca)


def test_fresh_certificate_from_the_same_ca_passes(
    pki: FederationPKI, ca: CertificateAuthority
) -> None:
    """Control for the validity test: the same CA key, a current window, is accepted."""
    key, cert = issue_certificate(_ca_key(pki), _load_ca_cert(pki), "client-9")
    assert _token().signed_by(Signer(cert, key)).verify(ca) == "client-9"


def test_server_certificate_is_not_a_contributor(
    pki: FederationPKI, ca: CertificateAuthority
) -> None:
    """The aggregator's certificate (server-auth EKU) cannot sign tokens or credentials."""
    aggregator = Signer.load(pki.aggregator.cert, pki.aggregator.key)
    with pytest.raises(CredentialError, match="certificate refused"):
        _token().signed_by(aggregator).verify(ca)
    credential = CommitteeCredential.issue(
        aggregator, federation=FEDERATION, mask_public=MASK_PUBLIC
    )
    with pytest.raises(CredentialError, match="certificate refused"):
        credential.verify(ca, federation=FEDERATION)


def test_ca_certificate_itself_is_not_a_contributor(
    pki: FederationPKI, ca: CertificateAuthority
) -> None:
    ca_signer = Signer(_load_ca_cert(pki), _ca_key(pki))
    with pytest.raises(CredentialError, match="certificate refused"):
        _token().signed_by(ca_signer).verify(ca)


@pytest.mark.parametrize(
    "certificate",
    [b"", b"\x30\x03\x02\x01\x01", b"not a certificate", bytes(MAX_CERTIFICATE_BYTES + 1)],
)
def test_garbage_certificate_fails(certificate: bytes, ca: CertificateAuthority) -> None:
    with pytest.raises(CredentialError):
        ca.verify(certificate)


def test_authority_needs_a_ca_and_readable_files(tmp_path: Path, pki: FederationPKI) -> None:
    with pytest.raises(CredentialError, match="at least one CA"):
        CertificateAuthority([])
    with pytest.raises(CredentialError, match="cannot load CA certificate"):
        CertificateAuthority.load(tmp_path / "missing.pem")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not pem")
    with pytest.raises(CredentialError, match="cannot load CA certificate"):
        CertificateAuthority.load(garbage)
    with pytest.raises(CredentialError, match="cannot load certificate"):
        Signer.load(tmp_path / "missing.pem", pki.clients[0].key)
    with pytest.raises(CredentialError, match="cannot load certificate"):
        Signer.load(pki.clients[0].cert, garbage)


def test_credential_error_is_a_fedcore_error() -> None:
    assert issubclass(CredentialError, FedcoreError)


# --- malformed wire bytes ---------------------------------------------------------------


def _token_items(signer: Signer) -> list[Any]:
    return msgpack.unpackb(_token().signed_by(signer).to_wire())


def test_truncated_token_is_refused(signer: Signer) -> None:
    wire = _token().signed_by(signer).to_wire()
    for length in range(len(wire)):
        with pytest.raises(CredentialError):
            ContributorToken.from_wire(wire[:length])


def test_token_with_trailing_bytes_is_refused(signer: Signer) -> None:
    with pytest.raises(CredentialError):
        ContributorToken.from_wire(_token().signed_by(signer).to_wire() + b"\x00")


@pytest.mark.parametrize("arity", [0, 1, 8, 10])
def test_token_with_wrong_arity_is_refused(arity: int, signer: Signer) -> None:
    items = (_token_items(signer) * 2)[:arity]
    with pytest.raises(CredentialError, match="9 fields"):
        ContributorToken.from_wire(msgpack.packb(items))


@pytest.mark.parametrize(
    ("index", "value"),
    [
        (0, bytes(31)),  # federation
        (0, "x" * 32),
        (1, -1),  # round_id
        (1, "7"),
        (1, 7.0),
        (1, True),
        (1, None),
        (2, bytes(33)),  # model_digest
        (3, bytes(31)),  # client_public
        (4, []),  # unmaskers
        (4, [bytes(32)] * 17),
        (4, bytes(32)),
        (4, [bytes(31)]),
        (4, ["x" * 32]),
        (5, "12"),  # item_count
        (5, 12.0),
        (5, False),
        (6, bytes(16)),  # upload_digest
        (7, "certificate"),  # certificate
        (7, None),
        (8, "signature"),  # signature
        (8, 0),
    ],
)
def test_token_with_wrong_field_type_is_refused(index: int, value: Any, signer: Signer) -> None:
    items = _token_items(signer)
    items[index] = value
    with pytest.raises(CredentialError):
        ContributorToken.from_wire(msgpack.packb(items))


def test_token_with_negative_item_count_is_refused(signer: Signer) -> None:
    items = _token_items(signer)
    items[5] = -12
    with pytest.raises(CredentialError, match="item_count"):
        ContributorToken.from_wire(msgpack.packb(items))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",  # never-used msgpack byte
        msgpack.packb({"a": 1}),
        msgpack.packb(5),
        msgpack.packb(b"bytes"),
        msgpack.packb([[[[]]]]),
        bytes(MAX_TOKEN_BYTES + 1),
        msgpack.packb([b"x" * (MAX_TOKEN_BYTES + 10)] + [b""] * 8),  # oversize field
    ],
)
def test_malformed_token_and_credential_bytes_are_refused(data: bytes) -> None:
    with pytest.raises(CredentialError):
        ContributorToken.from_wire(data)
    with pytest.raises(CredentialError):
        CommitteeCredential.from_wire(data)


def test_non_bytes_input_is_refused() -> None:
    with pytest.raises(CredentialError):
        ContributorToken.from_wire("text")  # type: ignore[arg-type]
    with pytest.raises(CredentialError):
        CommitteeCredential.from_wire(bytearray(b"\x94"))  # type: ignore[arg-type]
    with pytest.raises(CredentialError):
        unpack_tokens("text")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "items",
    [
        [FEDERATION, MASK_PUBLIC, b"cert"],  # 3 fields
        [FEDERATION, MASK_PUBLIC, b"cert", b"sig", b""],  # 5 fields
        [bytes(31), MASK_PUBLIC, b"cert", b"sig"],
        [FEDERATION, bytes(33), b"cert", b"sig"],
        [FEDERATION, MASK_PUBLIC, "cert", b"sig"],
        [FEDERATION, MASK_PUBLIC, b"cert", None],
    ],
)
def test_malformed_credential_is_refused(items: list[Any]) -> None:
    with pytest.raises(CredentialError):
        CommitteeCredential.from_wire(msgpack.packb(items))


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=600))
def test_random_bytes_raise_only_credential_error(data: bytes) -> None:
    for parse in (ContributorToken.from_wire, CommitteeCredential.from_wire, unpack_tokens):
        with contextlib.suppress(CredentialError):
            parse(data)


_msgpack_leaves = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=40)
    | st.binary(max_size=40)
    | st.sampled_from([bytes(32), bytes(range(32)), b"\x30\x82"])
)
_msgpack_values = _msgpack_leaves | st.lists(_msgpack_leaves, max_size=20)


@settings(max_examples=300, deadline=None)
@given(
    replacements=st.dictionaries(st.integers(0, 8), _msgpack_values, min_size=1, max_size=3),
    arity=st.integers(0, 11),
)
def test_mutated_msgpack_arrays_raise_only_credential_error(
    replacements: dict[int, Any], arity: int, signer: Signer, ca: CertificateAuthority
) -> None:
    """A real token's array with fields swapped for any msgpack values: parsed, or refused.

    Whatever parses must still fail verification (it is not what client-0 signed), and
    nothing but CredentialError may escape from parsing or verifying.
    """
    original = _token_items(signer)
    items = list(original)
    for index, value in replacements.items():
        items[index] = value
    items = (items + [b""] * 3)[:arity]
    wire = msgpack.packb(items)
    if wire == msgpack.packb(original):
        return  # the "mutation" put back what was there
    for parse in (ContributorToken.from_wire, CommitteeCredential.from_wire):
        try:
            statement = parse(wire)
        except CredentialError:
            continue
        with pytest.raises(CredentialError):
            if isinstance(statement, ContributorToken):
                statement.verify(ca)
            else:
                statement.verify(ca, federation=statement.federation)


# --- packed token lists -----------------------------------------------------------------


@given(tokens=st.lists(st.binary(max_size=300), max_size=40))
def test_pack_unpack_tokens_round_trip(tokens: list[bytes]) -> None:
    assert unpack_tokens(pack_tokens(tokens)) == tokens


def test_packed_real_tokens_round_trip(pki: FederationPKI, ca: CertificateAuthority) -> None:
    signers = [Signer.load(p.cert, p.key) for p in pki.clients]
    wires = [_token().signed_by(s).to_wire() for s in signers]
    parsed = [ContributorToken.from_wire(w) for w in unpack_tokens(pack_tokens(wires))]
    assert [t.verify(ca) for t in parsed] == ["client-0", "client-1", "client-2"]


def test_unpack_tokens_accepts_a_token_at_the_size_limit() -> None:
    assert unpack_tokens(pack_tokens([bytes(MAX_TOKEN_BYTES)])) == [bytes(MAX_TOKEN_BYTES)]


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",
        msgpack.packb([bytes(MAX_TOKEN_BYTES + 1)]),  # one token over the limit
        msgpack.packb(["text token"]),
        msgpack.packb([b"ok", 5]),
        msgpack.packb(b"not a list"),
        msgpack.packb({"a": b""}),
        msgpack.packb([b""]) + b"\x00",  # trailing bytes
    ],
)
def test_unpack_tokens_refuses_malformed_lists(data: bytes) -> None:
    with pytest.raises(CredentialError):
        unpack_tokens(data)


def test_unpack_tokens_refuses_more_than_the_token_limit() -> None:
    with pytest.raises(CredentialError):
        unpack_tokens(msgpack.packb([b""] * (MAX_TOKENS + 1)))
    assert len(unpack_tokens(msgpack.packb([b""] * MAX_TOKENS))) == MAX_TOKENS
