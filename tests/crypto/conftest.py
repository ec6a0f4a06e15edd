"""Shared keys for the crypto tests: the fixed 512-bit test-vector key, loaded not generated."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fedcore.crypto import PrivateKey, PublicKey

VECTORS = Path(__file__).resolve().parent.parent / "vectors"


def load_vectors(name: str) -> dict[str, Any]:
    """One JSON vector file from tests/vectors/."""
    document: dict[str, Any] = json.loads((VECTORS / name).read_text())
    return document


@pytest.fixture(scope="session")
def paillier_vectors() -> dict[str, Any]:
    return load_vectors("paillier_512.json")


@pytest.fixture(scope="session")
def private_key(paillier_vectors: dict[str, Any]) -> PrivateKey:
    key = paillier_vectors["key"]
    return PrivateKey(PublicKey(int(key["n"])), int(key["p"]), int(key["q"]))


@pytest.fixture(scope="session")
def public_key(private_key: PrivateKey) -> PublicKey:
    return private_key.public_key
