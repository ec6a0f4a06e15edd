"""Typed protocol messages and their explicit msgpack-map encodings.

Each message is a frozen, keyword-only dataclass validated when built: a bad field
raises ``TypeError``/``ValueError`` naming the field and the allowed range. Each
message has one hand-written ``to_wire`` (dataclass -> plain dict) and one
``from_wire`` (dict -> dataclass); nothing is decoded by reflection. Payloads are
opaque bytes: this module knows nothing of Paillier, packing or torch, and nothing
of frames or sockets.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeAlias

from .errors import ErrorCode, InvalidMessage, UnknownMessageType

__all__ = [
    "MAX_BYTES_FIELD_LEN",
    "MAX_CHUNKS_PER_UPDATE",
    "MAX_CLIENT_ID_LEN",
    "MAX_COMMITTEE_ENTRIES",
    "MAX_CONFIG_ENTRIES",
    "MAX_CONFIG_KEY_LEN",
    "MAX_CONFIG_STR_LEN",
    "MAX_CONTRIBUTORS_LEN",
    "MAX_FEDERATION_LEN",
    "MAX_INT",
    "MAX_METRIC_ENTRIES",
    "MAX_PUBLIC_KEY_LEN",
    "MAX_REASON_LEN",
    "MAX_STATEMENT_LEN",
    "MAX_STATUS_LEN",
    "MAX_VALUE_BITS",
    "MESSAGE_TYPES",
    "PROTOCOL_VERSION",
    "SHA256_DIGEST_LEN",
    "Ack",
    "Bye",
    "ConfigValue",
    "DecryptRequest",
    "DecryptResult",
    "Error",
    "Heartbeat",
    "Hello",
    "Message",
    "RoundEnd",
    "RoundStart",
    "UnmaskRequest",
    "UnmaskResult",
    "UpdateChunk",
    "UpdateDone",
    "UploadGrant",
    "UploadRequest",
    "Welcome",
    "message_from_wire",
]

# 2: uploads wait for an UploadGrant (UploadRequest -> UploadGrant -> UpdateChunk ...).
# 3: clients pin the federation and sign a token per upload; the committee unmasks.
PROTOCOL_VERSION = 3

# Named limits. Frame-size limits live in framing.py; these bound single fields.
MAX_INT = 2**63 - 1
MAX_REASON_LEN = 1024
MAX_STATUS_LEN = 64
MAX_CLIENT_ID_LEN = 256
MAX_PUBLIC_KEY_LEN = 64 * 1024
MAX_BYTES_FIELD_LEN = 1 << 30  # weights/payloads; the frame limit is the real cap
MAX_CONFIG_ENTRIES = 256
MAX_CONFIG_KEY_LEN = 128
MAX_CONFIG_STR_LEN = 4096
MAX_METRIC_ENTRIES = 256
MAX_CHUNKS_PER_UPDATE = 1_000_000
MAX_VALUE_BITS = 64
SHA256_DIGEST_LEN = 32
# Signed statements (committee credentials, contributor tokens) are opaque bytes here.
MAX_STATEMENT_LEN = 16 * 1024
MAX_COMMITTEE_ENTRIES = 16
# A packed list of contributor tokens: one per contributor of a round.
MAX_CONTRIBUTORS_LEN = 64 * 1024 * 1024
MAX_FEDERATION_LEN = 64 * 1024

ConfigValue: TypeAlias = int | float | str | bool


# --------------------------------------------------------------------------- checks


def _int(name: str, value: object, lo: int = 0, hi: int = MAX_INT) -> None:
    if type(value) is not int:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")


def _float(obj: object, name: str, value: object, lo: float = -math.inf) -> None:
    # ints are accepted (msgpack may carry 1 for 1.0) and stored as float
    if type(value) is int:
        value = float(value)
        object.__setattr__(obj, name, value)
    if type(value) is not float:
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not math.isfinite(value) or value < lo:
        raise ValueError(f"{name} must be a finite float >= {lo}, got {value}")


def _bool(name: str, value: object) -> None:
    if type(value) is not bool:
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def _str(name: str, value: object, max_len: int, *, nonempty: bool = False) -> None:
    if type(value) is not str:
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    if len(value) > max_len:
        raise ValueError(f"{name} must be at most {max_len} characters, got {len(value)}")
    if nonempty and not value:
        raise ValueError(f"{name} must not be empty")


def _bytes(name: str, value: object, max_len: int, exact_len: int | None = None) -> None:
    if type(value) is not bytes:
        raise TypeError(f"{name} must be bytes, got {type(value).__name__}")
    if exact_len is not None and len(value) != exact_len:
        raise ValueError(f"{name} must be exactly {exact_len} bytes, got {len(value)}")
    if len(value) > max_len:
        raise ValueError(f"{name} must be at most {max_len} bytes, got {len(value)}")


def _bytes_tuple(obj: object, name: str, value: object, max_items: int, max_len: int) -> None:
    if not isinstance(value, list | tuple):
        raise TypeError(f"{name} must be a list of bytes, got {type(value).__name__}")
    if len(value) > max_items:
        raise ValueError(f"{name} must have at most {max_items} entries, got {len(value)}")
    for index, item in enumerate(value):
        _bytes(f"{name}[{index}]", item, max_len)
    object.__setattr__(obj, name, tuple(value))


def _config(obj: object, name: str, value: object) -> None:
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a dict[str, int|float|str|bool]")
    if len(value) > MAX_CONFIG_ENTRIES:
        raise ValueError(f"{name} must have at most {MAX_CONFIG_ENTRIES} entries")
    for key, item in value.items():
        _str(f"{name} key", key, MAX_CONFIG_KEY_LEN, nonempty=True)
        if type(item) is float:
            if not math.isfinite(item):
                raise ValueError(f"{name}[{key!r}] must be finite, got {item}")
        elif type(item) is int:
            _int(f"{name}[{key!r}]", item, -MAX_INT, MAX_INT)
        elif type(item) is str:
            _str(f"{name}[{key!r}]", item, MAX_CONFIG_STR_LEN)
        elif type(item) is not bool:
            raise TypeError(f"{name}[{key!r}] must be int, float, str or bool")
    # a private copy: the message is frozen, the caller's dict is not
    object.__setattr__(obj, name, dict(value))


def _metrics(obj: object, name: str, value: object) -> None:
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a dict[str, float]")
    if len(value) > MAX_METRIC_ENTRIES:
        raise ValueError(f"{name} must have at most {MAX_METRIC_ENTRIES} entries")
    copy: dict[str, float] = {}
    for key, item in value.items():
        _str(f"{name} key", key, MAX_CONFIG_KEY_LEN, nonempty=True)
        if type(item) is int:
            item = float(item)
        if type(item) is not float:
            raise TypeError(f"{name}[{key!r}] must be a float")
        if not math.isfinite(item):
            raise ValueError(f"{name}[{key!r}] must be finite, got {item}")
        copy[key] = item
    object.__setattr__(obj, name, copy)


def _fields(
    wire: Mapping[str, Any], cls: type, required: tuple[str, ...], optional: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Pick exactly the known keys from a wire map; unknown or missing keys are invalid."""
    name = cls.__name__
    for key in wire:
        if key not in required and key not in optional:
            raise InvalidMessage(f"{name}: unexpected field {key!r}")
    for key in required:
        if key not in wire:
            raise InvalidMessage(f"{name}: missing field {key!r}")
    return dict(wire)


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True, kw_only=True, slots=True)
class Hello:
    """Client -> aggregator: first message on a connection.

    ``committee`` is a key holder's signed committee credential (empty for a client
    that does not hold the private key). Nothing about the client's data is sent.
    """

    type_id: ClassVar[int] = 1
    version: int
    committee: bytes = b""

    def __post_init__(self) -> None:
        _int("version", self.version, 0, 255)
        _bytes("committee", self.committee, MAX_STATEMENT_LEN)

    def to_wire(self) -> dict[str, Any]:
        """The msgpack map for this message."""
        return {"version": self.version, "committee": self.committee}

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> Hello:
        """Build from a decoded msgpack map (raises ``InvalidMessage``)."""
        f = _fields(wire, cls, ("version",), ("committee",))
        return cls(version=f["version"], committee=f.get("committee", b""))


