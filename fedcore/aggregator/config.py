"""Aggregator configuration: one validated dataclass, loadable from TOML, shared by the CLI.

Knows nothing about sockets or the round engine; it only says what a sane setting is.
"""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from fedcore.aggregator.rounds import (
    DEFAULT_UPLOAD_MIN_RATE,
    DEFAULT_UPLOAD_START_TIMEOUT,
    UploadPace,
)
from fedcore.aggregator.settings import check_types
from fedcore.contracts import DEFAULT_REPORT_METRICS, FederationParams
from fedcore.crypto import PublicKey, ThresholdPublicKey
from fedcore.crypto.keys import MIN_SECURE_KEY_BITS
from fedcore.crypto.threshold import THRESHOLD_KEY_TYPE
from fedcore.errors import ConfigError, KeyFileError
from fedcore.packing import MAX_HEADROOM_BITS
from protocol.transport import DEFAULT_MAX_CONNECTIONS_PER_PEER, SERVER_RECEIVE_BUFFER

__all__ = ["AggregatorConfig", "check_upload_pace", "checked_settings", "load_toml_table"]


@dataclass(frozen=True, slots=True, kw_only=True)
class AggregatorConfig:
    """Everything the aggregator daemon needs; defaults suit a small federation on one host."""

    public_key: Path
    cert: Path
    key: Path
    ca: Path
    state_dir: Path
    host: str = "127.0.0.1"
    port: int = 8765
    metrics_port: int | None = 9100
    metrics_host: str = "127.0.0.1"
    model: str = "fedcore.model:mlp"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    min_clients: int = 3
    clients_per_round: int | None = None
    clients_fraction: float | None = None
    rounds: int = 10
    round_timeout: float = 300.0
    wait_for_clients_timeout: float = 600.0
    max_failed_rounds: int = 5
    # Seconds from one round's start to the next one's (0 = back to back). A paced
    # federation leaves its clients idle time to refill their encryption pools.
    round_interval: float = 0.0
    max_inflight_uploads: int = 8
    # A granted upload keeps its slot only while it progresses: its first chunk within
    # upload_start_timeout (plus that chunk's bytes at the rate), then upload_min_rate
    # bytes a second on average since the grant; else it is refused (upload_stalled).
    # 64 KiB/s (a 512 kbit/s link) takes the seed MLP's 3.5 MB update (2048 bits) in 54 s.
    upload_min_rate: float = DEFAULT_UPLOAD_MIN_RATE
    upload_start_timeout: float = DEFAULT_UPLOAD_START_TIMEOUT
    fold_workers: int = 0
    max_connections: int = 2048
    # Connections at once per client certificate (0 = no cap): 2 lets a reconnecting
    # client overlap its old connection; one certificate cannot take every slot. Relay
    # certificates are exempt (a relay's replicas share one).
    max_connections_per_client: int = DEFAULT_MAX_CONNECTIONS_PER_PEER
    # SO_RCVBUF of each client connection, bytes (0 = the kernel's autotuning): smaller
    # keeps less TLS buffer per connection after an upload, larger costs less CPU per byte.
    receive_buffer: int = SERVER_RECEIVE_BUFFER
    # 8 bits: `bench accuracy` measures 8-bit encrypted FedAvg within 0.3 pp of plaintext
    # on digits and Fashion-MNIST (IID and Dirichlet), with 1/3 fewer ciphertexts than 16.
    value_bits: int = 8
    # None: the fewest bits that hold max_weight x the most clients a round can select
    headroom_bits: int | None = None
    clip: float = 0.5
    max_weight: int = 64
    samples_per_weight: int = 100
    report_metrics: tuple[tuple[str, float], ...] = DEFAULT_REPORT_METRICS
    min_key_bits: int = MIN_SECURE_KEY_BITS
    chunk_ciphertexts: int = 256
    # Shared mode: how many key holders decrypt each round's sum; 0 = every connected key
    # holder (each takes shards, so decryption spreads over every key holder's cores).
    # A threshold federation uses every connected share holder (each shard to T of them).
    committee_size: int = 0
    decrypt_shard_timeout: float = 120.0
    resume_grace: float = 30.0
    # A rerun of a model version waits this long for the unmasker(s) its contributors
    # masked for (they refuse to re-mask for another), then picks another.
    unmasker_grace: float = 30.0
    handshake_timeout: float = 30.0
    idle_timeout: float = 120.0
    heartbeat_interval: float = 15.0
    seed: int = 0
    allowed_clients: tuple[str, ...] | None = None
    local_epochs: int = 1
    learning_rate: float = 0.05

    def __post_init__(self) -> None:
        _require(1 <= self.port <= 65535 or self.port == 0, "port", "0..65535", self.port)
        if self.metrics_port is not None:
            _require(0 <= self.metrics_port <= 65535, "metrics_port", "0..65535", self.metrics_port)
        _require(
            isinstance(self.min_clients, int) and self.min_clients >= 2,
            "min_clients",
            ">= 2 (3 or more recommended: with 2, each contributor can subtract its own update)",
            self.min_clients,
        )
        if self.clients_per_round is not None and self.clients_fraction is not None:
            raise ConfigError("set clients_per_round or clients_fraction, not both")
        if self.clients_per_round is not None:
            _require(
                self.clients_per_round >= self.min_clients,
                "clients_per_round",
                f">= min_clients ({self.min_clients})",
                self.clients_per_round,
            )
        if self.clients_fraction is not None:
            _require(
                0.0 < self.clients_fraction <= 1.0,
                "clients_fraction",
                "(0, 1]",
                self.clients_fraction,
            )
        _require(self.rounds >= 1, "rounds", ">= 1", self.rounds)
        for name in (
            "round_timeout",
            "wait_for_clients_timeout",
            "decrypt_shard_timeout",
            "handshake_timeout",
            "idle_timeout",
        ):
            value = getattr(self, name)
            _require(math.isfinite(value) and value > 0, name, "> 0 seconds", value)
        _require(self.resume_grace >= 0, "resume_grace", ">= 0 seconds", self.resume_grace)
        _require(
            math.isfinite(self.unmasker_grace) and self.unmasker_grace >= 0,
            "unmasker_grace",
            ">= 0 seconds",
            self.unmasker_grace,
        )
        _require(
            self.heartbeat_interval >= 0, "heartbeat_interval", ">= 0", self.heartbeat_interval
        )
        if self.heartbeat_interval and self.heartbeat_interval >= self.idle_timeout:
            raise ConfigError(
                f"heartbeat_interval ({self.heartbeat_interval}) must be below idle_timeout "
                f"({self.idle_timeout}): a quiet but healthy connection would be closed; "
                "raise idle_timeout or lower heartbeat_interval"
            )
        _require(self.max_failed_rounds >= 1, "max_failed_rounds", ">= 1", self.max_failed_rounds)
        _require(self.round_interval >= 0, "round_interval", ">= 0", self.round_interval)
        _require(
            self.max_inflight_uploads >= 1,
            "max_inflight_uploads",
            ">= 1",
            self.max_inflight_uploads,
        )
        check_upload_pace(self)
        _require(0 <= self.fold_workers <= 64, "fold_workers", "0..64", self.fold_workers)
        _require(self.max_connections >= 1, "max_connections", ">= 1", self.max_connections)
        _require(
            type(self.max_connections_per_client) is int and self.max_connections_per_client >= 0,
            "max_connections_per_client",
            "an int >= 0 (0 = no cap)",
            self.max_connections_per_client,
        )
        _require(
            self.receive_buffer == 0 or self.receive_buffer >= 4096,
            "receive_buffer",
            "0 (autotuning) or >= 4096 bytes",
            self.receive_buffer,
        )
        _require(2 <= self.value_bits <= 32, "value_bits", "2..32", self.value_bits)
        if self.allowed_clients is not None:
            if isinstance(self.allowed_clients, str) or not all(
                isinstance(c, str) and c for c in self.allowed_clients
            ):
                raise ConfigError("allowed_clients must be a list of certificate common names")
            object.__setattr__(self, "allowed_clients", tuple(self.allowed_clients))
            self._check_allowed_clients(len(set(self.allowed_clients)))
        _require(1 <= self.max_weight <= 1 << 20, "max_weight", "1..2^20", self.max_weight)
        _require(
            self.samples_per_weight >= 1, "samples_per_weight", ">= 1", self.samples_per_weight
        )
        _require(512 <= self.min_key_bits <= 16384, "min_key_bits", "512..16384", self.min_key_bits)
        object.__setattr__(
            self, "report_metrics", tuple((str(n), float(b)) for n, b in self.report_metrics)
        )
        if self.headroom_bits is None:
            needed = self.selection_limit() * self.max_weight
            object.__setattr__(self, "headroom_bits", max(1, (needed - 1).bit_length()))
        _require(
            isinstance(self.headroom_bits, int) and 1 <= self.headroom_bits <= MAX_HEADROOM_BITS,
            "headroom_bits",
            f"1..{MAX_HEADROOM_BITS}",
            self.headroom_bits,
        )
        if self.clients_per_round is not None and self.clients_per_round > self.max_contributors:
            raise ConfigError(
                f"clients_per_round {self.clients_per_round} exceeds what headroom_bits "
                f"{self.headroom_bits} holds at max_weight {self.max_weight} "
                f"({self.max_contributors} clients); raise headroom_bits or lower max_weight"
            )
        _require(
            self.max_contributors >= self.min_clients,
            "headroom_bits",
            f"large enough for min_clients ({self.min_clients}) clients of weight "
            f"{self.max_weight}",
            self.headroom_bits,
        )
        _require(math.isfinite(self.clip) and self.clip > 0, "clip", "> 0", self.clip)
        _require(
            1 <= self.chunk_ciphertexts <= 4096,
            "chunk_ciphertexts",
            "1..4096",
            self.chunk_ciphertexts,
        )
        _require(
            self.committee_size >= 0,
            "committee_size",
            ">= 0 (0 = every connected key holder)",
            self.committee_size,
        )
        _require(self.local_epochs >= 1, "local_epochs", ">= 1", self.local_epochs)
        _require(self.learning_rate > 0, "learning_rate", "> 0", self.learning_rate)
        if ":" not in self.model:
            raise ConfigError(f"model must be 'module:factory', got {self.model!r}")

    def _check_allowed_clients(self, allowed: int) -> None:
        """Settings that ask for more clients than ``allowed_clients`` names: refused."""
        if self.min_clients > allowed:
            raise ConfigError(
                f"min_clients ({self.min_clients}) exceeds allowed_clients ({allowed} names): "
                "no round could ever reach its quorum; allow more clients or lower min_clients"
            )
        if self.clients_per_round is not None and self.clients_per_round > allowed:
            raise ConfigError(
                f"clients_per_round ({self.clients_per_round}) exceeds allowed_clients "
                f"({allowed} names): every round would wait for clients that cannot join; "
                "lower clients_per_round or allow more clients"
            )

    @property
    def upload_pace(self) -> UploadPace:
        """The minimum pace that keeps a granted upload its slot."""
        return UploadPace(min_rate=self.upload_min_rate, start_timeout=self.upload_start_timeout)

    def selection_limit(self) -> int:
        """The most clients a round can select: what the slot headroom must hold."""
        if self.clients_per_round is not None:
            return self.clients_per_round
        if self.allowed_clients is not None:
            return max(self.min_clients, len(self.allowed_clients))
        return self.max_connections

    @property
    def max_contributors(self) -> int:
        """Most clients one sum can hold: ``2^headroom_bits // max_weight``."""
        assert self.headroom_bits is not None
        return (1 << self.headroom_bits) // self.max_weight

    def target_clients(self, connected: int) -> int:
        """How many clients to select this round, given how many are connected."""
        if self.clients_per_round is not None:
            return self.clients_per_round
        if self.clients_fraction is not None:
            wanted = max(self.min_clients, math.ceil(self.clients_fraction * connected))
        else:
            wanted = max(self.min_clients, connected)
        return min(wanted, self.max_contributors)

    def load_public_key(self) -> PublicKey | ThresholdPublicKey:
        """The federation's public key, checked to be a plausible Paillier modulus.

        A threshold public key file (from ``fedcore keygen --threshold``) makes the
        federation a threshold one: its committee members hold key shares.
        """
        try:
            public_key: PublicKey | ThresholdPublicKey
            if _is_threshold_key_file(self.public_key):
                public_key = ThresholdPublicKey.load(self.public_key)
            else:
                public_key = PublicKey.load(self.public_key)
            public_key.check(min_bits=self.min_key_bits)
        except KeyFileError as exc:
            raise ConfigError(str(exc)) from None
        except ValueError as exc:
            raise ConfigError(f"public key {self.public_key} refused: {exc}") from None
        return public_key

    def federation(self, public_key: PublicKey | ThresholdPublicKey | None) -> FederationParams:
        """The federation parameters clients pin (``None`` key: a plaintext run)."""
        assert self.headroom_bits is not None
        threshold = public_key if isinstance(public_key, ThresholdPublicKey) else None
        try:
            return FederationParams(
                mode="plaintext"
                if public_key is None
                else ("threshold" if threshold is not None else "shared"),
                public_key=public_key.public_key
                if isinstance(public_key, ThresholdPublicKey)
                else public_key,
                threshold_key=threshold,
                value_bits=self.value_bits,
                headroom_bits=self.headroom_bits,
                clip=self.clip,
                min_clients=self.min_clients,
                max_weight=self.max_weight,
                samples_per_weight=self.samples_per_weight,
                report_metrics=self.report_metrics,
            )
        except ValueError as exc:
            raise ConfigError(f"federation parameters: {exc}") from None

    @classmethod
    def from_toml(cls, path: Path, **overrides: Any) -> AggregatorConfig:
        """Load a TOML file (keys = field names; an `[aggregator]` table is accepted too)."""
        return cls.from_mapping(load_toml_table(path, "aggregator", overrides))

    @classmethod
    def from_mapping(cls, data: dict[str, Any]) -> AggregatorConfig:
        """Build from plain values (paths as strings); unknown keys are an error."""
        paths = ("public_key", "cert", "key", "ca", "state_dir")
        values = checked_settings(cls, data, what="aggregator", required=paths, paths=paths)
        if "report_metrics" in values:
            raw = values["report_metrics"]
            if not isinstance(raw, list | tuple) or not all(
                isinstance(p, list | tuple) and len(p) == 2 for p in raw
            ):
                raise ConfigError("report_metrics must be a list of [name, bound] pairs")
            values["report_metrics"] = tuple((str(n), b) for n, b in raw)
        try:
            return cls(**values)
        except TypeError as exc:
            raise ConfigError(str(exc)) from exc

    def with_changes(self, **changes: Any) -> AggregatorConfig:
        """A copy with some fields replaced (validated again)."""
        return replace(self, **changes)


