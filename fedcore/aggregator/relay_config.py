"""Relay configuration: one validated dataclass, loadable from TOML, shared by the CLI.

A relay takes its federation (public key, packing, model layout) from its upstream's
Welcome, so it has no key, model or quorum settings of its own: only where to listen,
where to forward, its TLS identity and the limits of its own clients' uploads.
"""

from __future__ import annotations

import math
import re
import socket
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fedcore.aggregator.config import check_upload_pace, checked_settings, load_toml_table
from fedcore.aggregator.rounds import (
    DEFAULT_UPLOAD_MIN_RATE,
    DEFAULT_UPLOAD_START_TIMEOUT,
    UploadPace,
)
from fedcore.client.config import parse_server
from fedcore.errors import ConfigError
from protocol.transport import DEFAULT_MAX_CONNECTIONS_PER_PEER, SERVER_RECEIVE_BUFFER

__all__ = ["RelayConfig"]

_PATHS = ("cert", "key", "ca", "federation")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_REQUIRED = ("upstream", "cert", "key", "ca")


@dataclass(frozen=True, slots=True, kw_only=True)
class RelayConfig:
    """Everything a relay needs; the federation itself comes from ``upstream``."""

    upstream: str
    """HOST:PORT of the aggregator (root or another relay) this relay forwards to."""
    cert: Path
    """This relay's certificate: serverAuth for its clients and clientAuth upstream."""
    key: Path
    ca: Path
    federation: Path | None = None
    """The federation file to pin: the upstream's Welcome must offer exactly it."""
    name: str = ""
    """This relay's instance name upstream (default: the host name); replicas sharing
    one certificate need distinct names (a pod's name, in Kubernetes)."""
    server_hostname: str | None = None
    """Name to check in the upstream's certificate (default: the upstream host)."""
    host: str = "127.0.0.1"
    port: int = 8765
    metrics_port: int | None = 9100
    metrics_host: str = "127.0.0.1"
    clients_per_round: int | None = None
    """Clients of this relay asked per round (default: every connected one)."""
    max_inflight_uploads: int = 8
    upload_min_rate: float = DEFAULT_UPLOAD_MIN_RATE
    """Bytes a second a client's granted upload must keep up, on average, to keep its slot."""
    upload_start_timeout: float = DEFAULT_UPLOAD_START_TIMEOUT
    """Seconds a grant allows on top of its bytes at ``upload_min_rate`` (latency)."""
    fold_workers: int = 0
    max_connections: int = 2048
    max_connections_per_client: int = DEFAULT_MAX_CONNECTIONS_PER_PEER
    """Connections at once per client certificate (0 = no cap): 2 lets a reconnecting
    client overlap its old connection; one certificate cannot take every slot."""
    receive_buffer: int = SERVER_RECEIVE_BUFFER
    resume_grace: float = 30.0
    handshake_timeout: float = 30.0
    idle_timeout: float = 120.0
    heartbeat_interval: float = 15.0
    forward_margin: float = 0.1
    """Share of a round's remaining time kept for forwarding the sum (at least 2 s)."""
    reconnect_attempts: int | None = None
    """Failed connects to the upstream in a row before giving up (default: never)."""
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    allowed_clients: tuple[str, ...] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        try:
            parse_server(self.upstream)
        except ConfigError:
            raise ConfigError(f"upstream must be HOST:PORT, got {self.upstream!r}") from None
        _require(1 <= self.port <= 65535 or self.port == 0, "port", "0..65535", self.port)
        if self.metrics_port is not None:
            _require(0 <= self.metrics_port <= 65535, "metrics_port", "0..65535", self.metrics_port)
        _require(
            not self.name or bool(_NAME.fullmatch(self.name)),
            "name",
            "letters, digits, '.', '_' or '-' (at most 64)",
            self.name,
        )
        if self.clients_per_round is not None:
            _require(
                self.clients_per_round >= 1, "clients_per_round", ">= 1", self.clients_per_round
            )
        _require(
            self.max_inflight_uploads >= 1,
            "max_inflight_uploads",
            ">= 1",
            self.max_inflight_uploads,
        )
        check_upload_pace(self)
        _require(self.fold_workers >= 0, "fold_workers", ">= 0", self.fold_workers)
        _require(self.max_connections >= 1, "max_connections", ">= 1", self.max_connections)
        _require(
            type(self.max_connections_per_client) is int and self.max_connections_per_client >= 0,
            "max_connections_per_client",
            "an int >= 0 (0 = no cap)",
            self.max_connections_per_client,
        )
        for name in ("handshake_timeout", "idle_timeout", "heartbeat_interval", "backoff_base"):
            value = getattr(self, name)
            _require(math.isfinite(value) and value > 0, name, "> 0 seconds", value)
        _require(
            self.backoff_max >= self.backoff_base,
            "backoff_max",
            f">= backoff_base ({self.backoff_base})",
            self.backoff_max,
        )
        _require(
            self.heartbeat_interval < self.idle_timeout,
            "heartbeat_interval",
            f"< idle_timeout ({self.idle_timeout})",
            self.heartbeat_interval,
        )
        _require(self.resume_grace >= 0, "resume_grace", ">= 0 seconds", self.resume_grace)
        _require(0 <= self.forward_margin < 1, "forward_margin", "in [0, 1)", self.forward_margin)
        if self.reconnect_attempts is not None:
            _require(
                self.reconnect_attempts >= 0, "reconnect_attempts", ">= 0", self.reconnect_attempts
            )

    @property
    def upload_pace(self) -> UploadPace:
        """The minimum pace that keeps a client's granted upload its slot."""
        return UploadPace(min_rate=self.upload_min_rate, start_timeout=self.upload_start_timeout)

    @property
    def instance_name(self) -> str:
        """The name sent upstream: ``name``, else this host's name (made safe)."""
        if self.name:
            return self.name
        host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname()).lstrip("._-")
        return (host or "relay")[:64]

    @property
    def upstream_address(self) -> tuple[str, int]:
        """The upstream as (host, port)."""
        return parse_server(self.upstream)

    @classmethod
    def from_toml(cls, path: Path, **overrides: Any) -> RelayConfig:
        """Load a TOML file (keys = field names; a `[relay]` table is accepted too)."""
        return cls.from_mapping(load_toml_table(path, "relay", overrides))

    @classmethod
    def from_mapping(cls, data: dict[str, Any]) -> RelayConfig:
        """Build from plain values (paths as strings); unknown keys are an error."""
        values = checked_settings(cls, data, what="relay", required=_REQUIRED, paths=_PATHS)
        if values.get("allowed_clients") is not None:
            values["allowed_clients"] = tuple(values["allowed_clients"])
        try:
            return cls(**values)
        except TypeError as exc:
            raise ConfigError(f"relay settings: {exc}") from None

    def with_changes(self, **changes: Any) -> RelayConfig:
        """A copy with some fields replaced (validated again)."""
        return replace(self, **changes)


def _require(ok: bool, name: str, allowed: str, value: object) -> None:
    if not ok:
        raise ConfigError(f"relay setting {name} must be {allowed}; got {value!r}")