@dataclass(frozen=True, kw_only=True, slots=True)
class Welcome:
    """Aggregator -> client: handshake answer with the federation and session settings.

    ``federation`` is the federation document (public key and the parameters that
    decide what a sum reveals), which the client compares with the one it pinned.
    """

    type_id: ClassVar[int] = 2
    version: int
    client_id: str
    federation: bytes
    session_config: dict[str, ConfigValue]

    def __post_init__(self) -> None:
        _int("version", self.version, 0, 255)
        _str("client_id", self.client_id, MAX_CLIENT_ID_LEN, nonempty=True)
        _bytes("federation", self.federation, MAX_FEDERATION_LEN)
        _config(self, "session_config", self.session_config)

    def to_wire(self) -> dict[str, Any]:
        """The msgpack map for this message."""
        return {
            "version": self.version,
            "client_id": self.client_id,
            "federation": self.federation,
            "session_config": self.session_config,
        }

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> Welcome:
        """Build from a decoded msgpack map (raises ``InvalidMessage``)."""
        f = _fields(wire, cls, ("version", "client_id", "federation", "session_config"))
        return cls(
            version=f["version"],
            client_id=f["client_id"],
            federation=f["federation"],
            session_config=f["session_config"],
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class RoundStart:
    """Aggregator -> client: train on these weights and upload an update.

    ``chunks_received`` is how many chunks of this round's upload the aggregator
    already holds from this client (non-zero when resuming after a reconnect).
    ``committee`` carries the signed credentials of the round's unmaskers.
    """

    type_id: ClassVar[int] = 3
    round_id: int
    weights: bytes
    clip: float
    value_bits: int
    deadline_s: float
    chunks_received: int = 0
    config: dict[str, ConfigValue] = field(default_factory=dict)
    committee: tuple[bytes, ...] = ()

    def __post_init__(self) -> None:
        _int("round_id", self.round_id)
        _bytes("weights", self.weights, MAX_BYTES_FIELD_LEN)
        _float(self, "clip", self.clip, 0.0)
        if self.clip <= 0.0:
            raise ValueError(f"clip must be > 0, got {self.clip}")
        _int("value_bits", self.value_bits, 1, MAX_VALUE_BITS)
        _float(self, "deadline_s", self.deadline_s, 0.0)
        _int("chunks_received", self.chunks_received, 0, MAX_CHUNKS_PER_UPDATE)
        _config(self, "config", self.config)
        _bytes_tuple(self, "committee", self.committee, MAX_COMMITTEE_ENTRIES, MAX_STATEMENT_LEN)

    def to_wire(self) -> dict[str, Any]:
        """The msgpack map for this message."""
        return {
            "round_id": self.round_id,
            "weights": self.weights,
            "clip": self.clip,
            "value_bits": self.value_bits,
            "deadline_s": self.deadline_s,
            "chunks_received": self.chunks_received,
            "config": self.config,
            "committee": list(self.committee),
        }

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> RoundStart:
        """Build from a decoded msgpack map (raises ``InvalidMessage``)."""
        f = _fields(
            wire,
            cls,
            ("round_id", "weights", "clip", "value_bits", "deadline_s"),
            ("chunks_received", "config", "committee"),
        )
        return cls(
            round_id=f["round_id"],
            weights=f["weights"],
            clip=f["clip"],
            value_bits=f["value_bits"],
            deadline_s=f["deadline_s"],
            chunks_received=f.get("chunks_received", 0),
            config=f.get("config", {}),
            committee=f.get("committee", ()),
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class UploadRequest:
    """Client -> aggregator: my update for ``round_id`` is ready; tell me when to send it.

    Nothing is streamed before the :class:`UploadGrant`, so an aggregator with a cap on
    concurrent uploads never buffers the clients that are waiting for a slot.
    """

    type_id: ClassVar[int] = 13
    round_id: int

    def __post_init__(self) -> None:
        _int("round_id", self.round_id)

    def to_wire(self) -> dict[str, Any]:
        """The msgpack map for this message."""
        return {"round_id": self.round_id}

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> UploadRequest:
        """Build from a decoded msgpack map (raises ``InvalidMessage``)."""
        f = _fields(wire, cls, ("round_id",))
        return cls(round_id=f["round_id"])


@dataclass(frozen=True, kw_only=True, slots=True)
class UploadGrant:
    """Aggregator -> client: send the update now, from chunk ``start_seq`` on.

    ``start_seq`` is how many chunks of this round's upload the aggregator already holds
    (non-zero when resuming after a reconnect).
    """

    type_id: ClassVar[int] = 14
    round_id: int
    start_seq: int = 0

    def __post_init__(self) -> None:
        _int("round_id", self.round_id)
        _int("start_seq", self.start_seq, 0, MAX_CHUNKS_PER_UPDATE)

    def to_wire(self) -> dict[str, Any]:
        """The msgpack map for this message."""
        return {"round_id": self.round_id, "start_seq": self.start_seq}

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> UploadGrant:
        """Build from a decoded msgpack map (raises ``InvalidMessage``)."""
        f = _fields(wire, cls, ("round_id",), ("start_seq",))
        return cls(round_id=f["round_id"], start_seq=f.get("start_seq", 0))


@dataclass(frozen=True, kw_only=True, slots=True)
class UpdateChunk:
    """Client -> aggregator: one chunk of an encrypted update; ``seq`` counts from 0."""

    type_id: ClassVar[int] = 4
    round_id: int
    seq: int
    payload: bytes

    def __post_init__(self) -> None:
        _int("round_id", self.round_id)
        _int("seq", self.seq, 0, MAX_CHUNKS_PER_UPDATE - 1)
        _bytes("payload", self.payload, MAX_BYTES_FIELD_LEN)

    def to_wire(self) -> dict[str, Any]:
        """The msgpack map for this message."""
        return {"round_id": self.round_id, "seq": self.seq, "payload": self.payload}

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> UpdateChunk:
        """Build from a decoded msgpack map (raises ``InvalidMessage``)."""
        f = _fields(wire, cls, ("round_id", "seq", "payload"))
        return cls(round_id=f["round_id"], seq=f["seq"], payload=f["payload"])


@dataclass(frozen=True, kw_only=True, slots=True)
class UpdateDone:
    """Client -> aggregator: the upload is complete (count, sha256 digest, signed token).

    ``token`` is the client's signed contributor token (empty in plaintext federations);
    ``timings`` and ``metrics`` carry operational figures only (seconds per phase,
    local iterations), nothing about the client's data.
    """

    type_id: ClassVar[int] = 5
    round_id: int
    chunk_count: int
    item_count: int
    digest: bytes
    token: bytes = b""
    timings: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _int("round_id", self.round_id)
        _int("chunk_count", self.chunk_count, 0, MAX_CHUNKS_PER_UPDATE)
        _int("item_count", self.item_count)
        _bytes("digest", self.digest, SHA256_DIGEST_LEN, SHA256_DIGEST_LEN)
        _bytes("token", self.token, MAX_STATEMENT_LEN)
        _metrics(self, "timings", self.timings)
        _metrics(self, "metrics", self.metrics)

    def to_wire(self) -> dict[str, Any]:
        """The msgpack map for this message."""
        return {
            "round_id": self.round_id,
            "chunk_count": self.chunk_count,
            "item_count": self.item_count,
            "digest": self.digest,
            "token": self.token,
            "timings": self.timings,
            "metrics": self.metrics,
        }

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> UpdateDone:
        """Build from a decoded msgpack map (raises ``InvalidMessage``)."""
        f = _fields(
            wire,
            cls,
            ("round_id", "chunk_count", "item_count", "digest"),
            ("token", "timings", "metrics"),
        )
        return cls(
            round_id=f["round_id"],
            chunk_count=f["chunk_count"],
            item_count=f["item_count"],
            digest=f["digest"],
            token=f.get("token", b""),
            timings=f.get("timings", {}),
            metrics=f.get("metrics", {}),
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class Ack:
    """Aggregator -> client: the update for ``round_id`` was accepted or refused."""

    type_id: ClassVar[int] = 6
    round_id: int
    accepted: bool
    reason: str = ""

    def __post_init__(self) -> None:
        _int("round_id", self.round_id)
        _bool("accepted", self.accepted)
        _str("reason", self.reason, MAX_REASON_LEN)

    def to_wire(self) -> dict[str, Any]:
        """The msgpack map for this message."""
        return {"round_id": self.round_id, "accepted": self.accepted, "reason": self.reason}

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> Ack:
        """Build from a decoded msgpack map (raises ``InvalidMessage``)."""
        f = _fields(wire, cls, ("round_id", "accepted"), ("reason",))
        return cls(round_id=f["round_id"], accepted=f["accepted"], reason=f.get("reason", ""))


@dataclass(frozen=True, kw_only=True, slots=True)
class RoundEnd:
    """Aggregator -> client: the round is over for this client.

    ``status`` is a short word such as ``completed``, ``failed`` or ``closed``.
    """

    type_id: ClassVar[int] = 7
    round_id: int
    status: str
    reason: str = ""

    def __post_init__(self) -> None:
        _int("round_id", self.round_id)
        _str("status", self.status, MAX_STATUS_LEN, nonempty=True)
        _str("reason", self.reason, MAX_REASON_LEN)

    def to_wire(self) -> dict[str, Any]:
        """The msgpack map for this message."""
        return {"round_id": self.round_id, "status": self.status, "reason": self.reason}

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> RoundEnd:
        """Build from a decoded msgpack map (raises ``InvalidMessage``)."""
        f = _fields(wire, cls, ("round_id", "status"), ("reason",))
        return cls(round_id=f["round_id"], status=f["status"], reason=f.get("reason", ""))


@dataclass(frozen=True, kw_only=True, slots=True)
class DecryptRequest:
    """Aggregator -> key holder: decrypt summed ciphertexts ``[start, start + item_count)``.

    ``contributors`` is the packed list of the round's contributor tokens: the member
    decrypts only for a named set of at least the federation's quorum.
    """

    type_id: ClassVar[int] = 8
    round_id: int
    shard_id: int
    start: int
    item_count: int
    payload: bytes
    contributors: bytes

    def __post_init__(self) -> None:
        _int("round_id", self.round_id)
        _int("shard_id", self.shard_id)
        _int("start", self.start)
        _int("item_count", self.item_count)
        _bytes("payload", self.payload, MAX_BYTES_FIELD_LEN)
        _bytes("contributors", self.contributors, MAX_CONTRIBUTORS_LEN)

    def to_wire(self) -> dict[str, Any]:
        """The msgpack map for this message."""
        return {
            "round_id": self.round_id,
            "shard_id": self.shard_id,
            "start": self.start,
            "item_count": self.item_count,
            "payload": self.payload,
            "contributors": self.contributors,
        }

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> DecryptRequest:
        """Build from a decoded msgpack map (raises ``InvalidMessage``)."""
        f = _fields(
            wire,
            cls,
            ("round_id", "shard_id", "start", "item_count", "payload", "contributors"),
        )
        return cls(
            round_id=f["round_id"],
            shard_id=f["shard_id"],
            start=f["start"],
            item_count=f["item_count"],
            payload=f["payload"],
            contributors=f["contributors"],
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class DecryptResult:
    """Key-holding client -> aggregator: the plaintexts of one shard."""

    type_id: ClassVar[int] = 9
    round_id: int
    shard_id: int
    item_count: int
    payload: bytes
    seconds: float

    def __post_init__(self) -> None:
        _int("round_id", self.round_id)
        _int("shard_id", self.shard_id)
        _int("item_count", self.item_count)
        _bytes("payload", self.payload, MAX_BYTES_FIELD_LEN)
        _float(self, "seconds", self.seconds, 0.0)

    def to_wire(self) -> dict[str, Any]:
        """The msgpack map for this message."""
        return {
            "round_id": self.round_id,
            "shard_id": self.shard_id,
            "item_count": self.item_count,
            "payload": self.payload,
            "seconds": self.seconds,
        }

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> DecryptResult:
        """Build from a decoded msgpack map (raises ``InvalidMessage``)."""
        f = _fields(wire, cls, ("round_id", "shard_id", "item_count", "payload", "seconds"))
        return cls(
            round_id=f["round_id"],
            shard_id=f["shard_id"],
            item_count=f["item_count"],
            payload=f["payload"],
            seconds=f["seconds"],
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class UnmaskRequest:
    """Aggregator -> unmasker: remove the named contributors' masks from a decrypted range.

    ``payload`` holds the decrypted (still masked) sums of ``[start, start + item_count)``
    as fixed-width integers; ``contributors`` the packed signed tokens. The unmasker
    answers for one contributor set per model version, only for a quorum, and only
    when the unmasked values decode.
    """

    type_id: ClassVar[int] = 15
    round_id: int
    shard_id: int
    start: int
    item_count: int
    contributors: bytes
    payload: bytes

    def __post_init__(self) -> None:
        _int("round_id", self.round_id)
        _int("shard_id", self.shard_id)
        _int("start", self.start)
        _int("item_count", self.item_count)
        _bytes("contributors", self.contributors, MAX_CONTRIBUTORS_LEN)
        _bytes("payload", self.payload, MAX_BYTES_FIELD_LEN)

    def to_wire(self) -> dict[str, Any]:
        """The msgpack map for this message."""
        return {
            "round_id": self.round_id,
            "shard_id": self.shard_id,
            "start": self.start,
            "item_count": self.item_count,
            "contributors": self.contributors,
            "payload": self.payload,
        }

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> UnmaskRequest:
        """Build from a decoded msgpack map (raises ``InvalidMessage``)."""
        f = _fields(
            wire,
            cls,
            ("round_id", "shard_id", "start", "item_count", "contributors", "payload"),
        )
        return cls(
            round_id=f["round_id"],
            shard_id=f["shard_id"],
            start=f["start"],
            item_count=f["item_count"],
            contributors=f["contributors"],
            payload=f["payload"],
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class UnmaskResult:
    """Unmasker -> aggregator: the unmasked sums of one range, as fixed-width integers."""

    type_id: ClassVar[int] = 16
    round_id: int
    shard_id: int
    item_count: int
    payload: bytes
    seconds: float

    def __post_init__(self) -> None:
        _int("round_id", self.round_id)
        _int("shard_id", self.shard_id)
        _int("item_count", self.item_count)
        _bytes("payload", self.payload, MAX_BYTES_FIELD_LEN)
        _float(self, "seconds", self.seconds, 0.0)

    def to_wire(self) -> dict[str, Any]:
        """The msgpack map for this message."""
        return {
            "round_id": self.round_id,
            "shard_id": self.shard_id,
            "item_count": self.item_count,
            "payload": self.payload,
            "seconds": self.seconds,
        }

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> UnmaskResult:
        """Build from a decoded msgpack map (raises ``InvalidMessage``)."""
        f = _fields(wire, cls, ("round_id", "shard_id", "item_count", "payload", "seconds"))
        return cls(
            round_id=f["round_id"],
            shard_id=f["shard_id"],
            item_count=f["item_count"],
            payload=f["payload"],
            seconds=f["seconds"],
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class Heartbeat:
    """Either way: keep-alive; the transport answers and swallows these."""

    type_id: ClassVar[int] = 10
    sent_at: float

    def __post_init__(self) -> None:
        _float(self, "sent_at", self.sent_at, 0.0)

    def to_wire(self) -> dict[str, Any]:
        """The msgpack map for this message."""
        return {"sent_at": self.sent_at}

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> Heartbeat:
        """Build from a decoded msgpack map (raises ``InvalidMessage``)."""
        f = _fields(wire, cls, ("sent_at",))
        return cls(sent_at=f["sent_at"])


@dataclass(frozen=True, kw_only=True, slots=True)
class Error:
    """Either way: a protocol or runtime error; the connection closes after it."""

    type_id: ClassVar[int] = 11
    code: int
    reason: str

    def __post_init__(self) -> None:
        if not isinstance(self.code, ErrorCode):
            _int("code", self.code, 0, 0xFFFF)
        try:
            object.__setattr__(self, "code", ErrorCode(self.code))
        except ValueError:
            raise ValueError(f"code must be an ErrorCode value, got {self.code}") from None
        _str("reason", self.reason, MAX_REASON_LEN)

    def to_wire(self) -> dict[str, Any]:
        """The msgpack map for this message."""
        return {"code": int(self.code), "reason": self.reason}

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> Error:
        """Build from a decoded msgpack map (raises ``InvalidMessage``)."""
        f = _fields(wire, cls, ("code", "reason"))
        return cls(code=f["code"], reason=f["reason"])


@dataclass(frozen=True, kw_only=True, slots=True)
class Bye:
    """Either way: orderly close; nothing may follow it."""

    type_id: ClassVar[int] = 12
    reason: str = ""

    def __post_init__(self) -> None:
        _str("reason", self.reason, MAX_REASON_LEN)

    def to_wire(self) -> dict[str, Any]:
        """The msgpack map for this message."""
        return {"reason": self.reason}

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> Bye:
        """Build from a decoded msgpack map (raises ``InvalidMessage``)."""
        f = _fields(wire, cls, (), ("reason",))
        return cls(reason=f.get("reason", ""))


Message: TypeAlias = (
    Hello
    | Welcome
    | RoundStart
    | UpdateChunk
    | UpdateDone
    | UploadRequest
    | UploadGrant
    | Ack
    | RoundEnd
    | DecryptRequest
    | DecryptResult
    | UnmaskRequest
    | UnmaskResult
    | Heartbeat
    | Error
    | Bye
)

# type byte on the wire -> message class
MESSAGE_TYPES: dict[int, type[Message]] = {
    cls.type_id: cls
    for cls in (
        Hello,
        Welcome,
        RoundStart,
        UpdateChunk,
        UpdateDone,
        Ack,
        RoundEnd,
        DecryptRequest,
        DecryptResult,
        Heartbeat,
        Error,
        Bye,
        UploadRequest,
        UploadGrant,
        UnmaskRequest,
        UnmaskResult,
    )
}


def message_from_wire(type_id: int, wire: object) -> Message:
    """Decode one message body; any problem is an ``InvalidMessage`` from the peer."""
    cls = MESSAGE_TYPES.get(type_id)
    if cls is None:
        raise UnknownMessageType(f"unknown message type {type_id}")
    if not isinstance(wire, dict):
        raise InvalidMessage(f"{cls.__name__}: body must be a map, got {type(wire).__name__}")
    try:
        return cls.from_wire(wire)
    except InvalidMessage:
        raise
    except (TypeError, ValueError) as exc:
        raise InvalidMessage(f"{cls.__name__}: {exc}") from None