def checked_settings(
    cls: type, data: dict[str, Any], *, what: str, required: Sequence[str], paths: Sequence[str]
) -> dict[str, Any]:
    """``data`` as keyword arguments of the dataclass ``cls``: an unknown or missing key is
    a ConfigError naming it, and the settings named in ``paths`` become Paths."""
    unknown = sorted(set(data) - {f.name for f in fields(cls)})
    if unknown:
        raise ConfigError(f"unknown {what} setting(s): {', '.join(unknown)}")
    check_types(cls, data, what=what)
    values = dict(data)
    for name in required:
        if values.get(name) is None:
            raise ConfigError(f"{what} setting {name!r} is required (--{name.replace('_', '-')})")
    for name in paths:
        if values.get(name) is not None:
            values[name] = Path(values[name])
    return values


def load_toml_table(path: Path, table: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """A TOML file's settings (its ``[table]`` if it has one), with non-None overrides."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from None
    data = data.get(table, data)
    data.update({k: v for k, v in overrides.items() if v is not None})
    return data


def _is_threshold_key_file(path: Path) -> bool:
    """Whether ``path`` holds a threshold public key (its JSON ``type`` says so)."""
    try:
        with open(path, "rb") as handle:
            document = json.loads(handle.read(1 << 20))
    except (OSError, ValueError):
        return False  # PublicKey.load reports the error with the path
    return isinstance(document, dict) and document.get("type") == THRESHOLD_KEY_TYPE


def check_upload_pace(settings: Any) -> None:
    """``upload_min_rate`` and ``upload_start_timeout`` of an aggregator or relay: > 0."""
    for name in ("upload_min_rate", "upload_start_timeout"):
        value = getattr(settings, name)
        _require(
            isinstance(value, int | float) and math.isfinite(value) and value > 0,
            name,
            "> 0 (bytes per second, seconds)",
            value,
        )


def _require(ok: bool, name: str, allowed: str, value: object) -> None:
    if not ok:
        raise ConfigError(f"{name} must be {allowed}; got {value!r}")
