"""Fixtures for the protocol tests: a federation PKI in a temporary directory."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from protocol import FederationPKI, client_context, server_context, write_federation_pki


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> FederationPKI:
    """CA, aggregator and three client certificates, made once per test session."""
    return write_federation_pki(Path(tmp_path_factory.mktemp("pki")), clients=3)


@pytest.fixture(scope="session")
def server_ctx(pki: FederationPKI) -> ssl.SSLContext:
    """The aggregator's TLS context."""
    return server_context(pki.aggregator.cert, pki.aggregator.key, pki.ca.cert)


@pytest.fixture(scope="session")
def client_ctx(pki: FederationPKI) -> ssl.SSLContext:
    """client-0's TLS context."""
    return client_context(pki.clients[0].cert, pki.clients[0].key, pki.ca.cert)
