"""The client's settings and results: one validated dataclass each, no I/O."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedcore.contracts import FederationParams
from fedcore.crypto import PublicKey, ThresholdPublicKey
from fedcore.crypto.keys import MIN_SECURE_KEY_BITS
from fedcore.errors import ConfigError
from protocol.errors import ErrorCode

__all__ = [
    "FATAL_CODES",
    "FEDERATION_COMPLETE",
    "ClientConfig",
    "ClientResult",
    "EvaluateFn",
    "TrainFn",
    "parse_server",
]

#: The ``Bye`` reason with which the aggregator ends a finished federation; any other
#: goodbye (a restart, a shutdown) makes the client reconnect.
FEDERATION_COMPLETE = "federation complete"

if TYPE_CHECKING:  # only torch clients use these; a numpy-level client never imports torch
    import torch

#: A torch client's ``train_fn(model, round_config) -> samples``: train in place.
TrainFn = Callable[["torch.nn.Module", dict[str, Any]], int]
#: A torch client's ``evaluate_fn(model) -> metrics`` (e.g. accuracy, loss).
EvaluateFn = Callable[["torch.nn.Module"], dict[str, float]]

# Errors after which reconnecting cannot help: the federation does not want this client.
FATAL_CODES = {ErrorCode.UNSUPPORTED_VERSION, ErrorCode.UNKNOWN_CLIENT, ErrorCode.BAD_TOKEN}


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientConfig:
    """Where the client's credentials are, what it pins, and how it behaves on the network.

    ``federation`` is the federation file the operator hands out (or its parsed
    `FederationParams`): the client refuses an aggregator that offers another public key
    or other packing, quorum or weight parameters, and uploads nothing then.
    ``public_key`` optionally pins the key file from the key authority as well (a key
    holder's ``private_key`` or a threshold member's ``key_share`` pins it too).
    ``min_key_bits`` is the smallest modulus the client accepts (2048; tests lower it
    explicitly).
    """

    cert: Path
    key: Path
    ca: Path
    federation: Path | FederationParams
    public_key: Path | None = None
    private_key: Path | None = None
    key_share: Path | None = None
    server_hostname: str | None = None
    min_key_bits: int = MIN_SECURE_KEY_BITS
    reconnect_attempts: int | None = 20
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    # After a failure no retry can fix (a certificate either side refuses, a refusal
    # that will not change; see fedcore.client.failures): None stops the client with the
    # error; seconds (e.g. 300) keep trying that rarely, for an unattended edge device
    # whose operator fixes the federation's side. The app's own errors always stop it.
    permanent_failure_retry: float | None = None
    decrypt_workers: int = 1
    # Constant-time modular exponentiation with the secret CRT exponents: OpenSSL's
    # (faster than GMP's variable-time powmod, which phe uses) or, without a usable
    # libcrypto, GMP's powm_sec (~1.3x slower). False = GMP's variable-time powmod; only
    # where nobody who should not learn the key can observe decryption timing.
    constant_time_decrypt: bool = True
    # Make Paillier random factors in a background process between rounds, so that
    # encrypting an update costs about one multiplication per ciphertext.
    encryption_pool: bool = True
    idle_timeout: float = 300.0
    heartbeat_interval: float = 15.0
    write_timeout: float = 600.0

    def __post_init__(self) -> None:
        if self.reconnect_attempts is not None and self.reconnect_attempts < 0:
            raise ConfigError(
                f"reconnect_attempts must be >= 0 or None; got {self.reconnect_attempts}"
            )
        if not 0 < self.backoff_base <= self.backoff_max:
            raise ConfigError("backoff_base must be > 0 and <= backoff_max")
        retry = self.permanent_failure_retry
        if retry is not None and not (isinstance(retry, int | float) and 0 < retry < float("inf")):
            raise ConfigError(
                f"permanent_failure_retry must be None (stop) or seconds > 0; got {retry!r}"
            )
        if self.decrypt_workers < 1:
            raise ConfigError(f"decrypt_workers must be >= 1; got {self.decrypt_workers}")
        if not 512 <= self.min_key_bits <= 16384:
            raise ConfigError(f"min_key_bits must be in 512..16384; got {self.min_key_bits}")

    def load_federation(self) -> FederationParams:
        """The pinned federation, with its key checked and cross-checked against the key files."""
        federation = (
            self.federation
            if isinstance(self.federation, FederationParams)
            else FederationParams.load(self.federation)
        )
        federation.check_key(min_key_bits=self.min_key_bits)
        if federation.public_key is not None and self.public_key is not None:
            pinned: PublicKey | ThresholdPublicKey
            offered: PublicKey | ThresholdPublicKey
            if federation.threshold_key is not None:
                what, offered = "threshold key", federation.threshold_key
                pinned = ThresholdPublicKey.load(self.public_key)
            else:
                what, offered = "public key", federation.public_key
                pinned = PublicKey.load(self.public_key)
            if pinned != offered:
                raise ConfigError(
                    f"the federation file's {what} ({offered.fingerprint()}...) "
                    f"is not the one in {self.public_key} ({pinned.fingerprint()}...)"
                )
        return federation


@dataclass(slots=True)
class ClientResult:
    """What a client did by the time the federation ended."""

    rounds_contributed: int = 0
    rounds_refused: int = 0
    shards_decrypted: int = 0
    shards_unmasked: int = 0
    requests_refused: int = 0
    reconnects: int = 0
    bytes_uploaded: int = 0
    last_metrics: dict[str, float] = field(default_factory=dict)


def parse_server(server: str) -> tuple[str, int]:
    """'host:port' (or '[v6]:port') -> (host, port), with a clear error otherwise."""
    host, sep, port = server.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"server must be HOST:PORT, got {server!r}")
    return host.strip("[]"), int(port)
