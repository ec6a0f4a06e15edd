"""Shared parts of the committee tests: a federation PKI made by `write_federation_pki`."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedcore.client import ClientConfig
from fedcore.contracts import FederationParams
from fedcore.credentials import CertificateAuthority, Signer
from protocol.tls import FederationPKI, write_federation_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> FederationPKI:
    """Six client identities (which of them hold keys is up to each test module)."""
    return write_federation_pki(Path(tmp_path_factory.mktemp("pki")), clients=6)


@pytest.fixture(scope="module")
def ca(pki: FederationPKI) -> CertificateAuthority:
    return CertificateAuthority.load(pki.ca_cert)


@pytest.fixture(scope="module")
def signers(pki: FederationPKI) -> list[Signer]:
    return [Signer.load(paths.cert, paths.key) for paths in pki.clients]


def member_config(
    pki: FederationPKI, index: int, federation: FederationParams, private_key: Path
) -> ClientConfig:
    """A fast test client config for client ``index`` of ``pki``, holding ``private_key``."""
    return ClientConfig(
        cert=pki.clients[index].cert,
        key=pki.clients[index].key,
        ca=pki.ca_cert,
        federation=federation,
        private_key=private_key,
        server_hostname="localhost",
        min_key_bits=1024,
        encryption_pool=False,
        backoff_base=0.1,
        backoff_max=0.5,
    )
