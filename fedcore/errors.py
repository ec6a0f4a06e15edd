"""The fedcore exception hierarchy: one root, one subclass per kind of failure a user handles."""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "FedcoreError",
    "InvalidCiphertextError",
    "KeyFileError",
    "PackingError",
    "RoundError",
]


class FedcoreError(Exception):
    """Root of every error raised by the fedcore runtime (not by the protocol package)."""


class ConfigError(FedcoreError, ValueError):
    """A configuration value is missing, out of range or inconsistent with another."""


class KeyFileError(FedcoreError):
    """A key file is missing, malformed, or has unsafe permissions."""


class InvalidCiphertextError(FedcoreError, ValueError):
    """A ciphertext failed validation (range, gcd with n, byte length); ``index`` names it."""

    def __init__(self, message: str, *, index: int | None = None) -> None:
        super().__init__(message)
        self.index = index


class PackingError(FedcoreError, ValueError):
    """A packing parameter is impossible, or a sum would overflow its slot headroom."""


class RoundError(FedcoreError):
    """A federated round could not complete (quorum not reached, deadline passed)."""
