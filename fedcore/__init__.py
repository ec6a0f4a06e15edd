"""fedcore: privacy-preserving federated learning with packed Paillier over mutual TLS."""

from __future__ import annotations

from fedcore.errors import (
    ConfigError,
    FedcoreError,
    InvalidCiphertextError,
    KeyFileError,
    PackingError,
    RoundError,
)

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "FedcoreError",
    "InvalidCiphertextError",
    "KeyFileError",
    "PackingError",
    "RoundError",
    "__version__",
]
